"""`python -m bench traffic [--json FILE]`: every Triton launcher's modelled GPU memory traffic at
tracker shapes, against the fewest bytes the op must move.

Each launcher runs under the Triton interpreter (on CPU tensors; no GPU needed) inside
`bench.triton_traffic.traffic`, which records every load and store. "moved" is the sum over the
op's launches of the unique bytes each launch reads and writes (a perfect cache within a launch,
none across launches: what re-reading a tensor in a second launch costs). "minimum" counts each
input byte the op needs read once and each output byte written once (`CASES` states it per op).
The report prints launches per call, moved / minimum, and the modelled H100 time at 3.35 TB/s.

Targets (issue 14; `tests/test_triton_traffic.py` asserts them): `merge_tokens` in at most two
launches; every other kernel within 1.25x of its minimum bytes. `make aot` prints this report after
the ahead-of-time compile report.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
from typing import Callable

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MAX_RATIO = 1.25            # moved / minimum, every op but merge_tokens
MAX_MERGE_LAUNCHES = 2


@dataclasses.dataclass
class TrafficCase:
    op: str
    name: str
    args: Callable[[], tuple]          # the launcher's arguments (schema order), on CPU tensors
    minimum: Callable[[tuple], int]    # fewest bytes the op must move for those arguments


def _es(t) -> int:
    return t.element_size()


def _topk_min(args, qk):
    if qk:
        q, k, x, qi, w, bonus, gi, start, L, ratio, _ = args
        B, H, N, D = q.shape
        R = qi.shape[1]
        scores = B * H * (R + N) * D * _es(q)            # the R query rows of q, all of k
    else:
        attn, x, qi, w, bonus, gi, start, L, ratio = args
        B, H, N, _ = attn.shape
        R = qi.shape[1]
        scores = B * H * R * L * _es(attn)               # the R rows x L candidate columns per head
    from fasttrack.reference import keep_count
    C, k = x.shape[2], keep_count(ratio, L)
    rows = 2 * B * (N - L + k) * C * _es(x)              # surviving tokens read once, written once
    small = B * R * 8 + (w.numel() * _es(w) if w is not None else 0) + \
        (bonus.numel() * _es(bonus) if bonus is not None else 0) + (gi.numel() * 8 if gi is not None else 0)
    return scores + rows + small + 2 * B * L * 8         # keep/removed + their global indices


def _pruned_min(args):
    x, w, b, idx, lw, lb, eps, normalize = args
    M = x.numel() // x.shape[-1]
    d_out, k = w.shape
    x_bytes = M * (x.shape[-1] if normalize else k) * _es(x)   # the LayerNorm reads whole rows
    extra = (b.numel() if b is not None else 0) + (lw.numel() if lw is not None else 0) + \
        (lb.numel() if lb is not None else 0)
    return x_bytes + w.numel() * _es(w) + extra * _es(x) + idx.numel() * 8 + M * d_out * _es(x)


def _merge_min(args):
    z, score, proj, metric, ratio, reduce = args
    from fasttrack.reference import merge_count
    B, N, C = z.shape
    K = merge_count(ratio, N)
    inputs = z.numel() * _es(z) + (proj.numel() * _es(proj) if proj is not None else score.numel() * _es(score))
    if metric is not None:
        inputs += metric.numel() * _es(metric)
    return inputs + B * K * C * _es(z) + B * (K + 2 * (N - K)) * 8


def _argmax_min(args):
    src, dst = args
    return src.numel() * _es(src) + dst.numel() * _es(dst) + src.shape[0] * src.shape[1] * (4 + 8)


def cases() -> list[TrafficCase]:
    import torch

    from fasttrack.ops.topk_select import make_inputs

    def g():
        return torch.Generator().manual_seed(0)

    def merge_args(T, L, r, dtype=torch.float32):
        gen = g()
        z = torch.randn(1, T * L, 768, generator=gen).to(dtype)
        return (z, None, torch.randn(768, generator=gen).to(dtype), None, r, "sum")

    def pruned_args(d_out, ln, dtype=torch.float32):
        gen = g()
        x = torch.randn(320, 768, generator=gen).to(dtype)
        idx = torch.randperm(768, generator=gen)[:540].sort().values
        w = (torch.randn(d_out, 540, generator=gen) * 540 ** -0.5).to(dtype)
        norm = (torch.ones(768, dtype=dtype), torch.zeros(768, dtype=dtype)) if ln else (None, None)
        return (x, w, torch.zeros(d_out, dtype=dtype), idx, *norm, 1e-5, ln)

    out = []
    for name, all_rows in (("ostrack256", False), ("ostrack256", True), ("ostrack384", False), ("utptrack_s_ste", False)):
        tag = f"{name}-R{'all' if all_rows else 'ctr'}-B1"
        out.append(TrafficCase("topk_select", tag, lambda n=name, a=all_rows: make_inputs(n, 1, torch.float32,
                                                                                           all_rows=a, generator=g()),
                               lambda a: _topk_min(a, False)))
        out.append(TrafficCase("topk_select_qk", tag, lambda n=name, a=all_rows: make_inputs(
            n, 1, torch.float32, all_rows=a, qk=True, generator=g()), lambda a: _topk_min(a, True)))
    for T, L, r in ((5, 64, 0.9), (5, 64, 0.7), (5, 144, 0.5)):
        out.append(TrafficCase("merge_tokens", f"T{T}L{L}-r{r}-B1", lambda T=T, L=L, r=r: merge_args(T, L, r),
                               _merge_min))
    out.append(TrafficCase("cosine_argmax", "S32-T288-C768", lambda: (torch.randn(1, 32, 768, generator=g()),
                                                                    torch.randn(1, 288, 768, generator=g())),
                           _argmax_min))
    for d_out, ln, tag in ((2304, True, "qkv+ln1"), (768, False, "proj"), (3072, True, "fc1+ln2")):
        out.append(TrafficCase("pruned_linear", f"{tag}-M320-k540", lambda d=d_out, ln=ln: pruned_args(d, ln),
                               _pruned_min))
    return out


def measure(selected=None, case_names=None) -> list[dict]:
    """Run every case (of the `selected` ops; named `case_names`) under the traffic recorder (needs
    TRITON_INTERPRET=1 before triton is imported)."""
    from bench.triton_traffic import traffic
    from fasttrack.ops._registry import REGISTRY
    rows = []
    for c in cases():
        if (selected and c.op not in selected) or (case_names and c.name not in case_names):
            continue
        args = c.args()
        with traffic() as t:
            REGISTRY[c.op].triton_launcher()(*args)
        rep = t.report()
        tot = rep["total"]
        moved = tot["ld_unique"] + tot["st_unique"]
        minimum = c.minimum(args)
        rows.append(dict(op=c.op, case=c.name, launches=tot["launches"], moved=moved, minimum=minimum,
                         ratio=moved / minimum, h100_us=moved / 3.35e12 * 1e6,
                         by_kernel={k: v["ld_unique"] + v["st_unique"] for k, v in rep["by_kernel"].items()}))
    return rows


def table(rows) -> str:
    out = ["| op | case | launches | moved KB | minimum KB | moved / minimum | H100 µs (3.35 TB/s) |",
           "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['op']} | {r['case']} | {r['launches']} | {r['moved'] / 1e3:.1f} | {r['minimum'] / 1e3:.1f} | "
                   f"{r['ratio']:.2f} | {r['h100_us']:.2f} |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench traffic", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", default="", help="also write the rows here")
    p.add_argument("--op", default="", help="comma-separated ops (default: every Triton op)")
    a = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") != "1":
        # the recorder needs the interpreter on before triton is imported: rerun in a child that has it
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        return subprocess.call([sys.executable, "-m", "bench", "traffic", *(argv or sys.argv[2:])], env=env, cwd=ROOT)
    rows = measure([o for o in a.op.split(",") if o] or None)
    print(table(rows))
    bad = [r for r in rows if (r["op"] == "merge_tokens" and r["launches"] > MAX_MERGE_LAUNCHES)
           or (r["op"] != "merge_tokens" and r["ratio"] > MAX_RATIO)]
    print(f"\ntargets: merge_tokens <= {MAX_MERGE_LAUNCHES} launches, every other op <= {MAX_RATIO}x its minimum "
          f"bytes: {'met' if not bad else 'MISSED by ' + ', '.join(r['op'] + '/' + r['case'] for r in bad)}")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
