// The fasttrack library block. Each op family's schema and argument checks live in csrc/<op>.cpp
// (TORCH_LIBRARY_FRAGMENT), its CPU kernel in csrc/cpu/<op>_kernel.cpp, CUDA kernels in csrc/cuda/;
// loading the library registers them all.
// No Python here: the module init of fasttrack._C is csrc/python_module.cpp, so CMake can build the
// same sources into a plain shared library for the C++ tests.
#include <torch/library.h>

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
