"""`patch_model`: swap recognised blocks of an existing model for fused ones, in place.

``report = fasttrack.patch_model(model, include=None, exclude=None)`` walks ``model`` top-down.
Each submodule is offered to the recognisers in the table, in registration order; the first whose
``match`` accepts it builds the fused replacement with ``build(module)``, which shares the
module's Parameters (no copy: the state dict, optimisers and checkpoints keep working), and the
replacement takes the module's place in its parent. A swapped module's children are not visited.
Recognition is by structure (attribute names, submodule types, forward signature), never by
import path, so the official trackers' own classes are recognised.

A module that a recogniser matches but cannot convert (``build`` raises ``TypeError`` /
``ValueError``, e.g. relative position bias, a LayerScale, a non-GELU activation where a fused
epilogue needs GELU) is left untouched and reported with the reason, as is a module excluded by
``include`` / ``exclude``. Modules that look like transformer blocks (``attn`` and ``mlp``
children) but match no recogniser are reported too.

``include`` / ``exclude``: iterables of strings; a string selects a candidate when it equals the
recogniser's name or matches the module's qualified name as an `fnmatch` pattern (``"blocks.1*"``).
With ``include`` given only selected candidates are swapped; ``exclude`` wins over ``include``.

Registering another family (one line, at import of the family's module)::

    fasttrack.patch.register_recognizer("etctrack.hi_block", match=looks_like_hi_block,
                                        build=FusedHIBlock.from_reference)

``match(module) -> bool`` must be a cheap structural test; ``build(module) -> nn.Module`` returns
the fused module (raise TypeError/ValueError with a message to refuse). ``before="name"`` inserts
the recogniser ahead of an existing one (for a structure that is a superset of another's).
"""
from __future__ import annotations

import dataclasses
import fnmatch
import inspect
from typing import Callable, Iterable

from torch import nn

__all__ = ["Recognizer", "PatchReport", "register_recognizer", "recognizers", "patch_model"]


@dataclasses.dataclass(frozen=True)
class Recognizer:
    name: str
    match: Callable[[nn.Module], bool]
    build: Callable[[nn.Module], nn.Module]


_TABLE: list[Recognizer] = []


def register_recognizer(name: str, match: Callable[[nn.Module], bool], build: Callable[[nn.Module], nn.Module],
                        before: str | None = None) -> Recognizer:
    """Add (or replace, by name) a recogniser; see the module docstring."""
    if not isinstance(name, str) or not name:
        raise ValueError("register_recognizer: `name` must be a non-empty string")
    if not callable(match) or not callable(build):
        raise TypeError("register_recognizer: `match` and `build` must be callables")
    rec = Recognizer(name, match, build)
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


@dataclasses.dataclass
class PatchReport:
    swapped: list = dataclasses.field(default_factory=list)   # (path, recogniser, old type, new type)
    skipped: list = dataclasses.field(default_factory=list)   # (path, recogniser or None, reason)

    def __len__(self):
        return len(self.swapped)

    def __str__(self):
        lines = [f"patch_model: {len(self.swapped)} swapped, {len(self.skipped)} not swapped"]
        lines += [f"  swapped  {p or '<root>'}: {old} -> {new} [{rec}]" for p, rec, old, new in self.swapped]
        lines += [f"  kept     {p or '<root>'}: {why}" + (f" [{rec}]" if rec else "") for p, rec, why in self.skipped]
        return "\n".join(lines)


def _selected(patterns, rec_name, path):
    return any(s == rec_name or fnmatch.fnmatchcase(path, s) for s in patterns)


def _looks_like_block(m: nn.Module) -> bool:
    return isinstance(getattr(m, "attn", None), nn.Module) and isinstance(getattr(m, "mlp", None), nn.Module)


