// Schema of fasttrack::merge_tokens (kept identical to fasttrack/ops/merge_tokens.py;
// tests/test_registry.py compares them) and the native CPU kernel.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(fasttrack, m) {
  m.def("merge_tokens(Tensor z, Tensor? score, Tensor? proj, Tensor? metric, float keep_ratio, str reduce=\"sum\") -> (Tensor merged, Tensor target_index, Tensor source_index, Tensor assignment)");
}
