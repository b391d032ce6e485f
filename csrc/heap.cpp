// Placeholder until the indexed heap lands.
#include <pybind11/pybind11.h>
namespace py = pybind11;
void init_heap(py::module_ &) {}
