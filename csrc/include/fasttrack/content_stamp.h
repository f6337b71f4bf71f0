// A 64-bit stamp of a CPU tensor's content, for caches of values derived from weights (pre-packed
// oneDNN weights, folded convolutions): fasttrack/nn/derived.py. PyTorch's version counter misses
// in-place writes through `.data` (EMA teachers, re-initialisation, some loaders); the stamp sees
// any write that changes one of the elements it reads.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace fasttrack {

// Mixes the raw bytes of every element of a tensor of up to 4096 elements, else of 256 elements
// spread evenly over it (so any write that changes every element, or a contiguous run of more than
// numel / 255 elements, is seen). CPU tensors only. 0 for an empty tensor.
uint64_t content_stamp(const at::Tensor& t);

// The state of a cache's source tensors as one byte string (fasttrack.nn.derived.Derived compares
// it between calls): per source its TensorImpl (the cache holds its sources, so the address of a
// replaced tensor cannot come back), data pointer, version counter (0 for an inference tensor),
// dtype, device, sizes and strides, and content_stamp for a CPU tensor with storage; None is a
// marker of its own. One call for all sources instead of ~6 Python attribute reads per tensor: a
// `Derived.get` hit on a ViT-B weight costs ~6 µs in Python, and the 78 sources of the OSTrack head
// ~280 µs.
std::string sources_key(const std::vector<std::optional<at::Tensor>>& sources);

}  // namespace fasttrack
