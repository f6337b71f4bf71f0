"""`_attention`: the multi-head self-attention core, read in place from the qkv projection's output
(internal op; `fasttrack.nn`'s fused attention calls it on CPU). Semantics:
`fasttrack.reference.attention`."""
from __future__ import annotations

import torch

from fasttrack import _extension, _opchecks as checks
from fasttrack.ops._registry import CheckCase, OpDef, dispatch, register

SCHEMA = "(Tensor qkv, int num_heads, float scale) -> Tensor"


def _fake(qkv, num_heads, scale):
    checks.attention(qkv, num_heads, scale)
    B, N, C3 = qkv.shape
    return qkv.new_empty(B, N, C3 // 3)


def _setup_context(ctx, inputs, output):
    qkv, num_heads, scale = inputs
    ctx.save_for_backward(qkv)
    ctx.num_heads, ctx.scale = num_heads, scale


def _backward(ctx, grad):
    """Recomputes the probabilities P in the accumulation dtype; with O = P·v and S = q·kᵀ·scale:
    dv = Pᵀ·dO, dS = P ⊙ (dO·vᵀ - rowsum(dO ⊙ O)), dq = dS·k·scale, dk = dSᵀ·q·scale."""
    (qkv,) = ctx.saved_tensors
    B, N, C3 = qkv.shape
    C, H = C3 // 3, ctx.num_heads
    acc = torch.promote_types(qkv.dtype, torch.float32)
    q, k, v = qkv.to(acc).reshape(B, N, 3, H, C // H).permute(2, 0, 3, 1, 4).unbind(0)
    p = ((q @ k.transpose(-2, -1)) * ctx.scale).softmax(dim=-1)
    g = grad.to(acc).reshape(B, N, H, C // H).transpose(1, 2)
    dv = p.transpose(-2, -1) @ g
    dp = g @ v.transpose(-2, -1)
    ds = p * (dp - (dp * p).sum(-1, keepdim=True)) * ctx.scale
    dq, dk = ds @ k, ds.transpose(-2, -1) @ q
    dqkv = torch.stack([dq, dk, dv]).permute(1, 3, 0, 2, 4).reshape(B, N, C3)
    return dqkv.to(qkv.dtype), None, None


def _cases(device, dtype):
    """OSTrack-256 (64 + 256 tokens) and OSTrack-384 (144 + 576) ViT-B blocks (12 heads of 64), the
    token counts left after candidate elimination at keep ratio 0.7 (244, 153), a batch of 2, ViT-S
    (6 heads of 64), and odd shapes: one token, 7 tokens, head dim 32 (the composite path)."""
    g = torch.Generator().manual_seed(0)
    cases = []
    for name, B, N, C, H in [("ostrack256", 1, 320, 768, 12), ("ostrack384", 1, 720, 768, 12),
                             ("ce-244", 2, 244, 768, 12), ("ce-153", 1, 153, 768, 12),
                             ("vit-s", 1, 320, 384, 6), ("one-token", 3, 1, 768, 12), ("odd-7", 1, 7, 128, 2),
                             ("head-dim-32", 1, 33, 96, 3)]:
        qkv = torch.randn(B, N, 3 * C, generator=g).to(device, dtype)
        cases.append(CheckCase(f"{name}/B{B}/N{N}/C{C}/H{H}", (qkv, H, (C // H) ** -0.5), grad=(0,)))
    return cases


# CPU only: on CUDA, fasttrack.nn's fused attention runs scaled_dot_product_attention (FlashAttention).
ATTENTION = register(OpDef(name="_attention", schema=SCHEMA, fake=_fake, check=checks.attention,
                           setup_context=_setup_context, backward=_backward, cuda=None, cases=_cases))


def _served() -> frozenset:
    if not _extension.loaded:
        return frozenset()
    from fasttrack import _C
    return frozenset((dt, 64) for dt in (torch.float32, torch.bfloat16) if _C.attention_fast_path(dt, 64))


# The (dtype, head_dim) pairs the vectorised CPU kernel serves on this CPU, asked once: a set lookup
# is also what Dynamo can trace (the pybind call is not).
_FAST = _served()


def fast_path_serves(dtype: torch.dtype, head_dim: int) -> bool:
    """Whether `attention_core`'s CPU kernel runs its vectorised path for this dtype and head dim
    (float32 with AVX-512, bfloat16 with AVX512_BF16, head_dim 64; ATEN_CPU_CAPABILITY caps it as it
    caps ATen); other inputs run its composite matmul + softmax."""
    return (dtype, head_dim) in _FAST


def attention_core(qkv: torch.Tensor, num_heads: int, scale: float) -> torch.Tensor:
    """``softmax(q·kᵀ·scale)·v`` per head, q / k / v read in place from a fused qkv projection.

    Args:
        qkv: ``[B, N, 3·C]`` floating, the output of ``Linear(C, 3·C)`` in the timm / OSTrack layout
            (``[B, N, 3, H, D]``, ``C = H·D``).
        num_heads: H, dividing C.
        scale: the score scale (``D ** -0.5`` in a ViT).

    Returns:
        ``[B, N, C]`` in qkv's dtype: the heads' outputs side by side (what the output projection
        takes). The CPU kernel is vectorised for float32 / bfloat16 at head_dim 64
        (`fast_path_serves` says whether it serves an input on this CPU); other
        inputs run the composite matmul + softmax. Differentiable w.r.t. ``qkv``.
    """
    return dispatch("_attention", qkv, checks.int_arg(num_heads, "_attention", "num_heads"),
                    checks.float_arg(scale, "_attention", "scale"))
