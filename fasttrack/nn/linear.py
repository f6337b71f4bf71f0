"""`FastLinear`: `nn.Linear` whose CPU inference forward runs a GEMM on a pre-packed weight.

Why: on the CPUs this package targets, `F.linear` on an fp32 ``[d_out, d_in]`` weight re-lays the
weight out for the GEMM on every call; oneDNN with the weight reordered once into its blocked
format (`mkldnn._reorder_linear_weight`) and `mkldnn._linear_pointwise` is ~2x faster for the ViT-B
linears at 320 tokens (fp32; ~1.4x for bf16), see ``bench/bench_linear.py``. Where `panel_serves`
(AVX-512 CPUs, out_features a multiple of 64) the weight is packed for fasttrack's own panel GEMM
over oneDNN's brgemm micro-kernel instead (csrc/include/fasttrack/panel_linear.h), 1-9% faster
again (1-4% on one Zen 4 core at B=1, more on 2 threads): it skips oneDNN's per-call primitive setup.

Dispatch rule (`FastLinear.uses_packed` states it; tests check it). The packed path runs when all of:
- oneDNN is available, the input is on CPU, and x / weight (/ bias) are all float32 or all bfloat16
  (oneDNN's fp16 path needs CPU features this target does not have);
- no gradient is needed: grad mode is off, or none of x / weight / bias requires grad (the packed
  product is not differentiable);
- the call is not being traced by `torch.compile` (the packed weight is an opaque oneDNN tensor that
  fake tensors cannot follow; with ``freezing`` Inductor packs the weight itself);
- x's last dim equals the weight's width (otherwise `F.linear` raises nn.Linear's own shape error;
  oneDNN's names nothing).
Otherwise `F.linear` runs, exactly `nn.Linear.forward`.

The packed weight is a cache, not state (`fasttrack.nn.derived.Derived`): it is not in ``state_dict``,
and it is rebuilt whenever the weight changes — by a new Parameter or new storage (``.to()``,
``.data =``), in place (``weight._version``: ``load_state_dict``, an optimiser step), or in place
through ``.data`` (its content stamp; see `fasttrack.nn.derived` for what that sees).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fasttrack import _extension
from fasttrack.backend import capturing_graph
from fasttrack.nn.derived import Derived

# read once: Dynamo refuses to trace `mkldnn.is_available`
_MKLDNN = torch.backends.mkldnn.is_available()
# oneDNN's bf16 GEMMs need AVX-512 (BW/VL/DQ) or AVX-NE-CONVERT: on an AVX2-only CPU (or under
# ONEDNN_MAX_CPU_ISA=AVX2) packing a bf16 weight raises, so bf16 then takes F.linear
_PACKED_DTYPES = (torch.float32,) + ((torch.bfloat16,) if _MKLDNN and torch.ops.mkldnn._is_mkldnn_bf16_supported()
                                     else ())


# Bound once: every linear of a tracker forward asks (attribute lookups through `torch.` cost ~0.1 µs each).
_grad_enabled = torch.is_grad_enabled


def packable(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    if capturing_graph():   # first: Dynamo traces this, and then nothing below
        return False
    dtype = x.dtype
    if not _MKLDNN or not x.is_cpu or dtype not in _PACKED_DTYPES or weight.dtype != dtype or not weight.is_cpu:
        return False
    if bias is not None and bias.dtype != dtype:
        return False
    if _grad_enabled() and (x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)):
        return False
    return True


_PANEL = _extension.cpu_functions("panel_linear", "panel_pack", "panel_linear_serves")


# The C++ rule's answer per (dtype, in_features, out_features), taken while oneDNN is enabled: every
# FastLinear call asks, and the pybind call with its dtype conversion costs more than this lookup.
_PANEL_RULE: dict = {}
_mkldnn_enabled = torch._C._get_mkldnn_enabled


def panel_serves(weight: torch.Tensor) -> bool:
    """Whether ``weight`` ([out_features, in_features]) is packed for fasttrack's panel GEMM
    (`fasttrack._C.cpu.panel_linear`) rather than for oneDNN's primitive. The rule is the C++ one
    (csrc/include/fasttrack/panel_linear.h): float32 / bfloat16, out_features a multiple of 64 (an
    even in_features for bfloat16), an AVX-512 CPU without AMX (AVX512_BF16 for bfloat16) under
    ATEN_CPU_CAPABILITY, oneDNN's brgemm micro-kernel present and oneDNN enabled
    (``torch.backends.mkldnn.flags(enabled=...)``, read per call)."""
    if _PANEL is None or weight.dim() != 2 or not _mkldnn_enabled():
        return False
    key = (weight.dtype, weight.shape[1], weight.shape[0])
    served = _PANEL_RULE.get(key)
    if served is None:
        served = _PANEL.panel_linear_serves(*key)
        if _mkldnn_enabled():   # not switched off meanwhile: the answer is the CPU's
            _PANEL_RULE[key] = served
    return served


class PackedWeight(Derived):
    """A packed copy of a weight for the packed CPU GEMMs, rebuilt when the weight changes
    (`fasttrack.nn.derived` states what is seen): fasttrack's panel layout where `panel_serves`,
    else oneDNN's reordered weight (this cache itself). Each form has its own cache, so a rule that
    changes between calls (``torch.backends.mkldnn.flags(enabled=False)``) never pairs a form with
    the other kernel. Shared by `FastLinear` and `fasttrack.nn.pruned.PrunedLinear`."""

    __slots__ = ("_panel",)

    def __init__(self):
        self._panel = Derived()
        super().__init__()

    def clear(self) -> None:
        super().clear()
        self._panel.clear()

    def get(self, weight: torch.Tensor) -> torch.Tensor:
        if panel_serves(weight):
            return self._panel.get((weight,), lambda: _PANEL.panel_pack(weight.detach()))
        return super().get((weight,), lambda: torch.ops.mkldnn._reorder_linear_weight(weight.detach()))


# The packed GEMMs dispatch on the weight's packed form: an opaque oneDNN tensor runs oneDNN's
# primitive (torch.ops.mkldnn._linear_pointwise), a strided [N/64, K, 64] one fasttrack's panel
# GEMM. Measured on the Zen 4 VM (`python -m bench gemm`, ViT-B linears at 320 tokens,
# interleaved medians): the panel GEMM with its epilogue takes 0.96-0.99x oneDNN's time with the
# same post-op on 1 thread, 0.91-0.98x on 2, bf16 and fp32 alike.
def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ W.T + bias`` with the weight packed by `PackedWeight` (or oneDNN's reorder)."""
    if packed.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    return _PANEL.panel_linear(x.contiguous(), packed, bias, False, None)


