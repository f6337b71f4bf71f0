// fasttrack._C as a Python extension module. Importing it loads this shared library, and with it the
// op registrations of csrc/library.cpp, csrc/<op>.cpp and csrc/{cpu,cuda}/*.cpp. Kept apart so that CMake can build the
// same sources without Python (its C++ test loads the library with dlopen).
//
// `fasttrack._C.cpu.<op>`: the op's registered CPU kernel, called through the dispatcher's unboxed
// C++ redispatch. fasttrack/ops/_registry.py uses it for plain CPU inference calls (no autograd,
// tracing, dispatch mode or functorch transform active). The boxed Python path (`OpOverload.redispatch`)
// converts every argument against the schema, ~2 µs a call, as long as a tracker-sized kernel; this
// path costs a pybind11 call. It runs the same kernel, releases the GIL like torch ops do, and
// records a profiler event under the op's name.
#include <ATen/record_function.h>
#include <torch/extension.h>

#include <fasttrack/attention.h>
#include <fasttrack/content_stamp.h>
#include <fasttrack/cpu_isa.h>
#include <fasttrack/layer_norm.h>
#include <fasttrack/output_cache.h>
#include <fasttrack/panel_linear.h>
#include <fasttrack/vit_block.h>

#include <string>
#include <type_traits>

