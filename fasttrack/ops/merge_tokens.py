"""`merge_tokens`: ETCTrack's score-ranked cosine-similarity token merging (Adaptive Token
Compressor); `cosine_argmax`: the similarity argmax it is built on; `bipartite_merge`: ToMe's
bipartite soft matching + size-weighted merge, on the same argmax kernel.
Semantics: `fasttrack.reference.merge_tokens` / `cosine_argmax` / `bipartite_merge`."""
from __future__ import annotations

from typing import NamedTuple

import torch

from fasttrack import _opchecks as checks
from fasttrack import _validate as v
from fasttrack.ops._registry import CheckCase, OpDef, dispatch, register
from fasttrack.reference import descending_order, merge_count

SCHEMA = ("(Tensor z, Tensor? score, Tensor? proj, Tensor? metric, float keep_ratio, str reduce=\"sum\") -> "
          "(Tensor merged, Tensor target_index, Tensor source_index, Tensor assignment)")
SCHEMA_ARGMAX = "(Tensor src, Tensor dst) -> (Tensor max_similarity, Tensor argmax)"
from fasttrack._opchecks import REDUCES  # noqa: E402,F401  (re-exported)


class Merged(NamedTuple):
    merged: torch.Tensor        # [B, K, C] targets (with their sources added), in score order
    target_index: torch.Tensor  # [B, K]
    source_index: torch.Tensor  # [B, N - K]
    assignment: torch.Tensor    # [B, N - K] target slot (0..K-1) of each source


def _fake(z, score, proj, metric, keep_ratio, reduce="sum"):
    checks.merge_tokens(z, score, proj, metric, keep_ratio, reduce)
    B, N, C = z.shape
    K = merge_count(keep_ratio, N)
    idx = dict(dtype=torch.int64, device=z.device)
    return z.new_empty(B, K, C), torch.empty(B, K, **idx), torch.empty(B, N - K, **idx), torch.empty(B, N - K, **idx)


def _setup_context(ctx, inputs, output):
    _, tgt, src, assignment = output
    ctx.save_for_backward(tgt, src, assignment)
    ctx.mean = (inputs[5] if len(inputs) > 5 else "sum") == "mean"


def _backward(ctx, grad_merged, *_):
    """Each target gets its slot's gradient, each source the gradient of the slot it joined
    (divided by the slot's size for reduce="mean"): one gather through the slot of every token."""
    tgt, src, assignment = ctx.saved_tensors
    B, K, C = grad_merged.shape
    g = grad_merged
    if ctx.mean:
        acc = torch.float64 if g.dtype == torch.float64 else torch.float32   # as the forward
        count = torch.ones(B, K, device=g.device, dtype=acc).scatter_add(
            1, assignment, torch.ones_like(assignment, dtype=acc))
        g = (g.to(acc) / count.unsqueeze(-1)).to(grad_merged.dtype)
    own = torch.arange(K, device=g.device).expand(B, K)
    slot = torch.empty(B, K + src.shape[1], dtype=torch.int64, device=g.device).scatter_(
        1, torch.cat([tgt, src], 1), torch.cat([own, assignment], 1))
    grad_z = g.gather(1, slot.unsqueeze(-1).expand(-1, -1, C))
    return grad_z, None, None, None, None, None


def _cases(device, dtype):
    """Tracker shapes: ETCTrack T=5 frames of 8x8 (L=64) / 12x12 (L=144) templates, ViT-B."""
    g = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    cases = []
    for B, T, L, r, red in [(1, 5, 64, 0.9, "sum"), (2, 5, 144, 0.5, "mean"), (2, 6, 64, 0.7, "sum")]:
        z = rnd(B, T * L, 768)
        cases.append(CheckCase(f"proj/T{T}L{L}/r{r}/{red}", (z, None, rnd(768), None, r, red), grad=(0,)))
    z = rnd(2, 37, 50)
    cases.append(CheckCase("score+metric/N37C50", (z, rnd(2, 37), None, rnd(2, 37, 24), 0.5, "mean"), grad=(0,)))
    return cases


MERGE_TOKENS = register(OpDef(name="merge_tokens", schema=SCHEMA, fake=_fake, check=checks.merge_tokens,
                              setup_context=_setup_context, backward=_backward,
                              cuda="triton:merge_tokens:merge_tokens", cases=_cases))


def _fake_argmax(src, dst):
    checks.cosine_argmax(src, dst)
    B, S = src.shape[:2]
    return src.new_empty(B, S, dtype=torch.float32), src.new_empty(B, S, dtype=torch.int64)


def _cases_argmax(device, dtype):
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(2, 160, 768, generator=g), torch.randn(2, 160, 768, generator=g)
    return [CheckCase("ToMe/N320C768", (a.to(device, dtype), b.to(device, dtype)))]


COSINE_ARGMAX = register(OpDef(name="cosine_argmax", schema=SCHEMA_ARGMAX, fake=_fake_argmax, check=checks.cosine_argmax,
                               cuda="triton:merge_tokens:cosine_argmax", cases=_cases_argmax))


