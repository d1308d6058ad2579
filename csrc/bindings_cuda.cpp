// placeholder: replaced by the CUDA kernel bindings
#include <pybind11/pybind11.h>
PYBIND11_MODULE(_C_cuda, m) { m.doc() = "unif2ace CUDA kernels"; }
