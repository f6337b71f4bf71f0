"""`_layer_norm`: LayerNorm over the last dim (internal op; `fasttrack.nn`'s fused ViT block calls
it on CPU). Semantics: `fasttrack.reference.layer_norm`."""
from __future__ import annotations

import torch

from fasttrack import _extension, _opchecks as checks
from fasttrack.ops._registry import CheckCase, OpDef, dispatch, register

SCHEMA = "(Tensor x, Tensor? weight, Tensor? bias, float eps) -> Tensor"


def _fake(x, weight, bias, eps):
    checks.layer_norm(x, weight, bias, eps)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    x, weight, bias, eps = inputs
    ctx.save_for_backward(x, weight, bias)
    ctx.eps = eps


def _backward(ctx, grad):
    """ATen's LayerNorm backward at the statistics recomputed in the accumulation dtype."""
    x, weight, bias = ctx.saved_tensors
    acc = torch.promote_types(x.dtype, torch.float32)
    xa = x.to(acc)
    wa = None if weight is None else weight.to(acc)
    ba = None if bias is None else bias.to(acc)
    shape = [x.shape[-1]]
    _, mean, rstd = torch.ops.aten.native_layer_norm(xa, shape, wa, ba, ctx.eps)
    dx, dw, db = torch.ops.aten.native_layer_norm_backward(grad.to(acc), xa, shape, mean, rstd, wa, ba,
                                                           [True, wa is not None, ba is not None])
    return (dx.to(x.dtype), None if weight is None else dw.to(weight.dtype),
            None if bias is None else db.to(bias.dtype), None)


def _cases(device, dtype):
    """The ViT-B token matrices of OSTrack-256 (64 + 256 tokens), OSTrack-384 (144 + 576) and after
    candidate elimination (244, 153, batch 2), ViT-S width 384, and odd shapes: one token, a width
    that is not a multiple of 16 (the masked tail), no affine parameters, a 2-D input."""
    g = torch.Generator().manual_seed(0)
    cases = []
    for name, shape, affine in [("ostrack256", (1, 320, 768), True), ("ostrack384", (1, 720, 768), True),
                                ("ce-244", (2, 244, 768), True), ("ce-153", (1, 153, 768), True),
                                ("vit-s", (1, 320, 384), True), ("one-token", (3, 1, 768), True),
                                ("odd-width", (2, 7, 37), True), ("no-affine", (1, 9, 64), False),
                                ("2d", (5, 100), True)]:
        x = (torch.randn(*shape, generator=g) * 3 + 1).to(device, dtype)
        C = shape[-1]
        w = (torch.randn(C, generator=g) * 0.5 + 1).to(device, dtype) if affine else None
        b = torch.randn(C, generator=g).to(device, dtype) if affine else None
        cases.append(CheckCase(f"{name}/{'x'.join(map(str, shape))}", (x, w, b, 1e-6),
                               grad=(0, 1, 2) if affine else (0,)))
    return cases


# CPU only: on CUDA, fasttrack.nn's fused modules run torch's LayerNorm.
LAYER_NORM = register(OpDef(name="_layer_norm", schema=SCHEMA, fake=_fake, check=checks.layer_norm,
                            setup_context=_setup_context, backward=_backward, cuda=None, cases=_cases))


def _served() -> frozenset:
    if not _extension.loaded:
        return frozenset()
    from fasttrack import _C
    return frozenset(dt for dt in (torch.float32, torch.bfloat16) if _C.layer_norm_fast_path(dt))


# The dtypes the vectorised CPU kernel serves on this CPU, asked once (a set lookup is also what
# Dynamo can trace; the pybind call is not).
_FAST = _served()


def fast_path_serves(dtype: torch.dtype) -> bool:
    """Whether `layer_norm`'s CPU kernel runs its vectorised path for this dtype (float32 with
    AVX-512, bfloat16 with AVX512_BF16; ATEN_CPU_CAPABILITY caps it as it caps ATen); other inputs run
    ``at::layer_norm``."""
    return dtype in _FAST


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
               eps: float) -> torch.Tensor:
    """LayerNorm over the last dim, computed in float32 (float64 for float64) and rounded once.

    Args:
        x: ``[..., C]`` floating.
        weight, bias: ``[C]`` floating (any float dtype; read as the accumulation dtype) or None.
        eps: added to the variance.

    Returns:
        ``[..., C]`` in x's dtype, contiguous. The CPU kernel is vectorised for float32 / bfloat16
        (`fast_path_serves`); other inputs run ``at::layer_norm``. Differentiable w.r.t. x, weight
        and bias.
    """
    return dispatch("_layer_norm", x, weight, bias, checks.float_arg(eps, "_layer_norm", "eps"))
