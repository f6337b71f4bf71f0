"""`topk_select` / `topk_select_qk`: attention-score top-k token selection (OSTrack candidate
elimination, UTPTrack CE/DTE/STE). Semantics: `fasttrack.reference.topk_select`."""
from __future__ import annotations

from typing import NamedTuple

import torch

from fasttrack import _opchecks as checks
from fasttrack.ops._registry import CheckCase, OpDef, dispatch, register
from fasttrack.reference import keep_count

_OUT = "(Tensor tokens, Tensor keep_index, Tensor removed_index, Tensor keep_global, Tensor removed_global)"
SCHEMA = ("(Tensor attn, Tensor x, Tensor query_index, Tensor? query_weight, Tensor? bonus, "
          "Tensor? global_index, int start, int length, float keep_ratio) -> " + _OUT)
SCHEMA_QK = ("(Tensor q, Tensor k, Tensor x, Tensor query_index, Tensor? query_weight, Tensor? bonus, "
             "Tensor? global_index, int start, int length, float keep_ratio, float scale) -> " + _OUT)


class Selection(NamedTuple):
    tokens: torch.Tensor          # [B, N - L + k, C]
    keep_index: torch.Tensor      # [B, k] candidate positions (0..L-1), descending score
    removed_index: torch.Tensor   # [B, L - k]
    keep_global: torch.Tensor     # keep_index mapped through global_index
    removed_global: torch.Tensor


def _fake_outputs(x, length, keep_ratio):
    B, N, C = x.shape
    k = keep_count(keep_ratio, length)
    idx = dict(dtype=torch.int64, device=x.device)
    return (x.new_empty(B, N - length + k, C), torch.empty(B, k, **idx), torch.empty(B, length - k, **idx),
            torch.empty(B, k, **idx), torch.empty(B, length - k, **idx))


def _fake(attn, x, query_index, query_weight, bonus, global_index, start, length, keep_ratio):
    checks.topk_select(attn, x, query_index, query_weight, bonus, global_index, start, length, keep_ratio)
    return _fake_outputs(x, length, keep_ratio)


def _fake_qk(q, k, x, query_index, query_weight, bonus, global_index, start, length, keep_ratio, scale):
    checks.topk_select_qk(q, k, x, query_index, query_weight, bonus, global_index, start, length, keep_ratio, scale)
    return _fake_outputs(x, length, keep_ratio)


def _save(ctx, start, length, keep):
    ctx.save_for_backward(keep)
    ctx.start, ctx.length = start, length


def _setup_context(ctx, inputs, output):  # inputs: attn, x, query_index, ..., start, length, keep_ratio
    _save(ctx, inputs[6], inputs[7], output[1])


def _setup_context_qk(ctx, inputs, output):  # inputs: q, k, x, query_index, ..., start, length, ...
    _save(ctx, inputs[7], inputs[8], output[1])


def _grad_x(ctx, grad_tokens):
    """Kept candidates' gradients go back to their positions; removed candidates get zeros."""
    from fasttrack.ops.pad_scatter import pad_scatter

    (keep,) = ctx.saved_tensors
    s, L, k = ctx.start, ctx.length, keep.shape[1]
    cand = pad_scatter(grad_tokens[:, s:s + k].contiguous(), keep, L, check_index=False)
    return torch.cat([grad_tokens[:, :s], cand, grad_tokens[:, s + k:]], dim=1)


def _backward(ctx, grad_tokens, *_):
    return None, _grad_x(ctx, grad_tokens), None, None, None, None, None, None, None


def _backward_qk(ctx, grad_tokens, *_):
    return None, None, _grad_x(ctx, grad_tokens), None, None, None, None, None, None, None, None


# --------------------------------------------------------------------------------------------
# Tracker shapes and their inputs (shared by the check cases, tests and benchmarks)
# --------------------------------------------------------------------------------------------
class Shape(NamedTuple):
    N: int                 # tokens
    H: int                 # heads
    C: int                 # channels
    D: int                 # head dim (topk_select_qk)
    start: int             # candidates [start, start + L)
    L: int
    rows: tuple            # query rows: the template centre, ...
    all_rows: tuple        # ... or every template row (OSTrack without box_mask_z)
    keep_ratio: float


SHAPES = {
    # [template 8×8 | search 16×16]; centre of the 8×8 template = 27
    "ostrack256": Shape(320, 12, 768, 64, 64, 256, (27,), tuple(range(64)), 0.7),
    # [template 12×12 | search 24×24]; centre = 65
    "ostrack384": Shape(720, 12, 768, 64, 144, 576, (65,), tuple(range(144)), 0.7),
    # UTPTrack-S CE: [cls | search 14×14 | static z 7×7 | dynamic z 7×7 | text]; rows: static-z centre
    # (197 + 24) and the text row (weight 0/1 per sample)
    "utptrack_s": Shape(296, 8, 512, 64, 1, 196, (221, 295), (221, 295), 0.7),
    # UTPTrack-S STE: the static template, with the centre + foreground bonus
    "utptrack_s_ste": Shape(296, 8, 512, 64, 197, 49, (221, 295), (221, 295), 0.6),
    # odd, non-power-of-two everything; tokens after the candidates too
    "odd": Shape(45, 3, 50, 24, 5, 37, (1, 3, 44), (1, 3, 44), 0.55),
}


