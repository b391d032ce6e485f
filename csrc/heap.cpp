// The parts of pars_fast._heap shared by every heap-backed type (today only
// RequestHeap, request_queue.cpp): the ordered snapshot iterator, the
// NotQueuedError exception and the ARITY constant. The heap itself is heap.hpp.
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

PyObject *new_iter(PyObject *owner) {
  auto *it = PyObject_GC_New(HeapIter, HeapIterType);
  if (it == nullptr) return nullptr;
  new (&it->snap) std::vector<IterNode>();
  Py_INCREF(owner);
  it->owner = owner;
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
  const IterNode n = iter_pop(it->snap);  // the iterator is consistent before any reference is dropped
  Py_DECREF(n.id);  // an exact str: freeing it runs no Python code
  return n.obj;
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

py::object type_from_spec(PyType_Spec *spec) {
  PyObject *t = PyType_FromSpec(spec);
  if (t == nullptr) throw py::error_already_set();
  return py::reinterpret_steal<py::object>(t);
}

}  // namespace

PyObject *new_heap_iter(PyObject *owner) { return new_iter(owner); }

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

  m.attr("ARITY") = kArity;
}
