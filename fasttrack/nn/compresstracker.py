"""CompressTracker: an N-block student ViT distilled from a 12-block OSTrack teacher by stage
replacement (Hong et al., "General Compression Framework for Efficient Transformer Object
Tracking"; official code: github.com/LingyiHongfd/CompressTracker, restated here).

The teacher's 12 blocks are cut into N stages of ``ratio = 12 // N`` blocks; student block j
replaces stage j and is initialised from teacher block ``(j + 1)·ratio − 1`` (the stage's last).

State-dict layout (`CompressTrackerBackbone`, the official ``vit_compress*.py::VisionTransformer``
after ``finetune_track``; C = 768, patch 16)::

    patch_embed.proj.weight [C, 3, 16, 16]     patch_embed.proj.bias [C]
    cls_token [1, 1, C]                        kept from pre-training, not in the token sequence
    pos_embed [1, 1 + (224/16)², C]            pre-training table, kept, unused after finetune_track
    pos_embed_z [1, Lz, C]  pos_embed_x [1, Lx, C]    (Lz = 64 at 128 px, Lx = 256 at 256 px)
    blocks.{i}.*           i < 12, training layout only: the frozen teacher blocks
    distill_blocks.{j}.*   j < N: the student blocks
    norm.weight / norm.bias                    LayerNorm(eps=1e-6)

Block keys: ``norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2`` (weight and bias each).
``layout="student"`` (the released inference checkpoints, ``vit_compress_test.py``: no ``blocks``),
``"train"`` (``vit_compress.py``: ``blocks`` + ``distill_blocks``) or ``"teacher"`` (the frozen
``ori_backbone``: ``blocks`` only). A released checkpoint's ``net`` dict is ``backbone.*`` in the
student layout plus ``box_head.*`` (OSTrack's CENTER head); `backbone_state` takes out the
backbone part. The token sequence is ``[z, x]`` (``cat_mode="direct"``, no cls token).

Replacement training (`ReplacementTraining`, the official ``forward_features(is_training="train")``
with ``SUP_REPLACE``): with replacement probability p,
- p < 0.5: exactly one stage, chosen uniformly, runs its student block;
- otherwise each stage runs its student block independently with probability p, and if no stage
  was replaced, one stage chosen uniformly is.
(The official code compares the *set probability* with 0.5, not a fresh uniform draw.) p follows
`replacement_probability` (0.5 for the first 10 % of epochs, linear to 1.0, 1.0 for the last
10 %). Every stage's output (after its student block, or after the stage's last teacher block)
is returned for feature mimicking, with the teacher's outputs after blocks ``(j + 1)·ratio − 1``.
"""
from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from fasttrack._validate import module_error
from fasttrack.nn.init import trunc_normal_
from fasttrack.nn.head import CenterPredictor, FusedCenterPredictor
from fasttrack.nn.onestream import FusedOneStreamTracker, OneStreamTracker
from fasttrack.nn.twin import twin_from_reference
from fasttrack.nn.vit import (Block, FusedBlock, FusedPatchEmbed, PatchEmbed, call_block, fused_final_norm,
                              init_vit_weights, native_plan, patch_tokens)
from fasttrack.nn._recognizers import probe_like, register_recognizer

__all__ = ["STAGE_COUNTS", "stage_ratio", "student_init_blocks", "sample_replacement", "replacement_probability",
           "CompressTrackerBackbone", "FusedCompressTrackerBackbone", "ReplacementTraining",
           "backbone_state", "student_state_from_teacher", "feature_mimic_loss",
           "CompressTracker", "FusedCompressTracker", "build_compresstracker", "expected_net_keys", "official_config"]

STAGE_COUNTS = (2, 3, 4, 6)
LAYOUTS = ("student", "train", "teacher")


_err = module_error(__name__)


def stage_ratio(num_stages: int, depth: int = 12) -> int:
    """Teacher blocks per stage, ``depth // num_stages`` (the official ``distill_ratio``)."""
    if not isinstance(num_stages, int) or num_stages < 1 or depth % num_stages:
        raise _err("stage_ratio", f"`num_stages` must be a positive divisor of depth={depth}, got {num_stages!r}")
    return depth // num_stages


