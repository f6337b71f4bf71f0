// Schema of fasttrack::gather_tokens, fasttrack::pad_scatter (kept identical to fasttrack/ops/pad_scatter.py;
// tests/test_registry.py compares them) and the native CPU kernel.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(fasttrack, m) {
  m.def("gather_tokens(Tensor x, Tensor index, str layout=\"tokens\", bool check_index=True) -> Tensor");
  m.def("pad_scatter(Tensor kept, Tensor index, int length, str layout=\"tokens\", int[] hw=[], bool check_index=True) -> Tensor");
}
