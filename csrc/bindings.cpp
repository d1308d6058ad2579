// placeholder: replaced by the CPU kernel bindings
#include <pybind11/pybind11.h>
PYBIND11_MODULE(_C, m) { m.doc() = "unif2ace C++ CPU kernels"; }
