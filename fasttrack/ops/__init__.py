"""All fasttrack ops: importing this module registers every `torch.ops.fasttrack.*` op."""
from fasttrack.ops._registry import REGISTRY, dispatch  # noqa: F401
from fasttrack.ops.pad_scatter import gather_tokens, pad_scatter  # noqa: F401
from fasttrack.ops.topk_select import Selection, topk_select, topk_select_qk  # noqa: F401
from fasttrack.ops.merge_tokens import Merged, bipartite_merge, cosine_argmax, merge_tokens  # noqa: F401
from fasttrack.ops.pruned_linear import pruned_linear  # noqa: F401
from fasttrack.ops.attention import attention_core  # noqa: F401
from fasttrack.ops.layer_norm import layer_norm  # noqa: F401
