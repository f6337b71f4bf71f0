"""`pruned_linear`: a linear layer over a kept subset of input dimensions, optionally fused with
the LayerNorm in front of it (ABTrack's pruned ViT). Semantics: `fasttrack.reference.pruned_linear`."""
from __future__ import annotations

import math

import torch

from fasttrack import _opchecks as checks
from fasttrack.ops._registry import CheckCase, OpDef, dispatch, register

SCHEMA = ("(Tensor x, Tensor weight, Tensor? bias, Tensor in_index, Tensor? ln_weight=None, "
          "Tensor? ln_bias=None, float eps=1e-05, bool normalize=False) -> Tensor")
SCHEMA_GATHER = ("(Tensor x, Tensor in_index, Tensor? ln_weight=None, Tensor? ln_bias=None, float eps=1e-05, "
                 "bool normalize=False) -> Tensor")


def _fake(x, weight, bias, in_index, ln_weight=None, ln_bias=None, eps=1e-5, normalize=False):
    checks.pruned_linear(x, weight, bias, in_index, ln_weight, ln_bias, eps, normalize)
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def _setup_context(ctx, inputs, output):
    x, weight, bias, in_index, ln_weight, ln_bias, eps, normalize = inputs
    ctx.save_for_backward(x, weight, in_index, ln_weight, ln_bias)
    ctx.eps, ctx.normalize, ctx.has_bias = eps, normalize, bias is not None


def _backward(ctx, grad):
    """Recomputes the (normalised) kept input; the x-gradient is zero on pruned dims and goes
    through the LayerNorm when it is fused."""
    x, weight, in_index, ln_weight, ln_bias = ctx.saved_tensors
    d_in = x.shape[-1]
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32   # as the forward
    M = math.prod(x.shape[:-1])   # counted, not -1: d_in or d_out may be 0
    x2 = x.reshape(M, d_in).to(acc)
    g2 = grad.reshape(M, grad.shape[-1]).to(acc)
    w = ln_weight.to(acc) if ln_weight is not None else None
    b = ln_bias.to(acc) if ln_bias is not None else None
    if ctx.normalize:
        # the reference's own LayerNorm (affine included): the weight gradient sums hk over all rows,
        # where a differently rounded hk would show through cancellation
        h, mean, rstd = torch.native_layer_norm(x2, [d_in], w, b, ctx.eps)
        hk = h.index_select(-1, in_index)
    else:
        hk = x2.index_select(-1, in_index)
    g_w = (g2.t() @ hk).to(weight.dtype)
    g_b = g2.sum(0).to(weight.dtype) if ctx.has_bias else None
    g_hk = g2 @ weight.to(acc)
    g_h = torch.zeros_like(x2).index_copy_(1, in_index, g_hk)
    g_lnw = g_lnb = None
    if ctx.normalize:
        g_x, g_lnw, g_lnb = torch.ops.aten.native_layer_norm_backward(
            g_h, x2, [d_in], mean, rstd, w, b, [True, w is not None, b is not None])
        g_lnw = None if ln_weight is None else g_lnw.to(ln_weight.dtype)
        g_lnb = None if ln_bias is None else g_lnb.to(ln_bias.dtype)
    else:
        g_x = g_h
    return g_x.reshape(x.shape).to(x.dtype), g_w, g_b, None, g_lnw, g_lnb, None, None


def _cases(device, dtype):
    """ABTrack's pruned ViT-B linears at OSTrack-256 (320 tokens), d* = 540 (head-aligned, 45·12):
    norm1 → qkv and norm2 → fc1 fused with their LayerNorm, proj plain (`fasttrack.nn.pruned`
    states which linears are pruned); DeiT-tiny (d = 192) and an odd shape."""
    g = torch.Generator().manual_seed(0)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device, dtype)

    def keep(d_in, k):
        return torch.randperm(d_in, generator=g)[:k].sort().values.to(device)

    cases = []
    for name, B, d_in, k, d_out, ln in [("qkv+ln1", 1, 768, 540, 2304, True), ("proj", 1, 768, 540, 768, False),
                                        ("fc1+ln2", 2, 768, 540, 3072, True), ("tiny-proj", 1, 192, 96, 192, False),
                                        ("odd", 3, 50, 37, 33, True)]:
        x = rnd(B, 320 if d_in >= 192 else 7, d_in)
        norm = (rnd(d_in, scale=0.5) + 1, rnd(d_in, scale=0.1)) if ln else (None, None)
        args = (x, rnd(d_out, k, scale=k ** -0.5), rnd(d_out, scale=0.1), keep(d_in, k), *norm, 1e-5, ln)
        cases.append(CheckCase(f"{name}/B{B}/{d_in}->{k}->{d_out}", args, grad=(0, 1, 2, 4, 5) if ln else (0, 1, 2)))
    return cases


PRUNED_LINEAR = register(OpDef(name="pruned_linear", schema=SCHEMA, fake=_fake, check=checks.pruned_linear,
                               setup_context=_setup_context, backward=_backward,
                               cuda="triton:pruned_linear:pruned_linear", cases=_cases))


def _fake_gather(x, in_index, ln_weight=None, ln_bias=None, eps=1e-5, normalize=False):
    checks.pruned_linear_gather(x, in_index, ln_weight, ln_bias, eps, normalize)
    return x.new_empty(math.prod(x.shape[:-1]), in_index.shape[0])


def _gather_backward(ctx, grad):
    raise RuntimeError("fasttrack._pruned_linear_gather is inference-only (PrunedLinear calls it only when no "
                       "gradient is needed); differentiate through fasttrack.pruned_linear instead")


def _cases_gather(device, dtype):
    """pruned_linear's cases without the GEMM: the gather with and without its fused LayerNorm."""
    return [CheckCase(c.name.rpartition("->")[0], (c.args[0], *c.args[3:])) for c in _cases(device, dtype)]


# Phase 1 of the CPU kernel alone (csrc/cpu/pruned_linear_kernel.cpp): `fasttrack.nn.PrunedLinear`
# feeds it to its cached pre-packed oneDNN weight on the inference path (`gather_kept`). CPU only,
# and its autograd formula raises, so a backward through it can never be silently wrong.
PRUNED_LINEAR_GATHER = register(OpDef(name="_pruned_linear_gather", schema=SCHEMA_GATHER, fake=_fake_gather,
                                      check=checks.pruned_linear_gather,
                                      setup_context=lambda ctx, inputs, output: None, backward=_gather_backward,
                                      cuda=None, cases=_cases_gather))


def pruned_linear(x, weight, bias, in_index, norm=None):
    """``LN?(x).index_select(-1, in_index) @ weight.T + bias``. ``weight [d_out, d_kept]`` is stored
    pruned; ``norm=(ln_weight, ln_bias, eps)`` fuses the LayerNorm in front (statistics over all
    ``d_in``). Differentiable w.r.t. x, weight, bias and the LayerNorm affine parameters."""
    ln_w, ln_b, eps = norm if norm is not None else (None, None, 1e-5)
    return dispatch("pruned_linear", x, weight, bias, in_index, ln_w, ln_b, eps, norm is not None)


def gather_kept(x, in_index, ln_weight, ln_bias, eps, normalize):
    """Phase 1 of `pruned_linear` alone (``LN?(x)`` at the kept dims, ``[M, d_kept]``), for
    `fasttrack.nn.PrunedLinear`'s inference path: the internal op ``_pruned_linear_gather``."""
    return dispatch("_pruned_linear_gather", x, in_index, ln_weight, ln_bias, float(eps), normalize)
