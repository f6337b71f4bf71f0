"""Argument checks shared by every op wrapper and fake kernel: one message style, naming the
argument and what was expected. They look only at metadata (shape, dtype, device), so they also
run on fake tensors under torch.compile; value checks (index ranges, NaN) live in the kernels."""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check(cond: bool, op: str, msg: str) -> None:
    """For constant messages; a message that formats values goes through `fail` under an `if`, so
    the string is built only on failure (these checks run on every op call)."""
    if not cond:
        fail(op, msg)


def error(op: str, msg: str) -> ValueError:
    return ValueError(f"fasttrack.{op}: {msg}")


def fail(op: str, msg: str):
    raise error(op, msg)


def module_error(module: str):
    """``err(who, msg) -> ValueError`` for a module's constructors and functions, naming them as
    ``fasttrack.<module>.<who>`` (``module``: the module's ``__name__``)."""
    prefix = module.removeprefix("fasttrack.")
    return lambda who, msg: error(f"{prefix}.{who}", msg)


def tensor(t, op: str, name: str, *, ndim: int | None = None, dtypes=None, device=None,
           shape: tuple | None = None) -> None:
    """`shape` entries may be None (any size)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"fasttrack.{op}: `{name}` must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"fasttrack.{op}: `{name}` must have {ndim} dims, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"fasttrack.{op}: `{name}` must have dtype in ({names}), got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"fasttrack.{op}: `{name}` must be on {device} (like the other inputs), got {t.device}")
    if shape is not None:
        # a plain loop: these checks run on every op call, and a generator costs ~1 µs here
        ts = t.shape
        ok = len(shape) == len(ts)
        if ok:
            for s, d in zip(shape, ts):
                if s is not None and s != d:
                    ok = False
                    break
        if not ok:
            want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
            raise ValueError(f"fasttrack.{op}: `{name}` must have shape {want}, got {list(t.shape)}")


def index(t, op: str, name: str, *, ndim: int, device, shape: tuple | None = None) -> None:
    tensor(t, op, name, ndim=ndim, dtypes=(torch.int64,), device=device, shape=shape)


def ratio(r: float, op: str, name: str = "keep_ratio") -> None:
    if not (isinstance(r, (float, int)) and 0.0 < float(r) <= 1.0):
        raise ValueError(f"fasttrack.{op}: `{name}` must be in (0, 1], got {r!r}")


def floating(t, op: str, name: str, *, ndim: int | None = None, device=None, shape: tuple | None = None) -> None:
    tensor(t, op, name, ndim=ndim, dtypes=FLOAT_DTYPES, device=device, shape=shape)
