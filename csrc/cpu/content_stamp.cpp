// fasttrack::content_stamp (csrc/include/fasttrack/content_stamp.h).
#include <fasttrack/content_stamp.h>

#include <c10/util/Exception.h>

#include <cstring>

namespace fasttrack {

namespace {
constexpr int64_t kStampAll = 4096;     // tensors up to this size are read whole (vectors, small weights)
constexpr int64_t kStampSamples = 256;  // larger ones at this many evenly spread elements
}  // namespace

uint64_t content_stamp(const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), "fasttrack.content_stamp: `t` must be a CPU tensor, got ", t.device());
  const int64_t n = t.numel();
  if (n == 0) return 0;
  const at::Tensor c = t.is_contiguous() ? t : t.contiguous();  // weights are contiguous: no copy
  const int64_t es = static_cast<int64_t>(c.element_size());
  TORCH_CHECK_VALUE(es <= 8, "fasttrack.content_stamp: elements of ", es, " bytes are not supported");
  const char* p = static_cast<const char*>(c.const_data_ptr());
  auto mix = [](uint64_t h, uint64_t v) {
    h = (h ^ v) * 1099511628211ull;
    return h ^ (h >> 29);
  };
  uint64_t h = 1469598103934665603ull ^ static_cast<uint64_t>(n);
  if (n <= kStampAll) {
    // every byte, 8 at a time in four independent chains (a BatchNorm vector or a bias costs tens of
    // nanoseconds; one chain per element took ~1 µs per 256 elements)
    const int64_t bytes = n * es, words = bytes / 8;
    uint64_t lane[4] = {h, h ^ 1, h ^ 2, h ^ 3};
    int64_t i = 0;
    for (; i + 4 <= words; i += 4) {
      for (int l = 0; l < 4; ++l) {
        uint64_t v;
        std::memcpy(&v, p + (i + l) * 8, 8);
        lane[l] = mix(lane[l], v);
      }
    }
    for (; i < words; ++i) {
      uint64_t v;
      std::memcpy(&v, p + i * 8, 8);
      lane[0] = mix(lane[0], v);
    }
    if (bytes % 8) {
      uint64_t v = 0;
      std::memcpy(&v, p + words * 8, static_cast<size_t>(bytes % 8));
      lane[1] = mix(lane[1], v);
    }
    for (int l = 0; l < 4; ++l) h = mix(h, lane[l]);
  } else {
    // kStampSamples positions spread evenly: a cold weight costs one memory line per sample, ~25 ns
    // on this project's VM (a stripe through every row and column cost ~80 µs per ViT-B weight)
    for (int64_t s = 0; s < kStampSamples; ++s) {
      uint64_t v = 0;
      std::memcpy(&v, p + s * (n - 1) / (kStampSamples - 1) * es, static_cast<size_t>(es));
      h = mix(h, v);
    }
  }
  return h;
}

std::string sources_key(const std::vector<std::optional<at::Tensor>>& sources) {
  std::string key;
  key.reserve(sources.size() * 16 * sizeof(int64_t));
  auto put = [&key](int64_t v) { key.append(reinterpret_cast<const char*>(&v), sizeof(v)); };
  for (const auto& src : sources) {
    if (!src.has_value() || !src->defined()) {
      put(-1);
      continue;
    }
    const at::Tensor& t = *src;
    put(reinterpret_cast<int64_t>(t.unsafeGetTensorImpl()));
    const bool has_storage = t.has_storage() && !t.is_meta();
    put(has_storage ? reinterpret_cast<int64_t>(t.const_data_ptr()) : 0);
    put(t.is_inference() ? 0 : static_cast<int64_t>(t.unsafeGetTensorImpl()->version_counter().current_version()));
    put(static_cast<int64_t>(t.scalar_type()));
    put(static_cast<int64_t>(t.device().type()) * 65536 + t.device().index());
    put(t.dim());
    for (int64_t d = 0; d < t.dim(); ++d) {
      put(t.size(d));
      put(t.stride(d));
    }
    put(has_storage && t.device().is_cpu() ? static_cast<int64_t>(content_stamp(t)) : 0);
  }
  return key;
}

}  // namespace fasttrack
