"""The fused-twin recipe of the families whose fused modules mirror their reference's constructor:
build the twin on the meta device and take every tensor of the reference by assignment."""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["twin_from_reference"]


def twin_from_reference(cls, ref_module: nn.Module, base: type, config: dict | None = None, **submodules: nn.Module):
    """``cls(**ref_module.config)`` sharing every Parameter and buffer of ``ref_module`` (no copy).

    The twin is built on the meta device (no init cost) and then takes the reference's tensors by
    ``load_state_dict(assign=True)``; a key-layout mismatch between the twins fails here.
    ``submodules`` (name → module) replace the twin's own before loading, for parts whose structure
    the constructor cannot know (e.g. blocks pruned after construction). ``config`` (constructor
    arguments) is for a ``ref_module`` that is not a ``base`` (an official tracker's module).
    Used by the fused modules of the CompressTracker, ETCTrack and ABTrack families."""
    if config is None:
        if not isinstance(ref_module, base):
            raise TypeError(f"{cls.__name__}.from_reference: `ref_module` must be a {base.__name__}, "
                            f"got {type(ref_module).__name__}")
        config = ref_module.config
    with torch.device("meta"):
        m = cls(**config)
    for name, sub in submodules.items():
        setattr(m, name, sub)
    # the replaced submodules bring their own (shared) tensors and may have another key layout
    skip = tuple(f"{name}." for name in submodules)
    state = {k: v for k, v in ref_module.state_dict(keep_vars=True).items() if not k.startswith(skip)}
    res = m.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in res.missing_keys if not k.startswith(skip)]
    if missing or res.unexpected_keys:
        raise TypeError(f"{cls.__name__}.from_reference: key layouts differ: missing {missing}, "
                        f"unexpected {res.unexpected_keys}")
    left = [n for n, t in [*m.named_parameters(), *m.named_buffers()] if t.is_meta]
    if left:  # a non-persistent buffer is not in the state dict: the twin would have no data for it
        raise TypeError(f"{cls.__name__}.from_reference: no reference tensor for {left}")
    return m.train(ref_module.training)
