"""Triton kernels of `merge_tokens` (ETCTrack token merging) and `cosine_argmax` (the similarity
argmax that `bipartite_merge` reuses). Semantics: `fasttrack.reference.merge_tokens`.

`merge_tokens` is four launches, each with one program per (batch, tile):
1. `_score_kernel` (only with `proj`): ``score = z @ proj`` in fp32.
2. `_rank_kernel`: the descending stable ranking as a counting sort — a token's rank is the number
   of tokens with a higher score, or an equal score and a lower index; tokens write their own index
   to slot ``rank`` of `target_index` / `source_index`. O(N²) compares per row, no torch.sort, no
   atomics, and no collision since ranks are distinct. (The ranking needs every score of a row, so it
   cannot share a pass with the score or the similarity without recomputing them per tile.)
3. `_cos_argmax_kernel`, per source tile: rows gathered through the index, cosine normalisation on
   the fly, ``tl.dot`` similarity tiles against every target with a running max / first argmax (ties
   stay with the earlier target because only a strictly larger tile maximum replaces it). The
   ``[N-K, K]`` similarity matrix is never written.
4. `_merge_accum_kernel`, per (target tile, channel tile): the target row plus a one-hot
   ``[targets, sources] @ z[sources]`` product over source tiles in a fixed order: every output
   element is written by one program, so the result is bitwise identical run to run (no atomics).

fp32 `tl.dot` runs with ``input_precision="ieee"`` (TF32 would change the argmax and the sums);
bf16/fp16 inputs are upcast to fp32 before any arithmetic.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fasttrack import _validate as v
from fasttrack.kernels._aot import AotSpec
from fasttrack.reference import merge_count

BLOCK_N = 64      # score / rank tiles
BLOCK_S = 32      # source rows per similarity program
BLOCK_T = 32      # target rows per similarity tile
SIM_C = 32        # channel chunk of the similarity: with BLOCK_T=32 and one stage, no spills (fp32 FMA dot)
SIM_STAGES = 1
BLOCK_K = 32      # target rows per accumulation program
BLOCK_C = 64      # channel chunk


@triton.jit
def _score_kernel(z_ptr, proj_ptr, score_ptr, N, C, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mn = offs_n < N
    zb = z_ptr + b * N * C
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mc = offs_c < C
        x = tl.load(zb + offs_n[:, None] * C + offs_c[None, :], mask=mn[:, None] & mc[None, :], other=0.0)
        p = tl.load(proj_ptr + offs_c, mask=mc, other=0.0)
        acc += tl.sum(x.to(tl.float32) * p.to(tl.float32)[None, :], axis=1)
    tl.store(score_ptr + b * N + offs_n, acc, mask=mn)


@triton.jit
def _rank_kernel(score_ptr, tgt_ptr, src_ptr, N, K, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    offs_i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    mi = offs_i < N
    si = tl.load(score_ptr + b * N + offs_i, mask=mi, other=0.0).to(tl.float32)
    rank = tl.zeros([BLOCK_I], dtype=tl.int32)
    for j0 in range(0, N, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)
        mj = offs_j < N
        sj = tl.load(score_ptr + b * N + offs_j, mask=mj, other=0.0).to(tl.float32)
        ahead = (sj[None, :] > si[:, None]) | ((sj[None, :] == si[:, None]) & (offs_j[None, :] < offs_i[:, None]))
        rank += tl.sum((ahead & mj[None, :]).to(tl.int32), axis=1)
    is_tgt = rank < K
    tl.store(tgt_ptr + b * K + rank, offs_i.to(tl.int64), mask=mi & is_tgt)
    tl.store(src_ptr + b * (N - K) + (rank - K), offs_i.to(tl.int64), mask=mi & (rank >= K))


@triton.jit
def _cos_argmax_kernel(msrc_ptr, mdst_ptr, sidx_ptr, didx_ptr, best_ptr, arg_ptr,
                       S, T, Cm, NS, NT,
                       GATHER: tl.constexpr, WRITE_BEST: tl.constexpr,
                       BLOCK_S: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """For the S source rows of batch b (rows ``sidx[b]`` of ``msrc[b]`` when GATHER, else rows
    0..S-1), the first most cosine-similar of the T destination rows (``didx[b]`` / 0..T-1).
    msrc/mdst hold NS/NT rows of Cm features per batch."""
    b = tl.program_id(0).to(tl.int64)
    offs_s = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    ms = offs_s < S
    if GATHER:
        rows_s = tl.load(sidx_ptr + b * S + offs_s, mask=ms, other=0)
    else:
        rows_s = offs_s.to(tl.int64)
    sb = msrc_ptr + b * NS * Cm
    db = mdst_ptr + b * NT * Cm

    ss = tl.zeros([BLOCK_S], dtype=tl.float32)
    for c0 in range(0, Cm, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        x = tl.load(sb + rows_s[:, None] * Cm + offs_c[None, :], mask=ms[:, None] & (offs_c < Cm)[None, :],
                    other=0.0).to(tl.float32)
        ss += tl.sum(x * x, axis=1)
    ns = tl.sqrt(ss)
    inv_s = 1.0 / tl.where(ns > 0, ns, 1.0)   # a zero row stays zero: similarity 0

    best = tl.full([BLOCK_S], float("-inf"), dtype=tl.float32)
    arg = tl.zeros([BLOCK_S], dtype=tl.int32)
    for t0 in range(0, T, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        mt = offs_t < T
        if GATHER:
            rows_t = tl.load(didx_ptr + b * T + offs_t, mask=mt, other=0)
        else:
            rows_t = offs_t.to(tl.int64)
        dots = tl.zeros([BLOCK_S, BLOCK_T], dtype=tl.float32)
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
        sim = dots * inv_s[:, None] * inv_t[None, :]
        sim = tl.where(mt[None, :], sim, float("-inf"))
        tile_max = tl.max(sim, axis=1)
        tile_arg = tl.min(tl.where(sim == tile_max[:, None], offs_t[None, :], T), axis=1)
        better = tile_max > best
        arg = tl.where(better, tile_arg, arg)
        best = tl.where(better, tile_max, best)
    tl.store(arg_ptr + b * S + offs_s, arg.to(tl.int64), mask=ms)
    if WRITE_BEST:
        tl.store(best_ptr + b * S + offs_s, best, mask=ms)


@triton.jit
def _merge_accum_kernel(z_ptr, tgt_ptr, src_ptr, assign_ptr, out_ptr, N, K, S, C,
                        MEAN: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    mk = offs_k < K
    mc = offs_c < C
    zb = z_ptr + b * N * C
    rows_t = tl.load(tgt_ptr + b * K + offs_k, mask=mk, other=0)
    acc = tl.load(zb + rows_t[:, None] * C + offs_c[None, :], mask=mk[:, None] & mc[None, :],
                  other=0.0).to(tl.float32)
    count = tl.full([BLOCK_K], 1.0, dtype=tl.float32)
    for s0 in range(0, S, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        ms = offs_s < S
        slot = tl.load(assign_ptr + b * S + offs_s, mask=ms, other=-1)
        rows_s = tl.load(src_ptr + b * S + offs_s, mask=ms, other=0)
        x = tl.load(zb + rows_s[:, None] * C + offs_c[None, :], mask=ms[:, None] & mc[None, :],
                    other=0.0).to(tl.float32)
        onehot = (offs_k[:, None] == slot[None, :]).to(tl.float32)     # [BLOCK_K, BLOCK_S]
        acc = tl.dot(onehot, x, acc, input_precision="ieee")
        if MEAN:
            count += tl.sum(onehot, axis=1)
    if MEAN:
        acc = acc / count[:, None]
    tl.store(out_ptr + b * K * C + offs_k[:, None] * C + offs_c[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=mk[:, None] & mc[None, :])


def _check_no_nan(t: torch.Tensor, op: str, what: str) -> None:
    # A NaN has no place in a descending order: the ranking would silently depend on the kernel.
    v.check(not bool(torch.isnan(t).any()), op, f"{what} contains NaN: the ranking is undefined")


def _argmax(msrc, mdst, sidx, didx, S, T, best):
    B, NS, Cm = msrc.shape
    arg = torch.empty(B, S, dtype=torch.int64, device=msrc.device)
    if B * S == 0:
        return arg
    gather = sidx is not None
    _cos_argmax_kernel[(B, triton.cdiv(S, BLOCK_S))](
        msrc, mdst, sidx if gather else arg, didx if gather else arg, best if best is not None else msrc, arg,
        S, T, Cm, NS, mdst.shape[1], GATHER=gather, WRITE_BEST=best is not None,
        BLOCK_S=BLOCK_S, BLOCK_T=BLOCK_T, BLOCK_C=SIM_C, num_stages=SIM_STAGES)
    return arg


def merge_tokens(z, score, proj, metric, keep_ratio, reduce="sum"):
    """Launcher with the schema's argument list (the registered CUDA kernel)."""
    B, N, C = z.shape
    K = merge_count(keep_ratio, N)
    S = N - K
    dev = z.device
    z = z.contiguous()
    if proj is not None:
        score = torch.empty(B, N, dtype=torch.float32, device=dev)
        _score_kernel[(B, triton.cdiv(N, BLOCK_N))](z, proj.contiguous(), score, N, C,
                                                    BLOCK_N=BLOCK_N, BLOCK_C=BLOCK_C)
        _check_no_nan(score, "merge_tokens", "the score `z @ proj` (from `z` or `proj`)")
    else:
        score = score.contiguous()
        _check_no_nan(score, "merge_tokens", "`score`")
    tgt = torch.empty(B, K, dtype=torch.int64, device=dev)
    src = torch.empty(B, S, dtype=torch.int64, device=dev)
    _rank_kernel[(B, triton.cdiv(N, BLOCK_N))](score, tgt, src, N, K, BLOCK_I=BLOCK_N, BLOCK_J=BLOCK_N)
    m = z if metric is None else metric.contiguous()
    assignment = _argmax(m, m, src, tgt, S, K, None)
    out = torch.empty(B, K, C, dtype=z.dtype, device=dev)
    _merge_accum_kernel[(B, triton.cdiv(K, BLOCK_K), triton.cdiv(C, BLOCK_C))](
        z, tgt, src, assignment, out, N, K, S, C, MEAN=reduce == "mean",
        BLOCK_K=BLOCK_K, BLOCK_S=BLOCK_S, BLOCK_C=BLOCK_C)
    return out, tgt, src, assignment


