// pars_fast._heap.ScoredHeap: the general indexed min-heap, its ordered
// iterator, and the NotQueuedError exception.
//
// Entries are (key, tie, seq, id, object): ordered by key, then tie, then seq
// (insertion order), so equal keys come out FIFO. Ids are str.
#include <pybind11/pybind11.h>

#include "pyheap.hpp"

namespace py = pybind11;

namespace pars {

PyObject *NotQueuedError = nullptr;
PyTypeObject *HeapIterType = nullptr;

namespace {

PyTypeObject *ScoredHeapType = nullptr;

// ---------------------------------------------------------------- iterator --

struct IterNode {
  double key, tie;
  std::uint64_t seq;
  PyObject *id;   // owned
  PyObject *obj;  // owned
};

inline bool iter_less(const IterNode &a, const IterNode &b) noexcept {
  if (a.key != b.key) return a.key < b.key;
  if (a.tie != b.tie) return a.tie < b.tie;
  return a.seq < b.seq;
}

struct HeapIter {
  PyObject_HEAD
  PyObject *owner;  // the heap, until the snapshot is taken
  std::vector<IterNode> snap;  // a min-heap (same arity as the core) of owned refs
  IterMode mode;
  bool started;
};

void iter_release_snapshot(HeapIter *it) noexcept {
  std::vector<IterNode> snap;
  snap.swap(it->snap);  // empty before any __del__ can run
  for (const IterNode &n : snap) {
    Py_DECREF(n.id);
    Py_DECREF(n.obj);
  }
}

PyObject *new_iter(PyObject *owner, IterMode mode) {
  auto *it = PyObject_GC_New(HeapIter, HeapIterType);
  if (it == nullptr) return nullptr;
  new (&it->snap) std::vector<IterNode>();
  Py_INCREF(owner);
  it->owner = owner;
  it->mode = mode;
  it->started = false;
  PyObject_GC_Track(it);
  return reinterpret_cast<PyObject *>(it);
}

bool iter_take_snapshot(HeapIter *it) {
  it->started = true;
  Ref owner(std::exchange(it->owner, nullptr));  // dropped at return, after the copy
  const IndexedHeap &heap = heap_of(owner.get());
  try {
    it->snap.reserve(heap.size());
  } catch (const std::exception &e) {
    set_cpp_error(e);
    return false;
  }
  // The core array is already a heap of the same arity: copy it as is.
  for (std::size_t pos = 0; pos < heap.size(); ++pos) {
    const Node &n = heap.node_at(pos);
    const Slot &s = heap.slot(n.slot);
    Py_INCREF(s.id);
    Py_INCREF(s.obj);
    it->snap.push_back(IterNode{n.key, n.tie, n.seq, s.id, s.obj});
  }
  return true;
}

IterNode iter_pop(std::vector<IterNode> &h) noexcept {
  const IterNode top = h[0];
  const IterNode moving = h.back();
  h.pop_back();
  const std::size_t n = h.size();
  if (n > 0) {
    std::size_t pos = 0;
    for (;;) {
      const std::size_t first = pos * kArity + 1;
      if (first >= n) break;
      const std::size_t last = first + kArity < n ? first + kArity : n;
      std::size_t best = first;
      for (std::size_t c = first + 1; c < last; ++c)
        if (iter_less(h[c], h[best])) best = c;
      if (!iter_less(h[best], moving)) break;
      h[pos] = h[best];
      pos = best;
    }
    h[pos] = moving;
  }
  return top;
}

PyObject *iter_next(PyObject *self) {
  auto *it = reinterpret_cast<HeapIter *>(self);
  if (!it->started && !iter_take_snapshot(it)) return nullptr;
  if (it->snap.empty()) return nullptr;  // StopIteration
  const IterNode n = iter_pop(it->snap);  // the iterator is consistent before any allocation
  if (it->mode == IterMode::Objects) {
    Py_DECREF(n.id);
    return n.obj;
  }
  PyObject *key = PyFloat_FromDouble(n.key);
  if (key == nullptr) {
    Py_DECREF(n.id);
    Py_DECREF(n.obj);
    return nullptr;
  }
  PyObject *item = PyTuple_New(3);
  if (item == nullptr) {
    Py_DECREF(key);
    Py_DECREF(n.id);
    Py_DECREF(n.obj);
    return nullptr;
  }
  PyTuple_SET_ITEM(item, 0, n.id);
  PyTuple_SET_ITEM(item, 1, key);
  PyTuple_SET_ITEM(item, 2, n.obj);
  return item;
}

PyObject *iter_length_hint(PyObject *self, PyObject *) {
  auto *it = reinterpret_cast<HeapIter *>(self);
  const std::size_t n = it->started ? it->snap.size() : heap_of(it->owner).size();
  return PyLong_FromSize_t(n);
}

int iter_traverse(PyObject *self, visitproc visit, void *arg) {
  auto *it = reinterpret_cast<HeapIter *>(self);
  Py_VISIT(Py_TYPE(self));
  Py_VISIT(it->owner);
  for (const IterNode &n : it->snap) Py_VISIT(n.obj);
  return 0;
}

int iter_clear(PyObject *self) {
  auto *it = reinterpret_cast<HeapIter *>(self);
  it->started = true;  // never snapshot a cleared owner: the iterator is just exhausted
  Py_CLEAR(it->owner);
  iter_release_snapshot(it);
  return 0;
}

void iter_dealloc(PyObject *self) {
  auto *it = reinterpret_cast<HeapIter *>(self);
  PyTypeObject *tp = Py_TYPE(self);
  PyObject_GC_UnTrack(self);
  iter_clear(self);
  it->snap.~vector();
  tp->tp_free(self);
  Py_DECREF(tp);
}

PyMethodDef iter_methods[] = {
    {"__length_hint__", iter_length_hint, METH_NOARGS, nullptr},
    {nullptr, nullptr, 0, nullptr},
};

PyType_Slot iter_slots[] = {
    {Py_tp_doc, const_cast<char *>("Ordered iterator over a pars_fast heap (snapshot taken at the first next())")},
    {Py_tp_iter, reinterpret_cast<void *>(PyObject_SelfIter)},
    {Py_tp_iternext, reinterpret_cast<void *>(iter_next)},
    {Py_tp_traverse, reinterpret_cast<void *>(iter_traverse)},
    {Py_tp_clear, reinterpret_cast<void *>(iter_clear)},
    {Py_tp_dealloc, reinterpret_cast<void *>(iter_dealloc)},
    {Py_tp_methods, iter_methods},
    {0, nullptr},
};

PyType_Spec iter_spec = {
    "pars_fast._heap.HeapIterator",
    sizeof(HeapIter),
    0,
    Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_DISALLOW_INSTANTIATION,
    iter_slots,
};

// -------------------------------------------------------------- ScoredHeap --

HeapBase *as_heap(PyObject *self) { return reinterpret_cast<HeapBase *>(self); }

PyObject *sh_new(PyTypeObject *type, PyObject *, PyObject *) {
  PyObject *self = type->tp_alloc(type, 0);
  if (self == nullptr) return nullptr;
  new (&as_heap(self)->heap) IndexedHeap();
  return self;
}

int sh_init(PyObject *self, PyObject *args, PyObject *kwargs) {
  static const char *kwlist[] = {nullptr};
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, ":ScoredHeap", const_cast<char **>(kwlist))) return -1;
  (void)self;
  return 0;
}

