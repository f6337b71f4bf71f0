"""`patch_model`: swap recognised blocks of an existing model for fused ones, in place — and never
leave the model broken.

``report = fasttrack.patch_model(model, include=None, exclude=None, verify=True, example_inputs=None)``
walks ``model`` top-down. Each submodule is offered to the recognisers of
`fasttrack.nn._recognizers` (registered by the family modules, next to their fused classes), in
table order; a recogniser whose ``match`` accepts it builds a fused replacement sharing the
module's Parameters (no copy: the state dict, optimisers and checkpoints keep working). The
replacement takes the module's place only if it passes every check below; otherwise the next
matching recogniser is tried, and if none passes the module stays and the report says why. A
swapped module's children are not visited.

Checks (generic: they hold for any recogniser, built-in or registered later):
1. *State*: the replacement's state-dict keys equal the original's, as a set (a recogniser that
   knowingly converts the layout says so: ``converts_state``, e.g. ABTrack's masked weights).
2. *Members*: every parameter and buffer of the original is one of the replacement's (by
   identity), and every parameterless leaf module of the original (dropout, drop-path, activation)
   is the replacement's or has an equivalent there (same kind and setting); an identity (Identity,
   p = 0) needs none. A member left out is named: a gate, an extra norm, a LayerScale, timm's
   ``drop_path1`` / ``drop_path2`` in training.
3. *Behaviour* (``verify=True``, the default): the original and the replacement run on the
   recogniser's small synthetic probe input (eval mode, no gradient) and must agree within the
   dtype's tolerance; with ``example_inputs``, the model also runs once on them before any swap
   (each candidate's real inputs are recorded) and every candidate is compared on its own inputs.
   This catches what structure cannot: a post-norm block, a scaled residual, a causal mask.
A refused candidate is reported with the reason; the model's outputs are unchanged by it.

``include`` / ``exclude``: iterables of strings; a string selects a candidate when it equals the
recogniser's name or matches the module's qualified name as an `fnmatch` pattern (``"blocks.1*"``).
With ``include`` given only selected candidates are swapped; ``exclude`` wins over ``include``.
Modules that look like transformer blocks (``attn`` and ``mlp`` children) but match no recogniser
are reported too.
"""
from __future__ import annotations

import dataclasses
import fnmatch
from typing import Iterable

import torch
from torch import nn
from torch.utils._pytree import tree_leaves, tree_map

from fasttrack.nn._recognizers import Recognizer, recognizers, register_recognizer  # noqa: F401  (re-exported)

__all__ = ["Recognizer", "PatchReport", "register_recognizer", "recognizers", "patch_model"]


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


# --------------------------------------------------------------------------------- member accounting
def _inert(m: nn.Module) -> bool:
    """Modules that compute the identity in every mode."""
    if isinstance(m, nn.Identity):
        return True
    if isinstance(m, nn.Dropout):
        return m.p == 0
    if hasattr(m, "drop_prob") and not list(m.parameters()):   # DropPath of any flavour
        return not m.drop_prob
    return False


def _signature(m: nn.Module):
    """What a parameterless leaf module computes, for matching an original's against a replacement's."""
    if isinstance(m, nn.Dropout):
        return ("dropout", float(m.p))
    if hasattr(m, "drop_prob"):
        return ("drop_path", float(m.drop_prob or 0.0))
    return (type(m).__name__, repr(m))


def _unaccounted(orig: nn.Module, new: nn.Module) -> list[str]:
    """Members of ``orig`` that ``new`` does not use (check 2 of the module docstring)."""
    new_tensors = {id(t) for t in list(new.parameters()) + list(new.buffers())}
    missing = [name for name, t in list(orig.named_parameters()) + list(orig.named_buffers())
               if id(t) not in new_tensors]
    new_modules = {id(m) for m in new.modules()}
    new_signatures = {_signature(m) for m in new.modules() if not m._modules and not list(m.parameters(False))}
    owners = {n.rsplit(".", 1)[0] for n in missing}
    for name, m in orig.named_modules():
        if not name or m._modules or list(m.parameters(False)) or list(m.buffers(False)):
            continue   # the root, containers, and modules whose tensors were checked above
        if id(m) in new_modules or _inert(m) or _signature(m) in new_signatures or name in owners:
            continue
        missing.append(name)
    return missing