def student_init_blocks(num_stages: int, depth: int = 12) -> list[int]:
    """Teacher block that initialises each student block: ``(j + 1)·ratio − 1``."""
    r = stage_ratio(num_stages, depth)
    return [(j + 1) * r - 1 for j in range(num_stages)]


def _check_p(p, who: str) -> float:
    if not isinstance(p, (int, float)) or not 0.0 < float(p) <= 1.0:
        raise _err(who, f"replacement probability `p` must be in (0, 1], got {p!r}")
    return float(p)


def sample_replacement(num_stages: int, p: float, generator: torch.Generator | None = None) -> list[bool]:
    """Which stages run their student block in one training step (official rule, module doc)."""
    p = _check_p(p, "sample_replacement")
    if not isinstance(num_stages, int) or num_stages < 1:
        raise _err("sample_replacement", f"`num_stages` must be a positive int, got {num_stages!r}")
    if p >= 0.5:
        replaced = (torch.rand(num_stages, generator=generator) < p).tolist()
        if any(replaced):
            return replaced
    one = int(torch.randint(num_stages, (1,), generator=generator))
    return [j == one for j in range(num_stages)]


def replacement_probability(epoch: int, max_epoch: int) -> float:
    """The progressive schedule (official ``CompressTrackerActor.set_bernoulli``; epochs count from
    1 as the official trainer): 0.5 while ``epoch − 1 <= max_epoch // 10``, then linear, 1.0 once
    ``epoch − 1 >= max_epoch − max_epoch // 10``."""
    if not isinstance(max_epoch, int) or max_epoch < 1:
        raise _err("replacement_probability", f"`max_epoch` must be a positive int, got {max_epoch!r}")
    if not isinstance(epoch, int) or not 1 <= epoch <= max_epoch:
        raise _err("replacement_probability", f"`epoch` must be an int in [1, max_epoch={max_epoch}], got {epoch!r}")
    warm = end = max_epoch // 10
    if warm < epoch - 1 < max_epoch - end:
        return 0.5 + 0.5 * (epoch - warm) / (max_epoch - warm - end)
    if epoch - 1 >= max_epoch - end:
        return 1.0
    return 0.5


