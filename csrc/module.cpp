// pars_fast._heap: the C++ side of pars_fast.
//   heap.hpp           IndexedHeap, the indexed 4-ary min-heap (plain C++)
//   heap.cpp           the ordered iterator, NotQueuedError, ARITY
//   request_queue.cpp  RequestHeap, the body of pars_fast.queue.ScoredRequestQueue
// pybind11 builds the module; the types use the CPython API directly for speed
// (see pyheap.hpp for why).
#include <pybind11/pybind11.h>

namespace py = pybind11;

void init_heap(py::module_ &m);
void init_request_queue(py::module_ &m);

PYBIND11_MODULE(_heap, m) {
  m.doc() = R"pbdoc(Indexed min-heap holding pars_fast's scored waiting queue.)pbdoc";
  init_heap(m);
  init_request_queue(m);
  m.attr("__version__") = PARS_FAST_VERSION;
}