int sh_traverse(PyObject *self, visitproc visit, void *arg) {
  Py_VISIT(Py_TYPE(self));
  int err = 0;
  as_heap(self)->heap.for_each_object([&](PyObject *obj) {
    if (err == 0 && obj != nullptr) err = visit(obj, arg);
  });
  return err;
}

int sh_clear(PyObject *self) {
  drain_heap(as_heap(self)->heap);
  return 0;
}

void sh_dealloc(PyObject *self) {
  PyTypeObject *tp = Py_TYPE(self);
  PyObject_GC_UnTrack(self);
  drain_heap(as_heap(self)->heap);
  as_heap(self)->heap.~IndexedHeap();
  tp->tp_free(self);
  Py_DECREF(tp);
}

// Stages one entry; on success the heap owns `id` (stolen) and a new
// reference to obj. The caller did every Python-code step already.
PyObject *push_one(IndexedHeap &heap, Ref id, PyObject *obj, double key, double tie, const char *what) {
  const Py_hash_t hash = id_hash(id.get());
  if (!reserve(heap, 1)) return nullptr;
  if (!heap.append_unsifted(id.get(), hash, obj, key, tie)) {
    PyErr_Format(PyExc_KeyError, "%s: duplicate id %R", what, id.get());
    return nullptr;
  }
  heap.commit_unsifted(1);
  id.release();
  Py_INCREF(obj);
  Py_RETURN_NONE;
}

