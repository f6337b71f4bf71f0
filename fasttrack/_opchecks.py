"""The metadata check of every op: one function per schema, with the schema's argument list, raising
the documented message (ValueError / TypeError naming the argument and what was expected).

This module sits at the bottom of the package (it imports only `fasttrack._validate` and
`fasttrack.reference`) so that every registered kernel can run the same check: the op registry's
`dispatch` and fake kernels (fasttrack/ops), and the Triton launchers (fasttrack/kernels), which are
the registered CUDA kernels and can be reached through a raw `torch.ops.fasttrack.*` call. The C++
kernels repeat these checks with the same messages (csrc/). Value checks (index ranges, NaN) live
with the kernels (kernels/_checks.py for the Triton launchers).

Scalars: ``start`` / ``length`` (and gather/scatter's ``length``) must be Python ints,
``keep_ratio`` / ``scale`` Python numbers — the public wrappers convert numpy / 0-d tensor scalars
(`int_arg`, `float_arg`) so that every path sees the same thing.
"""
from __future__ import annotations

import numbers
import operator

import torch

from fasttrack import _validate as v

REDUCES = ("sum", "mean")
LAYOUTS = ("tokens", "nchw")


def int_arg(value, op: str, name: str) -> int:
    """A Python int from anything with ``__index__`` (numpy integers, 0-d integer tensors)."""
    if isinstance(value, bool) or value is None:
        v.fail(op, f"`{name}` must be an int, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"fasttrack.{op}: `{name}` must be an int, got {type(value).__name__}") from None


def float_arg(value, op: str, name: str) -> float:
    """A Python float from any real number (numpy floats, 0-d floating / integer tensors)."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 0 or value.is_complex():
            raise TypeError(f"fasttrack.{op}: `{name}` must be a real number, got a tensor of shape "
                            f"{tuple(value.shape)}")
        return float(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"fasttrack.{op}: `{name}` must be a real number, got {type(value).__name__}")
    return float(value)


# ------------------------------------------------------------------------------------------ topk_select
def _check_common(op, x, query_index, query_weight, bonus, global_index, start, length, keep_ratio, n_rows):
    v.floating(x, op, "x", ndim=3)
    B, N, _ = x.shape
    dev = x.device
    if n_rows != N:
        v.fail(op, f"`x` has {N} tokens but the attention is over {n_rows}")
    v.index(query_index, op, "query_index", ndim=2, device=dev, shape=(B, None))
    R = query_index.shape[1]
    v.check(R >= 1, op, "`query_index` must hold at least one row")
    if query_weight is not None:
        v.floating(query_weight, op, "query_weight", device=dev, shape=(B, R))
    if not (isinstance(start, int) and isinstance(length, int) and start >= 0 and length >= 1):
        v.fail(op, f"`start` must be >= 0 and `length` >= 1, got start={start}, length={length}")
    if start + length > N:
        v.fail(op, f"`start + length` must be <= N={N}, got {start} + {length}")
    if bonus is not None:
        v.floating(bonus, op, "bonus", device=dev, shape=(B, length))
    if global_index is not None:
        v.index(global_index, op, "global_index", ndim=2, device=dev, shape=(B, length))
    v.ratio(keep_ratio, op)


def topk_select(attn, x, query_index, query_weight, bonus, global_index, start, length, keep_ratio):
    v.floating(attn, "topk_select", "attn", ndim=4)
    B, H, N, N2 = attn.shape
    if N != N2:
        v.fail("topk_select", f"`attn` must be [B, H, N, N], got {list(attn.shape)}")
    v.tensor(x, "topk_select", "x", device=attn.device)
    if not (x.dim() == 3 and x.shape[0] == B):
        v.fail("topk_select", f"`x` must be [B={B}, N, C], got {list(x.shape)}")
    _check_common("topk_select", x, query_index, query_weight, bonus, global_index, start, length, keep_ratio, N)


def topk_select_qk(q, k, x, query_index, query_weight, bonus, global_index, start, length, keep_ratio, scale):
    op = "topk_select_qk"
    v.floating(q, op, "q", ndim=4)
    v.floating(k, op, "k", device=q.device, shape=tuple(q.shape))
    if k.dtype != q.dtype:
        raise TypeError(f"fasttrack.{op}: `k` must have q's dtype ({q.dtype}), got {k.dtype}")
    v.tensor(x, op, "x", device=q.device)
    if not (x.dim() == 3 and x.shape[0] == q.shape[0]):
        v.fail(op, f"`x` must be [B={q.shape[0]}, N, C], got {list(x.shape)}")
    _check_common(op, x, query_index, query_weight, bonus, global_index, start, length, keep_ratio, q.shape[2])



# ----------------------------------------------------------------------------------------- merge_tokens
def merge_tokens(z, score, proj, metric, keep_ratio, reduce="sum"):
    op = "merge_tokens"
    v.floating(z, op, "z", ndim=3)
    B, N, C = z.shape
    if N < 1:
        v.fail(op, f"`z` must have at least one token, got shape {list(z.shape)}")
    v.check((score is None) != (proj is None), op, "give exactly one of `score` [B, N] and `proj` [C]")
    if score is not None:
        v.floating(score, op, "score", device=z.device, shape=(B, N))
    if proj is not None:
        v.floating(proj, op, "proj", device=z.device, shape=(C,))
        if proj.dtype != z.dtype:
            raise TypeError(f"fasttrack.{op}: `proj` must have z's dtype ({z.dtype}), got {proj.dtype}")
    if metric is not None:
        v.floating(metric, op, "metric", device=z.device, shape=(B, N, None))
    v.ratio(keep_ratio, op)
    if reduce not in REDUCES:
        v.fail(op, f"`reduce` must be one of {REDUCES}, got {reduce!r}")



def cosine_argmax(src, dst):
    op = "cosine_argmax"
    v.floating(src, op, "src", ndim=3)
    v.floating(dst, op, "dst", ndim=3, device=src.device, shape=(src.shape[0], None, src.shape[2]))
    if dst.dtype != src.dtype:
        raise TypeError(f"fasttrack.{op}: `dst` must have src's dtype ({src.dtype}), got {dst.dtype}")
    v.check(dst.shape[1] >= 1 or src.shape[1] == 0, op, "`dst` must have at least one row to match against")



# ---------------------------------------------------------------------------------------- pruned_linear
def pruned_linear(x, weight, bias, in_index, ln_weight=None, ln_bias=None, eps=1e-5, normalize=False):
    op = "pruned_linear"
    v.floating(x, op, "x")
    v.check(x.dim() >= 1, op, "`x` must have at least one dim [..., d_in]")
    v.floating(weight, op, "weight", ndim=2, device=x.device)
    # one GEMM dtype: the kernels multiply x's dtype by weight's (the reference upcasts both)
    if weight.dtype != x.dtype:
        v.fail(op, f"`weight` must have x's dtype ({x.dtype}), got {weight.dtype}")
    d_out, d_kept = weight.shape
    v.index(in_index, op, "in_index", ndim=1, device=x.device)
    if in_index.shape[0] != d_kept:
        v.fail(op, f"`weight.shape[1]` ({d_kept}) must equal len(in_index) ({in_index.shape[0]})")
    _kept_dims(op, x, in_index)
    if bias is not None:
        v.floating(bias, op, "bias", device=x.device, shape=(d_out,))
        if bias.dtype != x.dtype:
            v.fail(op, f"`bias` must have x's dtype ({x.dtype}), got {bias.dtype}")
    _layer_norm_args(op, x, ln_weight, ln_bias, normalize)


def pruned_linear_gather(x, in_index, ln_weight=None, ln_bias=None, eps=1e-5, normalize=False):
    """The internal op ``_pruned_linear_gather`` (phase 1 of pruned_linear)."""
    op = "_pruned_linear_gather"
    v.floating(x, op, "x")
    v.check(x.dim() >= 1, op, "`x` must have at least one dim [..., d_in]")
    v.index(in_index, op, "in_index", ndim=1, device=x.device)
    _kept_dims(op, x, in_index)
    _layer_norm_args(op, x, ln_weight, ln_bias, normalize)


# ---------------------------------------------------------------------------------------- _attention
def attention(qkv, num_heads, scale):
    """The internal op ``_attention``: ``qkv [B, N, 3·C]``, C divisible by ``num_heads``."""
    op = "_attention"
    v.floating(qkv, op, "qkv", ndim=3)
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
        v.fail(op, f"`num_heads` must be an int >= 1, got {num_heads!r}")
    if qkv.shape[-1] % (3 * num_heads):
        v.fail(op, f"`qkv.shape[-1]` ({qkv.shape[-1]}) must be 3 * num_heads * head_dim with num_heads={num_heads}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"fasttrack.{op}: `scale` must be a float, got {type(scale).__name__}")


def layer_norm(x, weight, bias, eps):
    """The internal op ``_layer_norm``: x floating with >= 1 dim, weight / bias ``[C]`` or None."""
    op = "_layer_norm"
    v.floating(x, op, "x")
    if x.dim() < 1:
        v.fail(op, "`x` must have at least 1 dim, got a scalar")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None:
            v.floating(t, op, name, shape=(x.shape[-1],), device=x.device)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"fasttrack.{op}: `eps` must be a float, got {type(eps).__name__}")


def _kept_dims(op, x, in_index):
    if in_index.shape[0] > x.shape[-1]:
        v.fail(op, f"`in_index` keeps {in_index.shape[0]} dims but `x` has only d_in={x.shape[-1]}")


def _layer_norm_args(op, x, ln_weight, ln_bias, normalize):
    for name, t in (("ln_weight", ln_weight), ("ln_bias", ln_bias)):
        if t is not None:
            if not normalize:
                v.fail(op, f"`{name}` is given but normalize=False")
            v.floating(t, op, name, device=x.device, shape=(x.shape[-1],))
            if t.dtype != x.dtype:
                raise TypeError(f"fasttrack.{op}: `{name}` must have x's dtype ({x.dtype}), got {t.dtype}")



# ---------------------------------------------------------------------------------- gather / scatter
# Metadata checks (the wrapper and the fake kernels run them; the C++ kernels repeat them, same
# messages, for direct torch.ops calls). They run on every call, so each message is formatted only
# once its condition has failed.
def gather_tokens(x, index, layout="tokens", check_index=True):
    op = "gather_tokens"
    if layout not in LAYOUTS:
        v.fail(op, f"`layout` must be one of {LAYOUTS}, got {layout!r}")
    v.floating(x, op, "x", ndim=3 if layout == "tokens" else 4)
    v.index(index, op, "index", ndim=2, device=x.device, shape=(x.shape[0], None))
    n = x.shape[1] if layout == "tokens" else x.shape[2] * x.shape[3]
    if index.shape[1] > n:
        v.fail(op, f"`index` selects {index.shape[1]} tokens but `x` has only {n}")


def pad_scatter(kept, index, length, layout="tokens", hw=(), check_index=True):
    op = "pad_scatter"
    if layout not in LAYOUTS:
        v.fail(op, f"`layout` must be one of {LAYOUTS}, got {layout!r}")
    v.floating(kept, op, "kept", ndim=3)
    v.index(index, op, "index", ndim=2, device=kept.device, shape=tuple(kept.shape[:2]))
    # SymInt: under torch.compile with dynamic shapes the backward passes x.shape[1] as `length`
    if not (isinstance(length, (int, torch.SymInt)) and kept.shape[1] <= length < 2 ** 31):
        v.fail(op, f"`length` must be an int >= k={kept.shape[1]} (the number of kept tokens) and < 2^31, "
                   f"got {length!r}")
    if layout == "nchw" and not (len(hw) == 2 and hw[0] * hw[1] == length):
        v.fail(op, f"`hw` must be (H, W) with H*W == length={length}, got {tuple(hw)}")




# ------------------------------------------------------------------------------------------- values
def _first_bad_row_entry(index: torch.Tensor, n: int):
    """(b, j, kind, first_j) of the first entry of a [B, k] index out of [0, n) or repeating an
    earlier entry of its row, or None."""
    bad = (index < 0) | (index >= n)
    if bool(bad.any()):
        b, j = (int(i) for i in bad.nonzero()[0])
        return b, j, "range", None
    if index.shape[1] > 1:
        srt, order = index.sort(dim=1, stable=True)
        dup = srt[:, 1:] == srt[:, :-1]
        if bool(dup.any()):
            rows = dup.any(1).nonzero()[:, 0]
            b = int(rows[0])
            # the first position (in row order) whose value appeared earlier in the row
            row = index[b].tolist()
            seen = {}
            for j, val in enumerate(row):
                if val in seen:
                    return b, j, "repeat", seen[val]
                seen[val] = j
    return None


def values(name: str, *args) -> None:
    """The value checks of op `name` on host tensors, with the C++ kernels' messages: what the
    reference CPU kernel (no `_C`) runs before computing, so it refuses what the native kernel
    refuses (index ranges, duplicates, NaN scores)."""
    if name in ("topk_select", "topk_select_qk"):
        qi = args[3] if name == "topk_select_qk" else args[2]
        n = args[0].shape[2]
        bad = (qi < 0) | (qi >= n)
        if bool(bad.any()):
            b, r = (int(i) for i in bad.nonzero()[0])
            v.fail(name, f"`query_index` values must be in [0, N={n}), got {int(qi[b, r])} at [{b}, {r}]")
    elif name in ("gather_tokens", "pad_scatter"):
        data, index = args[0], args[1]
        if name == "pad_scatter":
            n = args[2]
        else:
            layout = args[2] if len(args) > 2 else "tokens"   # the dispatcher drops defaulted arguments
            n = data.shape[1] if layout == "tokens" else data.shape[2] * data.shape[3]
        found = _first_bad_row_entry(index, n)
        if found is not None:
            b, j, kind, first = found
            if kind == "range":
                v.fail(name, f"`index`[{b}, {j}] = {int(index[b, j])} is out of range [0, {n})")
            v.fail(name, f"`index`[{b}, {j}] = {int(index[b, j])} repeats `index`[{b}, {first}]; indices must be "
                         "distinct within a row")
    elif name in ("pruned_linear", "_pruned_linear_gather"):
        idx, d_in = args[3 if name == "pruned_linear" else 1], args[0].shape[-1]
        if idx.numel():
            found = _first_bad_row_entry(idx[None], d_in)
            if found is not None:
                _, j, kind, first = found
                if kind == "range":
                    v.fail(name, f"`in_index`[{j}] = {int(idx[j])} is out of range [0, {d_in})")
                v.fail(name, f"`in_index`[{j}] = {int(idx[j])} repeats `in_index`[{first}]; kept dims must be "
                             "distinct")
    elif name == "merge_tokens":
        z, score, proj = args[0], args[1], args[2]
        if score is not None and bool(torch.isnan(score).any()):
            v.fail(name, "`score` contains NaN: the ranking is undefined")
        if proj is not None:
            acc = torch.promote_types(z.dtype, torch.float32)
            if bool(torch.isnan(z.to(acc) @ proj.to(acc)).any()):
                v.fail(name, "the score `z @ proj` (from `z` or `proj`) contains NaN: the ranking is undefined")
