// A 64-bit stamp of a CPU tensor's content, for caches of values derived from weights (pre-packed
// oneDNN weights, folded convolutions): fasttrack/nn/derived.py. PyTorch's version counter misses
// in-place writes through `.data` (EMA teachers, re-initialisation, some loaders); the stamp sees
// any write that changes one of the elements it reads.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace fasttrack {

// Mixes the raw bytes of every element of a tensor of up to 4096 elements, else of 256 elements
// spread evenly over it (so any write that changes every element, or a contiguous run of more than
// numel / 255 elements, is seen). CPU tensors only. 0 for an empty tensor.
uint64_t content_stamp(const at::Tensor& t);

}  // namespace fasttrack
