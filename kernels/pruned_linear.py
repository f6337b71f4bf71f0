"""Triton kernel of `fasttrack::pruned_linear` (semantics: `fasttrack.reference.pruned_linear`).

One tiled GEMM ``out[M, d_out] = LN?(x)[:, in_index] @ weight.T + bias`` whose K loop walks
``in_index``: each step loads BLOCK_K kept column numbers, then the x tile by those columns (an
indirect, row-strided load) and the matching contiguous tile of the pruned weight ``[d_out, d_kept]``.
Accumulation is in float32 (float64 for float64 inputs, so gradcheck can run on this path), the bias
is added in the epilogue. With ``normalize`` a prologue pass computes each row's mean and rstd over
all d_in features (two passes over the row, as accurate as the reference), and every gathered tile is
normalised (and the affine applied) on load, in fp32, then rounded to x's dtype for the dot as an
unfused LayerNorm in that dtype would. The dot runs on tensor cores in fp16/bf16, and as 3xTF32 for
fp32 (fp32-level accuracy; plain TF32 would miss the fp32 tolerance). Programs are ordered in
GROUP_M-row super-groups so the weight tiles are reused from L2.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from fasttrack import _opchecks as checks
from fasttrack.kernels import INTERPRET, TRITON_BEFORE_3_7
from fasttrack.kernels._aot import AotSpec
from fasttrack.kernels._checks import distinct_in_range


@triton.jit
def _row_stats(x_ptr, rows, row_ok, D, s_xm, s_xd, eps, ACC: tl.constexpr, BLOCK_D: tl.constexpr,
               BLOCK_M: tl.constexpr):
    total = tl.zeros([BLOCK_M], dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        m = row_ok[:, None] & (d < D)[None, :]
        v = tl.load(x_ptr + rows[:, None] * s_xm + d[None, :] * s_xd, mask=m, other=0.0).to(ACC)
        total += tl.sum(v, axis=1)
    mean = total / D
    sq = tl.zeros([BLOCK_M], dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        m = row_ok[:, None] & (d < D)[None, :]
        v = tl.load(x_ptr + rows[:, None] * s_xm + d[None, :] * s_xd, mask=m, other=0.0).to(ACC)
        dv = tl.where(m, v - mean[:, None], 0.0)
        sq += tl.sum(dv * dv, axis=1)
    rstd = 1.0 / tl.sqrt(sq / D + eps)
    return mean, rstd


@triton.jit
def _rne_bf16(v):
    """fp32 -> the nearest bfloat16 value (ties to even), kept in fp32. Only for the interpreter,
    whose fp32 -> bf16 cast truncates (the GPU's cvt rounds to nearest even)."""
    b = v.to(tl.uint32, bitcast=True)
    b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
    return b.to(tl.float32, bitcast=True)


@triton.jit
def _pruned_linear_kernel(x_ptr, w_ptr, b_ptr, idx_ptr, lnw_ptr, lnb_ptr, out_ptr, M, N, K, D,
                          s_xm, s_xd, s_wn, s_wk, s_om, s_on, eps,
                          HAS_BIAS: tl.constexpr, NORMALIZE: tl.constexpr, HAS_LNW: tl.constexpr,
                          HAS_LNB: tl.constexpr, IS_FP64: tl.constexpr, DOT_NATIVE: tl.constexpr,
                          BF16_RNE: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          GROUP_M: tl.constexpr):
    """x [M, D] (strided), w [N, K] (strided), idx [K] contiguous, out [M, N]."""
    ACC: tl.constexpr = tl.float64 if IS_FP64 else tl.float32
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * grid_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = min(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    n_ok = cols_n < N
    if NORMALIZE:
        mean, rstd = _row_stats(x_ptr, rows, row_ok, D, s_xm, s_xd, eps, ACC, BLOCK_K, BLOCK_M)

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_ok = kk < K
        src = tl.load(idx_ptr + kk, mask=k_ok, other=0)
        a_ok = row_ok[:, None] & k_ok[None, :]
        a = tl.load(x_ptr + rows[:, None] * s_xm + src[None, :] * s_xd, mask=a_ok, other=0.0)
        if NORMALIZE:
            h = (a.to(ACC) - mean[:, None]) * rstd[:, None]
            if HAS_LNW:
                h = h * tl.load(lnw_ptr + src, mask=k_ok, other=0.0).to(ACC)[None, :]
            if HAS_LNB:
                h = h + tl.load(lnb_ptr + src, mask=k_ok, other=0.0).to(ACC)[None, :]
            # masked lanes would hold -mean*rstd (+ beta): zero them so they add nothing
            h = tl.where(a_ok, h, 0.0)
            if BF16_RNE:
                a = _rne_bf16(h)    # bf16 values held in fp32: the interpreter's dot path upcasts anyway
            else:
                a = h.to(x_ptr.dtype.element_ty)
        w = tl.load(w_ptr + cols_n[None, :] * s_wn + kk[:, None] * s_wk, mask=k_ok[:, None] & n_ok[None, :],
                    other=0.0)
        if DOT_NATIVE:
            acc = tl.dot(a, w, acc)
        elif IS_FP64:
            # out_dtype named: triton < 3.7 asserts the accumulator is fp32 otherwise
            acc = tl.dot(a.to(ACC), w.to(ACC), acc, input_precision="ieee", out_dtype=ACC)
        else:
            # fp32 inputs, and bf16 under the interpreter (its bf16 dot is wrong): products of two
            # bf16 values are exact in fp32, so this equals the native dot. fp32 runs as 3xTF32 on
            # tensor cores: fp32-level accuracy (plain tf32 misses the fp32 tolerance by 100x), and
            # the "ieee" FMA dot spills at these tile sizes on sm_80
            acc = tl.dot(a.to(tl.float32), w.to(tl.float32), acc, input_precision="tf32x3")

    if HAS_BIAS:
        acc += tl.load(b_ptr + cols_n, mask=n_ok, other=0.0).to(ACC)[None, :]
    if BF16_RNE:
        acc = _rne_bf16(acc)        # then the cast below is exact
    tl.store(out_ptr + rows[:, None] * s_om + cols_n[None, :] * s_on, acc.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & n_ok[None, :])


# ----------------------------------------------------------------------------------------------
# Tile configs. GPU: autotuned per (M, N, K, D) among configs sized for the tracker shapes
# (M = B·320, d_in = 768, d_out ∈ {768, 2304, 3072}, d_kept ≈ 540): 64-row tiles keep the B=1
# case (M=320) at ≥ 60 programs for d_out=768; 128-wide tiles feed large B. fp32 runs 3xTF32
# (three dots on split operands), which needs twice the registers: 8 warps per tile, else sm_80
# spills (and BLOCK_K=16: at 32 the LayerNorm variant still spills). Interpreter: one config.
# ----------------------------------------------------------------------------------------------
GPU_CONFIGS = {
    "half": [
        dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=4),
        dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=4),
        dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=8, num_stages=4),
        dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8, num_warps=8, num_stages=3),
    ],
    "fp32": [
        dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=16, GROUP_M=8, num_warps=8, num_stages=3),
        dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=16, GROUP_M=8, num_warps=8, num_stages=3),
        dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=16, GROUP_M=8, num_warps=8, num_stages=3),
    ],
}
if TRITON_BEFORE_3_7:
    # these spill with triton 3.6 on sm_80 (AOT report); the others cover the same shapes
    GPU_CONFIGS = {"half": [c for c in GPU_CONFIGS["half"] if (c["BLOCK_M"], c["BLOCK_N"]) != (64, 128)],
                   "fp32": [c for c in GPU_CONFIGS["fp32"] if (c["BLOCK_M"], c["BLOCK_N"]) != (64, 64)]}
