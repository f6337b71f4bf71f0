"""fasttrack: fused kernels for transformer visual object trackers (OSTrack lineage).

Ops (``torch.ops.fasttrack.*``, wrapped here with validation and docs): `topk_select`,
`topk_select_qk`, `gather_tokens`, `pad_scatter`, `merge_tokens`, `cosine_argmax`, `pruned_linear`;
plus `bipartite_merge` (ToMe), built on `cosine_argmax`.
Backend switch: `FASTTRACK_BACKEND` / `use_backend` (see `fasttrack.backend`). Large CPU outputs are
reused from a bounded cache: `empty_cache`, `FASTTRACK_CPU_CACHE_MB`.
"""
from fasttrack import _extension  # noqa: F401  (loads _C, which defines the op schemas)
from fasttrack._extension import cached_bytes, empty_cache  # noqa: F401
from fasttrack.backend import BACKENDS, current_backend, use_backend  # noqa: F401
from fasttrack.ops import (  # noqa: F401
    Merged, Selection, gather_tokens, merge_tokens, pad_scatter, pruned_linear, topk_select, topk_select_qk,
)
from fasttrack.ops import bipartite_merge, cosine_argmax  # noqa: F401

from fasttrack.patch import patch_model  # noqa: F401,E402
from fasttrack.nn.cuda_graph import graphed  # noqa: F401,E402
from fasttrack.backend import sync_checks  # noqa: F401,E402

__version__ = "0.1.0"
