// fasttrack._C: the Python module object. Each op's schema and CPU kernel live in csrc/cpu/<op>.cpp
// (TORCH_LIBRARY_FRAGMENT), CUDA kernels in csrc/cuda/; loading this module registers them all.
#include <torch/library.h>
#include <Python.h>

namespace fasttrack {
bool cuda_built() {
#ifdef FASTTRACK_WITH_CUDA
  return true;
#else
  return false;
#endif
}
}  // namespace fasttrack

TORCH_LIBRARY(fasttrack, m) {
  // Fake kernels and autograd formulas are registered from Python (fasttrack/ops/).
  m.set_python_module("fasttrack.ops");
  m.def("_cuda_built() -> bool", &fasttrack::cuda_built);
}

static PyModuleDef fasttrack_C_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&fasttrack_C_module); }
