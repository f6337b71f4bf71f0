// CUDA kernels of fasttrack::gather_tokens / fasttrack::pad_scatter on raw pointers (no ATen/c10/torch:
// this file compiles with plain nvcc; the binding is csrc/cuda/pad_scatter_binding.cpp).
//
// One kernel family, the "row map" of fasttrack/pad_scatter.h: output token row r of batch b is source
// row src_of[r], or zeros. A block owns one (batch, output-token tile) and first builds src_of for its
// tile in shared memory:
//   gather : src_of[r] = index[b, t0 + r], range-checked;
//   scatter: the tile's slice of the inverse map, built by scanning the whole index row (k ≤ a few
//            hundred, L2-resident) and claiming positions with atomicCAS, which also catches two
//            entries claiming one position. Each position belongs to exactly one tile, so the block
//            writes zero rows and kept rows in the same single pass: every output row once.
// Bad entries set bits of the device-side error word (if given) and are never written through.
// Layout "tokens": rows are contiguous, copied in 16-byte vectors when C·elem % 16 == 0 and both
// pointers are 16-byte aligned, else element by element. Layout "nchw": a shared-memory tile of
// kTileT tokens × kTileC channels turns the channel-contiguous side and the token-contiguous side into
// coalesced accesses on both ends (transpose through shared memory).
#include <cuda_runtime.h>
#include <stdint.h>

#include <climits>

#include <fasttrack/pad_scatter.h>