# ----------------------------------------------------------------------------------- behaviour
def _tolerance(t: torch.Tensor) -> tuple[float, float]:
    from fasttrack.testing import tolerance
    dtype = t.dtype if t.dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64) else torch.float32
    return tolerance(dtype, scale=100)


def _disagreement(out_orig, out_new) -> str | None:
    """Why two outputs differ beyond tolerance, or None. The fused modules return ``None`` for an
    attention map unless asked for one: a None on the replacement's side is not compared."""
    a, b = tree_leaves(out_orig), tree_leaves(out_new, is_leaf=lambda x: x is None)
    if len(b) != len(a):
        b = [x for x in b if x is not None] if len([x for x in b if x is not None]) == len(a) else b
        if len(b) != len(a):
            return f"returns {len(b)} outputs where the original returns {len(a)}"
    for i, (x, y) in enumerate(zip(a, b)):
        if y is None or not isinstance(x, torch.Tensor):
            continue
        if not isinstance(y, torch.Tensor) or x.shape != y.shape:
            return f"output {i} has shape {getattr(y, 'shape', None)} instead of {tuple(x.shape)}"
        if x.is_floating_point():
            atol, rtol = _tolerance(x)
            diff = (x.double() - y.double()).abs()
            bad = ~(diff <= atol + rtol * x.double().abs()) & ~(x.isnan() & y.isnan())
            if bool(bad.any()):
                return f"output {i} differs by up to {diff[bad].max().item():.3g}"
        elif not torch.equal(x, y):
            return f"output {i} (integer) differs"
    return None


def _run(module, args, kwargs):
    clone = lambda t: t.clone() if isinstance(t, torch.Tensor) else t  # noqa: E731
    return module(*tree_map(clone, args), **tree_map(clone, kwargs))


def _compare(orig, new, args, kwargs) -> str | None:
    modes = [(m, m.training) for m in (orig, new)]
    try:
        for m, _ in modes:
            m.eval()
        with torch.no_grad():
            try:
                want = _run(orig, args, kwargs)
            except Exception:
                return None   # the original itself refuses this input: nothing to compare
            try:
                got = _run(new, args, kwargs)
            except Exception as e:
                return f"fails where the original runs ({type(e).__name__}: {e})"
        return _disagreement(want, got)
    finally:
        for m, mode in modes:
            m.train(mode)


