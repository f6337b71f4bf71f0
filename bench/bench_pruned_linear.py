"""`pruned_linear` at ABTrack's pruned ViT-B linears (OSTrack-256: M = B·320 tokens, d = 768,
d* = 540 kept dims, head-aligned), B = 1 and 32, fp32 and bf16.

Providers (one group per shape/dtype):
- ``reference``: eager `fasttrack.reference.pruned_linear` = (LayerNorm →) index_select + F.linear;
- ``compile``: torch.compile of the same;
- ``native``: the op `fasttrack.pruned_linear` (C++: gather pass + oneDNN GEMM, weight reordered per call);
- ``module``: `PrunedLinear` inference (the op's gather pass + its cached pre-packed oneDNN weight);
- ``masked_dense``: ABTrack's statement ``(LN(x)·D) @ Wᵀ + b`` with the dense weight (eager);
- ``compile_freezing``: torch.compile with Inductor ``freezing`` (weights constant-folded and
  pre-packed by Inductor) of a module computing the reference;
- ``onednn_packed``: the anchor: eager gather, then oneDNN with a weight packed once ahead.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fasttrack
from bench.harness import bench_device, bench_op, compile_fn
from fasttrack import reference
from fasttrack.nn.pruned import PrunedLinear

D, KEPT = 768, 540
# (name, d_out, fused LayerNorm)
LAYERS = [("qkv+ln1", 2304, True), ("proj", 768, False), ("fc1+ln2", 3072, True)]
PROVIDERS = ["reference", "compile", "native", "module", "masked_dense", "compile_freezing", "onednn_packed"]


class _RefModule(nn.Module):
    """The reference as a module with parameters, for Inductor's freezing to fold."""

    def __init__(self, m: PrunedLinear, ln):
        super().__init__()
        self.weight, self.bias, self.ln, self.idx = m.weight, m.bias, ln, m.in_index

    def forward(self, x):
        h = self.ln(x) if self.ln is not None else x
        return F.linear(h.index_select(-1, self.idx), self.weight, self.bias)


def _compiled_frozen(module, x):
    torch._dynamo.reset()
    with torch._inductor.config.patch(freezing=True), torch.no_grad():
        fn = compile_fn(module, dynamic=False)
        fn(x)   # compile (and freeze: the weights become constants) outside the timed calls
    return fn


def make_layer(d_out, ln, B, dtype):
    """The benchmarked layer (fixed seed): dense linear, optional LayerNorm, kept dims, its
    `PrunedLinear` and an input ``[B, 320, D]``. bench/paired.py uses the same."""
    g = torch.Generator().manual_seed(0)
    dense = nn.Linear(D, d_out).to(dtype).requires_grad_(False)
    with torch.no_grad():
        dense.weight.copy_(torch.randn(d_out, D, generator=g) * D ** -0.5)
        dense.bias.copy_(torch.randn(d_out, generator=g) * 0.1)
    norm = nn.LayerNorm(D).to(dtype).requires_grad_(False) if ln else None
    idx = torch.randperm(D, generator=g)[:KEPT].sort().values
    m = PrunedLinear.from_dense(dense, idx, norm=norm).requires_grad_(False)
    x = torch.randn(B, 320, D, generator=g).to(dtype)
    return dense, norm, idx, m, x


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("B", [1, 32])
@pytest.mark.parametrize("layer", LAYERS, ids=[n for n, _, _ in LAYERS])
def test_pruned_linear(benchmark, provider, B, layer, dtype):
    if bench_device().type != "cpu" and provider not in ("reference", "compile", "native"):
        pytest.skip("module / oneDNN providers are CPU paths")
    name, d_out, ln = layer
    dense, norm, idx, m, x = make_layer(d_out, ln, B, dtype)
    ln_w, ln_b = (norm.weight, norm.bias) if ln else (None, None)
    args = (x, m.weight, m.bias, idx, ln_w, ln_b, 1e-5, ln)
    mask = torch.zeros(D, dtype=dtype).index_fill_(0, idx, 1)

    def op(*a):
        return fasttrack.pruned_linear(a[0], a[1], a[2], a[3], norm=(a[4], a[5], a[6]) if a[7] else None)

    extra = {
        "module": lambda *a: m(a[0]),
        "masked_dense": lambda *a: reference.masked_dense_linear(norm(a[0]) if ln else a[0], dense.weight,
                                                                 dense.bias, mask),
    }
    if provider == "compile_freezing":
        frozen = _compiled_frozen(_RefModule(m, norm), x)
        extra[provider] = lambda *a: frozen(a[0])
    if provider == "onednn_packed":
        packed = torch.ops.mkldnn._reorder_linear_weight(m.weight)

        def anchor(*a):
            h = norm(a[0]) if ln else a[0]
            return torch.ops.mkldnn._linear_pointwise(h.index_select(-1, idx), packed, m.bias, "none", [], "")
        extra["onednn_packed"] = anchor

    M = B * 320
    tol = 1e-4 if dtype == torch.float32 else 6e-2
    kw = dict(ref=reference.pruned_linear, args=args, group=f"pruned_linear/{name}/B{B}/{str(dtype)[6:]}",
              nbytes=(M * D + d_out * KEPT + M * d_out) * x.element_size(), flops=2 * M * KEPT * d_out,
              atol=tol, rtol=tol)
    if provider in extra:
        bench_op(benchmark, "native", native=extra[provider], **kw)
        benchmark.extra_info["provider"] = provider
    else:
        bench_op(benchmark, provider, native=op, **kw)