PyObject *sh_push(PyObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames) {
  static const char *const names[] = {"id", "key", "obj", "tie"};
  PyObject *a[4];
  if (!parse_args("ScoredHeap.push()", args, nargs, kwnames, names, 4, 3, a)) return nullptr;
  Ref id(as_id(a[0], "ScoredHeap.push()"));
  if (!id) return nullptr;
  double key, tie = 0.0;
  if (!as_real(a[1], &key, "ScoredHeap.push()", "key")) return nullptr;
  if (a[3] != nullptr && !as_real(a[3], &tie, "ScoredHeap.push()", "tie")) return nullptr;
  return push_one(as_heap(self)->heap, std::move(id), a[2], key, tie, "ScoredHeap.push()");
}

// A sequence of real numbers: a buffer (NumPy array, array.array, memoryview)
// of float or integer items is read directly; anything else goes item by item.
bool read_reals(PyObject *seq, const char *where, const char *what, std::vector<double> &out) {
  if (PyObject_CheckBuffer(seq) && !PyBytes_Check(seq) && !PyByteArray_Check(seq)) {
    Py_buffer view;
    if (PyObject_GetBuffer(seq, &view, PyBUF_FORMAT | PyBUF_STRIDES) == 0) {
      struct Release {
        Py_buffer *v;
        ~Release() { PyBuffer_Release(v); }
      } release{&view};
      const char *fmt = view.format ? view.format : "B";
      if (*fmt == '@' || *fmt == '=' || *fmt == '<') ++fmt;  // native little-endian here
      if (view.ndim != 1) {
        PyErr_Format(PyExc_ValueError, "%s: %s must be one-dimensional (got %d dimensions)", where, what, view.ndim);
        return false;
      }
      const char code = fmt[0];
      if (code != '\0' && fmt[1] == '\0' && std::strchr("dfbBhHiIlLqQ", code) != nullptr) {
        const Py_ssize_t n = view.shape[0];
        out.resize(static_cast<std::size_t>(n));
        const char *p = static_cast<const char *>(view.buf);
        for (Py_ssize_t i = 0; i < n; ++i, p += view.strides[0]) {
          double v;
          switch (code) {
            case 'd': v = *reinterpret_cast<const double *>(p); break;
            case 'f': v = *reinterpret_cast<const float *>(p); break;
            case 'b': v = *reinterpret_cast<const signed char *>(p); break;
            case 'B': v = *reinterpret_cast<const unsigned char *>(p); break;
            case 'h': v = *reinterpret_cast<const short *>(p); break;
            case 'H': v = *reinterpret_cast<const unsigned short *>(p); break;
            case 'i': v = *reinterpret_cast<const int *>(p); break;
            case 'I': v = *reinterpret_cast<const unsigned int *>(p); break;
            case 'l': v = static_cast<double>(*reinterpret_cast<const long *>(p)); break;
            case 'L': v = static_cast<double>(*reinterpret_cast<const unsigned long *>(p)); break;
            case 'q': v = static_cast<double>(*reinterpret_cast<const long long *>(p)); break;
            default: v = static_cast<double>(*reinterpret_cast<const unsigned long long *>(p)); break;
          }
          if (std::isnan(v)) {
            PyErr_Format(PyExc_ValueError, "%s: %s[%zd] is NaN; NaN cannot be ordered", where, what, i);
            return false;
          }
          out[static_cast<std::size_t>(i)] = v;
        }
        return true;
      }
      // Other formats (bool, complex, records, ...) fall through to item-wise conversion.
    } else {
      PyErr_Clear();
    }
  }
  if (!PySequence_Check(seq)) {
    PyErr_Format(PyExc_TypeError, "%s: %s must be a sequence or a 1-D array, not %.100s", where, what,
                 Py_TYPE(seq)->tp_name);
    return false;
  }
  // A private copy: __float__ may run Python code that mutates the caller's list.
  Ref items(PySequence_List(seq));
  if (!items) return false;
  const Py_ssize_t n = PyList_GET_SIZE(items.get());
  out.resize(static_cast<std::size_t>(n));
  for (Py_ssize_t i = 0; i < n; ++i) {
    if (!as_real(PyList_GET_ITEM(items.get(), i), &out[static_cast<std::size_t>(i)], where, what)) return false;
  }
  return true;
}

