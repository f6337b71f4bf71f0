"""UTPTrack token pruning blocks: UTPTrack-O (OSTrack-based) and UTPTrack-S (SUTrack Fast-iTPN).

UTPTrack prunes three token groups inside a block, all scored by the same attention (computed
before any pruning) from the static-template rows selected by ``ce_template_mask`` (the template
centre):
- CE  (candidate elimination): search tokens ``x``, keep ``keep_ratio_x``;
- DTE (dynamic template elimination): dynamic-template tokens ``dz``;
- STE (static template elimination): static-template tokens ``sz``, with a bonus of +1 on the
  ``ce_template_mask`` positions (the centre is never pruned) plus the token-type-aware foreground
  bonus ``z_indicate_mask`` (bool: +1 on True — UTPTrack's FULL_/ALL_FOREGROUND, which its backbone
  turns into a bool mask before the blocks; float: added as is — SOFT_ALL_FOREGROUND); the template
  masks are then re-ordered with the kept tokens (``mask.gather(keep)``) for later blocks.
UTPTrack-S adds a text-guided row: with ``task_index`` given and some sample having task 1 and the
group's letter (``'C'``, ``'D'``, ``'S'``) in ``multimodal_aware_pruning_target``, the text token's
attention row joins the query rows with weight ``(task_index == 1)`` per sample (the `query_weight`
of `topk_select`; the mean is over all rows, the zero-weighted included, as the official code).

Semantics follow EIT-NLP/UTPTrack ``UTPTrack-S/lib/models/sutrackcmp/ceatettamma_fastitpn.py`` and
``compression/{ce,ate}.py`` (``*_mma`` functions). Choices where the public code is silent or
differs (documented here, repeated in the report):
- UTPTrack-O's code is not public. `UTPTrackOBlock` is OSTrack's CEBlock (same keys) with the
  UTPTrack-S pruning rules on the layout ``[x, sz, dz]`` (no cls / text token, no text row).
- Within one block every group is selected from the same pre-pruning tokens and attention, and the
  kept pieces are assembled in layout order. With CE and DTE/STE in different blocks (the released
  configs: O at 3/6/9 and 4/7/10, S at 6/12/18 and 9/15/21) this equals the official sequence CE,
  DTE, STE; when they share a block the official STE slices the attention with the post-CE length
  (a misalignment) and this implementation scores the intended rows.
- Ties in scores go to the lower index (stable sort); global indices are int64.
Fused blocks run SDPA and score with `topk_select_qk` (``attn`` returned as None unless
``return_attention``); an explicit attention map is built only when asked for or when a mask /
relative position bias must enter the scores.
"""
from fasttrack.nn.utptrack.pruning import UTPTRACK_O_LOCS, UTPTRACK_S_LOCS, prune_groups  # noqa: F401
from fasttrack.nn.utptrack.o import (  # noqa: F401
    FusedUTPTrackO, FusedUTPTrackOBlock, FusedUTPTrackOViT, UTPTrackO, UTPTrackOBlock, UTPTrackOViT, build_utptrack_o,
)
from fasttrack.nn.utptrack.s import FusedUTPTrackSBlock, ITPNAttention, SwiGLU, UTPTrackSBlock  # noqa: F401

__all__ = ["UTPTrackOBlock", "FusedUTPTrackOBlock", "UTPTrackOViT", "FusedUTPTrackOViT", "UTPTrackO",
           "FusedUTPTrackO", "build_utptrack_o", "ITPNAttention", "SwiGLU", "UTPTrackSBlock",
           "FusedUTPTrackSBlock", "prune_groups", "UTPTRACK_O_LOCS", "UTPTRACK_S_LOCS"]
