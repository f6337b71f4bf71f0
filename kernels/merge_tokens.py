"""Triton kernels of `merge_tokens` (ETCTrack token merging) and `cosine_argmax` (the similarity
argmax that `bipartite_merge` reuses). Semantics: `fasttrack.reference.merge_tokens`.

`merge_tokens` is two launches:
1. `_rank_argmax_kernel`, one program per (batch, source tile). Each program computes the row's
   scores (``z @ proj`` in fp32, or reads ``score``), ranks every token of the row — a token's rank
   is the number of tokens with a higher score, or an equal score and a lower index: a counting sort,
   O(N²) compares, no torch.sort, no atomics — and writes its own copy of the order to a small
   workspace (``[B, programs, N]``: ranks are distinct, so every slot is written once), then, after a
   barrier, runs the cosine argmax for its tile of sources against every target: rows gathered
   through the order, cosine normalisation on the fly, ``tl.dot`` similarity tiles with a running
   max / first argmax (a strictly larger tile maximum replaces it, so ties stay with the earlier
   target). The ``[N-K, K]`` similarity matrix is never written. Program 0 also writes
   ``target_index`` / ``source_index`` (and the scores, for the NaN check). The scores and ranks
   are recomputed by every program of a row instead of a second launch: N·C reads that hit L2, and
   N² compares, against a launch (~3-5 µs) at tracker sizes (N = 320, C = 768).
2. `_merge_accum_kernel`, per (target tile, channel tile): the target row plus a one-hot
   ``[targets, sources] @ z[sources]`` product over source tiles in a fixed order: every output
   element is written by one program, so the result is bitwise identical run to run (no atomics).
   Non-finite values are counted apart and combined with IEEE semantics (the kernel's docstring).

NaN scores: the ranking treats NaN as below every number (ties by index), so the order is always
a permutation and no kernel reads outside z; the launcher then refuses the call
(`kernels/_checks.py`: ValueError on the host, a device-side assert on CUDA), as the spec does.
fp32 `tl.dot` runs with ``input_precision="ieee"`` (TF32 would change the argmax and the sums);
bf16/fp16 inputs are upcast to fp32 before any arithmetic. float64 inputs are refused by the launcher
(the kernels compute in fp32).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fasttrack import _opchecks as checks
from fasttrack.kernels._aot import AotSpec
from fasttrack.kernels._checks import no_nan
from fasttrack.reference import merge_count

BLOCK_N = 64      # score / rank tiles
BLOCK_S = 32      # source rows per similarity program
BLOCK_T = 32      # target rows per similarity tile
SIM_C = 32        # channel chunk of the similarity: with BLOCK_T=32 and one stage, no spills (fp32 FMA dot)
SIM_STAGES = 1
BLOCK_K = 32      # target rows per accumulation program
BLOCK_C = 64      # channel chunk of the score / rank pass
ACC_C = 32        # channel tile of the accumulation: three fp32 [BLOCK_K, ACC_C] accumulators; 64 spilled
                  # (fp32 ieee dot, sm_80 16 B / sm_90 128 B at 255 registers, triton 3.9)


@triton.jit
def _cos_argmax_tile(sb, db, rows_s, ms, dst_rows_ptr, T, Cm,
                     GATHER_T: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """For the source rows ``rows_s`` (active where ``ms``) of the matrix at ``sb``, the first most
    cosine-similar of T destination rows of the matrix at ``db`` (rows ``dst_rows_ptr[0..T)`` when
    GATHER_T, else 0..T-1). Returns (best similarity fp32, argmax int32)."""
    ss = tl.zeros([rows_s.shape[0]], dtype=tl.float32)
    for c0 in range(0, Cm, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        x = tl.load(sb + rows_s[:, None] * Cm + offs_c[None, :], mask=ms[:, None] & (offs_c < Cm)[None, :],
                    other=0.0).to(tl.float32)
        ss += tl.sum(x * x, axis=1)
    ns = tl.sqrt(ss)
    inv_s = 1.0 / tl.where(ns > 0, ns, 1.0)   # a zero row stays zero: similarity 0
    inv_s = tl.where(ns == float("inf"), float("nan"), inv_s)   # an infinite entry: NaN similarities

    best = tl.full([rows_s.shape[0]], float("-inf"), dtype=tl.float32)
    arg = tl.zeros([rows_s.shape[0]], dtype=tl.int32)
    for t0 in range(0, T, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        mt = offs_t < T
        if GATHER_T:
            rows_t = tl.load(dst_rows_ptr + offs_t, mask=mt, other=0).to(tl.int64)
        else:
            rows_t = offs_t.to(tl.int64)
        dots = tl.zeros([rows_s.shape[0], BLOCK_T], dtype=tl.float32)
        tt = tl.zeros([BLOCK_T], dtype=tl.float32)
        for c0 in range(0, Cm, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            mc = offs_c < Cm
            x = tl.load(sb + rows_s[:, None] * Cm + offs_c[None, :], mask=ms[:, None] & mc[None, :],
                        other=0.0).to(tl.float32)
            y = tl.load(db + rows_t[:, None] * Cm + offs_c[None, :], mask=mt[:, None] & mc[None, :],
                        other=0.0).to(tl.float32)
            dots = tl.dot(x, tl.trans(y), dots, input_precision="ieee")
            tt += tl.sum(y * y, axis=1)
        nt = tl.sqrt(tt)
        inv_t = 1.0 / tl.where(nt > 0, nt, 1.0)
        inv_t = tl.where(nt == float("inf"), float("nan"), inv_t)
        sim = dots * inv_s[:, None] * inv_t[None, :]
        # a NaN similarity never wins (the spec); padding lanes neither
        sim = tl.where(mt[None, :] & (sim == sim), sim, float("-inf"))
        tile_max = tl.max(sim, axis=1)
        tile_arg = tl.min(tl.where(sim == tile_max[:, None], offs_t[None, :], T), axis=1)
        better = tile_max > best
        arg = tl.where(better, tile_arg, arg)
        best = tl.where(better, tile_max, best)
    # similarities are in [-1, 1]: -inf means every one was NaN (index 0, maximum NaN)
    best = tl.where(best == float("-inf"), float("nan"), best)
    return best, arg


@triton.jit
def _rank_argmax_kernel(z_ptr, score_ptr, proj_ptr, metric_ptr, tgt_ptr, src_ptr, assign_ptr, score_out_ptr,
                        ws_score_ptr, ws_order_ptr, N, C, K, Cm, P,
                        HAS_PROJ: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
                        BLOCK_S: tl.constexpr, BLOCK_T: tl.constexpr, SIM_C: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    pid = tl.program_id(1)
    S = N - K
    ws = (b * P + pid) * N            # this program's workspace row
    # 1. the row's scores (fp32), into the workspace; program 0 also returns them for the NaN check
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mn = offs_n < N
        if HAS_PROJ:
            acc = tl.zeros([BLOCK_N], dtype=tl.float32)
            for c0 in range(0, C, BLOCK_C):
                offs_c = c0 + tl.arange(0, BLOCK_C)
                mc = offs_c < C
                x = tl.load(z_ptr + b * N * C + offs_n[:, None] * C + offs_c[None, :],
                            mask=mn[:, None] & mc[None, :], other=0.0)
                p = tl.load(proj_ptr + offs_c, mask=mc, other=0.0)
                acc += tl.sum(x.to(tl.float32) * p.to(tl.float32)[None, :], axis=1)
        else:
            acc = tl.load(score_ptr + b * N + offs_n, mask=mn, other=0.0).to(tl.float32)
        tl.store(ws_score_ptr + ws + offs_n, acc, mask=mn)
        if pid == 0:
            tl.store(score_out_ptr + b * N + offs_n, acc, mask=mn)
    tl.debug_barrier()
    # 2. rank every token (NaN below every number, ties by index): order[rank] = token
    for i0 in range(0, N, BLOCK_N):
        offs_i = i0 + tl.arange(0, BLOCK_N)
        mi = offs_i < N
        si = tl.load(ws_score_ptr + ws + offs_i, mask=mi, other=0.0)
        ni = si != si
        rank = tl.zeros([BLOCK_N], dtype=tl.int32)
        for j0 in range(0, N, BLOCK_N):
            offs_j = j0 + tl.arange(0, BLOCK_N)
            mj = offs_j < N
            sj = tl.load(ws_score_ptr + ws + offs_j, mask=mj, other=0.0)
            nj = sj != sj
            before = offs_j[None, :] < offs_i[:, None]
            both_num = (~nj[None, :]) & (~ni[:, None])
            ahead = (both_num & ((sj[None, :] > si[:, None]) | ((sj[None, :] == si[:, None]) & before))) \
                | ((~nj[None, :]) & ni[:, None]) | (nj[None, :] & ni[:, None] & before)
            rank += tl.sum((ahead & mj[None, :]).to(tl.int32), axis=1)
        tl.store(ws_order_ptr + ws + rank, offs_i, mask=mi)
        if pid == 0:
            tl.store(tgt_ptr + b * K + rank, offs_i.to(tl.int64), mask=mi & (rank < K))
            tl.store(src_ptr + b * S + (rank - K), offs_i.to(tl.int64), mask=mi & (rank >= K))
    tl.debug_barrier()
    # 3. this program's sources against every target
    offs_s = pid * BLOCK_S + tl.arange(0, BLOCK_S)
    ms = offs_s < S
    rows_s = tl.load(ws_order_ptr + ws + K + offs_s, mask=ms, other=0).to(tl.int64)
    mb = metric_ptr + b * N * Cm
    _, arg = _cos_argmax_tile(mb, mb, rows_s, ms, ws_order_ptr + ws, K, Cm,
                              GATHER_T=True, BLOCK_T=BLOCK_T, BLOCK_C=SIM_C)
    tl.store(assign_ptr + b * S + offs_s, arg.to(tl.int64), mask=ms)


@triton.jit
def _cos_argmax_kernel(msrc_ptr, mdst_ptr, best_ptr, arg_ptr, S, T, Cm, NS, NT,
                       BLOCK_S: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """`cosine_argmax`: for source rows 0..S-1 of msrc[b], the first most similar of mdst[b]'s T rows."""
    b = tl.program_id(0).to(tl.int64)
    offs_s = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    ms = offs_s < S
    best, arg = _cos_argmax_tile(msrc_ptr + b * NS * Cm, mdst_ptr + b * NT * Cm, offs_s.to(tl.int64), ms,
                                 arg_ptr, T, Cm, GATHER_T=False, BLOCK_T=BLOCK_T, BLOCK_C=BLOCK_C)
    tl.store(arg_ptr + b * S + offs_s, arg.to(tl.int64), mask=ms)
    tl.store(best_ptr + b * S + offs_s, best, mask=ms)


