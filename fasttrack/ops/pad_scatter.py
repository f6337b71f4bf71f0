"""`gather_tokens` / `pad_scatter`: gather kept tokens, and zero-pad them back to the full token
map (``[B, L, C]`` or ``[B, C, H, W]``). Each is the other's backward. Semantics:
`fasttrack.reference.gather_tokens` / `pad_scatter`. The GPU kernel is CUDA C++ (`csrc/cuda/`)."""
from __future__ import annotations

import torch

from fasttrack import _validate as v
from fasttrack.ops._registry import OpDef, dispatch, register

SCHEMA_GATHER = "(Tensor x, Tensor index, str layout=\"tokens\", bool check_index=True) -> Tensor"
SCHEMA_SCATTER = ("(Tensor kept, Tensor index, int length, str layout=\"tokens\", int[] hw=[], "
                  "bool check_index=True) -> Tensor")
LAYOUTS = ("tokens", "nchw")


def check_gather(x, index, layout="tokens", check_index=True):
    op = "gather_tokens"
    v.check(layout in LAYOUTS, op, f"`layout` must be one of {LAYOUTS}, got {layout!r}")
    v.tensor(x, op, "x", ndim=3 if layout == "tokens" else 4)
    v.index(index, op, "index", ndim=2, device=x.device, shape=(x.shape[0], None))
    n = x.shape[1] if layout == "tokens" else x.shape[2] * x.shape[3]
    v.check(index.shape[1] <= n, op, f"`index` selects {index.shape[1]} tokens but `x` has only {n}")


def check_scatter(kept, index, length, layout="tokens", hw=(), check_index=True):
    op = "pad_scatter"
    v.check(layout in LAYOUTS, op, f"`layout` must be one of {LAYOUTS}, got {layout!r}")
    v.tensor(kept, op, "kept", ndim=3)
    v.index(index, op, "index", ndim=2, device=kept.device, shape=tuple(kept.shape[:2]))
    v.check(isinstance(length, int) and length >= kept.shape[1], op,
            f"`length` must be an int >= k={kept.shape[1]} (the number of kept tokens), got {length!r}")
    if layout == "nchw":
        v.check(len(hw) == 2 and hw[0] * hw[1] == length, op,
                f"`hw` must be (H, W) with H*W == length={length}, got {tuple(hw)}")


def _fake_gather(x, index, layout="tokens", check_index=True):
    check_gather(x, index, layout, check_index)
    C = x.shape[2] if layout == "tokens" else x.shape[1]
    return x.new_empty(index.shape[0], index.shape[1], C)


def _fake_scatter(kept, index, length, layout="tokens", hw=(), check_index=True):
    check_scatter(kept, index, length, layout, hw, check_index)
    B, _, C = kept.shape
    return kept.new_empty(B, length, C) if layout == "tokens" else kept.new_empty(B, C, hw[0], hw[1])


def _setup_gather(ctx, inputs, output):
    x, index, layout = inputs[0], inputs[1], inputs[2] if len(inputs) > 2 else "tokens"
    ctx.save_for_backward(index)
    ctx.layout = layout
    ctx.length = x.shape[1] if layout == "tokens" else x.shape[2] * x.shape[3]
    ctx.hw = [] if layout == "tokens" else [x.shape[2], x.shape[3]]


def _backward_gather(ctx, grad):
    (index,) = ctx.saved_tensors
    return pad_scatter(grad.contiguous(), index, ctx.length, ctx.layout, ctx.hw, check_index=False), None, None, None


def _setup_scatter(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])
    ctx.layout = inputs[3] if len(inputs) > 3 else "tokens"


def _backward_scatter(ctx, grad):
    (index,) = ctx.saved_tensors
    return gather_tokens(grad.contiguous(), index, ctx.layout, check_index=False), None, None, None, None, None


GATHER_TOKENS = register(OpDef("gather_tokens", SCHEMA_GATHER, _fake_gather, _setup_gather, _backward_gather,
                               cuda_cpp=True))
PAD_SCATTER = register(OpDef("pad_scatter", SCHEMA_SCATTER, _fake_scatter, _setup_scatter, _backward_scatter,
                             cuda_cpp=True))


def gather_tokens(x, index, layout="tokens", check_index=True):
    """``out[b, j] = x[b, index[b, j]]`` → ``[B, k, C]``; ``x`` is ``[B, N, C]`` (``layout="tokens"``)
    or ``[B, C, H, W]`` (``layout="nchw"``). Indices must be distinct per row and in range (checked
    unless ``check_index=False``; on CUDA the check is a device-side flag, see README)."""
    check_gather(x, index, layout, check_index)
    return dispatch("gather_tokens", x, index, layout, check_index)


def pad_scatter(kept, index, length, layout="tokens", hw=(), check_index=True):
    """Zero map of ``length`` tokens with ``kept[b, j]`` at position ``index[b, j]``: ``[B, length, C]``
    or, with ``layout="nchw"`` and ``hw=(H, W)``, ``[B, C, H, W]``. Output dtype = ``kept.dtype``."""
    hw = [int(h) for h in hw]
    check_scatter(kept, index, length, layout, hw, check_index)
    return dispatch("pad_scatter", kept, index, length, layout, hw, check_index)
