// Index logic of fasttrack::gather_tokens / fasttrack::pad_scatter, shared by the CPU kernel
// (csrc/cpu/pad_scatter_kernel.cpp) and the CUDA kernel (csrc/cuda/pad_scatter_kernel.cu), so the
// CPU tests exercise the arithmetic the GPU runs. Plain C++: no ATen/c10/torch, no CUDA headers in
// the device part (the .cu must compile with plain nvcc). The ATen-side declarations (argument
// checks, CPU kernel pieces) are at the end, outside what nvcc sees.
//
// Both ops are one operation, "row map": output token row r is source token row src_of(r), or a row
// of zeros when src_of(r) == kEmpty.
//   gather : out [B, k, C],  src_of(j) = index[b, j]              (source: x, N = length rows)
//   scatter: out [B, L, C],  src_of(p) = j such that index[b, j] == p, else kEmpty  (the inverse map)
// Writing the scatter through its inverse map is what makes zero-fill and scatter one pass: every
// output row is written exactly once, and never through an unchecked index.
// Layout "nchw" only changes where token t / channel c lives: [B, C, T] instead of [B, T, C].
#pragma once

#include <stdint.h>

#ifdef __CUDACC__
#define FT_HOST_DEVICE __host__ __device__
#else
#define FT_HOST_DEVICE
#endif

namespace fasttrack {
namespace pad_scatter {

// Inverse-map entry of a position that no kept token fills (its output row is zeros).
constexpr int32_t kEmpty = -1;

// Bits of the error word (CPU: return value; CUDA: the device-side flag, OR-ed by the kernel).
enum IndexError : int32_t { kIndexOk = 0, kIndexOutOfRange = 1, kIndexDuplicate = 2 };

FT_HOST_DEVICE inline bool in_range(int64_t i, int64_t n) { return i >= 0 && i < n; }

// Element offset of (batch b, token t, channel c) in a map of T tokens and C channels:
// [B, T, C] ("tokens") or [B, C, T] ("nchw", channel-major).
FT_HOST_DEVICE inline int64_t elem_offset(bool channel_major, int64_t b, int64_t t, int64_t c, int64_t T, int64_t C) {
  return channel_major ? (b * C + c) * T + t : (b * T + t) * C + c;
}

// The source row of gather output row j: index[j] if in range, else kEmpty (a zero row, reported).
FT_HOST_DEVICE inline int32_t gather_source(int64_t index_j, int64_t length) {
  return in_range(index_j, length) ? static_cast<int32_t>(index_j) : kEmpty;
}

// Position p of a scatter, relative to the output tile [t0, t0 + tile): its slot in the tile-local
// inverse map, or -1 when another tile owns it (the CUDA kernel builds the inverse per tile).
FT_HOST_DEVICE inline int64_t tile_slot(int64_t p, int64_t t0, int64_t tile) {
  return (p >= t0 && p < t0 + tile) ? p - t0 : -1;
}

// What was wrong with a row of `index` (first offender in index order).
struct RowCheck {
  int32_t error;    // IndexError
  int64_t j;        // offending entry
  int64_t first_j;  // for kIndexDuplicate: the earlier entry with the same value
};

// Serial inverse of one index row: inv[p] = j for index[j] == p, kEmpty elsewhere. Checks every
// entry (range, duplicates) and stops at the first bad one; inv is scratch until it returns kIndexOk.
// Used for the scatter's inverse map and, on the CPU, to validate a gather's index the same way.
FT_HOST_DEVICE inline RowCheck build_inverse_row(const int64_t* index, int64_t k, int64_t length, int32_t* inv) {
  for (int64_t p = 0; p < length; ++p) inv[p] = kEmpty;
  for (int64_t j = 0; j < k; ++j) {
    const int64_t p = index[j];
    if (!in_range(p, length)) return {kIndexOutOfRange, j, -1};
    if (inv[p] != kEmpty) return {kIndexDuplicate, j, inv[p]};
    inv[p] = static_cast<int32_t>(j);
  }
  return {kIndexOk, -1, -1};
}

// The shape of one call, as the launchers see it. index is [batch, k]; the token map (x of a gather,
// output of a scatter) has `length` tokens; channels = C.
struct Problem {
  int64_t batch, k, length, channels;
  bool scatter;  // false: gather_tokens
  bool nchw;     // the token map is [B, C, H*W]
  FT_HOST_DEVICE int64_t out_rows() const { return scatter ? length : k; }
  FT_HOST_DEVICE int64_t src_rows() const { return scatter ? k : length; }
};

}  // namespace pad_scatter
}  // namespace fasttrack

#if defined(__CUDACC__) || defined(FASTTRACK_WITH_CUDA)
#include <cuda_runtime_api.h>

namespace fasttrack {
namespace pad_scatter {
// csrc/cuda/pad_scatter_kernel.cu. src/dst contiguous, index [batch, k] int64 contiguous, elem_size
// 2/4/8 bytes. error: device int32 word the kernel ORs IndexError bits into, or nullptr (no report;
// bad entries are still never written through). Returns the launch status.
cudaError_t launch_cuda(const Problem& pb, const void* src, void* dst, const int64_t* index, int elem_size,
                        int32_t* error, cudaStream_t stream);
}  // namespace pad_scatter
}  // namespace fasttrack
#endif

#if !defined(__CUDACC__)
#include <ATen/core/Tensor.h>

#include <cstddef>

namespace fasttrack {
namespace pad_scatter {

// csrc/pad_scatter.cpp: the metadata checks of both ops (CPU kernel and CUDA binding), and the CPU
// check of every index row: inv gets [B, length] inverse maps (inv_per_row) or one reused row of
// scratch; raises on the first bad entry, before anything is written.
Problem check_gather_args(const at::Tensor& x, const at::Tensor& index, c10::string_view layout);
Problem check_scatter_args(const at::Tensor& kept, const at::Tensor& index, int64_t length, c10::string_view layout,
                           at::IntArrayRef hw);
void check_rows(const char* op, const int64_t* index, int64_t B, int64_t k, int64_t length, int32_t* inv,
                bool inv_per_row);

// CPU kernel pieces shared by csrc/cpu/pad_scatter_kernel.cpp and csrc/cpu/gather_planes_kernel.cpp.
constexpr int64_t kGrainBytes = 64 * 1024;  // below this per task, a thread switch costs more than it saves
// nchw outputs above this are written with streaming stores: lower than the row copies' kStreamBytes
// because the plane writes of a scatter land scattered over the whole map (B=32 OSTrack-256 bf16,
// a 12.6 MB map: 1.3 ms with plain stores, 0.55 ms streaming); B=1 maps (< 2 MB) stay in cache.
constexpr size_t kStreamPlanesBytes = size_t{4} << 20;

// The gather from planes (csrc/cpu/gather_planes_kernel.cpp): dst [B, k, C] rows from src planes
// (batch stride sb, channel stride sc, token stride 1). inv: the [B, N] inverse maps of `index` when
// use_position_groups(sizeof(T), k, N), else nullptr. T: uint16_t, uint32_t or uint64_t (bytes).
bool use_position_groups(int64_t elem_size, int64_t k, int64_t N);
template <typename T>
void planes_to_rows(const T* src, int64_t sb, int64_t sc, T* dst, const int64_t* index, const int32_t* inv, int64_t B,
                    int64_t k, int64_t N, int64_t C);

}  // namespace pad_scatter
}  // namespace fasttrack
#endif