PyObject *sh_push_many(PyObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames) {
  static const char *const names[] = {"ids", "keys", "objs", "ties"};
  const char *where = "ScoredHeap.push_many()";
  PyObject *a[4];
  if (!parse_args(where, args, nargs, kwnames, names, 4, 3, a)) return nullptr;

  // 1. Convert everything (this may run Python code) before the heap changes.
  Ref ids_fast(PySequence_Fast(a[0], ""));
  if (!ids_fast) {
    PyErr_Format(PyExc_TypeError, "%s: ids must be a sequence, not %.100s", where, Py_TYPE(a[0])->tp_name);
    return nullptr;
  }
  Ref objs_fast(PySequence_Fast(a[2], ""));
  if (!objs_fast) {
    PyErr_Format(PyExc_TypeError, "%s: objs must be a sequence, not %.100s", where, Py_TYPE(a[2])->tp_name);
    return nullptr;
  }
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(ids_fast.get());
  std::vector<Ref> ids;
  std::vector<double> keys, ties;
  try {
    ids.reserve(static_cast<std::size_t>(n));
    for (Py_ssize_t i = 0; i < n; ++i) {
      ids.emplace_back(as_id(PySequence_Fast_GET_ITEM(ids_fast.get(), i), where));
      if (!ids.back()) return nullptr;
    }
    if (!read_reals(a[1], where, "keys", keys)) return nullptr;
    if (a[3] != nullptr && a[3] != Py_None) {
      if (!read_reals(a[3], where, "ties", ties)) return nullptr;
    } else {
      ties.assign(static_cast<std::size_t>(n), 0.0);
    }
  } catch (const std::exception &e) {
    return set_cpp_error(e);
  }
  const Py_ssize_t n_objs = PySequence_Fast_GET_SIZE(objs_fast.get());
  if (static_cast<Py_ssize_t>(keys.size()) != n || n_objs != n || static_cast<Py_ssize_t>(ties.size()) != n) {
    PyErr_Format(PyExc_ValueError, "%s: ids, keys, objs (and ties) must have the same length (got %zd, %zd, %zd, %zd)",
                 where, n, static_cast<Py_ssize_t>(keys.size()), n_objs, static_cast<Py_ssize_t>(ties.size()));
    return nullptr;
  }

  // 2. Insert all or nothing; no Python code runs from here on.
  IndexedHeap &heap = as_heap(self)->heap;
  if (!reserve(heap, static_cast<std::size_t>(n))) return nullptr;
  PyObject *const *objs = PySequence_Fast_ITEMS(objs_fast.get());
  for (Py_ssize_t i = 0; i < n; ++i) {
    const std::size_t k = static_cast<std::size_t>(i);
    if (!heap.append_unsifted(ids[k].get(), id_hash(ids[k].get()), objs[i], keys[k], ties[k])) {
      heap.rollback_unsifted(k);
      PyErr_Format(PyExc_KeyError, "%s: duplicate id %R (nothing was pushed)", where, ids[k].get());
      return nullptr;
    }
  }
  heap.commit_unsifted(static_cast<std::size_t>(n));
  for (Py_ssize_t i = 0; i < n; ++i) {
    ids[static_cast<std::size_t>(i)].release();
    Py_INCREF(objs[i]);
  }
  Py_RETURN_NONE;
}

