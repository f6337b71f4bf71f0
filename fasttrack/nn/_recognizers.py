"""The table of structures `fasttrack.patch_model` recognises: one `Recognizer` per structure,
registered by the family module that owns the fused replacement, next to it.

A leaf module: it imports nothing from fasttrack, so every family can register without importing
`fasttrack.patch` (which walks models and only reads this table).

``register_recognizer(name, match, build, probe=None, converts_state=False, before=None)``:
- ``match(module) -> bool``: a cheap structural test (attribute names, submodule types, forward
  signature), never the import path, so official trackers' own classes are recognised;
- ``build(module) -> nn.Module``: the fused replacement, sharing the module's Parameters (raise
  TypeError / ValueError with a message to refuse);
- ``probe(module) -> (args, kwargs)``: a small synthetic input for the module's forward, on which
  `patch_model` runs the original and the replacement and keeps the swap only if they agree;
- ``converts_state``: the replacement knowingly changes the state-dict layout (e.g. ABTrack's masked
  dense weights to pruned ones); otherwise its keys must equal the original's;
- ``before``: insert ahead of an existing recogniser.
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Callable

import torch
from torch import nn

__all__ = ["Recognizer", "register_recognizer", "recognizers", "forward_params", "has_attrs", "is_linear",
           "probe_like"]


@dataclasses.dataclass(frozen=True)
class Recognizer:
    name: str
    match: Callable[[nn.Module], bool]
    build: Callable[[nn.Module], nn.Module]
    probe: Callable[[nn.Module], tuple] | None = None
    converts_state: bool = False


_TABLE: list[Recognizer] = []


def register_recognizer(name: str, match: Callable[[nn.Module], bool], build: Callable[[nn.Module], nn.Module],
                        probe: Callable[[nn.Module], tuple] | None = None, converts_state: bool = False,
                        before: str | None = None) -> Recognizer:
    """Add (or replace, by name) a recogniser; see the module docstring."""
    if not isinstance(name, str) or not name:
        raise ValueError("register_recognizer: `name` must be a non-empty string")
    if not callable(match) or not callable(build) or (probe is not None and not callable(probe)):
        raise TypeError("register_recognizer: `match`, `build` (and `probe`) must be callables")
    rec = Recognizer(name, match, build, probe, bool(converts_state))
    for i, r in enumerate(_TABLE):
        if r.name == name:
            _TABLE[i] = rec
            return rec
    if before is not None:
        idx = [r.name for r in _TABLE]
        if before not in idx:
            raise ValueError(f"register_recognizer: `before` names no recogniser: {before!r} (have {idx})")
        _TABLE.insert(idx.index(before), rec)
    else:
        _TABLE.append(rec)
    return rec


def recognizers() -> list[Recognizer]:
    """The table, in matching order."""
    return list(_TABLE)


# ------------------------------------------------------------------------ structural probes
def forward_params(m: nn.Module) -> set:
    """The names of ``m.forward``'s parameters (empty if it has no inspectable signature)."""
    try:
        return set(inspect.signature(m.forward).parameters)
    except (TypeError, ValueError):
        return set()


def _get(m, path):
    obj = m
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def has_attrs(m, *paths) -> bool:
    """Every dotted attribute path exists (and is not None) on ``m``."""
    return all(_get(m, p) is not None for p in paths)


def is_linear(m, path) -> bool:
    return isinstance(_get(m, path), nn.Linear)


def probe_like(m: nn.Module, *shape: int) -> torch.Tensor:
    """A random probe tensor of ``shape`` with the dtype and device of ``m``'s first floating
    parameter (fixed seed: probes are reproducible)."""
    ref = next((p for p in m.parameters() if p.is_floating_point()), None)
    dtype, device = (ref.dtype, ref.device) if ref is not None else (torch.float32, torch.device("cpu"))
    g = torch.Generator().manual_seed(len(shape) * 1000 + sum(shape))
    return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)