def packed_linear_gelu(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``gelu(x @ W.T + bias)``, exact (erf) GELU, as one call (oneDNN: a GELU post-op)."""
    if packed.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "gelu", [], "none")
    return _PANEL.panel_linear(x.contiguous(), packed, bias, True, None)


def packed_linear_add(x: torch.Tensor, residual: torch.Tensor, packed: torch.Tensor,
                      bias: torch.Tensor | None) -> torch.Tensor:
    """``residual + (x @ W.T + bias)`` as one call (oneDNN: a sum post-op); x and residual contiguous,
    residual of the output's shape and dtype."""
    if packed.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise.binary(x, residual, packed, bias, "add")
    return _PANEL.panel_linear(x, packed, bias, False, residual)


class FastLinear(nn.Linear):
    """Drop-in `nn.Linear` (same constructor, parameters, state-dict keys) with the packed CPU
    inference path described in the module docstring."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self._packed = PackedWeight()

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "FastLinear":
        """A FastLinear sharing ``linear``'s Parameters (no copy: updates to either are seen by both)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"FastLinear.from_linear: `linear` must be an nn.Linear, got {type(linear).__name__}")
        m = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta",
                dtype=linear.weight.dtype)
        m.weight = linear.weight
        m.bias = linear.bias
        m.train(linear.training)
        return m

    def uses_packed(self, x: torch.Tensor) -> bool:
        """Whether `forward(x)` takes the packed path (panel GEMM or oneDNN) in the current grad/compile
        context."""
        return _takes_packed(x, self.weight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.weight, self.bias   # one module attribute lookup each (~0.3 µs apiece)
        if _takes_packed(x, weight, bias):
            return packed_linear(x, self._packed.get(weight), bias)
        return F.linear(x, weight, bias)


def _takes_packed(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    return x.shape[-1] == weight.shape[1] and packable(x, weight, bias)