PyObject *sh_pop(PyObject *self, PyObject *) {
  IndexedHeap &heap = as_heap(self)->heap;
  if (heap.empty()) {
    PyErr_SetString(PyExc_IndexError, "pop from empty heap");
    return nullptr;
  }
  const Taken t = heap.pop();
  Py_DECREF(t.id);  // an exact str: freeing it runs no Python code
  return t.obj;
}

PyObject *sh_peek(PyObject *self, PyObject *) {
  IndexedHeap &heap = as_heap(self)->heap;
  if (heap.empty()) {
    PyErr_SetString(PyExc_IndexError, "peek from empty heap");
    return nullptr;
  }
  PyObject *obj = heap.slot(heap.top().slot).obj;
  Py_INCREF(obj);
  return obj;
}

// (id, key, obj) of the top entry, removing it if `pop`.
PyObject *top_item(PyObject *self, bool pop) {
  // Allocate first: a GC pass triggered here may run finalizers that change
  // the heap, so the top is read only afterwards.
  Ref item(PyTuple_New(3));
  if (!item) return nullptr;
  IndexedHeap &heap = as_heap(self)->heap;
  if (heap.empty()) {
    PyErr_SetString(PyExc_IndexError, pop ? "pop from empty heap" : "peek from empty heap");
    return nullptr;
  }
  PyObject *key = PyFloat_FromDouble(heap.top().key);  // floats are not GC-tracked: no finalizers run
  if (key == nullptr) return nullptr;
  PyObject *id, *obj;
  if (pop) {
    const Taken t = heap.pop();
    id = t.id;
    obj = t.obj;
  } else {
    const Slot &s = heap.slot(heap.top().slot);
    id = s.id;
    obj = s.obj;
    Py_INCREF(id);
    Py_INCREF(obj);
  }
  PyTuple_SET_ITEM(item.get(), 0, id);
  PyTuple_SET_ITEM(item.get(), 1, key);
  PyTuple_SET_ITEM(item.get(), 2, obj);
  return item.release();
}

PyObject *sh_popitem(PyObject *self, PyObject *) { return top_item(self, true); }
PyObject *sh_peekitem(PyObject *self, PyObject *) { return top_item(self, false); }

// Looks an id up; sets NotQueuedError (a KeyError) when absent.
std::uint32_t find_or_raise(IndexedHeap &heap, PyObject *id, const char *where) {
  const std::uint32_t s = heap.find(id, id_hash(id));
  if (s == kNoSlot) PyErr_Format(NotQueuedError, "%s: id %R is not in the heap", where, id);
  return s;
}

PyObject *sh_remove(PyObject *self, PyObject *arg) {
  Ref id(as_id(arg, "ScoredHeap.remove()"));
  if (!id) return nullptr;
  IndexedHeap &heap = as_heap(self)->heap;
  const std::uint32_t s = find_or_raise(heap, id.get(), "ScoredHeap.remove()");
  if (s == kNoSlot) return nullptr;
  const Taken t = heap.erase_slot(s);
  Py_DECREF(t.id);
  return t.obj;  // the caller's reference now: no __del__ runs inside the heap
}

PyObject *sh_update(PyObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames) {
  static const char *const names[] = {"id", "key", "tie"};
  const char *where = "ScoredHeap.update()";
  PyObject *a[3];
  if (!parse_args(where, args, nargs, kwnames, names, 3, 2, a)) return nullptr;
  Ref id(as_id(a[0], where));
  if (!id) return nullptr;
  double key, tie = 0.0;
  if (!as_real(a[1], &key, where, "key")) return nullptr;
  const bool new_tie = a[2] != nullptr && a[2] != Py_None;
  if (new_tie && !as_real(a[2], &tie, where, "tie")) return nullptr;
  IndexedHeap &heap = as_heap(self)->heap;
  const std::uint32_t s = find_or_raise(heap, id.get(), where);
  if (s == kNoSlot) return nullptr;
  if (!new_tie) tie = heap.node_of(s).tie;
  heap.update(s, key, tie);
  Py_RETURN_NONE;
}