def cosine_argmax(src, dst):
    """Launcher with the schema's argument list: ``(max_similarity fp32 [B, S], argmax [B, S])``."""
    B, S, _ = src.shape
    best = torch.empty(B, S, dtype=torch.float32, device=src.device)
    arg = _argmax(src.contiguous(), dst.contiguous(), None, None, S, dst.shape[1], best)
    return best, arg


def _specs():
    out = []
    for dt in ("fp32", "fp16", "bf16"):
        ptr = "*" + dt
        out += [
            AotSpec(_score_kernel, {"z_ptr": ptr, "proj_ptr": ptr, "score_ptr": "*fp32", "N": "i32", "C": "i32"},
                    dict(BLOCK_N=BLOCK_N, BLOCK_C=BLOCK_C), name=f"{dt}"),
            AotSpec(_rank_kernel, {"score_ptr": "*fp32" if dt == "fp32" else ptr, "tgt_ptr": "*i64",
                                   "src_ptr": "*i64", "N": "i32", "K": "i32"},
                    dict(BLOCK_I=BLOCK_N, BLOCK_J=BLOCK_N), name=f"{dt}"),
            AotSpec(_cos_argmax_kernel, {"msrc_ptr": ptr, "mdst_ptr": ptr, "sidx_ptr": "*i64", "didx_ptr": "*i64",
                                         "best_ptr": "*fp32", "arg_ptr": "*i64", "S": "i32", "T": "i32",
                                         "Cm": "i32", "NS": "i32", "NT": "i32"},
                    dict(GATHER=True, WRITE_BEST=False, BLOCK_S=BLOCK_S, BLOCK_T=BLOCK_T, BLOCK_C=SIM_C),
                    num_stages=SIM_STAGES,
                    name=f"{dt}/merge"),
            AotSpec(_cos_argmax_kernel, {"msrc_ptr": ptr, "mdst_ptr": ptr, "sidx_ptr": "*i64", "didx_ptr": "*i64",
                                         "best_ptr": "*fp32", "arg_ptr": "*i64", "S": "i32", "T": "i32",
                                         "Cm": "i32", "NS": "i32", "NT": "i32"},
                    dict(GATHER=False, WRITE_BEST=True, BLOCK_S=BLOCK_S, BLOCK_T=BLOCK_T, BLOCK_C=SIM_C),
                    num_stages=SIM_STAGES,
                    name=f"{dt}/argmax"),
        ]
        for mean in (False, True):
            out.append(AotSpec(_merge_accum_kernel, {"z_ptr": ptr, "tgt_ptr": "*i64", "src_ptr": "*i64",
                                                     "assign_ptr": "*i64", "out_ptr": ptr, "N": "i32", "K": "i32",
                                                     "S": "i32", "C": "i32"},
                               dict(MEAN=mean, BLOCK_K=BLOCK_K, BLOCK_S=BLOCK_S, BLOCK_C=BLOCK_C),
                               name=f"{dt}/{'mean' if mean else 'sum'}"))
    return out


AOT_SPECS = _specs()
