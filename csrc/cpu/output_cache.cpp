// The cache of CPU output buffers: see csrc/include/fasttrack/output_cache.h for why and what.
#include <fasttrack/output_cache.h>

#include <ATen/EmptyTensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/CPUAllocator.h>
#include <c10/util/Exception.h>

#include <cstdlib>
#include <limits>
#include <map>
#include <mutex>
#include <string>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace fasttrack {
namespace {

constexpr size_t kMinBytes = size_t{256} << 10;   // below: small enough for glibc's heap to keep reusing
constexpr size_t kHugePage = size_t{2} << 20;     // buffers of at least this are rounded to it, huge-page backed
constexpr size_t kSmallGrain = size_t{64} << 10;  // smaller ones are rounded to this

size_t rounded_size(size_t n) {
  const size_t grain = n >= kHugePage ? kHugePage : kSmallGrain;
  return (n + grain - 1) / grain * grain;
}
constexpr int64_t kDefaultLimitMB = 512;

int64_t limit_from_env() {
  const char* env = std::getenv("FASTTRACK_CPU_CACHE_MB");
  if (env == nullptr || *env == '\0') return kDefaultLimitMB << 20;
  char* end = nullptr;
  const long long mb = std::strtoll(env, &end, 10);
  TORCH_CHECK_VALUE(end != env && *end == '\0' && mb >= 0,
                    "FASTTRACK_CPU_CACHE_MB must be a non-negative integer (MiB), got '", env, "'");
  // saturate: 2^43 MiB and more would overflow the byte count (and exceed any address space anyway)
  constexpr long long kMaxMB = std::numeric_limits<int64_t>::max() >> 20;
  return static_cast<int64_t>(mb > kMaxMB ? kMaxMB : mb) << 20;
}

struct Block {
  void* ptr;
  size_t size;
};

class OutputCache final : public c10::Allocator {
 public:
  OutputCache() : limit_(limit_from_env()) {}

  c10::DataPtr allocate(size_t n) override {
    if (n < kMinBytes) return c10::GetDefaultCPUAllocator()->allocate(n);  // e.g. a resize_ to small
    const size_t size = rounded_size(n);
    void* ptr = take(size);
    if (ptr == nullptr) {
      ptr = fresh(size);
    }
    return {ptr, new Block{ptr, size}, &OutputCache::release, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override { default_copy_data(dest, src, count); }

  int64_t clear() {
    std::lock_guard<std::mutex> lock(mutex_);
    const int64_t freed = cached_;
    for (auto& kv : free_) std::free(kv.second);
    free_.clear();
    cached_ = 0;
    return freed;
  }

  int64_t cached() {
    std::lock_guard<std::mutex> lock(mutex_);
    return cached_;
  }

  int64_t limit() const { return limit_; }

  static OutputCache& get() {
    static OutputCache* cache = new OutputCache();  // never destroyed: tensors may outlive static teardown
    return *cache;
  }

 private:
  // A free buffer of exactly `size` bytes, or of at most 1/8 more (so near sizes share buffers).
  void* take(size_t size) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = free_.lower_bound(size);
    if (it == free_.end() || it->first > size + size / 8) return nullptr;
    void* ptr = it->second;
    cached_ -= static_cast<int64_t>(it->first);
    free_.erase(it);
    return ptr;
  }

  static void* fresh(size_t size) {
    void* ptr = nullptr;
    const bool huge = size >= kHugePage;
    if (posix_memalign(&ptr, huge ? kHugePage : 64, size) != 0 || ptr == nullptr) {
      TORCH_CHECK(false, "fasttrack: cannot allocate ", size, " bytes for a CPU output");
    }
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    if (huge) madvise(ptr, size, MADV_HUGEPAGE);  // a hint: without THP the pages are simply 4 KiB
#endif
    return ptr;
  }

  static void release(void* ctx) {
    auto* block = static_cast<Block*>(ctx);
    get().give_back(block->ptr, block->size);
    delete block;
  }

  void give_back(void* ptr, size_t size) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (cached_ + static_cast<int64_t>(size) <= limit_) {
        free_.emplace(size, ptr);
        cached_ += static_cast<int64_t>(size);
        return;
      }
    }
    std::free(ptr);
  }

  std::mutex mutex_;
  std::multimap<size_t, void*> free_;  // size -> buffer
  int64_t cached_ = 0;
  const int64_t limit_;
};

}  // namespace

at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  int64_t numel = 1;
  for (const int64_t s : sizes) numel *= s;
  const size_t nbytes = static_cast<size_t>(numel) * c10::elementSize(c10::typeMetaToScalarType(options.dtype()));
  if (options.device().type() != c10::DeviceType::CPU || nbytes < kMinBytes || OutputCache::get().limit() == 0) {
    return at::empty(sizes, options);
  }
  return at::detail::empty_generic(sizes, &OutputCache::get(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   c10::typeMetaToScalarType(options.dtype()), std::nullopt);
}

int64_t output_cache_clear() { return OutputCache::get().clear(); }
int64_t output_cache_bytes() { return OutputCache::get().cached(); }
int64_t output_cache_limit() { return OutputCache::get().limit(); }

}  // namespace fasttrack