namespace fasttrack {
namespace pad_scatter {
namespace {

constexpr int kRowsPerBlock = 4;  // tokens layout: output rows per block (C=768 fp32: 768 16-byte units)
constexpr int kRowThreads = 128;
constexpr int kTileT = 32;  // nchw: tokens per block (one 32-wide coalesced run per channel)
constexpr int kTileC = 32;  // nchw: channels per shared-memory step
constexpr int kTileThreads = 256;

struct Args {
  const void* src;
  void* dst;
  const int64_t* index;  // [batch, k]
  int32_t* error;        // nullable
  int64_t k, length, channels, out_rows, src_rows;
  int64_t tiles;  // output tiles per batch
};

__device__ __forceinline__ void report(int32_t* error, int32_t bits) {
  if (error != nullptr) atomicOr(error, bits);
}

// src_of[0, tile) for output rows [t0, t0 + tile) of batch b. Ends with a barrier.
template <bool kScatter>
__device__ __forceinline__ void map_tile(const Args& a, int64_t b, int64_t t0, int tile, int32_t* src_of) {
  const int64_t* idx = a.index + b * a.k;
  if (kScatter) {
    for (int r = threadIdx.x; r < tile; r += blockDim.x) src_of[r] = kEmpty;
    __syncthreads();
    for (int64_t j = threadIdx.x; j < a.k; j += blockDim.x) {
      const int64_t p = idx[j];
      if (!in_range(p, a.length)) {
        if (t0 == 0) report(a.error, kIndexOutOfRange);  // one block per batch reports it
        continue;
      }
      const int64_t r = tile_slot(p, t0, tile);
      if (r >= 0 && atomicCAS(&src_of[r], kEmpty, static_cast<int32_t>(j)) != kEmpty) {
        report(a.error, kIndexDuplicate);
      }
    }
  } else {
    for (int r = threadIdx.x; r < tile; r += blockDim.x) {
      const int32_t s = gather_source(idx[t0 + r], a.length);
      if (s == kEmpty) report(a.error, kIndexOutOfRange);
      src_of[r] = s;
    }
  }
  __syncthreads();
}

// Tokens layout. V: the access unit (uint4 when vectorised, else the element); `units` V per row.
template <bool kScatter, typename V>
__global__ void __launch_bounds__(kRowThreads) rows_kernel(Args a, int64_t units) {
  __shared__ int32_t src_of[kRowsPerBlock];
  const int64_t b = blockIdx.x / a.tiles;
  const int64_t t0 = (blockIdx.x % a.tiles) * kRowsPerBlock;
  const int tile = static_cast<int>(min(static_cast<int64_t>(kRowsPerBlock), a.out_rows - t0));
  map_tile<kScatter>(a, b, t0, tile, src_of);

  const V* __restrict__ src = static_cast<const V*>(a.src);
  V* __restrict__ dst = static_cast<V*>(a.dst);
  for (int64_t i = threadIdx.x; i < tile * units; i += blockDim.x) {
    const int r = static_cast<int>(i / units);
    const int64_t u = i - r * units;
    const int32_t s = src_of[r];
    V v{};
    if (s != kEmpty) v = src[elem_offset(false, b, s, u, a.src_rows, units)];
    dst[elem_offset(false, b, t0 + r, u, a.out_rows, units)] = v;
  }
}

// NCHW layout. Scatter: rows [B, k, C] -> planes [B, C, L]; gather: planes [B, C, N] -> rows [B, k, C].
template <bool kScatter, typename T>
__global__ void __launch_bounds__(kTileThreads) planes_kernel(Args a) {
  __shared__ int32_t src_of[kTileT];
  __shared__ T buf[kTileC][kTileT + 1];  // +1: the transposed pass hits distinct banks
  const int64_t b = blockIdx.x / a.tiles;
  const int64_t t0 = (blockIdx.x % a.tiles) * kTileT;
  const int tile = static_cast<int>(min(static_cast<int64_t>(kTileT), a.out_rows - t0));
  map_tile<kScatter>(a, b, t0, tile, src_of);

  const T* __restrict__ src = static_cast<const T*>(a.src);
  T* __restrict__ dst = static_cast<T*>(a.dst);
  for (int64_t c0 = 0; c0 < a.channels; c0 += kTileC) {
    // read along the source's contiguous axis: channels of a row (scatter), tokens of a plane (gather)
    for (int i = threadIdx.x; i < kTileT * kTileC; i += blockDim.x) {
      const int r = kScatter ? i / kTileC : i % kTileT;
      const int cc = kScatter ? i % kTileC : i / kTileT;
      const int64_t c = c0 + cc;
      const int32_t s = r < tile ? src_of[r] : kEmpty;
      T v{};
      if (s != kEmpty && c < a.channels) v = src[elem_offset(!kScatter, b, s, c, a.src_rows, a.channels)];
      buf[cc][r] = v;
    }
    __syncthreads();
    // write along the destination's contiguous axis: tokens of a plane (scatter), channels of a row (gather)
    for (int i = threadIdx.x; i < kTileT * kTileC; i += blockDim.x) {
      const int r = kScatter ? i % kTileT : i / kTileC;
      const int cc = kScatter ? i / kTileT : i % kTileC;
      const int64_t c = c0 + cc;
      if (r < tile && c < a.channels) dst[elem_offset(kScatter, b, t0 + r, c, a.out_rows, a.channels)] = buf[cc][r];
    }
    __syncthreads();
  }
}

template <typename T>
struct Elem {
  using type = T;
};

template <typename F>
cudaError_t by_elem_size(int elem_size, F&& f) {
  switch (elem_size) {
    case 2: f(Elem<uint16_t>{}); return cudaSuccess;
    case 4: f(Elem<uint32_t>{}); return cudaSuccess;
    case 8: f(Elem<uint64_t>{}); return cudaSuccess;
    default: return cudaErrorInvalidValue;
  }
}

template <bool kScatter>
cudaError_t launch(Args a, bool nchw, int elem_size, int64_t batch, cudaStream_t stream) {
  const int64_t per_block = nchw ? kTileT : kRowsPerBlock;
  a.tiles = (a.out_rows + per_block - 1) / per_block;
  const int64_t blocks = batch * a.tiles;
  if (blocks > INT_MAX) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(blocks));
  if (nchw) {
    const cudaError_t e = by_elem_size(elem_size, [&](auto tag) {
      using T = typename decltype(tag)::type;
      planes_kernel<kScatter, T><<<grid, kTileThreads, 0, stream>>>(a);
    });
    if (e != cudaSuccess) return e;
  } else {
    const int64_t row_bytes = a.channels * elem_size;
    const bool vec = row_bytes % 16 == 0 && reinterpret_cast<uintptr_t>(a.src) % 16 == 0 &&
                     reinterpret_cast<uintptr_t>(a.dst) % 16 == 0;
    if (vec) {
      rows_kernel<kScatter, uint4><<<grid, kRowThreads, 0, stream>>>(a, row_bytes / 16);
    } else {
      const cudaError_t e = by_elem_size(elem_size, [&](auto tag) {
        using T = typename decltype(tag)::type;
        rows_kernel<kScatter, T><<<grid, kRowThreads, 0, stream>>>(a, a.channels);
      });
      if (e != cudaSuccess) return e;
    }
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_cuda(const Problem& pb, const void* src, void* dst, const int64_t* index, int elem_size,
                        int32_t* error, cudaStream_t stream) {
  Args a{src, dst, index, error, pb.k, pb.length, pb.channels, pb.out_rows(), pb.src_rows(), 0};
  if (pb.batch == 0 || a.out_rows == 0 || pb.channels == 0) return cudaSuccess;
  return pb.scatter ? launch<true>(a, pb.nchw, elem_size, pb.batch, stream)
                    : launch<false>(a, pb.nchw, elem_size, pb.batch, stream);
}

}  // namespace pad_scatter
}  // namespace fasttrack
