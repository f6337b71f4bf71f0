// Large outputs of the CPU kernels, and the cache of freed ones they come from.
//
// glibc serves every allocation of 32 MiB or more with a fresh mmap and returns it with munmap, so a
// kernel writing such an output first takes a page fault per 4 KiB page (the OS zeroes each one):
// on this project's VM that runs at ~4 GB/s, several times slower than the kernel's own writes (a B=32
// OSTrack-384 selection writes 54 MB). Trackers call the same op with the same shapes every frame or
// batch, so fasttrack keeps the buffers of its freed large outputs and hands them out again, like
// PyTorch's CUDA caching allocator does on the GPU:
// - only outputs of >= 32 MiB (below that glibc already reuses memory), rounded up to 2 MiB and
//   backed by transparent huge pages where the kernel allows (madvise), so a new buffer faults
//   512x less often;
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

// at::empty(sizes, options) for a CPU output, through the cache when it is large enough.
at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options);

// Frees every cached buffer; returns the bytes released.
int64_t output_cache_clear();

// Bytes held in free cached buffers, and the limit on them.
int64_t output_cache_bytes();
int64_t output_cache_limit();

}  // namespace fasttrack