INTERPRETER_CONFIG = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=4, num_warps=4, num_stages=1)


def _as_triton_configs(cfgs):
    out = []
    for c in cfgs:
        c = dict(c)
        nw, ns = c.pop("num_warps"), c.pop("num_stages")
        out.append(triton.Config(c, num_warps=nw, num_stages=ns))
    return out


def _autotuned(cfgs):
    return triton.autotune(_as_triton_configs([INTERPRETER_CONFIG] if INTERPRET else cfgs),
                           key=["M", "N", "K", "D", "NORMALIZE"])(_pruned_linear_kernel)


# fp64 (gradcheck) shares the fp32 tiles
_KERNELS = {"half": _autotuned(GPU_CONFIGS["half"]), "fp32": _autotuned(GPU_CONFIGS["fp32"])}


def _family(dtype) -> str:
    return "half" if dtype in (torch.float16, torch.bfloat16) else "fp32"


def pruned_linear(x, weight, bias, in_index, ln_weight=None, ln_bias=None, eps=1e-5, normalize=False):
    """Launcher with the schema's argument list (the registered CUDA kernel; the `triton` backend on
    CPU tensors, under the interpreter). It is reached by raw torch.ops calls too: it checks first."""
    checks.pruned_linear(x, weight, bias, in_index, ln_weight, ln_bias, eps, normalize)
    d_in = x.shape[-1]
    d_out, d_kept = weight.shape
    distinct_in_range(in_index, d_in, "pruned_linear", "in_index")
    # a view unless x's leading dims cannot be merged (M counted, not -1: d_in may be 0)
    x2 = x.reshape(math.prod(x.shape[:-1]), d_in)
    M = x2.shape[0]
    out = torch.empty(M, d_out, dtype=x.dtype, device=x.device)
    if M and d_out:
        idx = in_index.contiguous()
        dummy = out  # never read: the HAS_* flags are off
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(d_out, meta["BLOCK_N"]),)  # noqa: E731
        _KERNELS[_family(x.dtype)][grid](
            x2, weight, bias if bias is not None else dummy, idx,
            ln_weight if ln_weight is not None else dummy, ln_bias if ln_bias is not None else dummy, out,
            M, d_out, d_kept, d_in, *x2.stride(), *weight.stride(), *out.stride(), float(eps),
            HAS_BIAS=bias is not None, NORMALIZE=bool(normalize), HAS_LNW=ln_weight is not None,
            HAS_LNB=ln_bias is not None, IS_FP64=x.dtype == torch.float64, DOT_NATIVE=_dot_native(x.dtype),
            BF16_RNE=INTERPRET and x.dtype == torch.bfloat16)
    return out.view(*x.shape[:-1], d_out)


