"""`Derived`: the one cache type for values derived from weights — a pre-packed oneDNN weight
(`FastLinear`, `PrunedLinear`), concatenated or layer-scale-folded weights (`FusedUTPTrackSBlock`),
BatchNorm-folded convolutions (`FusedCenterPredictor`).

The contract: a cached value is rebuilt whenever one of its source tensors changes in a way the
tensor can reveal:
- a new tensor (a Parameter replaced, ``.data = ...``, ``.to()``): its identity and ``data_ptr``;
- an in-place update PyTorch tracks (an optimiser step, ``load_state_dict``, ``copy_`` under
  ``no_grad``): its version counter;
- an in-place update PyTorch does not track — a write through ``.data``, as EMA teachers,
  re-initialisations and some loaders do — on a CPU tensor: its *content stamp*
  (`fasttrack._C.content_stamp`: a hash of every element of a tensor of up to 4096 elements, of 256
  evenly spread elements of a larger one). Every write that changes all elements (an EMA step, a
  re-initialisation, a load through ``.data``) or a contiguous run of more than numel / 255
  elements is seen; a write through ``.data`` to a few scattered elements may not be, and on a GPU
  the stamp is not taken (it would read device memory back on the host): after such a write call
  `refresh(model)`.
Sources are held by the cache, so a source's address cannot be reused by another tensor while its
value is cached. The cache is not state: it is not in ``state_dict``, and pickling or deep-copying
a module gives it an empty one (rebuilt on first use).

Cost (measured on this project's 2-core Zen 4 VM, 2026-12-06, OSTrack-256-CE B=1 fp32): the stamps of
the 126 cached sources (the 48 ViT-B linear weights, the head's convolutions, BatchNorms and biases)
take 0.22 ms of a ~265 ms fused forward on 2 threads.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from fasttrack import _extension
from fasttrack.backend import capturing_graph

__all__ = ["Derived", "refresh", "TransientState"]


def _stamp(t: torch.Tensor):
    """The content stamp of a CPU tensor (None without `_C`, on other devices, or while tracing)."""
    if not t.is_cpu or not _extension.loaded or capturing_graph() or t.is_meta:
        return None
    return _extension._C.content_stamp(t)


def _key(t: torch.Tensor | None):
    if t is None:
        return None
    return (t.data_ptr(), t._version, t.dtype, t.device, t.shape, t.stride())


class Derived:
    """A value derived from source tensors, rebuilt when any source changes (module docstring)."""

    __slots__ = ("_sources", "_keys", "_stamps", "value")

    def __init__(self):
        self.clear()

    def clear(self) -> None:
        self._sources = self._keys = self._stamps = self.value = None

    def get(self, sources: tuple, build: Callable):
        """The cached ``build()`` for ``sources`` (a tuple of tensors or None), rebuilt when any of
        them changed. ``build`` runs under ``no_grad``. While a graph is captured (compile, export)
        nothing is cached: the graph computes the value from its sources."""
        if capturing_graph():
            with torch.no_grad():
                return build()
        keys = tuple(_key(t) for t in sources)
        cached = self._sources
        if (cached is not None and len(cached) == len(sources) and keys == self._keys
                and all(a is b for a, b in zip(cached, sources))
                and all(s is None or s == _stamp(t) for s, t in zip(self._stamps, sources))):
            return self.value
        with torch.no_grad():
            value = build()
        self._sources, self._keys = tuple(sources), keys
        self._stamps = tuple(None if t is None else _stamp(t) for t in sources)
        self.value = value
        return value

    def __reduce__(self):
        # pickling / deep-copying a module gives its copy an empty cache (the value may be an opaque
        # oneDNN tensor, and would be rebuilt from the copy's own weights anyway)
        return (type(self), ())


def refresh(module: nn.Module) -> int:
    """Drop every derived-weight cache in ``module`` (after writing weights through ``.data`` in a
    way the content stamp may miss, or on a GPU); returns how many were cleared."""
    n = 0
    for m in module.modules():
        for value in list(vars(m).values()):
            for cache in (value.values() if isinstance(value, dict) else (value,)):
                if isinstance(cache, Derived):
                    cache.clear()
                    n += 1
    return n


class TransientState:
    """Mixin for modules with per-process state in attributes named by ``_transient`` (a tracker's
    cached template embedding, its CUDA graph): pickles and deep copies leave them out, as
    `Derived` caches pickle empty."""

    _transient: tuple = ()

    def __getstate__(self):
        state = super().__getstate__().copy()
        for k in self._transient:
            state.pop(k, None)
        return state
