"""`python -m fasttrack.demo [--family ...] [--batch B] [--dtype float32|bfloat16] [--checkpoint PATH] [--out DIR]`

fasttrack's main job, end to end: for each tracker family build a tracker-sized network (random
weights with a fixed seed, or an OSTrack checkpoint), run the reference modules and the fused
modules (sharing the same parameters) on the same template/search input, and print one table:
parity (max abs difference of the features, kept-index agreement, box agreement) and latency,
reference vs fused. Also writes DIR/demo.json and DIR/demo.png.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from fasttrack import zoo
from fasttrack.info import cpu_line
from fasttrack.testing import tolerance


def _median_time(fn, args, reps):
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def run_family(family, batch, dtype, reps, **kw) -> dict:
    case = zoo.build(family, batch, dtype, **kw)
    with torch.inference_mode():
        out_ref = case.reference(*case.inputs)
        out_fus = case.fused(*case.inputs)   # warm-up (packs weights) and the parity run
        parity = case.parity(out_ref, out_fus)
        t_ref = _median_time(case.reference, case.inputs, reps)
        t_fus = _median_time(case.fused, case.inputs, reps)
    atol, _ = tolerance(dtype, scale=100)   # features of a 12-block ViT: errors compound per block
    ok = parity["feature_max_abs"] <= atol and parity["index_agreement"] in (None, 1.0) and \
        (parity["box_max_abs"] is None or parity["box_max_abs"] <= atol)
    return dict(family=case.family, description=case.description, batch=batch, dtype=str(dtype).replace("torch.", ""),
                reference_ms=1e3 * t_ref, fused_ms=1e3 * t_fus, speedup=t_ref / t_fus, parity_ok=ok, **parity)


def table(rows) -> str:
    fmt = lambda v, s: "—" if v is None else format(v, s)  # noqa: E731
    lines = ["| family | B | dtype | feature max abs | kept-index agreement | box max abs | reference ms | "
             "fused ms | speed-up | parity |", "|---|---:|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['family']} | {r['batch']} | {r['dtype']} | {r['feature_max_abs']:.2e} | "
                     f"{fmt(r['index_agreement'], '.3f')} | {fmt(r['box_max_abs'], '.2e')} | {r['reference_ms']:.1f} | "
                     f"{r['fused_ms']:.1f} | {r['speedup']:.2f}× | {'ok' if r['parity_ok'] else 'MISMATCH'} |")
    return "\n".join(lines)


def chart(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 4))
    names = [r["family"] for r in rows]
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r["reference_ms"] for r in rows], 0.4, label="reference")
    ax.bar([x + 0.2 for x in xs], [r["fused_ms"] for r in rows], 0.4, label="fasttrack fused")
    for x, r in zip(xs, rows):
        ax.text(x + 0.2, r["fused_ms"], f"{r['speedup']:.2f}×", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(xs))
    ax.set_xticklabels(names, fontsize=8)
    ax.set_ylabel(f"latency, ms (B={rows[0]['batch']}, {rows[0]['dtype']})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fasttrack.demo", description=__doc__.split("\n\n")[1])
    p.add_argument("--family", default=",".join(zoo.FAMILIES), help=f"comma-separated from {list(zoo.FAMILIES)}")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--reps", type=int, default=5, help="timed runs per path (median reported)")
    p.add_argument("--checkpoint", default=None, help="an OSTrack checkpoint (its `net` dict) for the ostrack family")
    p.add_argument("--out", default="demo_results")
    a = p.parse_args(argv)
    families = [f for f in a.family.split(",") if f]
    unknown = [f for f in families if f not in zoo.FAMILIES]
    if unknown:
        p.error(f"--family: unknown {unknown}; choose from {list(zoo.FAMILIES)}")
    dtype = getattr(torch, a.dtype)
    print(f"fasttrack demo: torch {torch.__version__}, {torch.get_num_threads()} threads, B={a.batch}, {a.dtype}",
          flush=True)
    print(cpu_line(), flush=True)
    rows = []
    for fam in families:
        kw = {"checkpoint": a.checkpoint} if fam == "ostrack" and a.checkpoint else {}
        t = time.perf_counter()
        rows.append(run_family(fam, a.batch, dtype, a.reps, **kw))
        print(f"  {rows[-1]['family']}: {rows[-1]['speedup']:.2f}× ({time.perf_counter() - t:.0f} s)", flush=True)
    print()
    print(table(rows))
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "demo.json"), "w") as fh:
        json.dump(dict(torch=torch.__version__, threads=torch.get_num_threads(), rows=rows), fh, indent=1)
    chart(rows, os.path.join(a.out, "demo.png"))
    print(f"\nwrote {a.out}/demo.json and {a.out}/demo.png")
    return 0 if all(r["parity_ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
