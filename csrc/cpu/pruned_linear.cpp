// Schema of fasttrack::pruned_linear (kept identical to fasttrack/ops/pruned_linear.py;
// tests/test_registry.py compares them) and the native CPU kernel.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(fasttrack, m) {
  m.def("pruned_linear(Tensor x, Tensor weight, Tensor? bias, Tensor in_index, Tensor? ln_weight=None, Tensor? ln_bias=None, float eps=1e-05, bool normalize=False) -> Tensor");
}
