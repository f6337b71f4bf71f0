// The x86 vector ISA the CPU kernels dispatch to at run time (the extension is built for baseline
// x86-64, and each fast path is compiled with a target attribute). Level = what the CPU supports,
// capped by ATen's own choice: ATEN_CPU_CAPABILITY=avx2 or =default moves ATen and fasttrack together,
// which is also how the tests run the AVX2 and baseline kernels on an AVX-512 machine
// (tests/test_cpu_isa.py).
#pragma once

#include <ATen/Version.h>

#include <string>

// The x86 fast paths (target attributes, intrinsics) exist only on GCC/Clang x86-64 builds.
#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define FT_HAVE_AVX2_PATH 1
#endif

namespace fasttrack {

enum class CpuIsa { baseline = 0, avx2 = 1, avx512 = 2 };  // avx2: AVX2 + FMA; avx512: AVX-512 F + BW

inline CpuIsa cpu_isa() {
  static const CpuIsa isa = [] {
#if defined(__GNUC__) && defined(__x86_64__)
    const std::string aten = at::get_cpu_capability();
    if (aten == "AVX512" && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")) {
      return CpuIsa::avx512;
    }
    if (aten != "DEFAULT" && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return CpuIsa::avx2;
#endif
    return CpuIsa::baseline;
  }();
  return isa;
}

inline const char* cpu_isa_name() {
  switch (cpu_isa()) {
    case CpuIsa::avx512: return "avx512";
    case CpuIsa::avx2: return "avx2";
    default: return "baseline";
  }
}

#if defined(FT_HAVE_AVX2_PATH)
// AVX-512 with the BF16 instructions (vdpbf16ps, vcvtneps2bf16) and VL, under the same ATen cap.
inline bool cpu_has_avx512_bf16() {
  static const bool has =
      cpu_isa() == CpuIsa::avx512 && __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512vl");
  return has;
}

// Code between these two is compiled for AVX-512 (+BF16) and must only be called after
// cpu_has_avx512_bf16() (or cpu_isa() == avx512 for code without BF16 instructions): the extension
// itself is built for baseline x86-64.
// clang-format off
#if defined(__clang__)
#define FT_AVX512_BF16_BEGIN _Pragma("clang attribute push(__attribute__((target(\"avx512f,avx512bw,avx512vl,avx512bf16,fma\"))), apply_to = function)")
#define FT_AVX512_BF16_END _Pragma("clang attribute pop")
#else
#define FT_AVX512_BF16_BEGIN _Pragma("GCC push_options") _Pragma("GCC target(\"avx512f,avx512bw,avx512vl,avx512bf16,fma\")")
#define FT_AVX512_BF16_END _Pragma("GCC pop_options")
#endif
// clang-format on

// The run-time dispatch flags of the CPU kernels (read once, at load).
inline const bool kHasAvx2 = cpu_isa() >= CpuIsa::avx2;  // with FMA
inline const bool kHasAvx512 = cpu_isa() >= CpuIsa::avx512;
#endif

}  // namespace fasttrack
