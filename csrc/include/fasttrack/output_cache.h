// Outputs of the CPU kernels, and the cache of freed ones they come from.
//
// glibc serves every allocation of 32 MiB or more with a fresh mmap and returns it with munmap, and
// below that it hands freed heap memory back to the OS whenever the free space at the top of the
// heap passes its trim threshold, so a kernel writing an output of a few hundred KB or more often
// first takes a page fault per 4 KiB page (the OS zeroes each one): on this project's VM that runs
// at ~4 GB/s, several times slower than the kernel's own writes (a B=32 OSTrack-384 selection writes
// 54 MB and took 16-88 ms instead of 2; at B=1 `PrunedLinear`'s 345 KB gather buffer faulted on a
// fraction of calls, which put its median 5-15% above the anchor GEMM it otherwise beats). Trackers
// call the same op with the same shapes every frame or batch, so fasttrack keeps the buffers of its
// freed outputs and hands them out again, like PyTorch's CUDA caching allocator does on the GPU:
// - outputs of >= 256 KiB (smaller ones stay in glibc's heap), rounded up to 64 KiB, or from 2 MiB
//   on to 2 MiB and backed by transparent huge pages where the kernel allows (madvise), so a new
//   buffer faults 512x less often; a request takes a free buffer of its size or up to 1/8 larger;
// - at most FASTTRACK_CPU_CACHE_MB (read once; default 512, 0 disables) of free buffers are kept,
//   beyond that a freed buffer goes back to the OS; `fasttrack.empty_cache()` releases them all.
// The tensors are ordinary CPU tensors (resizable; resizing reallocates through the default CPU
// allocator for small sizes). Every kernel writes every element of its outputs, so a reused buffer's
// old contents never show.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/TensorOptions.h>

#include <cstdint>

namespace fasttrack {

// at::empty(sizes, options) for a (contiguous) CPU output, through the cache when it is large enough.
at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options);

// Frees every cached buffer; returns the bytes released.
int64_t output_cache_clear();

// Bytes held in free cached buffers, and the limit on them.
int64_t output_cache_bytes();
int64_t output_cache_limit();

}  // namespace fasttrack