def _dot_native(dtype) -> bool:
    return dtype == torch.float16 or (dtype == torch.bfloat16 and not INTERPRET)


# ----------------------------------------------------------------------------------------------
# Ahead-of-time compile specs: every GPU config × fp32/fp16/bf16, for the plain product (bias only)
# and the fused LayerNorm one with every optional input (the most registers).
# ----------------------------------------------------------------------------------------------
_TRITON_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _aot_specs():
    specs = []
    ints = ["M", "N", "K", "D", "s_xm", "s_xd", "s_wn", "s_wk", "s_om", "s_on"]
    for dtype, t in _TRITON_DTYPE.items():
        sig = dict(x_ptr=f"*{t}", w_ptr=f"*{t}", b_ptr=f"*{t}", idx_ptr="*i64", lnw_ptr=f"*{t}", lnb_ptr=f"*{t}",
                   out_ptr=f"*{t}", eps="fp32", **dict.fromkeys(ints, "i32"))
        for cfg in GPU_CONFIGS[_family(dtype)]:
            cfg = dict(cfg)
            nw, ns = cfg.pop("num_warps"), cfg.pop("num_stages")
            for norm in (False, True):
                flags = dict(HAS_BIAS=True, NORMALIZE=norm, HAS_LNW=norm, HAS_LNB=norm, IS_FP64=False,
                             DOT_NATIVE=dtype != torch.float32, BF16_RNE=False)
                tag = f"{t}/{cfg['BLOCK_M']}x{cfg['BLOCK_N']}x{cfg['BLOCK_K']}" + ("/ln" if norm else "")
                specs.append(AotSpec(_pruned_linear_kernel, sig, {**flags, **cfg}, num_warps=nw, num_stages=ns,
                                     name=tag))
    return specs


AOT_SPECS = _aot_specs()
