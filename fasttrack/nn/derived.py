"""`Derived`: the one cache type for values derived from weights — a pre-packed GEMM weight
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
value is cached. The whole state is read by one C++ call (`fasttrack._C.sources_key`; without the
extension, from Python and without stamps). The cache is not state: it is not in ``state_dict``,
and pickling or deep-copying a module gives it an empty one (rebuilt on first use).

Cost of a hit (this project's 2-core Zen 4 VM, 2026-12-06, one thread, hot loop): ~6 µs for a ViT-B
weight and ~280 µs for the 78 sources of the fused OSTrack head when the state was read from
Python attribute by attribute (and small tensors stamped element by element); with the one C++
call and a word-wise stamp, 3.7 µs and 47 µs.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from fasttrack import _extension
from fasttrack.backend import capturing_graph

__all__ = ["Derived", "refresh", "TransientState"]


def _python_key(sources: tuple) -> tuple:
    """The sources' state without `_C` (no content stamps: only what PyTorch tracks)."""
    return tuple(None if t is None else (id(t), t.data_ptr(), 0 if t.is_inference() else t._version, t.dtype,
                                         t.device, t.shape, t.stride())
                 for t in sources)


def _sources_key(sources: tuple):
    """The state of ``sources`` that a cached value is valid for: `fasttrack._C.sources_key` (one
    C++ call: identity, data pointer, version, dtype, device, shape, strides and content stamp of
    each), or `_python_key` without the extension."""
    if _extension.loaded:
        return _extension._C.sources_key(sources)
    return _python_key(sources)


class Derived:
    """A value derived from source tensors, rebuilt when any source changes (module docstring)."""

    __slots__ = ("_sources", "_key", "value")

    def __init__(self):
        self.clear()

    def clear(self) -> None:
        self._sources = self._key = self.value = None

    def get(self, sources: tuple, build: Callable):
        """The cached ``build()`` for ``sources`` (a tuple of tensors or None), rebuilt when any of
        them changed. ``build`` runs under ``no_grad``. While a graph is captured (compile, export)
        nothing is cached: the graph computes the value from its sources."""
        if capturing_graph():
            with torch.no_grad():
                return build()
        key = _sources_key(sources)
        if key == self._key:
            return self.value
        with torch.no_grad():
            value = build()
        # the sources are held: a replaced tensor's address cannot be reused while its value is cached
        self._sources, self._key, self.value = tuple(sources), key, value
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
