"""`gather_tokens` / `pad_scatter`: gather kept tokens, and zero-pad them back to the full token
map (``[B, L, C]`` or ``[B, C, H, W]``). Each is the other's backward. Semantics:
`fasttrack.reference.gather_tokens` / `pad_scatter`. Kernels: C++ on CPU
(`csrc/cpu/pad_scatter_kernel.cpp`, `gather_planes_kernel.cpp`), CUDA C++ on GPU (`csrc/cuda/`),
sharing the argument checks of `csrc/pad_scatter.cpp` and the index logic of
`csrc/include/fasttrack/pad_scatter.h`.

Index checks (`check_index`):
- CPU: every row is checked for range and duplicates before anything is written, whatever
  ``check_index`` says (O(B·L) integer work next to the O(B·L·C) copy).
- CUDA: the kernel checks the range of every entry and, for `pad_scatter`, duplicates (two entries
  of a row claiming the same position, caught while the kernel builds the tile's inverse map); it
  ORs the finding into a device-side flag that the op reads after the launch and raises on. Reading
  the flag is a device synchronisation per call: ``check_index=False`` skips it (production latency).
  Bad entries are never written through either way: an out-of-range gather entry yields a zero row,
  an out-of-range scatter entry is dropped, and of two duplicate scatter entries one (unspecified)
  wins. Not checked on CUDA: duplicates in a `gather_tokens` index (its forward is still well
  defined; its backward, a scatter, would keep one of the duplicate rows' gradients).
"""
from __future__ import annotations

import torch

from fasttrack import _opchecks as checks
from fasttrack.ops._registry import CheckCase, OpDef, dispatch, register

SCHEMA_GATHER = "(Tensor x, Tensor index, str layout=\"tokens\", bool check_index=True) -> Tensor"
SCHEMA_SCATTER = ("(Tensor kept, Tensor index, int length, str layout=\"tokens\", int[] hw=[], "
                  "bool check_index=True) -> Tensor")
from fasttrack._opchecks import LAYOUTS  # noqa: E402  (the gather / scatter layouts)


def _fake_gather(x, index, layout="tokens", check_index=True):
    checks.gather_tokens(x, index, layout, check_index)
    C = x.shape[2] if layout == "tokens" else x.shape[1]
    return x.new_empty(index.shape[0], index.shape[1], C)


def _fake_scatter(kept, index, length, layout="tokens", hw=(), check_index=True):
    checks.pad_scatter(kept, index, length, layout, hw, check_index)
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


# (name, B, L, k, C, (H, W)): OSTrack-256 / -384 search maps after elimination at keep ratio 0.35,
# UTPTrack-S (14×14 map, C=512, keep 0.7), and an odd shape (prime L, C not a multiple of 4).
SHAPES = (
    ("ostrack256", 2, 256, 89, 768, (16, 16)),
    ("ostrack384", 1, 576, 199, 768, (24, 24)),
    ("utptrack_s", 2, 196, 138, 512, (14, 14)),
    ("odd", 3, 37, 11, 50, (1, 37)),
)


def random_index(B, L, k, device="cpu", generator=None):
    """``[B, k]`` int64, distinct within each row, in random order (as a top-k selection gives)."""
    rows = [torch.randperm(L, generator=generator)[:k] for _ in range(B)]
    return torch.stack(rows).to(device) if rows else torch.empty(0, k, dtype=torch.long, device=device)


def _cases(scatter):
    def cases(device, dtype):
        g = torch.Generator().manual_seed(0)
        out = []
        for name, B, L, k, C, hw in SHAPES:
            index = random_index(B, L, k, device, g)
            for layout in LAYOUTS:
                if scatter:
                    kept = torch.randn(B, k, C, generator=g).to(device, dtype)
                    args = (kept, index, L, layout, list(hw) if layout == "nchw" else [], True)
                else:
                    shape = (B, L, C) if layout == "tokens" else (B, C, *hw)
                    args = (torch.randn(*shape, generator=g).to(device, dtype), index, layout, True)
                out.append(CheckCase(f"{name}/{layout}", args, grad=(0,)))
        return out
    return cases


GATHER_TOKENS = register(OpDef(name="gather_tokens", schema=SCHEMA_GATHER, fake=_fake_gather, check=checks.gather_tokens,
                               setup_context=_setup_gather, backward=_backward_gather, cuda="cpp",
                               cases=_cases(scatter=False)))
PAD_SCATTER = register(OpDef(name="pad_scatter", schema=SCHEMA_SCATTER, fake=_fake_scatter, check=checks.pad_scatter,
                             setup_context=_setup_scatter, backward=_backward_scatter, cuda="cpp",
                             cases=_cases(scatter=True)))


def gather_tokens(x, index, layout="tokens", check_index=True):
    """``out[b, j] = x[b, index[b, j]]`` → ``[B, k, C]``; ``x`` is ``[B, N, C]`` (``layout="tokens"``)
    or ``[B, C, H, W]`` (``layout="nchw"``). Indices must be distinct per row and in range: always
    checked on CPU; on CUDA ``check_index=False`` skips the read-back of the device-side flag (a sync)
    — see this module's docstring for what is checked where."""
    return dispatch("gather_tokens", x, index, layout, check_index)


def pad_scatter(kept, index, length, layout="tokens", hw=(), check_index=True):
    """Zero map of ``length`` tokens with ``kept[b, j]`` at position ``index[b, j]``: ``[B, length, C]``
    or, with ``layout="nchw"`` and ``hw=(H, W)``, ``[B, C, H, W]``. Output dtype = ``kept.dtype`` (the
    official OSTrack recipe promotes fp16/bf16 to fp32 because its zero pad is created as fp32).
    Index checks and ``check_index``: as `gather_tokens`."""
    hw = list(hw)
    length = checks.int_arg(length, "pad_scatter", "length")
    return dispatch("pad_scatter", kept, index, length, layout, hw, check_index)
