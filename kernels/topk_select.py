"""Triton kernels of `fasttrack::topk_select` / `fasttrack::topk_select_qk` (semantics:
`fasttrack.reference.topk_select`).

One program per batch row does everything: it reads only the R query rows × L candidate columns of
each head (or, for `_qk`, computes those softmax rows from q and k), reduces them in float32 in the
reference's order (per head: Σ_r / R; then Σ_h / H; + bonus, with correctly rounded divisions),
ranks the candidates with one bitonic `tl.sort` of packed (score, index) keys, writes the four index
outputs and copies the output tokens. Nothing of size [B, H, R, L] is ever stored.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from fasttrack import _opchecks as checks
from fasttrack.kernels import INTERPRET, TRITON_BEFORE_3_7
from fasttrack.kernels._aot import AotSpec
from fasttrack.kernels._checks import index_in_range

MAX_LENGTH = 1024   # the candidates' keys are sorted in one program's registers


@triton.jit
def _select_store(score, b, L, K, gi_ptr, s_gb, s_gl, keep_ptr, removed_ptr, keep_g_ptr, removed_g_ptr,
                  HAS_GI: tl.constexpr, IDENTITY: tl.constexpr, BLOCK_L: tl.constexpr):
    j = tl.arange(0, BLOCK_L)
    valid = j < L
    if IDENTITY:
        idx = j.to(tl.int64)
    else:
        # Ascending key order = descending score, then ascending index (the tie rule). Every NaN
        # ranks first and -0 ties with +0, as torch.sort(descending=True, stable=True).
        bits = score.to(tl.uint32, bitcast=True)
        bits = tl.where((bits & 0x7FFFFFFF) > 0x7F800000, 0x7FC00000, bits)
        bits = tl.where(bits == 0x80000000, 0, bits)
        # `x ^ 0xFFFFFFFF` is ~x on uint32 (triton < 3.9's interpreter overflows numpy on unsigned ~)
        ascending = tl.where((bits >> 31) != 0, bits ^ 0xFFFFFFFF, bits | 0x80000000)
        key = ((ascending ^ 0xFFFFFFFF).to(tl.uint64) << 32) | j.to(tl.uint64)
        key = tl.where(valid, key, 0xFFFFFFFFFFFFFFFF)
        idx = (tl.sort(key, 0) & 0xFFFFFFFF).to(tl.int64)
    if HAS_GI:
        g = tl.load(gi_ptr + b * s_gb + idx * s_gl, mask=valid, other=0)
    else:
        g = idx
    in_keep = j < K
    in_removed = valid & (j >= K)
    tl.store(keep_ptr + b * K + j, idx, mask=in_keep)
    tl.store(keep_g_ptr + b * K + j, g, mask=in_keep)
    tl.store(removed_ptr + b * (L - K) + (j - K), idx, mask=in_removed)
    tl.store(removed_g_ptr + b * (L - K) + (j - K), g, mask=in_removed)


@triton.jit
def _gather_tokens(x_ptr, tok_ptr, keep_ptr, b, N, C, start, L, K, s_xb, s_xn, s_xc,
                   BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """tokens[b] = cat(x[b, :start], x[b, start + keep[b]], x[b, start + L:]). Reads keep back from
    global memory: the caller's barrier makes the other threads' stores visible."""
    M = N - L + K
    for o0 in range(0, M, BLOCK_T):
        o = o0 + tl.arange(0, BLOCK_T)
        in_out = o < M
        in_keep = (o >= start) & (o < start + K)
        kept = tl.load(keep_ptr + b * K + (o - start), mask=in_out & in_keep, other=0)
        src = tl.where(o < start, o, tl.where(in_keep, start + kept, o - K + L))
        for c0 in range(0, C, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            m = in_out[:, None] & (c < C)[None, :]
            v = tl.load(x_ptr + b * s_xb + src[:, None] * s_xn + c[None, :] * s_xc, mask=m)
            tl.store(tok_ptr + (b * M + o[:, None]) * C + c[None, :], v, mask=m)


@triton.jit
def _row_weights(qi_ptr, qw_ptr, b, rows, row_ok, s_qib, s_qir, s_wb, s_wr, HAS_W: tl.constexpr):
    qi = tl.load(qi_ptr + b * s_qib + rows * s_qir, mask=row_ok, other=0)
    if HAS_W:
        w = tl.load(qw_ptr + b * s_wb + rows * s_wr, mask=row_ok, other=0.0).to(tl.float32)
    else:
        w = tl.where(row_ok, 1.0, 0.0)
    return qi, w


@triton.jit
def _topk_select_kernel(attn_ptr, x_ptr, qi_ptr, qw_ptr, bonus_ptr, gi_ptr,
                        tok_ptr, keep_ptr, removed_ptr, keep_g_ptr, removed_g_ptr,
                        H, N, C, R, start, L, K,
                        s_ab, s_ah, s_an, s_al, s_xb, s_xn, s_xc, s_qib, s_qir, s_wb, s_wr, s_bb, s_bl, s_gb, s_gl,
                        HAS_W: tl.constexpr, HAS_BONUS: tl.constexpr, HAS_GI: tl.constexpr,
                        IDENTITY: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_R: tl.constexpr,
                        BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    offs_l = tl.arange(0, BLOCK_L)
    l_ok = offs_l < L
    score = tl.zeros([BLOCK_L], dtype=tl.float32)
    if not IDENTITY:  # k == L keeps every candidate in place: no score needed
        base = attn_ptr + b * s_ab + (start + offs_l)[None, :] * s_al
        for h in range(H):
            head = tl.zeros([BLOCK_L], dtype=tl.float32)
            for r0 in range(0, R, BLOCK_R):
                rows = r0 + tl.arange(0, BLOCK_R)
                row_ok = rows < R
                qi, w = _row_weights(qi_ptr, qw_ptr, b, rows, row_ok, s_qib, s_qir, s_wb, s_wr, HAS_W)
                a = tl.load(base + h * s_ah + qi[:, None] * s_an, mask=row_ok[:, None] & l_ok[None, :], other=0.0)
                head += tl.sum(a.to(tl.float32) * w[:, None], axis=0)
            score += tl.math.div_rn(head, R * 1.0)
        score = tl.math.div_rn(score, H * 1.0)
        if HAS_BONUS:
            score += tl.load(bonus_ptr + b * s_bb + offs_l * s_bl, mask=l_ok, other=0.0).to(tl.float32)
    _select_store(score, b, L, K, gi_ptr, s_gb, s_gl, keep_ptr, removed_ptr, keep_g_ptr, removed_g_ptr,
                  HAS_GI, IDENTITY, BLOCK_L)
    tl.debug_barrier()
    _gather_tokens(x_ptr, tok_ptr, keep_ptr, b, N, C, start, L, K, s_xb, s_xn, s_xc, BLOCK_T, BLOCK_C)


@triton.jit
def _logits(q, k, scale, DOT_NATIVE: tl.constexpr):
    """q [BR, BD] · k [BN, BD]ᵀ · scale in fp32 (scaled after the product, as the reference). fp16/bf16
    products are exact in fp32, so their native dot with fp32 accumulation is the reference's math;
    fp32 needs IEEE (not TF32) to be fp32 logits."""
    if DOT_NATIVE:
        s = tl.dot(q, tl.trans(k))
    else:
        s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
    return s * scale


@triton.jit
def _topk_select_qk_kernel(q_ptr, k_ptr, x_ptr, qi_ptr, qw_ptr, bonus_ptr, gi_ptr,
                           tok_ptr, keep_ptr, removed_ptr, keep_g_ptr, removed_g_ptr, stats_ptr, score_ptr,
                           H, N, D, C, R, start, L, K, scale,
                           s_qb, s_qh, s_qn, s_qd, s_kb, s_kh, s_kn, s_kd, s_xb, s_xn, s_xc,
                           s_qib, s_qir, s_wb, s_wr, s_bb, s_bl, s_gb, s_gl,
                           HAS_W: tl.constexpr, HAS_BONUS: tl.constexpr, HAS_GI: tl.constexpr,
                           IDENTITY: tl.constexpr, DOT_NATIVE: tl.constexpr, BLOCK_L: tl.constexpr,
                           BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                           BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    offs_l = tl.arange(0, BLOCK_L)
    l_ok = offs_l < L
    score = tl.zeros([BLOCK_L], dtype=tl.float32)
    if not IDENTITY:
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        q_base = q_ptr + b * s_qb + offs_d[None, :] * s_qd
        k_base = k_ptr + b * s_kb + offs_d[None, :] * s_kd
        stats = stats_ptr + b * H * R * 2
        # Pass 1: each query row's softmax max and denominator over all N keys (online).
        for h in range(H):
            for r0 in range(0, R, BLOCK_R):
                rows = r0 + tl.arange(0, BLOCK_R)
                row_ok = rows < R
                qi = tl.load(qi_ptr + b * s_qib + rows * s_qir, mask=row_ok, other=0)
                qt = tl.load(q_base + h * s_qh + qi[:, None] * s_qn, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
                m_i = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
                l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
                for n0 in range(0, N, BLOCK_N):
                    keys = n0 + tl.arange(0, BLOCK_N)
                    kt = tl.load(k_base + h * s_kh + keys[:, None] * s_kn, mask=(keys < N)[:, None] & d_ok[None, :],
                                 other=0.0)
                    s = tl.where((keys < N)[None, :], _logits(qt, kt, scale, DOT_NATIVE), float("-inf"))
                    m_new = tl.maximum(m_i, tl.max(s, axis=1))
                    l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(s - m_new[:, None]), axis=1)
                    m_i = m_new
                tl.store(stats + (h * R + rows) * 2, m_i, mask=row_ok)
                tl.store(stats + (h * R + rows) * 2 + 1, l_i, mask=row_ok)
        tl.debug_barrier()
        # Pass 2: the candidates' probabilities (their logits recomputed), reduced as in topk_select,
        # one chunk of candidates at a time into a [B, BLOCK_L] scratch row.
        for c0 in range(0, L, BLOCK_N):
            cand = c0 + tl.arange(0, BLOCK_N)
            c_ok = cand < L
            acc = tl.zeros([BLOCK_N], dtype=tl.float32)
            for h in range(H):
                kt = tl.load(k_base + h * s_kh + (start + cand)[:, None] * s_kn, mask=c_ok[:, None] & d_ok[None, :],
                             other=0.0)
                head = tl.zeros([BLOCK_N], dtype=tl.float32)
                for r0 in range(0, R, BLOCK_R):
                    rows = r0 + tl.arange(0, BLOCK_R)
                    row_ok = rows < R
                    qi, w = _row_weights(qi_ptr, qw_ptr, b, rows, row_ok, s_qib, s_qir, s_wb, s_wr, HAS_W)
                    qt = tl.load(q_base + h * s_qh + qi[:, None] * s_qn, mask=row_ok[:, None] & d_ok[None, :],
                                 other=0.0)
                    m_i = tl.load(stats + (h * R + rows) * 2, mask=row_ok, other=0.0)
                    l_i = tl.load(stats + (h * R + rows) * 2 + 1, mask=row_ok, other=1.0)
                    p = tl.exp(_logits(qt, kt, scale, DOT_NATIVE) - m_i[:, None]) / l_i[:, None]
                    p = tl.where(row_ok[:, None] & c_ok[None, :], p, 0.0)
                    head += tl.sum(p * w[:, None], axis=0)
                acc += tl.math.div_rn(head, R * 1.0)
            acc = tl.math.div_rn(acc, H * 1.0)
            if HAS_BONUS:
                acc += tl.load(bonus_ptr + b * s_bb + cand * s_bl, mask=c_ok, other=0.0).to(tl.float32)
            tl.store(score_ptr + b * BLOCK_L + cand, acc, mask=c_ok)
        tl.debug_barrier()
        score = tl.load(score_ptr + b * BLOCK_L + offs_l, mask=l_ok, other=0.0)
    _select_store(score, b, L, K, gi_ptr, s_gb, s_gl, keep_ptr, removed_ptr, keep_g_ptr, removed_g_ptr,
                  HAS_GI, IDENTITY, BLOCK_L)
    tl.debug_barrier()
    _gather_tokens(x_ptr, tok_ptr, keep_ptr, b, N, C, start, L, K, s_xb, s_xn, s_xc, BLOCK_T, BLOCK_C)


# ----------------------------------------------------------------------------------------------
# Launchers (the registered CUDA kernels; on CPU tensors they run under the interpreter)
# ----------------------------------------------------------------------------------------------
def _config(L: int, R: int, C: int, D: int | None = None, dtype=None) -> dict:
    """Block sizes for a problem. Row tiles stay at <= 4096 fp32 elements (32/thread at 4 warps)."""
    block_l = max(16, triton.next_power_of_2(L))
    block_c = min(256, max(16, triton.next_power_of_2(C)))
    cfg = dict(BLOCK_L=block_l, BLOCK_T=max(1, 2048 // block_c), BLOCK_C=block_c,
               num_warps=8 if block_l >= 1024 else 4)
    if D is None:
        # triton < 3.7 spills a 64-row tile at L=32/64 (AOT report): 32 rows there
        cfg["BLOCK_R"] = min(triton.next_power_of_2(R), max(1, 4096 // block_l), 32 if TRITON_BEFORE_3_7 else 64)
        return cfg
    # tl.dot needs every dim >= 16. 16×32 logits tiles over 8 warps do not spill on sm_80 or sm_90
    # (ptxas -v); 32-row or 64-key tiles, or 4 warps, do for some dtype / arch (the fp32 IEEE dot
    # runs on FMA units and holds the most registers).
    block_d = max(16, triton.next_power_of_2(D))
    # triton < 3.7 caps this kernel at 128 registers on sm_90 and the fp32 (FMA) dot of a 32-key tile
    # spills there: 16-key tiles (fp32 only; the native half dot fits)
    narrow = block_d > 64 or (TRITON_BEFORE_3_7 and dtype == torch.float32)
    cfg.update(BLOCK_R=16, BLOCK_D=block_d, BLOCK_N=16 if narrow else 32, num_warps=8)
    return cfg


def _check_values(op, n, query_index, length):
    if length > MAX_LENGTH:
        raise ValueError(f"fasttrack.{op}: the Triton kernel handles `length` <= {MAX_LENGTH} candidates "
                         f"(they are ranked in registers), got {length}")
    # an out-of-range row would read outside attn / q (kernels/_checks.py: host or device check)
    index_in_range(query_index, n, op, "query_index")


def _outputs(x, length, keep):
    B, N, C = x.shape
    idx = dict(dtype=torch.int64, device=x.device)
    return (torch.empty(B, N - length + keep, C, dtype=x.dtype, device=x.device),
            torch.empty(B, keep, **idx), torch.empty(B, length - keep, **idx),
            torch.empty(B, keep, **idx), torch.empty(B, length - keep, **idx))


def _optional_args(x, query_weight, bonus, global_index):
    """Pointers and strides of the optional inputs (x stands in for an absent one; never read)."""
    w = query_weight if query_weight is not None else x
    bo = bonus if bonus is not None else x
    g = global_index if global_index is not None else x
    ws = query_weight.stride() if query_weight is not None else (0, 0)
    bs = bonus.stride() if bonus is not None else (0, 0)
    gs = global_index.stride() if global_index is not None else (0, 0)
    flags = dict(HAS_W=query_weight is not None, HAS_BONUS=bonus is not None, HAS_GI=global_index is not None)
    return (w, bo, g), (*ws, *bs, *gs), flags


def _keep_count(keep_ratio, length):
    return math.ceil(keep_ratio * length)   # = fasttrack.reference.keep_count (kernels sit below it)


def topk_select(attn, x, query_index, query_weight, bonus, global_index, start, length, keep_ratio):
    # the registered CUDA kernel: a raw torch.ops call reaches it unchecked otherwise
    checks.topk_select(attn, x, query_index, query_weight, bonus, global_index, start, length, keep_ratio)
    B, H, N, _ = attn.shape
    C, R = x.shape[2], query_index.shape[1]
    _check_values("topk_select", N, query_index, length)
    K = _keep_count(keep_ratio, length)
    out = _outputs(x, length, K)
    if B == 0:
        return out
    (w, bo, g), opt_strides, flags = _optional_args(x, query_weight, bonus, global_index)
    cfg = _config(length, R, C)
    _topk_select_kernel[(B,)](
        attn, x, query_index, w, bo, g, *out, H, N, C, R, start, length, K,
        *attn.stride(), *x.stride(), *query_index.stride(), *opt_strides,
        IDENTITY=K == length, **flags, **cfg)
    return out


def topk_select_qk(q, k, x, query_index, query_weight, bonus, global_index, start, length, keep_ratio, scale):
    checks.topk_select_qk(q, k, x, query_index, query_weight, bonus, global_index, start, length, keep_ratio, scale)
    B, H, N, D = q.shape
    C, R = x.shape[2], query_index.shape[1]
    _check_values("topk_select_qk", N, query_index, length)
    K = _keep_count(keep_ratio, length)
    out = _outputs(x, length, K)
    if B == 0:
        return out
    (w, bo, g), opt_strides, flags = _optional_args(x, query_weight, bonus, global_index)
    dot_native = _dot_native(q.dtype)
    cfg = _config(length, R, C, D, q.dtype)
    stats = torch.empty(B, H, R, 2, dtype=torch.float32, device=q.device)
    score = torch.empty(B, cfg["BLOCK_L"], dtype=torch.float32, device=q.device)
    _topk_select_qk_kernel[(B,)](
        q, k, x, query_index, w, bo, g, *out, stats, score, H, N, D, C, R, start, length, K, float(scale),
        *q.stride(), *k.stride(), *x.stride(), *query_index.stride(), *opt_strides,
        IDENTITY=K == length, DOT_NATIVE=dot_native, **flags, **cfg)
    return out


def _dot_native(dtype) -> bool:
    # The interpreter's bf16 dot is wrong (NaN / garbage): it checks the upcast variant instead,
    # which computes the same exact products.
    return dtype == torch.float16 or (dtype == torch.bfloat16 and not INTERPRET)


# ----------------------------------------------------------------------------------------------
# Ahead-of-time compile specs: every dtype × every BLOCK_L the launcher can pick (with all optional
# inputs present, the most registers), plus the identity and no-optional variants.
# ----------------------------------------------------------------------------------------------
_TRITON_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _aot_specs():
    ints1 = ["H", "N", "C", "R", "start", "L", "K"]
    strides1 = ["s_ab", "s_ah", "s_an", "s_al", "s_xb", "s_xn", "s_xc", "s_qib", "s_qir", "s_wb", "s_wr",
                "s_bb", "s_bl", "s_gb", "s_gl"]
    ints2 = ["H", "N", "D", "C", "R", "start", "L", "K"]
    strides2 = ["s_qb", "s_qh", "s_qn", "s_qd", "s_kb", "s_kh", "s_kn", "s_kd", "s_xb", "s_xn", "s_xc",
                "s_qib", "s_qir", "s_wb", "s_wr", "s_bb", "s_bl", "s_gb", "s_gl"]
    idx_ptrs = dict(qi_ptr="*i64", gi_ptr="*i64", keep_ptr="*i64", removed_ptr="*i64", keep_g_ptr="*i64",
                    removed_g_ptr="*i64")
    all_inputs = dict(HAS_W=True, HAS_BONUS=True, HAS_GI=True, IDENTITY=False)
    plain = dict(HAS_W=False, HAS_BONUS=False, HAS_GI=False, IDENTITY=False)
    # (L, R, flags): every BLOCK_L; BLOCK_R at both ends (R=64: the widest row tile, R=1: one row)
    variants = [(L, 64, all_inputs) for L in (16, 32, 64, 128, 256, 512, 1024)]
    variants += [(L, 1, plain) for L in (256, 1024)] + [(256, 1, {**plain, "IDENTITY": True})]
    specs = []
    for dtype, t in _TRITON_DTYPE.items():
        for L, R, flags in variants:
            tag = f"{t}/L{L}/R{R}" + ("/id" if flags["IDENTITY"] else "" if flags["HAS_W"] else "/plain")
            cfg = _config(L, R, 768)
            nw = cfg.pop("num_warps")
            sig = dict(attn_ptr=f"*{t}", x_ptr=f"*{t}", qw_ptr=f"*{t}", bonus_ptr=f"*{t}", tok_ptr=f"*{t}",
                       **idx_ptrs, **dict.fromkeys(ints1 + strides1, "i32"))
            specs.append(AotSpec(_topk_select_kernel, sig, {**flags, **cfg}, num_warps=nw, name=tag))
            cfg = _config(L, R, 768, 64, dtype)
            nw = cfg.pop("num_warps")
            sig = dict(q_ptr=f"*{t}", k_ptr=f"*{t}", x_ptr=f"*{t}", qw_ptr=f"*{t}", bonus_ptr=f"*{t}",
                       tok_ptr=f"*{t}", stats_ptr="*fp32", score_ptr="*fp32", scale="fp32", **idx_ptrs,
                       **dict.fromkeys(ints2 + strides2, "i32"))
            cex = {**flags, **cfg, "DOT_NATIVE": dtype != torch.float32}
            specs.append(AotSpec(_topk_select_qk_kernel, sig, cex, num_warps=nw, name=tag))
    return specs


AOT_SPECS = _aot_specs()