int sh_contains(PyObject *self, PyObject *arg) {
  if (!PyUnicode_Check(arg)) return 0;  // ids are str: nothing else can be in the heap
  Ref id(as_id(arg, "ScoredHeap.__contains__()"));
  if (!id) return -1;
  return as_heap(self)->heap.find(id.get(), id_hash(id.get())) != kNoSlot;
}

PyObject *sh_contains_method(PyObject *self, PyObject *arg) {
  const int r = sh_contains(self, arg);
  if (r < 0) return nullptr;
  return PyBool_FromLong(r);
}

PyObject *sh_key_of(PyObject *self, PyObject *arg) {
  Ref id(as_id(arg, "ScoredHeap.key_of()"));
  if (!id) return nullptr;
  IndexedHeap &heap = as_heap(self)->heap;
  const std::uint32_t s = find_or_raise(heap, id.get(), "ScoredHeap.key_of()");
  if (s == kNoSlot) return nullptr;
  return PyFloat_FromDouble(heap.node_of(s).key);
}

PyObject *sh_clear_method(PyObject *self, PyObject *) {
  drain_heap(as_heap(self)->heap);
  Py_RETURN_NONE;
}

PyObject *sh_items(PyObject *self, PyObject *) { return new_heap_iter(self, IterMode::Items); }
PyObject *sh_iter(PyObject *self) { return new_heap_iter(self, IterMode::Objects); }
Py_ssize_t sh_len(PyObject *self) { return static_cast<Py_ssize_t>(as_heap(self)->heap.size()); }
PyObject *sh_check(PyObject *self, PyObject *) { return check_heap(as_heap(self)->heap); }

PyObject *sh_repr(PyObject *self) {
  return PyUnicode_FromFormat("<%s with %zd entries>", Py_TYPE(self)->tp_name, sh_len(self));
}

PyMethodDef sh_methods[] = {
    {"push", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(sh_push)), METH_FASTCALL | METH_KEYWORDS,
     R"pbdoc(push(id, key, obj, tie=0.0) -> None

Insert obj under the str id with sort key (key, tie). O(log n).
KeyError if id is already present, ValueError for a NaN key or tie,
TypeError for a non-str id or a non-real key.)pbdoc"},
    {"push_many", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(sh_push_many)),
     METH_FASTCALL | METH_KEYWORDS,
     R"pbdoc(push_many(ids, keys, objs, ties=None) -> None

Insert a batch, all or nothing: on any error nothing is inserted.
keys and ties may be sequences or 1-D NumPy arrays (any float or int dtype).
Equal keys keep the batch order. O(m log n), or O(n + m) for big batches.)pbdoc"},
    {"pop", sh_pop, METH_NOARGS,
     R"pbdoc(pop() -> obj

Remove and return the object with the smallest key. IndexError if empty.)pbdoc"},
    {"peek", sh_peek, METH_NOARGS,
     R"pbdoc(peek() -> obj

Return the object with the smallest key without removing it. IndexError if empty.)pbdoc"},
    {"popitem", sh_popitem, METH_NOARGS, "popitem() -> (id, key, obj)\n\nLike pop(), with the id and key."},
    {"peekitem", sh_peekitem, METH_NOARGS, "peekitem() -> (id, key, obj)\n\nLike peek(), with the id and key."},
    {"remove", sh_remove, METH_O,
     R"pbdoc(remove(id) -> obj

Remove the entry with this id and return its object. O(log n).
NotQueuedError (a KeyError) if the id is not present.)pbdoc"},
    {"update", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(sh_update)), METH_FASTCALL | METH_KEYWORDS,
     R"pbdoc(update(id, key, tie=None) -> None

