"""`python -m bench profile [--family NAME] [--batch B] [--dtype float32|bfloat16] [--threads N]`

Per-segment time breakdown of one tracker forward, reference modules vs fused modules. Segments are
assigned by the kind of each leaf operator in the torch profiler (self CPU time):
linear (GEMMs, incl. pruned_linear, and the oneDNN convolutions of the patch embedding and the
head), attention (SDPA, the explicit softmax(QKᵀ)V, fasttrack's
attention kernel, also inside the native ViT block), selection
(top-k selection, sorts), merge (token merging), scatter (gather / pad-scatter), other.
"""
from __future__ import annotations

import argparse

import torch

from fasttrack.info import cpu_line

SEGMENTS = ("linear", "attention", "selection", "merge", "scatter", "other")
_KIND = {
    "linear": ("aten::addmm", "aten::mm", "aten::linear", "mkldnn::_linear_pointwise", "fasttrack::panel_linear",
               "aten::mkldnn_linear",
               "fasttrack::pruned_linear", "aten::_addmm_activation", "mkldnn::_convolution_pointwise",
               "aten::mkldnn_convolution"),
    "attention": ("aten::_scaled_dot_product", "aten::bmm", "aten::_softmax", "aten::softmax",
                  "aten::baddbmm", "aten::_safe_softmax", "fasttrack::_attention"),
    "selection": ("fasttrack::topk_select", "aten::sort", "aten::topk"),
    "merge": ("fasttrack::merge_tokens",),
    "scatter": ("fasttrack::pad_scatter", "fasttrack::gather_tokens", "aten::scatter", "aten::gather"),
}


def segment_of(name: str) -> str:
    for seg, prefixes in _KIND.items():
        if name.startswith(prefixes):
            return seg
    return "other"


def breakdown(fn, *args, warmup: int = 2) -> dict[str, float]:
    """Seconds per segment of one call of fn(*args) (self CPU time of leaf ops), plus 'total' (wall)."""
    import time

    from torch.profiler import ProfilerActivity, profile
    with torch.no_grad():
        for _ in range(warmup):
            fn(*args)
        t = time.perf_counter()
        fn(*args)
        wall = time.perf_counter() - t
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn(*args)
    out = dict.fromkeys(SEGMENTS, 0.0)
    for e in prof.key_averages():
        out[segment_of(e.key)] += e.self_cpu_time_total / 1e6
    scale = wall / max(sum(out.values()), 1e-12)  # report shares of the un-profiled wall time
    out = {k: v * scale for k, v in out.items()}
    out["total"] = wall
    return out


def table(rows: list[tuple[str, str, dict]]) -> str:
    lines = ["| family | path | " + " | ".join(f"{s} ms" for s in SEGMENTS) + " | total ms |",
             "|---|---|" + "---:|" * (len(SEGMENTS) + 1)]
    for fam, path, d in rows:
        lines.append(f"| {fam} | {path} | " + " | ".join(f"{1e3 * d[s]:.1f}" for s in SEGMENTS)
                     + f" | {1e3 * d['total']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    from fasttrack.zoo import FAMILIES, build
    p = argparse.ArgumentParser(prog="python -m bench profile")
    p.add_argument("--family", default="", help=f"comma-separated, from {list(FAMILIES)} (default: all)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (default: leave as is)")
    a = p.parse_args(argv)
    print(cpu_line(), flush=True)
    if a.threads:
        torch.set_num_threads(a.threads)
    dtype = getattr(torch, a.dtype)
    fams = [f for f in a.family.split(",") if f] or list(FAMILIES)
    rows = []
    for fam in fams:
        case = build(fam, a.batch, dtype)
        rows.append((fam, "reference", breakdown(case.reference, *case.inputs)))
        rows.append((fam, "fused", breakdown(case.fused, *case.inputs)))
        for name, module in case.extras.items():   # ABTrack: the dense ViT yardstick, fused-all at B > 1
            rows.append((fam, name, breakdown(module, *case.inputs)))
    print(table(rows))
    return 0