def patch_model(model: nn.Module, include: Iterable[str] | None = None, exclude: Iterable[str] | None = None
                ) -> PatchReport:
    """Swap recognised blocks of ``model`` for fused ones in place (module docstring); returns a
    `PatchReport`. The root module itself is never replaced."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"patch_model: `model` must be an nn.Module, got {type(model).__name__}")
    for arg, val in (("include", include), ("exclude", exclude)):
        if isinstance(val, str):
            raise TypeError(f"patch_model: `{arg}` must be an iterable of strings, not a single string")
    include = None if include is None else list(include)
    exclude = [] if exclude is None else list(exclude)
    # every family module registers its recognisers when imported; importing them here (not at the
    # top: they import this module) makes the table complete after a plain `import fasttrack`
    import fasttrack.nn  # noqa: F401
    report = PatchReport()

    def visit(parent: nn.Module, prefix: str):
        for name, child in list(parent._modules.items()):
            if child is None:
                continue
            path = f"{prefix}.{name}" if prefix else name
            rec = next((r for r in _TABLE if _safe_match(r, child)), None)
            if rec is None:
                if _looks_like_block(child) and not _is_fused(child):
                    report.skipped.append((path, None, f"{type(child).__name__} looks like a transformer block "
                                                       "but matches no recogniser"))
                if not _is_fused(child):
                    visit(child, path)
                continue
            if _selected(exclude, rec.name, path) or (include is not None and not _selected(include, rec.name, path)):
                report.skipped.append((path, rec.name, "excluded by include/exclude"))
                continue
            try:
                new = rec.build(child)
            except (TypeError, ValueError) as e:
                report.skipped.append((path, rec.name, str(e)))
                visit(child, path)
                continue
            new._fasttrack_fused = True
            setattr(parent, name, new)
            report.swapped.append((path, rec.name, type(child).__name__, type(new).__name__))

    visit(model, "")
    return report


def _is_fused(m: nn.Module) -> bool:
    t = type(m)
    return getattr(m, "_fasttrack_fused", False) or (t.__module__.startswith("fasttrack.")
                                                      and t.__name__.startswith("Fused"))


def _safe_match(rec: Recognizer, m: nn.Module) -> bool:
    if _is_fused(m):
        return False
    try:
        return bool(rec.match(m))
    except Exception:  # a recogniser's structural probe must not break the walk
        return False


# --------------------------------------------------------------------------------------------
# Built-in recognisers: OSTrack / UTPTrack family
# --------------------------------------------------------------------------------------------
def _params(m: nn.Module) -> set:
    try:
        return set(inspect.signature(m.forward).parameters)
    except (TypeError, ValueError):
        return set()


def _has(m, *paths) -> bool:
    for p in paths:
        obj = m
        for part in p.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                return False
    return True


def _is_linear(m, path) -> bool:
    obj = m
    for part in path.split("."):
        obj = getattr(obj, part, None)
    return isinstance(obj, nn.Linear)


def _vit_parts(m) -> bool:
    return (all(_is_linear(m, p) for p in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"))
            and _has(m, "norm1", "norm2", "attn.num_heads", "attn.scale"))


def _itpn_parts(m) -> bool:
    return (all(_is_linear(m, p) for p in ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.proj",
                                           "mlp.w1", "mlp.w2", "mlp.w3"))
            and _has(m, "norm1", "norm2", "gamma_1", "gamma_2", "mlp.ffn_ln"))


def match_ce_block(m) -> bool:
    return _vit_parts(m) and {"global_index_template", "global_index_search"} <= _params(m)


def match_utptrack_o_block(m) -> bool:
    return _vit_parts(m) and {"global_index_sz", "global_index_dz", "global_index_x"} <= _params(m)


def match_utptrack_s_block(m) -> bool:
    return _itpn_parts(m) and {"global_index_sz", "global_index_dz", "global_index_x"} <= _params(m)


def match_vit_block(m) -> bool:
    p = _params(m)
    return _vit_parts(m) and not ({"global_index_template", "global_index_sz"} & p) and "x" in p


def match_center_head(m) -> bool:
    return (_has(m, "feat_sz", "stride")
            and all(hasattr(m, f"conv{s}_{b}") for s in range(1, 6) for b in ("ctr", "offset", "size")))


def _refuse_vit_extras(m):
    """Pieces of timm / OSTrack blocks the fused blocks do not implement."""
    for name in ("ls1", "ls2"):
        sub = getattr(m, name, None)
        if sub is not None and not isinstance(sub, nn.Identity):
            raise TypeError(f"`{name}` (LayerScale) is not supported by the fused ViT blocks")
    for name in ("q_norm", "k_norm"):
        sub = getattr(m.attn, name, None)
        if sub is not None and not isinstance(sub, nn.Identity):
            raise TypeError(f"`attn.{name}` (qk-norm) is not supported by the fused ViT blocks")
    if getattr(m.attn, "rpe", False):
        raise TypeError("`attn.rpe` (relative position bias) is not supported by the fused ViT blocks")


def _refuse_itpn_extras(m):
    a = m.attn
    if getattr(a, "relative_position_bias_table", None) is not None or getattr(a, "rel_pos_bias", None) is not None:
        raise TypeError("Fast-iTPN relative position bias is not supported by FusedUTPTrackSBlock")
    if getattr(m, "postnorm", False) or getattr(m, "deepnorm", False):
        raise TypeError("Fast-iTPN postnorm/deepnorm blocks are not supported by FusedUTPTrackSBlock")
    if float(getattr(a, "scale", 0)) <= 0:
        raise TypeError("`attn.scale` must be positive")


def _build_ce(m):
    from fasttrack.nn.ostrack import FusedCEBlock
    _refuse_vit_extras(m)
    return FusedCEBlock.from_reference(m)


def _build_utp_o(m):
    from fasttrack.nn.utptrack import FusedUTPTrackOBlock
    _refuse_vit_extras(m)
    return FusedUTPTrackOBlock.from_reference(m)


def _build_utp_s(m):
    from fasttrack.nn.utptrack import FusedUTPTrackSBlock
    _refuse_itpn_extras(m)
    return FusedUTPTrackSBlock.from_reference(m)


def _build_vit(m):
    from fasttrack.nn.vit import FusedBlock
    _refuse_vit_extras(m)
    return FusedBlock.from_reference(m)


def _build_head(m):
    from fasttrack.nn.head import FusedCenterPredictor
    return FusedCenterPredictor.from_reference(m)


_BUILTIN = [
    ("ostrack.ce_block", match_ce_block, _build_ce),
    ("utptrack_o.block", match_utptrack_o_block, _build_utp_o),
    ("utptrack_s.block", match_utptrack_s_block, _build_utp_s),
    ("vit.block", match_vit_block, _build_vit),
    ("ostrack.center_head", match_center_head, _build_head),
]
_TABLE.extend(Recognizer(*r) for r in _BUILTIN)
