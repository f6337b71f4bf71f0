// C++ test of the fasttrack ops without Python: loads the ops library built by CMake (as Python loads
// fasttrack._C) and reaches every op only through the dispatcher, by name.
//   fasttrack_cpp_test <case>   (ctest runs each case as its own test; no argument runs all)
// Cases: registry, roundtrip_tokens, roundtrip_nchw, bad_index.
#include <dlfcn.h>

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>

#include <cstdio>
#include <functional>
#include <map>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#ifndef FASTTRACK_OPS_LIBRARY
#error "FASTTRACK_OPS_LIBRARY must name the ops shared library (CMakeLists.txt defines it)"
#endif

namespace {

// The ops of issue 2, which must all be there; any other public fasttrack op that the library
// defines is checked for a CPU kernel too.
const std::vector<std::string> kOps = {"topk_select", "topk_select_qk", "gather_tokens",
                                       "pad_scatter", "merge_tokens",   "pruned_linear"};

struct Failure : std::runtime_error {
  using std::runtime_error::runtime_error;
};

#define EXPECT(cond, msg)                                                        \
  do {                                                                           \
    if (!(cond)) {                                                               \
      std::ostringstream os_;                                                    \
      os_ << __FILE__ << ":" << __LINE__ << ": " << #cond << " failed: " << msg; \
      throw Failure(os_.str());                                                  \
    }                                                                            \
  } while (0)

c10::OperatorHandle find_op(const std::string& name) {
  auto op = c10::Dispatcher::singleton().findSchema({"fasttrack::" + name, ""});
  if (!op) {
    throw Failure("fasttrack::" + name + " has no schema: is csrc/cpu/<op>.cpp defining it compiled in?");
  }
  return *op;
}

// Boxed call: works whatever C++ types the kernel was written with.
torch::jit::Stack call(const std::string& name, torch::jit::Stack args) {
  auto op = find_op(name);
  EXPECT(op.hasKernelForDispatchKey(c10::DispatchKey::CPU), "fasttrack::" << name << " has no CPU kernel");
  op.callBoxed(&args);
  return args;
}

at::Tensor pad_scatter(const at::Tensor& kept, const at::Tensor& index, int64_t length,
                       const std::string& layout = "tokens", std::vector<int64_t> hw = {}) {
  return call("pad_scatter", {kept, index, length, layout, std::move(hw), true})[0].toTensor();
}

at::Tensor gather_tokens(const at::Tensor& x, const at::Tensor& index, const std::string& layout = "tokens") {
  return call("gather_tokens", {x, index, layout, true})[0].toTensor();
}

// Distinct kept positions per row, in random order (the order top-k selection produces).
at::Tensor random_index(int64_t B, int64_t k, int64_t L) {
  std::vector<at::Tensor> rows;
  for (int64_t b = 0; b < B; ++b) rows.push_back(at::randperm(L, at::kLong).slice(0, 0, k));
  return at::stack(rows);
}

// Checks pad_scatter against a naive loop, then gather_tokens(pad_scatter(kept)) == kept.
void roundtrip(int64_t B, int64_t k, int64_t C, int64_t H, int64_t W, at::ScalarType dtype, bool nchw) {
  const int64_t L = H * W;
  const auto kept = at::randn({B, k, C}).to(dtype);
  const auto index = random_index(B, k, L);
  const std::string layout = nchw ? "nchw" : "tokens";
  const auto out = pad_scatter(kept, index, L, layout, nchw ? std::vector<int64_t>{H, W} : std::vector<int64_t>{});
  const std::string what = "pad_scatter(" + layout + ", B=" + std::to_string(B) + ", k=" + std::to_string(k) +
                           ", L=" + std::to_string(L) + ", C=" + std::to_string(C) + ", " + c10::toString(dtype) + ")";
  const std::vector<int64_t> want_shape = nchw ? std::vector<int64_t>{B, C, H, W} : std::vector<int64_t>{B, L, C};
  EXPECT(out.sizes().vec() == want_shape, what << ": shape " << out.sizes());
  EXPECT(out.scalar_type() == dtype, what << ": dtype " << out.scalar_type());

  const auto keptf = kept.to(at::kFloat);
  // read the result as [B, C, H, W] whatever the layout (token t = h * W + w)
  const auto outf = (nchw ? out : out.transpose(1, 2).reshape({B, C, H, W})).to(at::kFloat).contiguous();
  auto got_at = outf.accessor<float, 4>();
  auto idx = index.accessor<int64_t, 2>();
  auto src = keptf.accessor<float, 3>();
  for (int64_t b = 0; b < B; ++b) {
    std::vector<int64_t> from(L, -1);  // kept row that lands on token t, or -1 (zero pad)
    for (int64_t j = 0; j < k; ++j) from[idx[b][j]] = j;
    for (int64_t t = 0; t < L; ++t) {
      for (int64_t c = 0; c < C; ++c) {
        const float want = from[t] < 0 ? 0.f : src[b][from[t]][c];
        const float got = got_at[b][c][t / W][t % W];
        // a pure copy: bit-exact in every dtype
        EXPECT(got == want, what << ": out[b=" << b << ", token=" << t << ", c=" << c << "] = " << got
                                 << ", naive loop gives " << want);
      }
    }
  }
  const auto back = gather_tokens(out, index, layout);
  EXPECT(back.sizes() == kept.sizes() && back.scalar_type() == dtype,
         "gather_tokens after " << what << ": " << back.sizes() << " " << back.scalar_type());
  EXPECT(at::equal(back, kept), "gather_tokens(" << what << ") != kept");
}

void test_registry() {
  std::set<std::string> ops(kOps.begin(), kOps.end());
  for (const auto& name : c10::Dispatcher::singleton().getAllOpNames()) {
    const std::string n = name.name;
    if (n.rfind("fasttrack::", 0) == 0 && n.compare(11, 1, "_") != 0) ops.insert(n.substr(11));
  }
  std::string missing;
  for (const auto& name : ops) {
    auto op = c10::Dispatcher::singleton().findSchema({"fasttrack::" + name, ""});
    if (!op) {
      missing += "\n  fasttrack::" + name + ": no schema";
    } else if (!op->hasKernelForDispatchKey(c10::DispatchKey::CPU)) {
      missing += "\n  fasttrack::" + name + ": schema but no CPU kernel";
    }
  }
  EXPECT(missing.empty(), "ops without a native CPU kernel:" << missing);
  std::printf("  %zu ops with a CPU kernel\n", ops.size());
}

void test_roundtrip_tokens() {
  for (auto dtype : {at::kFloat, at::kHalf, at::kBFloat16}) {
    roundtrip(2, 7, 5, 1, 13, dtype, false);   // odd, non-power-of-two
    roundtrip(3, 13, 3, 1, 13, dtype, false);  // nothing removed
  }
  roundtrip(2, 180, 768, 16, 16, at::kFloat, false);  // OSTrack-256 search map, keep ratio 0.7
}

void test_roundtrip_nchw() {
  for (auto dtype : {at::kFloat, at::kHalf, at::kBFloat16}) roundtrip(2, 9, 5, 3, 5, dtype, true);
  roundtrip(1, 403, 64, 24, 24, at::kFloat, true);  // OSTrack-384 search map, keep ratio 0.7
}

// An out-of-range index is refused with an error naming `index`, and nothing is written through it.
void test_bad_index() {
  const auto kept = at::randn({2, 3, 4});
  for (int64_t bad : {int64_t{5}, int64_t{-1}, int64_t{1} << 40}) {
    auto index = at::tensor({0, 1, 2, 0, 1, 2}, at::kLong).view({2, 3});
    index[1][2].fill_(bad);
    for (const char* op : {"pad_scatter", "gather_tokens"}) {
      const auto x = at::randn({2, 5, 4});
      const auto x_before = x.clone();
      bool threw = false;
      try {
        if (std::string(op) == "pad_scatter")
          pad_scatter(kept, index, 5);
        else
          gather_tokens(x, index);
      } catch (const Failure&) {
        throw;
      } catch (const c10::Error& e) {
        threw = true;
        const std::string msg = e.what_without_backtrace();
        EXPECT(msg.find("index") != std::string::npos, op << ": error does not name `index`: " << msg);
      }
      EXPECT(threw, op << " accepted index value " << bad << " (length 5)");
      EXPECT(at::equal(x, x_before), op << " modified its input");
    }
  }
}

const std::map<std::string, std::function<void()>> kCases = {
    {"registry", test_registry},
    {"roundtrip_tokens", test_roundtrip_tokens},
    {"roundtrip_nchw", test_roundtrip_nchw},
    {"bad_index", test_bad_index},
};

}  // namespace

int main(int argc, char** argv) {
  at::manual_seed(0);
  // RTLD_GLOBAL as Python's torch.ops.load_library: the registrations run in the static initialisers.
  if (!dlopen(FASTTRACK_OPS_LIBRARY, RTLD_NOW | RTLD_GLOBAL)) {
    std::fprintf(stderr, "cannot load %s: %s\n", FASTTRACK_OPS_LIBRARY, dlerror());
    return 1;
  }
  std::vector<std::string> names;
  for (int i = 1; i < argc; ++i) names.push_back(argv[i]);
  if (names.empty()) {
    for (const auto& kv : kCases) names.push_back(kv.first);
  }
  int passed = 0, failed = 0;
  for (const auto& name : names) {
    auto it = kCases.find(name);
    if (it == kCases.end()) {
      std::fprintf(stderr, "unknown case %s\n", name.c_str());
      return 2;
    }
    try {
      it->second();
      std::printf("PASS %s\n", name.c_str());
      ++passed;
    } catch (const std::exception& e) {
      std::printf("FAIL %s: %s\n", name.c_str(), e.what());
      ++failed;
    }
  }
  std::printf("%d passed, %d failed\n", passed, failed);
  return failed ? 1 : 0;
}