def _record_inputs(model, modules, example_inputs):
    """Run ``model(*example_inputs)`` once, recording each of ``modules``' first (args, kwargs)."""
    seen, hooks = {}, []
    copy = lambda t: t.detach().clone() if isinstance(t, torch.Tensor) else t  # noqa: E731

    def hook(module, args, kwargs):
        seen.setdefault(id(module), (tree_map(copy, args), tree_map(copy, kwargs)))
    for m in modules:
        hooks.append(m.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            model(*example_inputs)
    finally:
        for h in hooks:
            h.remove()
    return seen


# ------------------------------------------------------------------------------------------ walk
def _build_checked(rec: Recognizer, child: nn.Module, verify: bool):
    """The checked replacement, or (None, reason)."""
    try:
        new = rec.build(child)
    except (TypeError, ValueError) as e:
        return None, str(e)
    if not rec.converts_state:
        before, after = set(child.state_dict()), set(new.state_dict())
        if before != after:
            return None, (f"the fused module would change the state-dict keys (missing {sorted(before - after)[:4]}, "
                          f"new {sorted(after - before)[:4]})")
        missing = _unaccounted(child, new)
        if missing:
            return None, f"the fused module does not use {missing} of {type(child).__name__}"
    if verify and rec.probe is not None:
        try:
            args, kwargs = rec.probe(child)
        except Exception as e:  # a probe that cannot be built for this module: no behaviour check possible
            return None, f"no probe input for it ({type(e).__name__}: {e})"
        why = _compare(child, new, args, kwargs)
        if why:
            return None, f"behaves differently on a probe input: the fused module {why}"
    return new, None


def patch_model(model: nn.Module, include: Iterable[str] | None = None, exclude: Iterable[str] | None = None,
                verify: bool = True, example_inputs: tuple | None = None) -> PatchReport:
    """Swap recognised blocks of ``model`` for fused ones in place (module docstring); returns a
    `PatchReport`. The root module itself is never replaced.

    Args:
        model: any nn.Module (e.g. an official tracker network).
        include / exclude: recogniser names or `fnmatch` patterns of qualified module names.
        verify: run each candidate and its replacement on a probe input and keep only agreeing swaps.
        example_inputs: a tuple of ``model``'s forward arguments: candidates are also compared on the
            inputs they receive when the model runs on them (implies ``verify``).
    Returns:
        `PatchReport` with ``swapped`` (path, recogniser, old type, new type) and ``skipped``
        (path, recogniser, reason)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"patch_model: `model` must be an nn.Module, got {type(model).__name__}")
    for arg, val in (("include", include), ("exclude", exclude)):
        if isinstance(val, str):
            raise TypeError(f"patch_model: `{arg}` must be an iterable of strings, not a single string")
    if example_inputs is not None and not isinstance(example_inputs, tuple):
        raise TypeError("patch_model: `example_inputs` must be a tuple of the model's forward arguments")
    include = None if include is None else list(include)
    exclude = [] if exclude is None else list(exclude)
    import fasttrack.nn  # noqa: F401  (the family modules register their recognisers on import)
    report = PatchReport()
    table = recognizers()

    # 1. every module some recogniser matches (at any depth: a refused candidate's children are
    #    candidates too), so that one run on `example_inputs` can record all their inputs
    matches = {}
    for path, m in model.named_modules():
        if path and not _is_fused(m):
            recs = [r for r in table if _safe_match(r, m)]
            if recs:
                matches[id(m)] = recs
    recorded = {}
    if example_inputs is not None:
        recorded = _record_inputs(model, [m for _, m in model.named_modules() if id(m) in matches], example_inputs)

    # 2. top-down: swap a candidate that passes every check, else look inside it
    def visit(parent: nn.Module, prefix: str):
        for name, child in list(parent._modules.items()):
            if child is None or _is_fused(child):
                continue
            path = f"{prefix}.{name}" if prefix else name
            recs = matches.get(id(child))
            if recs is None:
                if _looks_like_block(child):
                    report.skipped.append((path, None, f"{type(child).__name__} looks like a transformer block "
                                                       "but matches no recogniser"))
                visit(child, path)
                continue
            chosen = [r for r in recs if not (_selected(exclude, r.name, path)
                                              or (include is not None and not _selected(include, r.name, path)))]
            if not chosen:
                report.skipped.append((path, None, "excluded by include/exclude"))
                continue
            reasons = []
            for rec in chosen:
                new, why = _build_checked(rec, child, verify or example_inputs is not None)
                if new is not None and id(child) in recorded:
                    why = _compare(child, new, *recorded[id(child)])
                    if why:
                        new, why = None, f"behaves differently on the example inputs: the fused module {why}"
                if new is None:
                    reasons.append(f"{rec.name}: {why}")
                    continue
                new._fasttrack_fused = True
                setattr(parent, name, new)
                report.swapped.append((path, rec.name, type(child).__name__, type(new).__name__))
                break
            else:
                report.skipped.append((path, chosen[0].name if len(chosen) == 1 else None, "; ".join(reasons)))
                visit(child, path)

    visit(model, "")
    return report
