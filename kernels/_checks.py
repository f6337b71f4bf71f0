"""Value checks of the Triton launchers, one policy for all (stated in `fasttrack.backend`, "Value
checks on GPU tensors"): on CPU tensors (the interpreter) and under `fasttrack.sync_checks` they
run on the host and raise the documented ValueError; on CUDA tensors otherwise they are device-side
asserts (`torch._assert_async`: no host read, nothing breaks a CUDA-graph capture). The assert is
enqueued on the launch's stream before the kernel, so a kernel never runs on values it would read
or write out of bounds with: a failed assert stops the stream's later work."""
from __future__ import annotations

import torch

from fasttrack.backend import sync_checks_enabled


def on_host(t: torch.Tensor) -> bool:
    """Whether checks on `t` run on the host (CPU tensors, or sync checks switched on)."""
    return t.device.type == "cpu" or sync_checks_enabled()


def index_in_range(t: torch.Tensor, n: int, op: str, name: str) -> None:
    """Every entry of the int64 tensor `t` in ``[0, n)``; the message names the first bad value."""
    if t.numel() == 0:
        return
    bad = (t < 0) | (t >= n)
    if on_host(t):
        if bool(bad.any()):
            raise ValueError(f"fasttrack.{op}: `{name}` values must be in [0, N={n}), got {t[bad][0].item()}")
    else:
        torch._assert_async(~bad.any(), f"fasttrack.{op}: `{name}` values must be in [0, N={n})")


def no_nan(t: torch.Tensor, op: str, what: str) -> None:
    """No NaN in `t` (a NaN has no place in a descending order: the ranking would be undefined)."""
    if on_host(t):
        if bool(torch.isnan(t).any()):
            raise ValueError(f"fasttrack.{op}: {what} contains NaN: the ranking is undefined")
    else:
        torch._assert_async(~torch.isnan(t).any(), f"fasttrack.{op}: {what} contains NaN: the ranking is undefined")


def distinct_in_range(t: torch.Tensor, n: int, op: str, name: str) -> None:
    """Entries of the 1-d int64 tensor `t` in ``[0, n)`` and pairwise distinct; messages name the
    first offending position. On the device only the range is asserted (a repeated entry reads
    nothing out of bounds; modules check their own indices once, when they are set)."""
    if t.numel() == 0:
        return
    if not on_host(t):
        torch._assert_async(((t >= 0) & (t < n)).all(), f"fasttrack.{op}: `{name}` values must be in [0, {n})")
        return
    lo, hi = int(t.min()), int(t.max())
    if lo < 0 or hi >= n:
        j = int(((t < 0) | (t >= n)).nonzero()[0, 0])
        raise ValueError(f"fasttrack.{op}: `{name}`[{j}] = {int(t[j])} is out of range [0, {n})")
    counts = torch.bincount(t, minlength=n)
    if int(counts.max()) > 1:
        c = int((counts > 1).nonzero()[0, 0])
        first, again = (t == c).nonzero()[:2, 0].tolist()
        raise ValueError(f"fasttrack.{op}: `{name}`[{again}] = {c} repeats `{name}`[{first}]; kept dims must be "
                         "distinct")
