// Schema of fasttrack::topk_select, fasttrack::topk_select_qk (kept identical to fasttrack/ops/topk_select.py;
// tests/test_registry.py compares them) and the native CPU kernel.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(fasttrack, m) {
  m.def("topk_select(Tensor attn, Tensor x, Tensor query_index, Tensor? query_weight, Tensor? bonus, Tensor? global_index, int start, int length, float keep_ratio) -> (Tensor tokens, Tensor keep_index, Tensor removed_index, Tensor keep_global, Tensor removed_global)");
  m.def("topk_select_qk(Tensor q, Tensor k, Tensor x, Tensor query_index, Tensor? query_weight, Tensor? bonus, Tensor? global_index, int start, int length, float keep_ratio, float scale) -> (Tensor tokens, Tensor keep_index, Tensor removed_index, Tensor keep_global, Tensor removed_global)");
}