Change an entry's key (and tie, unless None) in place. O(log n).
The entry keeps its insertion order among equal keys.
NotQueuedError (a KeyError) if the id is not present.)pbdoc"},
    {"contains", sh_contains_method, METH_O, "contains(id) -> bool\n\nWhether an entry with this id is present. O(1)."},
    {"key_of", sh_key_of, METH_O, "key_of(id) -> float\n\nThe key stored for id. NotQueuedError if absent."},
    {"items", sh_items, METH_NOARGS,
     "items() -> iterator of (id, key, obj)\n\nEntries in pop order, from a snapshot taken at the first next()."},
    {"clear", sh_clear_method, METH_NOARGS, "clear() -> None\n\nRemove every entry."},
    {"_check", sh_check, METH_NOARGS, "_check() -> None\n\nVerify internal invariants (for tests); AssertionError if broken."},
    {nullptr, nullptr, 0, nullptr},
};

PyType_Slot sh_slots[] = {
    {Py_tp_doc, const_cast<char *>(R"pbdoc(ScoredHeap()

Indexed min-heap of (key, tie, seq, id, obj) entries.

Entries come out in ascending (key, tie) order; equal keys come out in
insertion order (seq). Ids are str and unique. An id index makes push, pop,
remove(id), update(id, key) O(log n), and peek, contains(id) O(1).
Iteration (iter(), items()) yields entries in pop order without changing the
heap. The heap holds a reference to each object and takes part in cyclic GC.)pbdoc")},
    {Py_tp_new, reinterpret_cast<void *>(sh_new)},
    {Py_tp_init, reinterpret_cast<void *>(sh_init)},
    {Py_tp_dealloc, reinterpret_cast<void *>(sh_dealloc)},
    {Py_tp_traverse, reinterpret_cast<void *>(sh_traverse)},
    {Py_tp_clear, reinterpret_cast<void *>(sh_clear)},
    {Py_tp_iter, reinterpret_cast<void *>(sh_iter)},
    {Py_tp_repr, reinterpret_cast<void *>(sh_repr)},
    {Py_sq_length, reinterpret_cast<void *>(sh_len)},
    {Py_sq_contains, reinterpret_cast<void *>(sh_contains)},
    {Py_tp_methods, sh_methods},
    {0, nullptr},
};

PyType_Spec sh_spec = {
    "pars_fast._heap.ScoredHeap",
    sizeof(HeapBase),
    0,
    Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    sh_slots,
};

py::object type_from_spec(PyType_Spec *spec) {
  PyObject *t = PyType_FromSpec(spec);
  if (t == nullptr) throw py::error_already_set();
  return py::reinterpret_steal<py::object>(t);
}

}  // namespace

PyObject *new_heap_iter(PyObject *owner, IterMode mode) { return new_iter(owner, mode); }

}  // namespace pars

void init_heap(py::module_ &m) {
  using namespace pars;
  py::object exc_bases = py::make_tuple(py::handle(PyExc_KeyError), py::handle(PyExc_ValueError));
  NotQueuedError = PyErr_NewExceptionWithDoc(
      "pars_fast._heap.NotQueuedError",
      "An id or request is not in the heap/queue. A KeyError (unknown key) and a ValueError "
      "(what vLLM's queues raise from remove_request, via list.remove / deque.remove).",
      exc_bases.ptr(), nullptr);
  if (NotQueuedError == nullptr) throw py::error_already_set();
  m.add_object("NotQueuedError", py::reinterpret_borrow<py::object>(NotQueuedError));

  py::object iter_type = type_from_spec(&iter_spec);
  HeapIterType = reinterpret_cast<PyTypeObject *>(iter_type.ptr());
  m.add_object("HeapIterator", iter_type);

  py::object heap_type = type_from_spec(&sh_spec);
  ScoredHeapType = reinterpret_cast<PyTypeObject *>(heap_type.ptr());
  m.add_object("ScoredHeap", heap_type);
  m.attr("ARITY") = kArity;
}
