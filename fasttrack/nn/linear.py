"""`FastLinear`: `nn.Linear` whose CPU inference forward runs oneDNN with a pre-packed weight.

Why: on the CPUs this package targets, `F.linear` on an fp32 ``[d_out, d_in]`` weight re-lays the
weight out for the GEMM on every call; oneDNN with the weight reordered once into its blocked
format (`mkldnn._reorder_linear_weight`) and `mkldnn._linear_pointwise` is ~2x faster for the ViT-B
linears at 320 tokens (fp32; ~1.4x for bf16), see ``bench/bench_linear.py``.

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


class PackedWeight(Derived):
    """A oneDNN pre-packed copy of a weight, rebuilt when the weight changes (`fasttrack.nn.derived`
    states what is seen). Shared by `FastLinear` and `fasttrack.nn.pruned.PrunedLinear`."""

    __slots__ = ()

    def get(self, weight: torch.Tensor) -> torch.Tensor:
        return super().get((weight,), lambda: torch.ops.mkldnn._reorder_linear_weight(weight.detach()))


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ W.T + bias`` through oneDNN with the weight pre-packed by `PackedWeight`."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


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
        """Whether `forward(x)` takes the packed oneDNN path in the current grad/compile context."""
        return _takes_packed(x, self.weight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.weight, self.bias   # one module attribute lookup each (~0.3 µs apiece)
        if _takes_packed(x, weight, bias):
            return packed_linear(x, self._packed.get(weight), bias)
        return F.linear(x, weight, bias)


def _takes_packed(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    return x.shape[-1] == weight.shape[1] and packable(x, weight, bias)

