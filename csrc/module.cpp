// pars_fast._heap: the C++ side of pars_fast (see heap.cpp).
#include <pybind11/pybind11.h>

namespace py = pybind11;

void init_heap(py::module_ &m);

PYBIND11_MODULE(_heap, m) {
  m.doc() = R"pbdoc(Indexed min-heap holding pars_fast's scored waiting queue.)pbdoc";
  init_heap(m);
  m.attr("__version__") = PARS_FAST_VERSION;
}
