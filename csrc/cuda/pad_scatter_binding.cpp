// CUDA binding of fasttrack::gather_tokens / fasttrack::pad_scatter (compiled only in a CUDA build):
// the argument checks of csrc/pad_scatter.cpp (shared with the CPU kernel), then one launch of
// csrc/cuda/pad_scatter_kernel.cu.
//
// check_index=True costs one device synchronisation per call: the kernel ORs what it found wrong
// with `index` (fasttrack/pad_scatter.h::IndexError) into a device word, read back here. With
// check_index=False nothing is read back (no sync); the kernel still never writes through a bad entry.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <fasttrack/pad_scatter.h>

namespace fasttrack {
namespace pad_scatter {

namespace {

at::Tensor run(const char* op, const Problem& pb, const at::Tensor& src_in, const at::Tensor& index_in, at::Tensor out,
               bool check_index) {
  const c10::cuda::CUDAGuard guard(src_in.device());
  const at::Tensor src = src_in.contiguous();
  const at::Tensor index = index_in.contiguous();
  at::Tensor error;
  if (check_index) error = at::zeros({1}, index.options().dtype(at::kInt));
  C10_CUDA_CHECK(launch_cuda(pb, src.const_data_ptr(), out.mutable_data_ptr(), index.const_data_ptr<int64_t>(),
                             static_cast<int>(src.element_size()),
                             check_index ? error.mutable_data_ptr<int32_t>() : nullptr,
                             c10::cuda::getCurrentCUDAStream()));
  if (check_index) {
    const int32_t bits = error.item<int32_t>();
    TORCH_CHECK_VALUE(!(bits & kIndexOutOfRange), "fasttrack.", op, ": `index` has entries out of range [0, ",
                      pb.length, ")");
    TORCH_CHECK_VALUE(!(bits & kIndexDuplicate), "fasttrack.", op,
                      ": `index` repeats a position within a row; indices must be distinct within a row");
  }
  return out;
}

at::Tensor gather_tokens_cuda(const at::Tensor& x, const at::Tensor& index, c10::string_view layout, bool check_index) {
  const Problem pb = check_gather_args(x, index, layout);
  at::Tensor out = at::empty({pb.batch, pb.k, pb.channels}, x.options());
  return run("gather_tokens", pb, x, index, out, check_index);
}

at::Tensor pad_scatter_cuda(const at::Tensor& kept, const at::Tensor& index, int64_t length, c10::string_view layout,
                            at::IntArrayRef hw, bool check_index) {
  const Problem pb = check_scatter_args(kept, index, length, layout, hw);
  at::Tensor out = pb.nchw ? at::empty({pb.batch, pb.channels, hw[0], hw[1]}, kept.options())
                           : at::empty({pb.batch, pb.length, pb.channels}, kept.options());
  return run("pad_scatter", pb, kept, index, out, check_index);
}

}  // namespace
}  // namespace pad_scatter
}  // namespace fasttrack

TORCH_LIBRARY_IMPL(fasttrack, CUDA, m) {
  m.impl("gather_tokens", &fasttrack::pad_scatter::gather_tokens_cuda);
  m.impl("pad_scatter", &fasttrack::pad_scatter::pad_scatter_cuda);
}
