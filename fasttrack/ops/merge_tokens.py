"""`merge_tokens`: ETCTrack's score-ranked cosine-similarity token merging (Adaptive Token
Compressor). Semantics: `fasttrack.reference.merge_tokens`."""
from __future__ import annotations

from typing import NamedTuple

import torch

from fasttrack import _validate as v
from fasttrack.ops._registry import OpDef, dispatch, register
from fasttrack.reference import merge_count

SCHEMA = ("(Tensor z, Tensor? score, Tensor? proj, Tensor? metric, float keep_ratio, str reduce=\"sum\") -> "
          "(Tensor merged, Tensor target_index, Tensor source_index, Tensor assignment)")
REDUCES = ("sum", "mean")


class Merged(NamedTuple):
    merged: torch.Tensor        # [B, K, C] targets (with their sources added), in score order
    target_index: torch.Tensor  # [B, K]
    source_index: torch.Tensor  # [B, N - K]
    assignment: torch.Tensor    # [B, N - K] target slot (0..K-1) of each source


def check_args(z, score, proj, metric, keep_ratio, reduce="sum"):
    op = "merge_tokens"
    v.floating(z, op, "z", ndim=3)
    B, N, C = z.shape
    v.check((score is None) != (proj is None), op, "give exactly one of `score` [B, N] and `proj` [C]")
    if score is not None:
        v.floating(score, op, "score", device=z.device, shape=(B, N))
    if proj is not None:
        v.floating(proj, op, "proj", device=z.device, shape=(C,))
    if metric is not None:
        v.floating(metric, op, "metric", device=z.device, shape=(B, N, None))
    v.ratio(keep_ratio, op)
    v.check(reduce in REDUCES, op, f"`reduce` must be one of {REDUCES}, got {reduce!r}")


def _fake(z, score, proj, metric, keep_ratio, reduce="sum"):
    check_args(z, score, proj, metric, keep_ratio, reduce)
    B, N, C = z.shape
    K = merge_count(keep_ratio, N)
    idx = dict(dtype=torch.int64, device=z.device)
    return z.new_empty(B, K, C), torch.empty(B, K, **idx), torch.empty(B, N - K, **idx), torch.empty(B, N - K, **idx)


def _setup_context(ctx, inputs, output):
    _, tgt, src, assignment = output
    ctx.save_for_backward(tgt, src, assignment)
    ctx.mean = (inputs[5] if len(inputs) > 5 else "sum") == "mean"
    ctx.n = inputs[0].shape[1]


def _backward(ctx, grad_merged, *_):
    """Each target gets its slot's gradient, each source the gradient of the slot it joined
    (divided by the slot's size for reduce="mean")."""
    from fasttrack.ops.pad_scatter import gather_tokens, pad_scatter

    tgt, src, assignment = ctx.saved_tensors
    g = grad_merged.float()
    if ctx.mean:
        count = torch.ones(g.shape[:2], device=g.device).scatter_add(
            1, assignment, torch.ones_like(assignment, dtype=torch.float32))
        g = g / count.unsqueeze(-1)
    g = g.to(grad_merged.dtype)
    per_token = torch.cat([g, gather_tokens(g, assignment, check_index=False)], dim=1) if src.shape[1] else g
    grad_z = pad_scatter(per_token.contiguous(), torch.cat([tgt, src], dim=1), ctx.n, check_index=False)
    return grad_z, None, None, None, None, None


MERGE_TOKENS = register(OpDef("merge_tokens", SCHEMA, _fake, _setup_context, _backward,
                              triton="merge_tokens:merge_tokens"))


def merge_tokens(z, keep_ratio, *, score=None, proj=None, metric=None, reduce="sum") -> Merged:
    """Compress ``z [B, N, C]`` to ``K = max(1, floor(keep_ratio·N))`` tokens: the top-K by score are
    targets, every other token is added into its most cosine-similar target. Give ``score [B, N]`` or
    the fixed projection ``proj [C]`` (score = z @ proj). Differentiable w.r.t. ``z``."""
    check_args(z, score, proj, metric, keep_ratio, reduce)
    return Merged(*dispatch("merge_tokens", z, score, proj, metric, float(keep_ratio), reduce))
