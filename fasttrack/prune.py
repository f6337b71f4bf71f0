"""From a trained ViT with ABTrack's learned dimension masks to a pruned one.

ABTrack learns, per block, scores for two diagonal masks over the embedding dim d: D1 (attention)
and D2 (MLP). Pruning keeps, per block (local ranking: blocks are never compared),
``d* = floor(d·σ / N_h)·N_h`` dims of each mask — a multiple of the head count — ranked by score
(descending; ties to the lower dim). ``per_head=True`` instead keeps the top ``d*/N_h`` dims inside
each of the N_h head-sized groups, so every head of ``attn.proj``'s input keeps the same count.
Which linears each mask prunes is stated in `fasttrack.nn.pruned`.

Typical use::

    idx = {name: (select_kept(d1[name], 0.7, 12), select_kept(d2[name], 0.7, 12)) for name in blocks}
    prune_model(model, idx)                  # dense blocks -> PrunedBlock, in place
    save_pruned(model, "pruned.pt")          # weights [d_out, d*] + in_index buffers
    load_pruned(other_model, "pruned.pt")    # other_model: the dense architecture
"""
from __future__ import annotations

import math

import torch
from torch import nn

from fasttrack.nn.pruned import MaskedBlock, PrunedBlock

__all__ = ["kept_count", "select_kept", "index_to_mask", "prune_block", "masked_block", "prune_model",
           "save_pruned", "load_pruned"]


def kept_count(d: int, sigma: float, num_heads: int) -> int:
    """ABTrack's head-aligned kept count ``floor(d·σ / N_h)·N_h`` (at least ``N_h``)."""
    if not 0.0 < sigma <= 1.0:
        raise ValueError(f"kept_count: `sigma` must be in (0, 1], got {sigma!r}")
    if num_heads <= 0 or d % num_heads:
        raise ValueError(f"kept_count: `d` ({d}) must be a positive multiple of `num_heads` ({num_heads})")
    # the small slack keeps e.g. 768·0.75/12 = 48 exact despite binary rounding of σ
    return max(1, math.floor(d * sigma / num_heads + 1e-9)) * num_heads


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    return torch.sort(scores.float(), descending=True, stable=True).indices[:k]


def select_kept(scores: torch.Tensor, sigma: float, num_heads: int, per_head: bool = False) -> torch.Tensor:
    """Kept dims (int64, ascending) of one block's mask from its learned scores ``[d]``."""
    if not isinstance(scores, torch.Tensor) or scores.dim() != 1:
        raise ValueError("select_kept: `scores` must be a 1-D tensor [d]")
    d = scores.numel()
    k = kept_count(d, sigma, num_heads)
    if not per_head:
        return _top(scores, k).sort().values
    hd, per = d // num_heads, k // num_heads
    parts = [_top(scores[h * hd:(h + 1) * hd], per) + h * hd for h in range(num_heads)]
    return torch.cat(parts).sort().values


def index_to_mask(index: torch.Tensor, d: int, dtype=torch.float32) -> torch.Tensor:
    """The 0/1 diagonal of D for kept dims ``index``."""
    return torch.zeros(d, dtype=dtype, device=index.device).index_fill_(0, index, 1)


def prune_block(block: nn.Module, attn_index: torch.Tensor, mlp_index: torch.Tensor) -> PrunedBlock:
    """A dense block (timm / OSTrack layout) -> `PrunedBlock` keeping ``attn_index`` (D1) and
    ``mlp_index`` (D2)."""
    return PrunedBlock.from_dense(block, attn_index, mlp_index)


def masked_block(block: nn.Module, attn_index: torch.Tensor, mlp_index: torch.Tensor) -> MaskedBlock:
    """The masked dense reference of `prune_block` (shares ``block``'s modules)."""
    d = block.norm1.normalized_shape[0]
    dt = block.attn.qkv.weight.dtype
    return MaskedBlock.from_block(block, index_to_mask(attn_index, d, dt), index_to_mask(mlp_index, d, dt))


def prune_model(model: nn.Module, kept: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> nn.Module:
    """Replace, in place, each block named in ``kept`` (``model.get_submodule`` names, e.g.
    ``"backbone.blocks.3"``) by its `PrunedBlock`. Returns ``model``."""
    for name, (i1, i2) in kept.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, prune_block(parent.get_submodule(child), i1, i2))
    return model


def _block_names(state_dict) -> list[str]:
    suffix = ".attn.qkv.in_index"
    return sorted(k[: -len(suffix)] for k in state_dict if k.endswith(suffix))


def save_pruned(model: nn.Module, path) -> None:
    """`torch.save` of the state dict: pruned weights ``[d_out, d*]`` and the ``in_index`` buffers."""
    torch.save(model.state_dict(), path)


def load_pruned(model: nn.Module, path_or_state, strict: bool = True) -> nn.Module:
    """Load a pruned checkpoint into ``model``: blocks that the checkpoint stores pruned (those with
    an ``attn.qkv.in_index``) are first converted to `PrunedBlock` (with any kept count; the
    checkpoint's indices and weights replace the placeholders). Returns ``model``."""
    sd = path_or_state if isinstance(path_or_state, dict) else torch.load(path_or_state, map_location="cpu")
    placeholder = {}
    for name in _block_names(sd):
        block = model.get_submodule(name)
        if not isinstance(block, PrunedBlock):
            d = block.norm1.normalized_shape[0]
            i = torch.arange(d)
            placeholder[name] = (i, i)
    prune_model(model, placeholder)
    model.load_state_dict(sd, strict=strict)
    return model
