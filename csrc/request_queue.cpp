// pars_fast._heap.RequestHeap: the C++ body of pars_fast.queue.ScoredRequestQueue.
//
// vLLM 0.32's RequestQueue interface, method for method, over the indexed heap.
// Each request is stored under request.request_id with
//     key = request.priority,   tie = request.arrival_time,
// then insertion order: vLLM's (priority, arrival_time) order. The queue adds
// nothing to the priority: aging against starvation lives in the priority that
// PARSScheduler sets (pars_fast/aging.py), so that vLLM's preemption, which reads
// the same priority, agrees with the admission order.
//
// Hot methods read priority / arrival_time / request_id in C with interned
// attribute names: one Python call does one whole operation.
#include <pybind11/pybind11.h>

#include "pyheap.hpp"

namespace py = pybind11;

namespace pars {
namespace {

PyObject *s_request_id = nullptr;  // interned attribute names
PyObject *s_priority = nullptr;
PyObject *s_arrival_time = nullptr;

struct QueueObject {
  HeapBase base;  // first member: the iterator reads the heap through it
};

QueueObject *as_queue(PyObject *self) { return reinterpret_cast<QueueObject *>(self); }

const char *const kNeed =
    "expected a vLLM Request (or an object with str request_id, priority and arrival_time attributes)";

// Reads one attribute; a missing attribute becomes a TypeError that says what a
// request must look like.
PyObject *get_attr(PyObject *req, PyObject *name, const char *where) {
  PyObject *v = PyObject_GetAttr(req, name);
  if (v == nullptr && PyErr_ExceptionMatches(PyExc_AttributeError)) {
    PyErr_Clear();
    PyErr_Format(PyExc_TypeError, "%s: %s; %.100s has no attribute %R", where, kNeed, Py_TYPE(req)->tp_name, name);
  }
  return v;
}

PyObject *request_id(PyObject *req, const char *where) {
  Ref v(get_attr(req, s_request_id, where));
  if (!v) return nullptr;
  return as_id(v.get(), where);
}

// The (priority, arrival_time) a request sorts by now, as doubles (vLLM's int
// priorities are exact up to 2**53). May run Python code (properties, __float__):
// callers run it before touching the heap.
bool request_key(PyObject *req, const char *where, double *key, double *tie) {
  Ref arrival(get_attr(req, s_arrival_time, where));
  if (!arrival) return false;
  if (!as_real(arrival.get(), tie, where, "request.arrival_time")) return false;
  Ref priority(get_attr(req, s_priority, where));
  if (!priority) return false;
  return as_real(priority.get(), key, where, "request.priority");
}

// The slot of `req` if this very object is queued, else kNoSlot. With
// `raise`, sets NotQueuedError (KeyError + ValueError) when it is not.
std::uint32_t find_request(IndexedHeap &heap, PyObject *id, PyObject *req, const char *where, bool raise) {
  const std::uint32_t s = heap.find(id, id_hash(id));
  if (s != kNoSlot && heap.slot(s).obj == req) return s;
  if (raise) {
    if (s == kNoSlot)
      PyErr_Format(NotQueuedError, "%s: request %R is not in the queue", where, id);
    else
      PyErr_Format(NotQueuedError, "%s: a different request object with id %R is in the queue", where, id);
  }
  return kNoSlot;
}

// ----------------------------------------------------------------- methods --

PyObject *rq_new(PyTypeObject *type, PyObject *, PyObject *) {
  PyObject *self = type->tp_alloc(type, 0);
  if (self == nullptr) return nullptr;
  new (&as_queue(self)->base.heap) IndexedHeap();
  return self;
}

// Takes no arguments. Without this slot, object.__init__ would accept and ignore
// any (tp_new is overridden), so RequestHeap(aging_rate=0.5) would pass silently.
int rq_init(PyObject *self, PyObject *args, PyObject *kwargs) {
  if (PyTuple_GET_SIZE(args) != 0 || (kwargs != nullptr && PyDict_GET_SIZE(kwargs) != 0)) {
    PyErr_Format(PyExc_TypeError, "%.100s() takes no arguments", Py_TYPE(self)->tp_name);
    return -1;
  }
  return 0;
}

int rq_traverse(PyObject *self, visitproc visit, void *arg) {
  Py_VISIT(Py_TYPE(self));
  int err = 0;
  as_queue(self)->base.heap.for_each_object([&](PyObject *obj) {
    if (err == 0) err = visit(obj, arg);
  });
  return err;
}

int rq_clear(PyObject *self) {
  drain_heap(as_queue(self)->base.heap);
  return 0;
}

void rq_dealloc(PyObject *self) {
  PyTypeObject *tp = Py_TYPE(self);
  PyObject_GC_UnTrack(self);
  rq_clear(self);
  as_queue(self)->base.heap.~IndexedHeap();
  tp->tp_free(self);
  Py_DECREF(tp);
}

PyObject *rq_add_request(PyObject *self, PyObject *req) {
  const char *where = "ScoredRequestQueue.add_request()";
  QueueObject *q = as_queue(self);
  Ref id(request_id(req, where));
  if (!id) return nullptr;
  double key, tie;
  if (!request_key(req, where, &key, &tie)) return nullptr;
  // No Python code runs from here to the end.
  IndexedHeap &heap = q->base.heap;
  if (!reserve(heap, 1)) return nullptr;
  if (!heap.append_unsifted(id.get(), id_hash(id.get()), req, key, tie)) {
    PyErr_Format(PyExc_KeyError, "%s: a request with id %R is already queued", where, id.get());
    return nullptr;
  }
  heap.commit_unsifted(1);
  id.release();
  Py_INCREF(req);
  Py_RETURN_NONE;
}

PyObject *rq_pop_request(PyObject *self, PyObject *) {
  IndexedHeap &heap = as_queue(self)->base.heap;
  if (heap.empty()) {
    PyErr_SetString(PyExc_IndexError, "pop from empty heap");  // vLLM's message
    return nullptr;
  }
  const Taken t = heap.pop();
  Py_DECREF(t.id);  // an exact str: freeing it runs no Python code
  return t.obj;
}

PyObject *rq_peek_request(PyObject *self, PyObject *) {
  IndexedHeap &heap = as_queue(self)->base.heap;
  if (heap.empty()) {
    PyErr_SetString(PyExc_IndexError, "peek from empty heap");
    return nullptr;
  }
  PyObject *obj = heap.slot(heap.top().slot).obj;
  Py_INCREF(obj);
  return obj;
}

struct Pending {
  Ref id;
  PyObject *req;  // borrowed from `items`
  double key, tie;
};

PyObject *rq_prepend_requests(PyObject *self, PyObject *requests) {
  const char *where = "ScoredRequestQueue.prepend_requests()";
  QueueObject *q = as_queue(self);
  // Materialise first: the iterable may be a generator, or even this queue.
  Ref items(PySequence_List(requests));
  if (!items) return nullptr;
  const Py_ssize_t n = PyList_GET_SIZE(items.get());
  std::vector<Pending> batch;
  try {
    batch.reserve(static_cast<std::size_t>(n));
  } catch (const std::exception &e) {
    return set_cpp_error(e);
  }
  for (Py_ssize_t i = 0; i < n; ++i) {
    // `items` is a private list: its items stay alive while Python code runs.
    PyObject *req = PyList_GET_ITEM(items.get(), i);
    Ref id(request_id(req, where));
    if (!id) return nullptr;
    double key, tie;
    if (!request_key(req, where, &key, &tie)) return nullptr;
    batch.push_back(Pending{std::move(id), req, key, tie});
  }
  // All or nothing, with no Python code from here on.
  IndexedHeap &heap = q->base.heap;
  if (!reserve(heap, batch.size())) return nullptr;
  for (std::size_t k = 0; k < batch.size(); ++k) {
    const Pending &p = batch[k];
    if (!heap.append_unsifted(p.id.get(), id_hash(p.id.get()), p.req, p.key, p.tie)) {
      heap.rollback_unsifted(k);
      PyErr_Format(PyExc_KeyError, "%s: a request with id %R is already queued (nothing was added)", where,
                   p.id.get());
      return nullptr;
    }
  }
  heap.commit_unsifted(batch.size());
  for (Pending &p : batch) {
    p.id.release();
    Py_INCREF(p.req);
  }
  Py_RETURN_NONE;
}

PyObject *rq_remove_request(PyObject *self, PyObject *req) {
  const char *where = "ScoredRequestQueue.remove_request()";
  Ref id(request_id(req, where));
  if (!id) return nullptr;
  IndexedHeap &heap = as_queue(self)->base.heap;
  const std::uint32_t s = find_request(heap, id.get(), req, where, true);
  if (s == kNoSlot) return nullptr;
  const Taken t = heap.erase_slot(s);
  Py_DECREF(t.id);
  Py_DECREF(t.obj);  // the caller still holds `req`: this never frees it
  Py_RETURN_NONE;
}

PyObject *rq_remove_requests(PyObject *self, PyObject *requests) {
  const char *where = "ScoredRequestQueue.remove_requests()";
  Ref it(PyObject_GetIter(requests));
  if (!it) return nullptr;
  IndexedHeap &heap = as_queue(self)->base.heap;
  // Like vLLM (a set difference), requests that are not queued are ignored.
  while (PyObject *raw = PyIter_Next(it.get())) {
    Ref req(raw);
    Ref id_attr(PyObject_GetAttr(req.get(), s_request_id));
    if (!id_attr) {
      if (!PyErr_ExceptionMatches(PyExc_AttributeError)) return nullptr;
      PyErr_Clear();  // not a request, so not in the queue
      continue;
    }
    if (!PyUnicode_Check(id_attr.get())) continue;  // ids are str: cannot be queued
    Ref id(as_id(id_attr.get(), where));
    if (!id) return nullptr;
    const std::uint32_t s = find_request(heap, id.get(), req.get(), where, false);
    if (s == kNoSlot) continue;
    const Taken t = heap.erase_slot(s);
    Py_DECREF(t.id);
    Py_DECREF(t.obj);  // `req` still holds it
  }
  if (PyErr_Occurred()) return nullptr;
  Py_RETURN_NONE;
}

PyObject *rq_update_request(PyObject *self, PyObject *req) {
  const char *where = "ScoredRequestQueue.update_request()";
  QueueObject *q = as_queue(self);
  Ref id(request_id(req, where));
  if (!id) return nullptr;
  double key, tie;
  if (!request_key(req, where, &key, &tie)) return nullptr;
  IndexedHeap &heap = q->base.heap;
  const std::uint32_t s = find_request(heap, id.get(), req, where, true);
  if (s == kNoSlot) return nullptr;
  heap.update(s, key, tie);
  Py_RETURN_NONE;
}

PyObject *rq_key_of(PyObject *self, PyObject *req) {
  const char *where = "ScoredRequestQueue.key_of()";
  Ref id(request_id(req, where));
  if (!id) return nullptr;
  IndexedHeap &heap = as_queue(self)->base.heap;
  const std::uint32_t s = find_request(heap, id.get(), req, where, true);
  if (s == kNoSlot) return nullptr;
  return PyFloat_FromDouble(heap.node_of(s).key);
}

int rq_contains(PyObject *self, PyObject *req) {
  PyObject *raw = PyObject_GetAttr(req, s_request_id);
  if (raw == nullptr) {
    if (!PyErr_ExceptionMatches(PyExc_AttributeError)) return -1;
    PyErr_Clear();  // `x in queue` is False for anything that is not a request
    return 0;
  }
  Ref id_attr(raw);
  if (!PyUnicode_Check(raw)) return 0;
  Ref id(as_id(raw, "ScoredRequestQueue.__contains__()"));
  if (!id) return -1;
  return find_request(as_queue(self)->base.heap, id.get(), req, "", false) != kNoSlot;
}

PyObject *rq_clear_method(PyObject *self, PyObject *) {
  drain_heap(as_queue(self)->base.heap);
  Py_RETURN_NONE;
}

Py_ssize_t rq_len(PyObject *self) { return static_cast<Py_ssize_t>(as_queue(self)->base.heap.size()); }
int rq_bool(PyObject *self) { return !as_queue(self)->base.heap.empty(); }
PyObject *rq_iter(PyObject *self) { return new_heap_iter(self); }
PyObject *rq_check(PyObject *self, PyObject *) { return check_heap(as_queue(self)->base.heap); }

PyObject *rq_repr(PyObject *self) {
  return PyUnicode_FromFormat("<%s with %zd requests>", Py_TYPE(self)->tp_name, rq_len(self));
}

PyMethodDef rq_methods[] = {
    {"add_request", rq_add_request, METH_O,
     R"pbdoc(add_request(request) -> None

Queue a request under request.request_id, ordered by (priority, arrival_time).
O(log n). KeyError if a request with that id is already queued.)pbdoc"},
    {"pop_request", rq_pop_request, METH_NOARGS,
     "pop_request() -> Request\n\nRemove and return the first request. IndexError if empty. O(log n)."},
    {"peek_request", rq_peek_request, METH_NOARGS,
     "peek_request() -> Request\n\nThe first request, not removed. IndexError if empty. O(1)."},
    {"prepend_request", rq_add_request, METH_O,
     R"pbdoc(prepend_request(request) -> None

Same as add_request: in a priority queue a request goes where its key puts
it (as in vLLM's PriorityRequestQueue).)pbdoc"},
    {"prepend_requests", rq_prepend_requests, METH_O,
     R"pbdoc(prepend_requests(requests) -> None

Add every request of an iterable by key, all or nothing: if one fails
(duplicate id, bad attribute), none is added.)pbdoc"},
    {"remove_request", rq_remove_request, METH_O,
     R"pbdoc(remove_request(request) -> None

Remove this request object. O(log n) through the id index.
NotQueuedError (a KeyError and a ValueError, as vLLM raises ValueError) if it
is not queued.)pbdoc"},
    {"remove_requests", rq_remove_requests, METH_O,
     R"pbdoc(remove_requests(requests) -> None

Remove every request of an iterable that is queued; others are ignored,
as in vLLM. O(log n) per request.)pbdoc"},
    {"update_request", rq_update_request, METH_O,
     R"pbdoc(update_request(request) -> None

Re-read a queued request's priority and arrival_time (after either changed)
and move it; it keeps its insertion order among equal keys.
O(log n). NotQueuedError if it is not queued.)pbdoc"},
    {"key_of", rq_key_of, METH_O,
     R"pbdoc(key_of(request) -> float

The priority a queued request is stored under, as a float: request.priority as
read at its last add or update_request.)pbdoc"},
    {"clear", rq_clear_method, METH_NOARGS, "clear() -> None\n\nRemove every request."},
    {"_check", rq_check, METH_NOARGS, "_check() -> None\n\nVerify internal invariants (for tests)."},
    {nullptr, nullptr, 0, nullptr},
};

PyType_Slot rq_slots[] = {
    {Py_tp_doc, const_cast<char *>(R"pbdoc(RequestHeap()

C++ core of pars_fast.queue.ScoredRequestQueue (use that class): vLLM's
RequestQueue interface over an indexed heap. Requests come out in ascending
(request.priority, request.arrival_time) order, then insertion order.)pbdoc")},
    {Py_tp_new, reinterpret_cast<void *>(rq_new)},
    {Py_tp_init, reinterpret_cast<void *>(rq_init)},
    {Py_tp_dealloc, reinterpret_cast<void *>(rq_dealloc)},
    {Py_tp_traverse, reinterpret_cast<void *>(rq_traverse)},
    {Py_tp_clear, reinterpret_cast<void *>(rq_clear)},
    {Py_tp_iter, reinterpret_cast<void *>(rq_iter)},
    {Py_tp_repr, reinterpret_cast<void *>(rq_repr)},
    {Py_sq_length, reinterpret_cast<void *>(rq_len)},
    {Py_sq_contains, reinterpret_cast<void *>(rq_contains)},
    {Py_nb_bool, reinterpret_cast<void *>(rq_bool)},
    {Py_tp_methods, rq_methods},
    {0, nullptr},
};

PyType_Spec rq_spec = {
    "pars_fast._heap.RequestHeap",
    sizeof(QueueObject),
    0,
    Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    rq_slots,
};

}  // namespace
}  // namespace pars

void init_request_queue(py::module_ &m) {
  using namespace pars;
  s_request_id = PyUnicode_InternFromString("request_id");
  s_priority = PyUnicode_InternFromString("priority");
  s_arrival_time = PyUnicode_InternFromString("arrival_time");
  if (!s_request_id || !s_priority || !s_arrival_time) throw py::error_already_set();
  PyObject *t = PyType_FromSpec(&rq_spec);
  if (t == nullptr) throw py::error_already_set();
  m.add_object("RequestHeap", py::reinterpret_steal<py::object>(t));
}