def merge_tokens(z, keep_ratio, *, score=None, proj=None, metric=None, reduce="sum") -> Merged:
    """Compress ``z [B, N, C]`` to ``K = max(1, floor(keep_ratio·N))`` tokens: the top-K by score are
    targets, every other token is added into its most cosine-similar target. Give ``score [B, N]`` or
    the fixed projection ``proj [C]`` (score = z @ proj). Differentiable w.r.t. ``z``."""
    keep_ratio = checks.float_arg(keep_ratio, "merge_tokens", "keep_ratio")
    return Merged(*dispatch("merge_tokens", z, score, proj, metric, keep_ratio, reduce))


def cosine_argmax(src, dst):
    """For each row of ``src [B, S, Cm]`` the most cosine-similar row of ``dst [B, T, Cm]``:
    ``(max_similarity [B, S] float32, argmax [B, S] int64)``, ties to the lower index, zero rows
    similarity 0. Not differentiable (a matching, as ToMe computes it under no_grad)."""
    return dispatch("cosine_argmax", src, dst)


def bipartite_merge(x, r, metric=None, size=None, protected=0, clamp=True):
    """ToMe's ``bipartite_soft_matching`` + ``merge_wavg`` (semantics: `reference.bipartite_merge`).

    Even tokens are A, odd tokens B; each A token's best B match comes from the `cosine_argmax`
    kernel (on ``metric``, default ``x``; protected B tokens are left out of the candidates, protected
    A tokens never merge); the ``r`` A tokens with the highest similarity (stable: ties to the lower A
    position) are added into their match by size-weighted mean. Returns ``(merged [B, N - r, C],
    size [B, N - r, 1])`` ordered ``cat([unmerged A, B])`` as ToMe: unmerged A by descending
    similarity, or in A order when ``protected > 0`` (ToMe's ``class_token`` re-sort, which keeps the
    protected tokens first; ToMe's extra distillation-token shuffle is not reproduced).

    Differentiable w.r.t. ``x`` and ``size`` as ToMe's is: the matching is computed without
    gradient (ToMe runs it under ``torch.no_grad``; ``metric`` gets none), the weighted merge is
    plain PyTorch (gather / scatter_add / divide) so autograd flows through it.

    ToMe's edges: ``r`` above the mergeable count ``(N - protected) // 2`` is clamped to it (ToMe's
    ``r = min(r, (t - protected) // 2)``; ``clamp=False`` raises instead), and ``r <= 0`` (after the
    clamp) merges nothing: ``x`` itself is returned, with ``size`` (ones when not given) — ToMe's
    ``do_nothing``. Precision: the similarities are computed in float32 from bf16 / fp16 inputs
    (ToMe normalises and multiplies in the input dtype), so in half precision a near-tied match can
    differ from ToMe's; in float32 the two agree bit for bit on the normal grid.
    """
    op = "bipartite_merge"
    v.floating(x, op, "x", ndim=3)
    B, N, C = x.shape
    protected = checks.int_arg(protected, op, "protected")
    if not 0 <= protected <= N:
        v.fail(op, f"`protected` must be an int in [0, N={N}], got {protected!r}")
    limit = (N - protected) // 2
    r = checks.int_arg(r, op, "r")
    if not clamp and not 0 <= r <= limit:
        v.fail(op, f"`r` must be an int in [0, (N - protected) // 2 = {limit}] (N={N}, protected={protected}), got {r!r}")
    r = min(r, limit)
    if metric is not None:
        v.floating(metric, op, "metric", ndim=3, device=x.device, shape=(B, N, None))
    if size is not None:
        v.floating(size, op, "size", device=x.device, shape=(B, N, 1))
    if r <= 0:   # ToMe's do_nothing
        return x, (size if size is not None else torch.ones(B, N, 1, dtype=x.dtype, device=x.device))
    m = (x if metric is None else metric).detach()
    na, nb = (N + 1) // 2, N // 2
    pa, pb = (protected + 1) // 2, protected // 2
    if nb == pb:  # only when r == 0: every B token is protected
        node_max = torch.full((B, na), float("-inf"), device=x.device)
        node_idx = torch.zeros(B, na, dtype=torch.int64, device=x.device)
    else:
        node_max, node_idx = cosine_argmax(m[:, ::2], m[:, 1::2][:, pb:])
        node_idx = node_idx + pb
        node_max[:, :pa] = float("-inf")
    edge = descending_order(node_max)
    unm_idx, src_idx = edge[:, r:], edge[:, :r]
    if protected:  # ToMe (class_token): unmerged A back in A order, so protected tokens stay first
        unm_idx = unm_idx.sort(dim=1).values
    dst_idx = node_idx.gather(1, src_idx)

    def merge(t):
        ta, tb = t[:, ::2], t[:, 1::2]
        c = t.shape[-1]
        unm = ta.gather(1, unm_idx.unsqueeze(-1).expand(-1, -1, c))
        s = ta.gather(1, src_idx.unsqueeze(-1).expand(-1, -1, c))
        tb = tb.scatter_add(1, dst_idx.unsqueeze(-1).expand(-1, -1, c), s)
        return torch.cat([unm, tb], dim=1)

    acc = torch.float64 if x.dtype == torch.float64 else torch.float32  # fp64 stays fp64 for gradcheck
    size_acc = torch.ones(B, N, 1, device=x.device, dtype=acc) if size is None else size.to(acc)
    xs = merge(x.to(acc) * size_acc)
    new_size = merge(size_acc)
    return (xs / new_size).to(x.dtype), new_size.to(x.dtype if size is None else size.dtype)
