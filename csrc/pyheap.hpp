// Python-side helpers shared by the parts of pars_fast._heap (heap.cpp,
// request_queue.cpp): owned references, argument conversion, the ordered
// snapshot iterator, and the common object layout.
//
// Why the raw CPython API and not pybind11 classes for the types: a pybind11
// method call costs 300-400 ns here against 25 ns for a METH_O C function
// (see docs/BENCHMARKS.md), and vLLM's own heap does a push+pop pair in about
// 1.3 us, so pybind11 dispatch alone would eat the speed-up the queue exists
// for. pybind11 still builds the module (module.cpp).
#pragma once

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <cmath>
#include <new>
#include <utility>

#include "heap.hpp"

namespace pars {

// Owned reference (RAII). Releasing it may run Python code (__del__), so a Ref
// must not go out of scope in the middle of a heap mutation; in this code the
// core calls never run while a Ref is being destroyed.
class Ref {
 public:
  Ref() = default;
  explicit Ref(PyObject *owned) noexcept : p_(owned) {}
  Ref(const Ref &) = delete;
  Ref &operator=(const Ref &) = delete;
  Ref(Ref &&o) noexcept : p_(std::exchange(o.p_, nullptr)) {}
  Ref &operator=(Ref &&o) noexcept {
    if (this != &o) {
      Py_XDECREF(p_);
      p_ = std::exchange(o.p_, nullptr);
    }
    return *this;
  }
  ~Ref() { Py_XDECREF(p_); }
  PyObject *get() const noexcept { return p_; }
  PyObject *release() noexcept { return std::exchange(p_, nullptr); }
  explicit operator bool() const noexcept { return p_ != nullptr; }

 private:
  PyObject *p_ = nullptr;
};

// Layout shared by every type that owns an IndexedHeap, so the iterator can
// read any of them. `heap` is constructed with placement new in tp_new.
struct HeapBase {
  PyObject_HEAD
  IndexedHeap heap;
};

inline IndexedHeap &heap_of(PyObject *self) { return reinterpret_cast<HeapBase *>(self)->heap; }

// Module-level objects, created once by init_heap (single-phase init).
extern PyObject *NotQueuedError;  // subclass of KeyError and ValueError
extern PyTypeObject *HeapIterType;

// A lazy iterator over `owner`'s objects in pop order. Like vLLM's
// PriorityRequestQueue.__iter__ (a generator that copies the heap on its first
// next()), it snapshots the heap at the first next() call, so later changes to
// the heap do not affect an iteration in progress.
PyObject *new_heap_iter(PyObject *owner);

// The id stored for `o`: an exact str. A str subclass is copied to an exact
// str, so that hashing and comparing ids never runs Python code (a subclass
// could override __hash__/__eq__). New reference, or nullptr with TypeError.
inline PyObject *as_id(PyObject *o, const char *where) {
  if (PyUnicode_CheckExact(o)) {
    Py_INCREF(o);
    return o;
  }
  if (PyUnicode_Check(o)) return PyUnicode_FromObject(o);
  PyErr_Format(PyExc_TypeError, "%s: ids must be str, not %.100s", where, Py_TYPE(o)->tp_name);
  return nullptr;
}

// The cached hash of an exact str (never fails, never runs Python code).
inline Py_hash_t id_hash(PyObject *id) noexcept { return PyObject_Hash(id); }

// A real number as a double: float, int, or anything with __float__/__index__
// (NumPy scalars, ...). TypeError for other types, ValueError for NaN.
// May run Python code (__float__), so call it before touching a heap.
inline bool as_real(PyObject *o, double *out, const char *where, const char *what) {
  double v;
  if (PyFloat_CheckExact(o)) {
    v = PyFloat_AS_DOUBLE(o);
  } else if (PyLong_CheckExact(o)) {
    v = PyLong_AsDouble(o);  // OverflowError past ~1.8e308
    if (v == -1.0 && PyErr_Occurred()) return false;
  } else {
    PyNumberMethods *nb = Py_TYPE(o)->tp_as_number;
    if (nb == nullptr || (nb->nb_float == nullptr && nb->nb_index == nullptr)) {
      PyErr_Format(PyExc_TypeError, "%s: %s must be a real number, not %.100s", where, what, Py_TYPE(o)->tp_name);
      return false;
    }
    v = PyFloat_AsDouble(o);
    if (v == -1.0 && PyErr_Occurred()) return false;
  }
  if (std::isnan(v)) {
    PyErr_Format(PyExc_ValueError, "%s: %s is NaN; NaN cannot be ordered", where, what);
    return false;
  }
  *out = v;
  return true;
}

// Converts a C++ exception escaping a core call (only std::bad_alloc and
// std::length_error can) to a Python exception.
inline PyObject *set_cpp_error(const std::exception &e) {
  if (dynamic_cast<const std::bad_alloc *>(&e)) return PyErr_NoMemory();
  PyErr_SetString(PyExc_OverflowError, e.what());
  return nullptr;
}

inline bool reserve(IndexedHeap &heap, std::size_t n) {
  try {
    heap.reserve_more(n);
    return true;
  } catch (const std::exception &e) {
    set_cpp_error(e);
    return false;
  }
}

// Releases every entry of `heap`. The heap is empty before the first
// reference is dropped, so __del__ code that re-enters it finds it consistent.
inline void drain_heap(IndexedHeap &heap) noexcept {
  heap.drain([](PyObject *id, PyObject *obj) {
    Py_DECREF(id);
    Py_DECREF(obj);
  });
}

inline PyObject *check_heap(IndexedHeap &heap) {
  if (const char *problem = heap.check()) {
    PyErr_Format(PyExc_AssertionError, "pars_fast heap invariant broken: %s", problem);
    return nullptr;
  }
  Py_RETURN_NONE;
}

}  // namespace pars