def grid_attention(shape, dtype, device="cpu", generator=None, rows=1):
    """Attention-like values on a grid where the op's float32 arithmetic is exact in any order:
    multiples m·2⁻¹⁰ of the odd part m of `rows` (R), below 256·2⁻¹⁰ (so exact in bf16 too). Then
    the per-head row sums are exact, dividing them by R is exact, the sum over heads is exact, and
    only ``/ H`` and ``+ bonus`` round — once, identically in any kernel. A kernel that computes the
    spec therefore reproduces the reference's scores bit for bit, and its selection, ties included."""
    m = rows
    while m % 2 == 0:
        m //= 2
    a = torch.randint(0, max(2, 256 // m), shape, generator=generator, dtype=torch.float32)
    return a.mul_(m * 2.0 ** -10).to(device=device, dtype=dtype)


def make_inputs(name, B, dtype, device="cpu", *, all_rows=False, qk=False, generator=None):
    """Schema arguments of `topk_select` (or `topk_select_qk` with ``qk``) at shape `name`.
    UTPTrack shapes carry the text row's 0/1 `query_weight`; the STE shape the centre + foreground
    `bonus`; every shape a shuffled `global_index`."""
    s = SHAPES[name]
    g = generator
    rows = s.all_rows if all_rows else s.rows
    R = len(rows)
    if qk:
        head = (torch.randn(B, s.H, s.N, s.D, generator=g).to(device, dtype),
                torch.randn(B, s.H, s.N, s.D, generator=g).to(device, dtype))
    else:
        head = (grid_attention((B, s.H, s.N, s.N), dtype, device, g, rows=R),)
    x = torch.randn(B, s.N, s.C, generator=g).to(device, dtype)
    qi = torch.tensor(rows, device=device).expand(B, R).contiguous()
    weight = bonus = None
    if name.startswith("utptrack"):
        weight = torch.ones(B, R)
        weight[:, -1] = torch.arange(B) % 2       # text row counts for samples with task 1
        weight = weight.to(device, dtype)
    if name == "utptrack_s_ste":
        bonus = torch.randint(0, 17, (B, s.L), generator=g, dtype=torch.float32) / 16   # fg fraction
        bonus[:, 24] += 1                                                                 # the centre
        bonus = bonus.to(device, dtype)
    gi = torch.stack([torch.randperm(1000, generator=g)[:s.L] for _ in range(B)]).to(device)
    return (*head, x, qi, weight, bonus, gi, s.start, s.L, s.keep_ratio) + ((s.D ** -0.5,) if qk else ())


def _cases(qk):
    def cases(device, dtype):
        g = torch.Generator().manual_seed(0)
        out = []
        for name, B, all_rows in (("ostrack256", 2, False), ("ostrack256", 2, True), ("ostrack384", 1, False),
                                  ("utptrack_s", 2, False), ("utptrack_s_ste", 2, False), ("odd", 3, False)):
            args = make_inputs(name, B, dtype, device, all_rows=all_rows, qk=qk, generator=g)
            label = f"{name}/R{len(args[3 if qk else 2][0])}"
            out.append(CheckCase(label, args, grad=(2 if qk else 1,)))
        return out
    return cases


TOPK_SELECT = register(OpDef(name="topk_select", schema=SCHEMA, fake=_fake, check=checks.topk_select,
                             setup_context=_setup_context, backward=_backward,
                             cuda="triton:topk_select:topk_select", cases=_cases(False)))
TOPK_SELECT_QK = register(OpDef(name="topk_select_qk", schema=SCHEMA_QK, fake=_fake_qk, check=checks.topk_select_qk,
                                setup_context=_setup_context_qk, backward=_backward_qk,
                                cuda="triton:topk_select:topk_select_qk", cases=_cases(True)))


def topk_select(attn, x, query_index, keep_ratio, *, start, length=None, query_weight=None, bonus=None,
                global_index=None) -> Selection:
    """Keep the top ``ceil(keep_ratio·L)`` of the candidate tokens ``x[:, start:start+L]`` by the
    attention they receive from the ``query_index`` rows of ``attn`` (see
    `fasttrack.reference.topk_select` for the exact semantics). ``length`` defaults to ``N - start``.
    Differentiable w.r.t. ``x``."""
    op = "topk_select"
    start = checks.int_arg(start, op, "start")
    length = x.shape[1] - start if length is None else checks.int_arg(length, op, "length")
    keep_ratio = checks.float_arg(keep_ratio, op, "keep_ratio")
    return Selection(*dispatch("topk_select", attn, x, query_index, query_weight, bonus, global_index,
                               start, length, keep_ratio))


def topk_select_qk(q, k, x, query_index, keep_ratio, *, start, length=None, scale=None, query_weight=None,
                   bonus=None, global_index=None) -> Selection:
    """`topk_select` with the attention rows computed from ``q, k [B, H, N, D]`` inside the kernel
    (``softmax(q[r]·kᵀ·scale)`` over all keys, fp32 logits) — for blocks that run their attention with
    `scaled_dot_product_attention` and never build ``[B, H, N, N]``. ``scale`` defaults to D^-0.5."""
    op = "topk_select_qk"
    start = checks.int_arg(start, op, "start")
    length = x.shape[1] - start if length is None else checks.int_arg(length, op, "length")
    keep_ratio = checks.float_arg(keep_ratio, op, "keep_ratio")
    scale = q.shape[-1] ** -0.5 if scale is None else checks.float_arg(scale, op, "scale")
    return Selection(*dispatch("topk_select_qk", q, k, x, query_index, query_weight, bonus, global_index,
                               start, length, keep_ratio, scale))