namespace {

namespace py = pybind11;

// pybind11 has no caster for c10::string_view: take a std::string and view it.
template <typename T>
struct PyArg {
  using type = T;
};
template <>
struct PyArg<c10::string_view> {
  using type = std::string;
};

template <typename Sig>
struct CpuKernel;

template <typename Ret, typename... Args>
struct CpuKernel<Ret(Args...)> {
  // Binds fasttrack::<name>; `typed` checks Sig against the registered schema at import.
  static void def(py::module_& m, const char* name) {
    const std::string qualname = std::string("fasttrack::") + name;
    auto op = c10::Dispatcher::singleton().findSchemaOrThrow(qualname.c_str(), "").typed<Ret(Args...)>();
    m.def(
        name,
        [op, qualname](typename PyArg<std::decay_t<Args>>::type... args) -> Ret {
          RECORD_FUNCTION(qualname.c_str(), std::vector<c10::IValue>());
          return op.redispatch(c10::DispatchKeySet(c10::DispatchKey::CPU), args...);
        },
        py::call_guard<py::gil_scoped_release>());
  }
};

using Tensor = at::Tensor;
using OptTensor = std::optional<at::Tensor>;
using Selection = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;
using fasttrack::vit::LayerNormArgs;
using fasttrack::vit::LinearArgs;

// fasttrack.nn.vit.FusedBlock's native inference path (fasttrack/vit_block.h): flat arguments, one
// profiler event per call around the ops' own.
void def_vit_block(py::module_& m) {
  m.def(
      "vit_attn_residual",
      [](const Tensor& x, const OptTensor& n1w, const OptTensor& n1b, double eps1, const Tensor& qkv_w,
         const OptTensor& qkv_b, const Tensor& proj_w, const OptTensor& proj_b, int64_t num_heads, double scale) {
        RECORD_FUNCTION("fasttrack::vit_attn_residual", std::vector<c10::IValue>());
        return fasttrack::vit::attn_residual(x, LayerNormArgs{n1w, n1b, eps1}, LinearArgs{qkv_w, qkv_b},
                                             LinearArgs{proj_w, proj_b}, num_heads, scale);
      },
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "vit_mlp_residual",
      [](const Tensor& x, const OptTensor& n2w, const OptTensor& n2b, double eps2, const Tensor& fc1_w,
         const OptTensor& fc1_b, const Tensor& fc2_w, const OptTensor& fc2_b) {
        RECORD_FUNCTION("fasttrack::vit_mlp_residual", std::vector<c10::IValue>());
        return fasttrack::vit::mlp_residual(x, LayerNormArgs{n2w, n2b, eps2}, LinearArgs{fc1_w, fc1_b},
                                            LinearArgs{fc2_w, fc2_b});
      },
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "vit_block",
      [](const Tensor& x, const OptTensor& n1w, const OptTensor& n1b, double eps1, const Tensor& qkv_w,
         const OptTensor& qkv_b, const Tensor& proj_w, const OptTensor& proj_b, int64_t num_heads, double scale,
         const OptTensor& n2w, const OptTensor& n2b, double eps2, const Tensor& fc1_w, const OptTensor& fc1_b,
         const Tensor& fc2_w, const OptTensor& fc2_b) {
        RECORD_FUNCTION("fasttrack::vit_block", std::vector<c10::IValue>());
        return fasttrack::vit::block(x, LayerNormArgs{n1w, n1b, eps1}, LinearArgs{qkv_w, qkv_b},
                                     LinearArgs{proj_w, proj_b}, num_heads, scale, LayerNormArgs{n2w, n2b, eps2},
                                     LinearArgs{fc1_w, fc1_b}, LinearArgs{fc2_w, fc2_b});
      },
      py::call_guard<py::gil_scoped_release>());
}

// fasttrack.nn.linear's packed GEMM (fasttrack/panel_linear.h): rule, packing, product.
void def_panel_linear(py::module_& m) {
  namespace pl = fasttrack::panel_linear;
  m.def(
      "panel_linear_serves",
      [](py::object dtype, int64_t in_features, int64_t out_features) {
        return pl::serves(torch::python::detail::py_object_to_dtype(dtype), in_features, out_features);
      },
      "Whether fasttrack's panel GEMM serves a weight of this dtype and shape here (fasttrack/panel_linear.h)");
  m.def("panel_pack", &pl::pack, "A [N, K] weight packed for panel_linear ([N/64, K, 64])",
        py::call_guard<py::gil_scoped_release>());
  m.def(
      "panel_linear",
      [](const Tensor& x, const Tensor& packed, const OptTensor& bias, bool gelu, const OptTensor& residual) {
        TORCH_CHECK_VALUE(!(gelu && residual.has_value()),
                          "fasttrack.panel_linear: `gelu` and `residual` are two epilogues; give at most one");
        const auto epilogue = residual.has_value() ? pl::Epilogue::add : gelu ? pl::Epilogue::gelu : pl::Epilogue::none;
        return pl::linear(x, packed, bias, epilogue, residual);
      },
      "x @ W.T + bias [then GELU, or + residual] with W packed by panel_pack",
      py::call_guard<py::gil_scoped_release>());
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.def("output_cache_clear", &fasttrack::output_cache_clear, "Free the cached large-output buffers; bytes freed");
  m.def("output_cache_bytes", &fasttrack::output_cache_bytes, "Bytes in free cached large-output buffers");
  m.def("output_cache_limit", &fasttrack::output_cache_limit, "FASTTRACK_CPU_CACHE_MB, in bytes");
  m.def("cpu_isa", &fasttrack::cpu_isa_name, "Vector ISA of the CPU kernels: avx512, avx2 or baseline");
  m.def("content_stamp", &fasttrack::content_stamp,
        "A 64-bit stamp of a CPU tensor's content (a stripe of its elements: every row and every column)");
  m.def(
      "sources_key",
      [](const std::vector<std::optional<at::Tensor>>& sources) { return py::bytes(fasttrack::sources_key(sources)); },
      "The state of a cache's source tensors as bytes (fasttrack.nn.derived.Derived)");
  m.def(
      "layer_norm_fast_path",
      [](py::object dtype) {
        return fasttrack::layer_norm::fast_path_serves(torch::python::detail::py_object_to_dtype(dtype));
      },
      "Whether fasttrack::_layer_norm's vectorised CPU kernel serves this dtype on this CPU");
  m.def(
      "attention_fast_path",
      [](py::object dtype, int64_t head_dim) {
        return fasttrack::attention::fast_path_serves(torch::python::detail::py_object_to_dtype(dtype), head_dim);
      },
      "Whether fasttrack::_attention's vectorised CPU kernel serves this dtype and head dim on this CPU");
  auto cpu = m.def_submodule("cpu", "Registered CPU kernels, called without the boxed Python dispatch");
  CpuKernel<Selection(const Tensor&, const Tensor&, const Tensor&, const OptTensor&, const OptTensor&, const OptTensor&,
                      int64_t, int64_t, double)>::def(cpu, "topk_select");
  CpuKernel<Selection(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const OptTensor&, const OptTensor&,
                      const OptTensor&, int64_t, int64_t, double, double)>::def(cpu, "topk_select_qk");
  CpuKernel<Tensor(const Tensor&, const Tensor&, c10::string_view, bool)>::def(cpu, "gather_tokens");
  CpuKernel<Tensor(const Tensor&, const Tensor&, int64_t, c10::string_view, at::IntArrayRef, bool)>::def(cpu,
                                                                                                         "pad_scatter");
  CpuKernel<std::tuple<Tensor, Tensor, Tensor, Tensor>(const Tensor&, const OptTensor&, const OptTensor&,
                                                       const OptTensor&, double,
                                                       c10::string_view)>::def(cpu, "merge_tokens");
  CpuKernel<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&)>::def(cpu, "cosine_argmax");
  CpuKernel<Tensor(const Tensor&, const Tensor&, const OptTensor&, const Tensor&, const OptTensor&, const OptTensor&,
                   double, bool)>::def(cpu, "pruned_linear");
  CpuKernel<Tensor(const Tensor&, const Tensor&, const OptTensor&, const OptTensor&, double, bool)>::def(
      cpu, "_pruned_linear_gather");
  CpuKernel<Tensor(const Tensor&, int64_t, double)>::def(cpu, "_attention");
  CpuKernel<Tensor(const Tensor&, const OptTensor&, const OptTensor&, double)>::def(cpu, "_layer_norm");
  def_vit_block(cpu);
  def_panel_linear(cpu);
}