@triton.jit
def _finite_and_flags(x):
    """``(x with NaN / inf replaced by 0, flags)``: flags = isnan + 1024·isposinf, and isneginf,
    as fp32 (their one-hot sums count the non-finite terms exactly: counts < 1024, sums < 2^24)."""
    nan = x != x
    pinf = x == float("inf")
    ninf = x == float("-inf")
    x0 = tl.where(nan | pinf | ninf, 0.0, x)
    return x0, nan.to(tl.float32) + 1024.0 * pinf.to(tl.float32), ninf.to(tl.float32)


@triton.jit
def _merge_accum_kernel(z_ptr, tgt_ptr, src_ptr, assign_ptr, out_ptr, N, K, S, C,
                        MEAN: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """Targets + their sources, as one-hot ``[targets, sources] @ z[sources]`` products. A product
    would turn a non-finite value of a source assigned elsewhere into 0·inf = NaN, so the finite
    parts are summed by the product and the NaN / ±inf terms are counted by two more (exact in
    fp32), then combined with IEEE semantics: any NaN, or +inf with -inf, gives NaN; else ±inf."""
    b = tl.program_id(0).to(tl.int64)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    mk = offs_k < K
    mc = offs_c < C
    zb = z_ptr + b * N * C
    rows_t = tl.load(tgt_ptr + b * K + offs_k, mask=mk, other=0)
    t = tl.load(zb + rows_t[:, None] * C + offs_c[None, :], mask=mk[:, None] & mc[None, :],
                other=0.0).to(tl.float32)
    acc, nan_pinf, ninf = _finite_and_flags(t)
    count = tl.full([BLOCK_K], 1.0, dtype=tl.float32)
    for s0 in range(0, S, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        ms = offs_s < S
        slot = tl.load(assign_ptr + b * S + offs_s, mask=ms, other=-1)
        rows_s = tl.load(src_ptr + b * S + offs_s, mask=ms, other=0)
        x = tl.load(zb + rows_s[:, None] * C + offs_c[None, :], mask=ms[:, None] & mc[None, :],
                    other=0.0).to(tl.float32)
        x0, f1, f2 = _finite_and_flags(x)
        onehot = (offs_k[:, None] == slot[None, :]).to(tl.float32)     # [BLOCK_K, BLOCK_S]
        acc = tl.dot(onehot, x0, acc, input_precision="ieee")
        nan_pinf = tl.dot(onehot, f1, nan_pinf, input_precision="ieee")
        ninf = tl.dot(onehot, f2, ninf, input_precision="ieee")
        if MEAN:
            count += tl.sum(onehot, axis=1)
    pinf = nan_pinf >= 1024.0
    nan = (nan_pinf - 1024.0 * tl.floor(nan_pinf / 1024.0)) > 0.0
    acc = tl.where(nan | (pinf & (ninf > 0.0)), float("nan"),
                   tl.where(pinf, float("inf"), tl.where(ninf > 0.0, float("-inf"), acc)))
    if MEAN:
        acc = acc / count[:, None]
    tl.store(out_ptr + b * K * C + offs_k[:, None] * C + offs_c[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=mk[:, None] & mc[None, :])


def merge_tokens(z, score, proj, metric, keep_ratio, reduce="sum"):
    """Launcher with the schema's argument list (the registered CUDA kernel): two launches."""
    checks.merge_tokens(z, score, proj, metric, keep_ratio, reduce)   # a raw torch.ops call lands here
    B, N, C = z.shape
    if z.dtype == torch.float64:
        raise TypeError("fasttrack.merge_tokens: `z` is float64, but the Triton kernel computes in float32 (use "
                        "the CPU kernel or the reference for float64)")
    K = merge_count(keep_ratio, N)
    S = N - K
    dev = z.device
    idx = dict(dtype=torch.int64, device=dev)
    tgt, src, assignment = torch.empty(B, K, **idx), torch.empty(B, S, **idx), torch.empty(B, S, **idx)
    out = torch.empty(B, K, C, dtype=z.dtype, device=dev)
    if B == 0:
        return out, tgt, src, assignment
    z = z.contiguous()
    m = z if metric is None else metric.contiguous()
    P = max(1, triton.cdiv(S, BLOCK_S))
    scores = torch.empty(B, N, dtype=torch.float32, device=dev)
    ws_score = torch.empty(B, P, N, dtype=torch.float32, device=dev)
    ws_order = torch.empty(B, P, N, dtype=torch.int32, device=dev)
    _rank_argmax_kernel[(B, P)](
        z, score.contiguous() if score is not None else scores, proj.contiguous() if proj is not None else scores,
        m, tgt, src, assignment, scores, ws_score, ws_order, N, C, K, m.shape[2], P,
        HAS_PROJ=proj is not None, BLOCK_N=BLOCK_N, BLOCK_C=BLOCK_C, BLOCK_S=BLOCK_S, BLOCK_T=BLOCK_T,
        SIM_C=SIM_C, num_stages=SIM_STAGES)
    no_nan(scores, "merge_tokens", "`score`" if proj is None else "the score `z @ proj` (from `z` or `proj`)")
    _merge_accum_kernel[(B, triton.cdiv(K, BLOCK_K), triton.cdiv(C, ACC_C))](
        z, tgt, src, assignment, out, N, K, S, C, MEAN=reduce == "mean",
        BLOCK_K=BLOCK_K, BLOCK_S=BLOCK_S, BLOCK_C=ACC_C)
    return out, tgt, src, assignment


def cosine_argmax(src, dst):
    """Launcher with the schema's argument list: ``(max_similarity fp32 [B, S], argmax [B, S])``."""
    checks.cosine_argmax(src, dst)
    B, S, Cm = src.shape
    if src.dtype == torch.float64 or dst.dtype == torch.float64:
        raise TypeError("fasttrack.cosine_argmax: `src` / `dst` are float64, but the Triton kernel computes in "
                        "float32 (use the CPU kernel or the reference for float64)")
    best = torch.empty(B, S, dtype=torch.float32, device=src.device)
    arg = torch.empty(B, S, dtype=torch.int64, device=src.device)
    if B * S:
        _cos_argmax_kernel[(B, triton.cdiv(S, BLOCK_S))](
            src.contiguous(), dst.contiguous(), best, arg, S, dst.shape[1], Cm, S, dst.shape[1],
            BLOCK_S=BLOCK_S, BLOCK_T=BLOCK_T, BLOCK_C=SIM_C, num_stages=SIM_STAGES)
    return best, arg


def _specs():
    out = []
    for dt in ("fp32", "fp16", "bf16"):
        ptr = "*" + dt
        for has_proj in (True, False):
            out.append(AotSpec(_rank_argmax_kernel, {
                "z_ptr": ptr, "score_ptr": ptr if not has_proj else "*fp32", "proj_ptr": ptr if has_proj else "*fp32",
                "metric_ptr": ptr, "tgt_ptr": "*i64", "src_ptr": "*i64", "assign_ptr": "*i64",
                "score_out_ptr": "*fp32", "ws_score_ptr": "*fp32", "ws_order_ptr": "*i32",
                "N": "i32", "C": "i32", "K": "i32", "Cm": "i32", "P": "i32"},
                dict(HAS_PROJ=has_proj, BLOCK_N=BLOCK_N, BLOCK_C=BLOCK_C, BLOCK_S=BLOCK_S, BLOCK_T=BLOCK_T,
                     SIM_C=SIM_C), num_stages=SIM_STAGES, name=f"{dt}/{'proj' if has_proj else 'score'}"))
        out.append(AotSpec(_cos_argmax_kernel, {"msrc_ptr": ptr, "mdst_ptr": ptr, "best_ptr": "*fp32",
                                                "arg_ptr": "*i64", "S": "i32", "T": "i32", "Cm": "i32",
                                                "NS": "i32", "NT": "i32"},
                           dict(BLOCK_S=BLOCK_S, BLOCK_T=BLOCK_T, BLOCK_C=SIM_C), num_stages=SIM_STAGES,
                           name=f"{dt}/argmax"))
        for mean in (False, True):
            out.append(AotSpec(_merge_accum_kernel, {"z_ptr": ptr, "tgt_ptr": "*i64", "src_ptr": "*i64",
                                                     "assign_ptr": "*i64", "out_ptr": ptr, "N": "i32", "K": "i32",
                                                     "S": "i32", "C": "i32"},
                               dict(MEAN=mean, BLOCK_K=BLOCK_K, BLOCK_S=BLOCK_S, BLOCK_C=ACC_C),
                               name=f"{dt}/{'mean' if mean else 'sum'}"))
    return out


AOT_SPECS = _specs()