class CompressTrackerBackbone(nn.Module):
    """The reference backbone (official semantics, plain PyTorch blocks); layouts in the module doc.

    ``forward(z, x)`` runs the student: images ``[B, 3, Tz, Tz]``, ``[B, 3, Ts, Ts]`` →
    ``(norm([z, x]) [B, Lz + Lx, C], {"attn": None})`` (the official backbone's return).
    `forward_plan` runs any mix of student and teacher stages and returns the tokens.
    """

    block_cls = Block
    patch_embed_cls = PatchEmbed

    def __init__(self, num_stages: int = 4, layout: str = "student", depth: int = 12, embed_dim: int = 768,
                 num_heads: int = 12, mlp_ratio: float = 4.0, qkv_bias: bool = True, patch_size: int = 16,
                 template_size: int = 128, search_size: int = 256, pretrain_size: int = 224,
                 drop_path_rate: float = 0.0):
        super().__init__()
        who = type(self).__name__
        if layout not in LAYOUTS:
            raise _err(who, f"`layout` must be one of {LAYOUTS}, got {layout!r}")
        ratio = stage_ratio(num_stages, depth)
        for name, size in (("template_size", template_size), ("search_size", search_size),
                           ("pretrain_size", pretrain_size)):
            if size % patch_size:
                raise _err(who, f"`{name}` ({size}) must be a multiple of patch_size={patch_size}")
        self.config = dict(num_stages=num_stages, layout=layout, depth=depth, embed_dim=embed_dim,
                           num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, patch_size=patch_size,
                           template_size=template_size, search_size=search_size, pretrain_size=pretrain_size,
                           drop_path_rate=drop_path_rate)
        self.num_stages, self.depth, self.ratio, self.layout = num_stages, depth, ratio, layout
        self.feat_sz_z, self.feat_sz_x = template_size // patch_size, search_size // patch_size
        self.lens_z, self.lens_x = self.feat_sz_z ** 2, self.feat_sz_x ** 2
        C = embed_dim
        self.patch_embed = self.patch_embed_cls(pretrain_size, patch_size, 3, C)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, C))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + (pretrain_size // patch_size) ** 2, C))
        self.pos_embed_z = nn.Parameter(torch.zeros(1, self.lens_z, C))
        self.pos_embed_x = nn.Parameter(torch.zeros(1, self.lens_x, C))
        dpr = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
        block = partial(self.block_cls, dim=C, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                        norm_layer=partial(nn.LayerNorm, eps=1e-6))
        if layout in ("train", "teacher"):
            self.blocks = nn.Sequential(*[block(drop_path=dpr[i]) for i in range(depth)])
        if layout in ("train", "student"):
            # the official student j takes the drop-path rate of teacher block j·ratio
            self.distill_blocks = nn.Sequential(*[block(drop_path=dpr[j * ratio]) for j in range(num_stages)])
        self.norm = nn.LayerNorm(C, eps=1e-6)
        for p in (self.pos_embed, self.pos_embed_z, self.pos_embed_x, self.cls_token):
            trunc_normal_(p, std=0.02)
        self.apply(init_vit_weights)

    def embed(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``[patch_embed(z) + pos_embed_z, patch_embed(x) + pos_embed_x]``."""
        who = type(self).__name__
        for name, t, size in (("z", z, self.config["template_size"]), ("x", x, self.config["search_size"])):
            if not isinstance(t, torch.Tensor) or t.dim() != 4 or tuple(t.shape[1:]) != (3, size, size):
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise _err(who, f"`{name}` must be images [B, 3, {size}, {size}] (the size its position "
                                f"embedding was built for), got {got}")
        if z.shape[0] != x.shape[0]:
            raise _err(who, f"`z` and `x` batch sizes differ ({z.shape[0]} vs {x.shape[0]})")
        return torch.cat([patch_tokens(self.patch_embed, z, self.pos_embed_z),
                          patch_tokens(self.patch_embed, x, self.pos_embed_x)], dim=1)

    def stage_plan(self, replaced: list[bool] | None = None) -> list[tuple[nn.Module, bool]]:
        """``(block, ends_a_stage)`` in run order; ``replaced[j]`` picks student block j for stage j
        (None: the student everywhere)."""
        who = type(self).__name__
        if replaced is None:
            replaced = [True] * self.num_stages
        if len(replaced) != self.num_stages:
            raise _err(who, f"`replaced` must have one entry per stage ({self.num_stages}), got {len(replaced)}")
        if any(replaced) and not hasattr(self, "distill_blocks"):
            raise _err(who, f"layout {self.layout!r} has no student blocks (distill_blocks)")
        if not all(replaced) and not hasattr(self, "blocks"):
            raise _err(who, f"layout {self.layout!r} has no teacher blocks (blocks) for the kept stages")
        plan = []
        for j, rep in enumerate(replaced):
            if rep:
                plan.append((self.distill_blocks[j], True))
            else:
                plan.extend((self.blocks[j * self.ratio + o], o == self.ratio - 1) for o in range(self.ratio))
        return plan

    def final_norm(self, x):
        """``norm(x)`` after the last block."""
        return self.norm(x)

    def forward_plan(self, z, x, replaced: list[bool] | None = None, return_stages: bool = False):
        """``norm(tokens)`` after the stages in ``replaced`` (see `stage_plan`); with
        ``return_stages`` also the list of the N stage outputs (pre-norm, ``[B, Lz + Lx, C]``)."""
        t = self.embed(z, x)
        stages = []
        plan = self.stage_plan(replaced)
        for (blk, ends), planned in zip(plan, native_plan([b for b, _ in plan], t)):
            t = call_block(blk, planned, t)
            if ends and return_stages:
                stages.append(t)
        out = self.final_norm(t)
        return (out, stages) if return_stages else out

    def forward(self, z, x, ce_template_mask=None, ce_keep_rate=None, return_last_attn=False, is_training=False):
        """The student, with the official backbone signature: ``(features, {"attn": None})``.
        CompressTracker has no candidate elimination: CE arguments must be None. ``is_training``
        (official: False / "val" / "test" run the student) may not be "train": replacement training
        is `ReplacementTraining`."""
        who = type(self).__name__
        if ce_template_mask is not None or ce_keep_rate is not None:
            raise _err(who, "CompressTracker has no candidate elimination: `ce_template_mask` and `ce_keep_rate` "
                            "must be None")
        if is_training not in (False, None, "val", "test"):
            raise _err(who, f"`is_training`={is_training!r}: the student forward serves False/'val'/'test'; "
                            "use ReplacementTraining for replacement training")
        return self.forward_plan(z, x), {"attn": None}

    @torch.no_grad()
    def forward_teacher(self, z, x, return_stages: bool = True):
        """The teacher (``blocks``): ``norm(tokens)`` and the outputs of blocks ``(j + 1)·ratio − 1``."""
        return self.forward_plan(z, x, [False] * self.num_stages, return_stages)

    def set_bernoulli(self, sample_prob: float) -> None:
        """The official backbone's replacement-probability setter (the official tracker calls it with
        1.0 after loading); the inference forward does not use it, `ReplacementTraining` does."""
        self.bernoulli_prob = _check_p(sample_prob, "set_bernoulli")

    @torch.no_grad()
    def init_students_from_teacher(self) -> None:
        """Copy teacher block ``(j + 1)·ratio − 1`` into student block j (training layout)."""
        if self.layout != "train":
            raise _err(type(self).__name__, f"init_students_from_teacher needs layout='train', got {self.layout!r}")
        for j, i in enumerate(student_init_blocks(self.num_stages, self.depth)):
            self.distill_blocks[j].load_state_dict(self.blocks[i].state_dict())

    @classmethod
    def expected_keys(cls, num_stages: int = 4, layout: str = "student", depth: int = 12) -> list[str]:
        """The state-dict keys of the official layout (for strict-loading checks)."""
        if layout not in LAYOUTS:
            raise _err("expected_keys", f"`layout` must be one of {LAYOUTS}, got {layout!r}")
        stage_ratio(num_stages, depth)
        leaves = [f"{m}.{p}" for m in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
                  for p in ("weight", "bias")]
        keys = ["cls_token", "pos_embed", "pos_embed_z", "pos_embed_x", "patch_embed.proj.weight",
                "patch_embed.proj.bias"]
        if layout in ("train", "teacher"):
            keys += [f"blocks.{i}.{k}" for i in range(depth) for k in leaves]
        if layout in ("train", "student"):
            keys += [f"distill_blocks.{j}.{k}" for j in range(num_stages) for k in leaves]
        return keys + ["norm.weight", "norm.bias"]


class FusedCompressTrackerBackbone(CompressTrackerBackbone):
    """`CompressTrackerBackbone` with `FusedBlock` blocks (FastLinear GEMMs, SDPA). Same
    constructor, keys and forward."""

    block_cls = FusedBlock
    patch_embed_cls = FusedPatchEmbed
    final_norm = fused_final_norm

    @classmethod
    def from_reference(cls, ref_module: nn.Module) -> "FusedCompressTrackerBackbone":
        """A fused backbone sharing ``ref_module``'s Parameters (no copy). ``ref_module`` is a
        `CompressTrackerBackbone` or the official ``VisionTransformer`` of ``vit_compress*.py``
        (read by structure; the ``direct`` layout without cls / segment tokens only)."""
        if isinstance(ref_module, CompressTrackerBackbone):
            return twin_from_reference(cls, ref_module, CompressTrackerBackbone)
        return twin_from_reference(cls, ref_module, CompressTrackerBackbone, config=official_config(ref_module))


def official_config(m: nn.Module) -> dict:
    """`CompressTrackerBackbone` arguments equivalent to an official CompressTracker backbone
    (TypeError naming what does not fit)."""
    who = "FusedCompressTrackerBackbone.from_reference"
    need = ("patch_embed", "cls_token", "pos_embed", "pos_embed_z", "pos_embed_x", "distill_blocks", "norm")
    missing = [n for n in need if not hasattr(m, n)]
    if missing:
        raise TypeError(f"{who}: `ref_module` ({type(m).__name__}) lacks {missing}")
    if getattr(m, "cat_mode", "direct") != "direct" or getattr(m, "add_cls_token", False) \
            or getattr(m, "add_sep_seg", False):
        raise TypeError(f"{who}: only cat_mode='direct' without cls / segment tokens is supported")
    if not isinstance(m.norm, nn.LayerNorm) or m.norm.eps != 1e-6:
        raise TypeError(f"{who}: `norm` must be LayerNorm(eps=1e-6)")
    students = list(m.distill_blocks)
    teachers = list(getattr(m, "blocks", None) or [])
    depth = int(getattr(m, "depth", len(teachers) or 12))
    blk = students[0]
    proj = m.patch_embed.proj
    patch = int(proj.kernel_size[0])
    side = [math.isqrt(n) for n in (m.pos_embed_z.shape[1], m.pos_embed_x.shape[1], m.pos_embed.shape[1] - 1)]
    last = teachers[-1] if teachers else students[-1]
    drop = getattr(getattr(last, "drop_path", None), "drop_prob", 0.0)
    ratio = stage_ratio(len(students), depth)
    rate = drop if teachers else (drop * (depth - 1) / max(1, (len(students) - 1) * ratio))
    return dict(num_stages=len(students), layout="train" if teachers else "student", depth=depth,
                embed_dim=m.pos_embed_x.shape[-1], num_heads=int(blk.attn.num_heads),
                mlp_ratio=blk.mlp.fc1.out_features / blk.mlp.fc1.in_features,
                qkv_bias=blk.attn.qkv.bias is not None, patch_size=patch, template_size=side[0] * patch,
                search_size=side[1] * patch, pretrain_size=side[2] * patch, drop_path_rate=float(rate))


def backbone_state(net_state: dict, prefix: str = "backbone.") -> dict:
    """The backbone part of a released checkpoint's ``net`` dict (``module.`` prefixes dropped)."""
    out = {}
    for k, v in net_state.items():
        k = k[7:] if k.startswith("module.") else k
        if k.startswith(prefix):
            out[k[len(prefix):]] = v
    if not out:
        raise _err("backbone_state", f"`net_state` has no keys starting with {prefix!r}")
    return out


def student_state_from_teacher(teacher_state: dict, num_stages: int, depth: int = 12) -> dict:
    """Training-layout backbone state from an OSTrack backbone state (``blocks.{i}.*``, embeddings,
    ``norm``): the teacher keys as they are, plus ``distill_blocks.{j}.*`` copied from block
    ``(j + 1)·ratio − 1`` (the official ``build_compresstracker`` initialisation)."""
    out = dict(teacher_state)
    for j, i in enumerate(student_init_blocks(num_stages, depth)):
        src = f"blocks.{i}."
        found = [k for k in teacher_state if k.startswith(src)]
        if not found:
            raise _err("student_state_from_teacher", f"`teacher_state` has no keys for teacher block {i} ({src}*)")
        for k in found:
            out[f"distill_blocks.{j}." + k[len(src):]] = teacher_state[k].clone()
    return out


def feature_mimic_loss(student_stages: list[torch.Tensor], teacher_stages: list[torch.Tensor],
                       lens_x: int) -> torch.Tensor:
    """The official feature loss before its weight: per stage, the mean of the search-token MSE and
    the template-token MSE; averaged over stages. Teacher features are detached."""
    if len(student_stages) != len(teacher_stages) or not student_stages:
        raise _err("feature_mimic_loss", f"need one teacher feature per student stage, got "
                                         f"{len(student_stages)} and {len(teacher_stages)}")
    total = 0.0
    for s, t in zip(student_stages, teacher_stages):
        t = t.detach()
        total = total + (F.mse_loss(s[:, -lens_x:], t[:, -lens_x:]) + F.mse_loss(s[:, :-lens_x], t[:, :-lens_x])) / 2
    return total / len(student_stages)


class ReplacementTraining(nn.Module):
    """Replacement training around a training-layout backbone and a frozen teacher backbone.

    ``backbone``: `CompressTrackerBackbone` (or fused) with ``layout="train"``; its ``blocks`` are the
    frozen teacher copy the kept stages run (the official optimiser freezes ``backbone.blocks``).
    ``teacher``: the frozen ``ori_backbone`` (``layout="teacher"`` or ``"train"``) that gives the
    mimicking targets; None uses ``backbone``'s own embeddings and ``blocks``.

    In training mode ``forward(z, x)`` samples the replaced stages (`sample_replacement` at
    ``self.p``) and returns a dict: ``features`` (normed ``[B, Lz + Lx, C]``), ``stage_features``
    (N student-side stage outputs), ``teacher_stage_features`` (N, no grad) and ``replaced``.
    In eval mode it returns the student's ``features`` only (as the official ``"val"``/``"test"``).
    A box head and the losses stay with the caller (`feature_mimic_loss` restates the feature term).
    """

    def __init__(self, backbone: CompressTrackerBackbone, teacher: CompressTrackerBackbone | None = None,
                 p: float = 0.5, generator: torch.Generator | None = None):
        super().__init__()
        if not isinstance(backbone, CompressTrackerBackbone) or backbone.layout != "train":
            raise _err("ReplacementTraining", "`backbone` must be a CompressTrackerBackbone with layout='train'")
        if teacher is not None and (not isinstance(teacher, CompressTrackerBackbone) or teacher.layout == "student"
                                    or teacher.num_stages != backbone.num_stages):
            raise _err("ReplacementTraining", "`teacher` must be a CompressTrackerBackbone with teacher blocks and "
                                              "the backbone's num_stages")
        self.backbone = backbone
        self.teacher = teacher
        self.generator = generator
        self.p = _check_p(p, "ReplacementTraining")
        for prm in backbone.blocks.parameters():
            prm.requires_grad_(False)
        if teacher is not None:
            teacher.requires_grad_(False)

    def set_probability(self, p: float) -> None:
        self.p = _check_p(p, "set_probability")

    def set_epoch(self, epoch: int, max_epoch: int) -> float:
        """Set p from the progressive schedule; returns it."""
        self.p = replacement_probability(epoch, max_epoch)
        return self.p

    def forward(self, z, x, replaced: list[bool] | None = None):
        if not self.training:
            return {"features": self.backbone.forward_plan(z, x)}
        if replaced is None:
            replaced = sample_replacement(self.backbone.num_stages, self.p, self.generator)
        feats, stages = self.backbone.forward_plan(z, x, replaced, return_stages=True)
        teacher = self.teacher if self.teacher is not None else self.backbone
        _, t_stages = teacher.forward_teacher(z, x)
        return {"features": feats, "stage_features": stages, "teacher_stage_features": t_stages,
                "replaced": list(replaced)}


# --------------------------------------------------------------------------------------------
# Full network (the released inference model: student backbone + CENTER head)
# --------------------------------------------------------------------------------------------
class CompressTracker(OneStreamTracker):
    """The official ``CompressTrackerTest`` network: ``backbone`` (student layout) + CENTER
    ``box_head``; keys ``backbone.*`` / ``box_head.*`` as a released checkpoint's ``net`` dict, and
    OSTrack's forward (``pred_boxes``, ``score_map``, ``size_map``, ``offset_map``, ...)."""

    def __init__(self, backbone: CompressTrackerBackbone, box_head: CenterPredictor):
        if not isinstance(backbone, CompressTrackerBackbone) or not hasattr(backbone, "distill_blocks"):
            raise _err("CompressTracker", "`backbone` must be a CompressTrackerBackbone with student blocks")
        super().__init__(backbone, box_head)


class FusedCompressTracker(FusedOneStreamTracker, CompressTracker):
    """`CompressTracker` with the fused backbone and head (OSTrack's fused head path)."""

    def __init__(self, backbone: FusedCompressTrackerBackbone, box_head: FusedCenterPredictor):
        if not isinstance(backbone, FusedCompressTrackerBackbone):
            raise _err("FusedCompressTracker", "`backbone` must be a FusedCompressTrackerBackbone")
        super().__init__(backbone, box_head)

    @classmethod
    def from_reference(cls, ref: CompressTracker) -> "FusedCompressTracker":
        if not isinstance(ref, CompressTracker):
            raise TypeError(f"{cls.__name__}.from_reference: `ref` must be a CompressTracker, got {type(ref).__name__}")
        return cls(FusedCompressTrackerBackbone.from_reference(ref.backbone),
                   FusedCenterPredictor.from_reference(ref.box_head))


def build_compresstracker(num_stages: int = 4, fused: bool = False, head_channels: int = 256,
                          **backbone_kw) -> CompressTracker:
    """The released CompressTracker-N network (ViT-B/16, 128 px template, 256 px search)."""
    if num_stages not in STAGE_COUNTS:
        raise _err("build_compresstracker", f"`num_stages` must be one of {STAGE_COUNTS}, got {num_stages!r}")
    bb = CompressTrackerBackbone(num_stages, layout="student", **backbone_kw)
    ref = CompressTracker(bb, CenterPredictor(inplanes=bb.config["embed_dim"], channel=head_channels,
                                              feat_sz=bb.feat_sz_x, stride=bb.config["patch_size"]))
    return FusedCompressTracker.from_reference(ref) if fused else ref


def expected_net_keys(num_stages: int = 4) -> list[str]:
    """The keys of a released checkpoint's ``net`` dict: the student backbone and OSTrack's CENTER
    head (``conv{1..4}_{ctr,offset,size}`` = Conv2d ``.0`` + BatchNorm2d ``.1``, ``conv5_*`` Conv2d)."""
    head = []
    for b in ("ctr", "offset", "size"):
        for s in range(1, 5):
            head += [f"conv{s}_{b}.0.weight", f"conv{s}_{b}.0.bias"]
            head += [f"conv{s}_{b}.1.{k}" for k in ("weight", "bias", "running_mean", "running_var",
                                                      "num_batches_tracked")]
        head += [f"conv5_{b}.weight", f"conv5_{b}.bias"]
    return (["backbone." + k for k in CompressTrackerBackbone.expected_keys(num_stages, "student")]
            + ["box_head." + k for k in head])


def _looks_like_backbone(m: nn.Module) -> bool:
    return (isinstance(getattr(m, "distill_blocks", None), (nn.Sequential, nn.ModuleList))
            and all(isinstance(getattr(m, n, None), nn.Parameter) for n in ("pos_embed_z", "pos_embed_x", "cls_token"))
            and isinstance(getattr(getattr(m, "patch_embed", None), "proj", None), nn.Conv2d))


# patch_model: an official (or reference) CompressTracker backbone becomes the fused backbone as a
# whole; the official forward asks every block for its attention map, so swapping the blocks alone
# would keep the explicit attention
def _probe_images(m):
    """A template and a search image of the sizes the backbone's position embeddings were made for."""
    patch = m.patch_embed.proj.kernel_size[0]
    side = lambda pe: int(round(pe.shape[1] ** 0.5)) * patch  # noqa: E731
    return (probe_like(m, 1, 3, side(m.pos_embed_z), side(m.pos_embed_z)),
            probe_like(m, 1, 3, side(m.pos_embed_x), side(m.pos_embed_x))), {}


register_recognizer("compresstracker.backbone", _looks_like_backbone, FusedCompressTrackerBackbone.from_reference,
                    probe=_probe_images)
