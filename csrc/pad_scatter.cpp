// fasttrack::gather_tokens / fasttrack::pad_scatter: schema and argument checks, shared by the CPU
// kernel (csrc/cpu/pad_scatter_kernel.cpp) and the CUDA binding (csrc/cuda/pad_scatter_binding.cpp),
// declared in fasttrack/pad_scatter.h. The schema is kept identical to fasttrack/ops/pad_scatter.py
// (tests/test_registry.py compares them). The Python wrapper runs the same checks first; these guard
// direct torch.ops calls.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>

#include <fasttrack/checks.h>
#include <fasttrack/pad_scatter.h>

TORCH_LIBRARY_FRAGMENT(fasttrack, m) {
  m.def("gather_tokens(Tensor x, Tensor index, str layout=\"tokens\", bool check_index=True) -> Tensor");
  m.def(
      "pad_scatter(Tensor kept, Tensor index, int length, str layout=\"tokens\", int[] hw=[], bool check_index=True) -> Tensor");
}

namespace fasttrack {
namespace pad_scatter {
namespace {

bool parse_layout(c10::string_view layout, const char* op) {
  TORCH_CHECK_VALUE(layout == "tokens" || layout == "nchw", "fasttrack.", op,
                    ": `layout` must be one of ('tokens', 'nchw'), got '", layout, "'");
  return layout == "nchw";
}

void check_index_meta(const at::Tensor& index, const at::Tensor& data, const char* op, const char* data_name) {
  TORCH_CHECK_TYPE(index.scalar_type() == at::kLong, "fasttrack.", op, ": `index` must have dtype int64, got ",
                   index.scalar_type());
  TORCH_CHECK_VALUE(index.dim() == 2, "fasttrack.", op, ": `index` must have 2 dims, got shape ", index.sizes());
  TORCH_CHECK_VALUE(index.device() == data.device(), "fasttrack.", op, ": `index` must be on ", data.device(),
                    " (like `", data_name, "`), got ", index.device());
  TORCH_CHECK_VALUE(index.size(0) == data.size(0), "fasttrack.", op, ": `index` must have shape [", data.size(0),
                    ", *] (batch of `", data_name, "`), got ", index.sizes());
}

[[noreturn]] void raise_bad_index(const char* op, const RowCheck& rc, const int64_t* row, int64_t b, int64_t length) {
  if (rc.error == kIndexOutOfRange) {
    TORCH_CHECK_VALUE(false, "fasttrack.", op, ": `index`[", b, ", ", rc.j, "] = ", row[rc.j], " is out of range [0, ",
                      length, ")");
  }
  TORCH_CHECK_VALUE(false, "fasttrack.", op, ": `index`[", b, ", ", rc.j, "] = ", row[rc.j], " repeats `index`[", b,
                    ", ", rc.first_j, "]; indices must be distinct within a row");
}

}  // namespace

// Validates all rows before anything is written. inv: [B, length] inverse maps (scatter) or one
// reused row of scratch (gather, inv_per_row = false).
void check_rows(const char* op, const int64_t* index, int64_t B, int64_t k, int64_t length, int32_t* inv,
                bool inv_per_row) {
  for (int64_t b = 0; b < B; ++b) {
    const int64_t* row = index + b * k;
    const RowCheck rc = build_inverse_row(row, k, length, inv + (inv_per_row ? b * length : 0));
    if (rc.error != kIndexOk) raise_bad_index(op, rc, row, b, length);
  }
}

Problem check_gather_args(const at::Tensor& x, const at::Tensor& index, c10::string_view layout) {
  const char* op = "gather_tokens";
  const bool nchw = parse_layout(layout, op);
  TORCH_CHECK_VALUE(x.dim() == (nchw ? 4 : 3), "fasttrack.", op, ": `x` must have ", nchw ? 4 : 3, " dims, got shape ",
                    x.sizes());
  check_floating(x, op, "x");
  check_index_meta(index, x, op, "x");
  const int64_t N = nchw ? x.size(2) * x.size(3) : x.size(1);
  const int64_t C = nchw ? x.size(1) : x.size(2);
  TORCH_CHECK_VALUE(index.size(1) <= N, "fasttrack.", op, ": `index` selects ", index.size(1),
                    " tokens but `x` has only ", N);
  TORCH_CHECK_VALUE(N <= std::numeric_limits<int32_t>::max(), "fasttrack.", op, ": `x` has ", N,
                    " tokens, more than the 2^31 - 1 supported");
  return Problem{x.size(0), index.size(1), N, C, false, nchw};
}

Problem check_scatter_args(const at::Tensor& kept, const at::Tensor& index, int64_t length, c10::string_view layout,
                           at::IntArrayRef hw) {
  const char* op = "pad_scatter";
  const bool nchw = parse_layout(layout, op);
  TORCH_CHECK_VALUE(kept.dim() == 3, "fasttrack.", op, ": `kept` must have 3 dims, got shape ", kept.sizes());
  check_floating(kept, op, "kept");
  check_index_meta(index, kept, op, "kept");
  TORCH_CHECK_VALUE(index.size(1) == kept.size(1), "fasttrack.", op, ": `index` must have shape [", kept.size(0), ", ",
                    kept.size(1), "] (like `kept`), got ", index.sizes());
  TORCH_CHECK_VALUE(length >= kept.size(1) && length <= std::numeric_limits<int32_t>::max(), "fasttrack.", op,
                    ": `length` must be >= k=", kept.size(1), " (the number of kept tokens) and < 2^31, got ", length);
  if (nchw) {
    // H * W compared without multiplying (it could wrap for huge H, W)
    TORCH_CHECK_VALUE(hw.size() == 2 && hw[0] >= 0 && hw[1] >= 0 &&
                          (hw[1] == 0 ? length == 0 : (length % hw[1] == 0 && hw[0] == length / hw[1])),
                      "fasttrack.", op, ": `hw` must be (H, W) with H*W == length=", length, ", got ", hw);
  }
  return Problem{kept.size(0), kept.size(1), length, kept.size(2), true, nchw};
}

}  // namespace pad_scatter
}  // namespace fasttrack
