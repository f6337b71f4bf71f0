"""fasttrack's executable specification: every op in plain, readable PyTorch.

Each function here has the exact argument list of its `torch.ops.fasttrack` schema, so it is at
once the spec that every kernel is tested against, the CPU kernel when `fasttrack._C` is absent,
and the ``reference`` backend. Scores and reductions are computed in float32 for fp16/bf16/fp32 inputs (float64 for
float64, so gradcheck is exact; the kernels accumulate in fp32 too); outputs have the input's dtype.

Conventions shared by all ops
- Token tensors are ``[B, N, C]``; index tensors are int64 ``[B, k]`` unless stated.
- "Descending score order, ties broken by lower index" is a *stable* descending sort.
- No output aliases an input (a requirement of custom ops): identity cases return copies.

Official recipes (`official_*`) reproduce the tracker repositories' code paths line for line, so
tests can show that the spec equals what the trackers do.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fasttrack.backend import exporting_to_onnx


def keep_count(keep_ratio: float, length: int) -> int:
    """Candidates kept by top-k selection: ``ceil(keep_ratio * length)`` (as OSTrack's
    `candidate_elimination`, in double precision)."""
    return math.ceil(keep_ratio * length)


def merge_count(keep_ratio: float, n: int) -> int:
    """Targets kept by `merge_tokens`: ``max(1, floor(keep_ratio * n))`` (ETCTrack's K)."""
    return max(1, math.floor(keep_ratio * n))


def _acc(t: torch.Tensor) -> torch.Tensor:
    """The accumulation dtype: float32 for fp16/bf16/fp32 inputs, float64 for float64 (gradcheck)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def descending_order(score: torch.Tensor) -> torch.Tensor:
    """Indices of ``score`` along the last dim in descending order, ties by the lower index (a
    stable sort): the order every op and module of fasttrack ranks by."""
    if exporting_to_onnx():
        # ONNX has no stable sort; its TopK orders equal values by the lower index, the same rule
        return torch.topk(score, score.shape[-1], dim=-1, largest=True, sorted=True).indices
    return torch.sort(score, dim=-1, descending=True, stable=True).indices


def _gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [B, N, C], index [B, k] -> x[b, index[b, j]]  ([B, k, C])."""
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


# --------------------------------------------------------------------------------------------
# Top-k token selection (OSTrack candidate elimination, UTPTrack CE / DTE / STE)
# --------------------------------------------------------------------------------------------
def _select_from_rows(rows, x, query_weight, bonus, global_index, start, length, keep_ratio):
    """rows: [B, H, R, N] float32 attention probabilities of the query rows."""
    B, L = x.shape[0], length
    cand = rows[..., start:start + L]                                   # [B, H, R, L]
    if query_weight is not None:
        cand = cand * _acc(query_weight)[:, None, :, None]
    score = cand.mean(dim=2).mean(dim=1)                                # [B, L]
    if bonus is not None:
        score = score + _acc(bonus)
    k = keep_count(keep_ratio, L)
    if k == L:  # the official code returns its input untouched when nothing is removed
        keep = torch.arange(L, device=x.device).expand(B, L).contiguous()
        removed = keep.new_empty(B, 0)
        tokens = x.clone()
    else:
        order = descending_order(score)
        keep, removed = order[:, :k], order[:, k:]
        tokens = torch.cat([x[:, :start], _gather_rows(x[:, start:start + L], keep), x[:, start + L:]], 1)
    keep_global = global_index.gather(1, keep) if global_index is not None else keep.clone()
    removed_global = global_index.gather(1, removed) if global_index is not None else removed.clone()
    return tokens, keep, removed, keep_global, removed_global


def topk_select(attn, x, query_index, query_weight, bonus, global_index, start, length, keep_ratio):
    """Attention-score top-k selection of the candidate tokens ``[start, start + length)``.

    Args:
        attn: ``[B, H, N, N]`` post-softmax attention, floating.
        x: ``[B, N, C]`` tokens.
        query_index: ``[B, R]`` int64, the rows of ``attn`` that score the candidates (OSTrack:
            the template centre, e.g. row 27 of an 8×8 template; or every template row).
        query_weight: ``[B, R]`` or None: per-row weights (UTPTrack's text row, weight 0 or 1).
        bonus: ``[B, L]`` or None: added to the score (UTPTrack STE: +1 on the template centre,
            plus the token-type-aware foreground fraction).
        global_index: ``[B, L]`` int64 or None: global positions of the candidates.
        start, length: the candidate range; ``start + length <= N``.
        keep_ratio: in (0, 1]; ``k = ceil(keep_ratio * L)``.

    Semantics:
        ``score[b, l] = mean_h mean_r w[b, r] * attn[b, h, query_index[b, r], start + l] + bonus[b, l]``
        (float32). ``keep [B, k]`` = candidates in descending score order (ties: lower index first),
        ``removed [B, L - k]`` = the rest, in the same order.

    Returns:
        ``tokens [B, N - L + k, C]`` = ``cat(x[:, :start], x[:, start + keep], x[:, start + L:])``,
        ``keep``, ``removed``, and both mapped through ``global_index`` (copies of ``keep`` /
        ``removed`` when it is None). When ``k == L`` nothing is removed: ``tokens`` is a copy of
        ``x``, ``keep = arange(L)``, ``removed`` is empty (as the official code).
    """
    B, H, N, _ = attn.shape
    R = query_index.shape[1]
    rows = _acc(attn).gather(2, query_index[:, None, :, None].expand(B, H, R, N))
    return _select_from_rows(rows, x, query_weight, bonus, global_index, start, length, keep_ratio)


def topk_select_qk(q, k, x, query_index, query_weight, bonus, global_index, start, length, keep_ratio,
                   scale):
    """`topk_select` with the attention rows computed from queries and keys.

    ``q, k``: ``[B, H, N, D]``. The attention rows are ``softmax(q[query_index] · kᵀ · scale)`` over
    all N keys, logits in float32 (UTPTrack-S ``qk_float``); everything else is `topk_select`.
    """
    B, H, N, D = q.shape
    R = query_index.shape[1]
    qr = _acc(q).gather(2, query_index[:, None, :, None].expand(B, H, R, D))
    rows = torch.softmax((qr @ _acc(k).transpose(-1, -2)) * scale, dim=-1)   # [B, H, R, N]
    return _select_from_rows(rows, x, query_weight, bonus, global_index, start, length, keep_ratio)


def official_candidate_elimination(attn, tokens, lens_t, keep_ratio, global_index, box_mask_z):
    """OSTrack `lib/models/layers/attn_blocks.py::candidate_elimination`, restated (for tests).
    Differences from `topk_select`: scores in attn's dtype, torch.sort without a stable tie rule."""
    lens_s = attn.shape[-1] - lens_t
    bs, hn, _, _ = attn.shape
    lens_keep = math.ceil(keep_ratio * lens_s)
    if lens_keep == lens_s:
        return tokens, global_index, None
    attn_t = attn[:, :, :lens_t, lens_t:]
    if box_mask_z is not None:
        m = box_mask_z.unsqueeze(1).unsqueeze(-1).expand(-1, attn_t.shape[1], -1, attn_t.shape[-1])
        attn_t = attn_t[m].view(bs, hn, -1, lens_s)
    attn_t = attn_t.mean(dim=2).mean(dim=1)
    _, indices = torch.sort(attn_t, dim=1, descending=True)
    topk_idx, non_topk_idx = indices[:, :lens_keep], indices[:, lens_keep:]
    keep_index = global_index.gather(dim=1, index=topk_idx)
    removed_index = global_index.gather(dim=1, index=non_topk_idx)
    tokens_t, tokens_s = tokens[:, :lens_t], tokens[:, lens_t:]
    B, L, C = tokens_s.shape
    attentive = tokens_s.gather(dim=1, index=topk_idx.unsqueeze(-1).expand(B, -1, C))
    return torch.cat([tokens_t, attentive], dim=1), keep_index, removed_index


# --------------------------------------------------------------------------------------------
# Gather / zero-pad scatter (re-padding kept search tokens to the full map)
# --------------------------------------------------------------------------------------------
def gather_tokens(x, index, layout="tokens", check_index=True):
    """Gather tokens by index: ``out[b, j] = x[b, index[b, j]]``.

    ``layout="tokens"``: ``x [B, N, C]``; ``layout="nchw"``: ``x [B, C, H, W]`` read as the token
    map ``[B, H·W, C]``. ``index [B, k]`` int64 in ``[0, N)``. Returns ``[B, k, C]``.
    ``check_index`` only affects kernels (the reference always checks via PyTorch's gather).
    """
    if layout == "nchw":
        x = x.flatten(2).transpose(1, 2)
    return _gather_rows(x, index)


def pad_scatter(kept, index, length, layout="tokens", hw=(), check_index=True):
    """Put kept tokens back at their positions in a zero map (inverse of `gather_tokens`).

    ``kept [B, k, C]``, ``index [B, k]`` int64, distinct per row, in ``[0, length)``.
    ``layout="tokens"`` returns ``[B, length, C]``; ``layout="nchw"`` returns ``[B, C, H, W]`` with
    ``hw = (H, W)``, ``H·W = length`` — the layout the conv box head consumes, contiguous (the
    official code's ``transpose``/``reshape`` view is made contiguous by the conv that reads it; the
    op fuses that copy). Positions not in ``index`` are exact zeros. The output has ``kept``'s dtype (the official recipe,
    `official_pad_scatter`, promotes fp16/bf16 to fp32 because its zero pad is created as fp32;
    fasttrack does not).
    """
    B, k, C = kept.shape
    out = kept.new_zeros(B, length, C)
    out.scatter_(1, index.unsqueeze(-1).expand(B, k, C), kept)
    if layout == "nchw":
        H, W = hw
        out = out.transpose(1, 2).reshape(B, C, H, W).contiguous()
    return out


def official_pad_scatter(x, global_index_s, removed_indexes_cat):
    """OSTrack `vit_ce.py::forward_features` re-padding, restated: x ``[B, k, C]`` kept search tokens,
    ``global_index_s [B, k]``, ``removed_indexes_cat [B, L - k]``. Returns ``[B, L, C]`` (fp32 when
    x is fp16/bf16, because the pad is created in the default dtype)."""
    B, _, C = x.shape
    pad_x = torch.zeros([B, removed_indexes_cat.shape[1], C], device=x.device)
    x = torch.cat([x, pad_x], dim=1)
    index_all = torch.cat([global_index_s, removed_indexes_cat], dim=1)
    C = x.shape[-1]
    return torch.zeros_like(x).scatter_(dim=1, index=index_all.unsqueeze(-1).expand(B, -1, C).to(torch.int64),
                                        src=x)


# --------------------------------------------------------------------------------------------
# Token merging (ETCTrack Adaptive Token Compressor; ToMe bipartite matching)
# --------------------------------------------------------------------------------------------
def _unit(m: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit L2 norm; a zero row stays zero (so its cosine similarity is 0)."""
    n = m.norm(dim=-1, keepdim=True)
    return m / torch.where(n > 0, n, torch.ones_like(n))


def cosine_argmax(src, dst):
    """For each row of ``src [B, S, Cm]``, the most cosine-similar row of ``dst [B, T, Cm]``:
    returns ``(max_similarity [B, S] float32, argmax [B, S] int64)``; ties go to the lower dst
    index; zero vectors have similarity 0 with everything. Non-finite rows: a row with a NaN or
    infinite entry has NaN similarity with everything (``x / ||x||``); a NaN similarity never wins,
    and a source whose similarities are all NaN gets index 0 and max_similarity NaN. ``T = 0`` is
    allowed only with ``S = 0`` (empty outputs)."""
    B, S, T = src.shape[0], src.shape[1], dst.shape[1]
    if S == 0 or T == 0:
        return (torch.empty(B, S, dtype=torch.float32, device=src.device),
                torch.zeros(B, S, dtype=torch.int64, device=src.device))
    sim = _unit(_acc(src)) @ _unit(_acc(dst)).transpose(1, 2)
    nan = torch.isnan(sim)
    sim = sim.masked_fill(nan, -math.inf)
    best, _ = sim.max(dim=-1)
    # torch.max does not promise the first maximum: take the lowest index attaining it
    first = torch.where(sim == best.unsqueeze(-1), torch.arange(T, device=sim.device), T).amin(dim=-1)
    best = best.masked_fill(nan.all(dim=-1), math.nan)
    return best.float(), first


def merge_tokens(z, score, proj, metric, keep_ratio, reduce="sum"):
    """ETCTrack's score-ranked cosine merging of template tokens.

    Args:
        z: ``[B, N, C]`` tokens (N = T·L for T template frames of L tokens).
        score: ``[B, N]`` per-token scores, or None to use ``proj``.
        proj: ``[C]`` fixed (random) projection: ``score = z @ proj`` (float32). Exactly one of
            ``score`` / ``proj`` is given.
        metric: ``[B, N, Cm]`` or None: features for the similarity (default ``z``).
        keep_ratio: r in (0, 1]; ``K = max(1, floor(r·N))``.
        reduce: ``"sum"`` (the paper: ``a'_j = a_j + Σ_{i∈Ω_j} b_i``) or ``"mean"`` (the mean of
            ``a_j`` and its sources).

    Semantics: tokens sorted by score, descending (ties: lower index first); the first K are the
    targets A, the rest the sources B. Each source goes to the target of highest cosine similarity
    (ties: the earlier target in score order; a zero vector has similarity 0).

    Returns ``merged [B, K, C]`` (targets in score order, z's dtype, accumulated in fp32),
    ``target_index [B, K]``, ``source_index [B, N - K]``, ``assignment [B, N - K]`` (target slot of
    each source). With r = 1 the output is z sorted by score and the sources are empty.
    """
    B, N, C = z.shape
    if score is None:
        score = _acc(z) @ _acc(proj)
    K = merge_count(keep_ratio, N)
    order = descending_order(_acc(score))
    tgt, src = order[:, :K], order[:, K:]
    m = z if metric is None else metric
    _, assignment = cosine_argmax(_gather_rows(m, src), _gather_rows(m, tgt))
    out = _gather_rows(_acc(z), tgt)
    out = out.scatter_add(1, assignment.unsqueeze(-1).expand(-1, -1, C), _gather_rows(_acc(z), src))
    if reduce == "mean":
        count = torch.ones(B, K, dtype=out.dtype, device=z.device).scatter_add(
            1, assignment, torch.ones_like(assignment, dtype=out.dtype))
        out = out / count.unsqueeze(-1)
    return out.to(z.dtype), tgt, src, assignment


def bipartite_merge(x, r, metric=None, size=None, protected=0):
    """ToMe's `bipartite_soft_matching` + `merge_wavg`, restated.

    Tokens alternate into A (even positions) and B (odd positions). Each A token finds its most
    cosine-similar B token (of ``metric``, default ``x``); the ``r`` A tokens with the highest such
    similarity (stable order: ties to the lower A position) merge into their B match by
    size-weighted mean. The first ``protected`` tokens are never merged: protected A tokens are never
    sources, protected B tokens never destinations (ToMe's class / distillation tokens).

    Returns ``(merged [B, N - r, C], size [B, N - r, 1])``, ordered ``cat([unmerged A, B])`` as ToMe:
    unmerged A tokens in descending-similarity order, or in A order when ``protected > 0`` (ToMe
    sorts them when it protects a class token). ``size`` defaults to ones. As ToMe, ``r`` is first
    clamped to ``(N - protected) // 2``; ``r <= 0`` then merges nothing and returns ``x`` itself.
    """
    B, N, C = x.shape
    m = x if metric is None else metric
    size = torch.ones(B, N, 1, dtype=x.dtype, device=x.device) if size is None else size
    r = min(r, (N - protected) // 2)
    if r <= 0:   # ToMe's do_nothing
        return x, size
    a, b = _unit(_acc(m[:, ::2])), _unit(_acc(m[:, 1::2]))
    sim = a @ b.transpose(1, 2)
    nb = sim.shape[2]
    pa = (protected + 1) // 2   # protected even positions 0, 2, ... < protected
    pb = protected // 2         # protected odd positions 1, 3, ... < protected
    sim[:, :pa, :] = -math.inf
    sim[:, :, :pb] = -math.inf
    node_max, node_idx = sim.max(dim=-1)
    first = torch.where(sim == node_max.unsqueeze(-1), torch.arange(nb, device=x.device), nb).amin(-1)
    node_idx = torch.where(torch.isfinite(node_max), first, node_idx)
    edge = descending_order(node_max)
    unm_idx, src_idx = edge[:, r:], edge[:, :r]
    if protected:  # ToMe with a class token: unmerged A back in A order, so protected tokens lead
        unm_idx = unm_idx.sort(dim=1).values
    dst_idx = node_idx.gather(1, src_idx)

    def merge(t):
        ta, tb = _acc(t[:, ::2]), _acc(t[:, 1::2])
        unm = _gather_rows(ta, unm_idx)
        s = _gather_rows(ta, src_idx)
        tb = tb.scatter_add(1, dst_idx.unsqueeze(-1).expand(-1, -1, t.shape[-1]), s)
        return torch.cat([unm, tb], dim=1)

    xs = merge(_acc(x) * _acc(size))
    new_size = merge(_acc(size))
    return (xs / new_size).to(x.dtype), new_size.to(size.dtype)


# --------------------------------------------------------------------------------------------
# Pruned-dimension linear (ABTrack)
# --------------------------------------------------------------------------------------------
def pruned_linear(x, weight, bias, in_index, ln_weight=None, ln_bias=None, eps=1e-5, normalize=False):
    """``LN?(x).index_select(-1, in_index) @ weight.T + bias``.

    ``x [..., d_in]``; ``weight [d_out, d_kept]`` (already pruned); ``bias [d_out]`` or None;
    ``in_index [d_kept]`` int64, distinct, in ``[0, d_in)``. With ``normalize`` the LayerNorm
    statistics are over all ``d_in`` features (affine ``ln_weight``/``ln_bias [d_in]``, optional)
    and only the kept features feed the product. Computed in float32 (float64 for float64 inputs), returned in x's dtype.
    """
    h = _pruned_input(x, in_index, ln_weight, ln_bias, eps, normalize)
    out = F.linear(h, _acc(weight), None if bias is None else _acc(bias))
    return out.to(x.dtype)


def _pruned_input(x, in_index, ln_weight, ln_bias, eps, normalize):
    h = _acc(x)
    if normalize:
        h = F.layer_norm(h, (x.shape[-1],), None if ln_weight is None else _acc(ln_weight),
                         None if ln_bias is None else _acc(ln_bias), eps)
    return h.index_select(-1, in_index)


def pruned_linear_gather(x, in_index, ln_weight=None, ln_bias=None, eps=1e-5, normalize=False):
    """Phase 1 of `pruned_linear` (the internal op ``_pruned_linear_gather``): ``LN?(x)`` at the kept
    dims, ``[M, d_kept]`` in x's dtype, M = the product of x's leading dims."""
    h = _pruned_input(x, in_index, ln_weight, ln_bias, eps, normalize)
    return h.to(x.dtype).reshape(math.prod(x.shape[:-1]), in_index.shape[0])


def attention(qkv, num_heads, scale):
    """Multi-head self-attention core (the internal op ``_attention``) from a fused qkv projection in
    the timm / OSTrack layout: ``qkv [B, N, 3·C]`` is ``[B, N, 3, H, D]`` (H = num_heads, C = H·D);
    returns ``softmax(q·kᵀ·scale)·v`` per head as ``[B, N, C]`` (heads side by side), qkv's dtype."""
    B, N, C3 = qkv.shape
    C = C3 // 3
    q, k, v = _acc(qkv).reshape(B, N, 3, num_heads, C // num_heads).permute(2, 0, 3, 1, 4).unbind(0)
    attn = ((q @ k.transpose(-2, -1)) * scale).softmax(dim=-1)
    return (attn @ v).transpose(1, 2).reshape(B, N, C).to(qkv.dtype)


def layer_norm(x, weight, bias, eps):
    """LayerNorm over the last dim (the internal op ``_layer_norm``): ``(x - mean) / sqrt(var + eps)
    · weight + bias`` with the biased variance, computed in the accumulation dtype (float32, float64
    for float64) and rounded once to x's dtype; ``weight`` / ``bias`` ``[C]`` or None."""
    acc = torch.promote_types(x.dtype, torch.float32)
    w = None if weight is None else weight.to(acc)
    b = None if bias is None else bias.to(acc)
    return F.layer_norm(x.to(acc), (x.shape[-1],), w, b, eps).to(x.dtype)


def masked_dense_linear(x, dense_weight, bias, mask):
    """ABTrack's statement of a pruned layer: ``(x · D) @ Wᵀ + b`` with ``D = diag(mask)``, a 0/1
    mask over ``d_in``. Equals `pruned_linear` with ``in_index = mask.nonzero()`` and the weight's
    kept columns."""
    return F.linear(x * mask.to(x.dtype), dense_weight, bias)
