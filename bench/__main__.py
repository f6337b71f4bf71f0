"""`python -m bench [--quick] [-k EXPR] [--out DIR]` — every benchmark in bench/, providers side by side.

Measures this machine's memory bandwidth (DRAM and last-level cache) and GEMM throughput first, runs the pytest-benchmark suites
in this one process (reference, torch.compile of the reference, fasttrack native, Triton on CUDA),
then prints a markdown table per group (op/shape/dtype): median time, speed-up vs the eager
reference and vs torch.compile, and the fraction of this machine's roofline (the larger of
bytes/bandwidth and FLOPs/GEMM-peak, over the measured time; cache bandwidth for ops whose bytes
fit in the last-level cache, as the B=1 tracker ops do). Writes DIR/results.json (with the
machine description) and DIR/speedup.png.

`python -m bench profile [--family NAME]` prints the per-segment time breakdown of one tracker
forward (see bench/profile.py). `python -m bench bandwidth` checks the B=32 memory-bandwidth targets
with the copy bandwidth measured right before each timing (see bench/bandwidth.py); `python -m bench
paired` times `PrunedLinear` and its pre-packed oneDNN anchor alternately (see bench/paired.py);
`python -m bench traffic` models every Triton launcher's GPU memory traffic against the op's
minimum bytes (see bench/traffic.py); `python -m bench peers` times fused fasttrack against ONNX
Runtime and OpenVINO on the exported networks (see bench/peers.py); `python -m bench attention` times
the CPU attention core against the cores it replaces (see bench/attention.py); `python -m bench gemm`
times the panel GEMM against oneDNN's primitive it replaces (see bench/gemm.py).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import torch

from bench.machine import machine_line, measure_machine

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


class _Progress:
    """A one-line progress bar over the collected benchmarks (pytest plugin)."""

    def __init__(self):
        self.total = self.done = 0

    def pytest_collection_finish(self, session):
        self.total = len(session.items)

    def pytest_runtest_logreport(self, report):
        if report.when != "call" and not (report.when == "setup" and report.skipped):
            return
        self.done += 1
        width = 30
        fill = int(width * self.done / max(self.total, 1))
        name = report.nodeid.split("::")[-1][:60]
        sys.stderr.write(f"\r[{'#' * fill}{'.' * (width - fill)}] {self.done}/{self.total} {name:<60}")
        sys.stderr.flush()
        if self.done == self.total:
            sys.stderr.write("\n")


def run_benchmarks(pytest_args: list[str], json_path: str) -> int:
    import pytest
    args = [HERE, "-q", "-p", "no:cacheprovider", "--benchmark-only", f"--benchmark-json={json_path}",
            "--no-header", "-o", "console_output_style=classic", "--benchmark-disable-gc",
            "--benchmark-columns=median", "--benchmark-sort=name", *pytest_args]
    return pytest.main(args, plugins=[_Progress()])


def summarise(raw: dict, machine: dict) -> list[dict]:
    """One row per (group, provider) with ratios against the reference and compile providers."""
    groups: dict[str, dict[str, dict]] = {}
    for b in raw.get("benchmarks", []):
        info = b.get("extra_info", {})
        provider = info.get("provider", b["name"])
        t = info.get("do_bench_ms", None)
        t = t / 1e3 if t is not None else b["stats"]["median"]
        groups.setdefault(b["group"] or b["name"], {})[provider] = dict(time=t, **info)
    rows = []
    for group, provs in sorted(groups.items()):
        ref = provs.get("reference", {}).get("time")
        comp = provs.get("compile", {}).get("time")
        for provider, r in provs.items():
            if machine.get("device", "cpu") != "cpu":
                # the device's DRAM copy bandwidth and fp32 GEMM peak, measured in this run
                bw, peak = machine["device_bandwidth_gbs"], machine["device_gemm_fp32_tflops"] * 1e3
            else:
                # an op whose bytes fit in the last-level cache is bounded by the cache, not DRAM
                bw = machine["cache_bandwidth_gbs"] if r.get("nbytes", 0) <= machine["llc_bytes"] \
                    else machine["bandwidth_gbs"]
                peak = machine["gemm_gflops"]
            roof = max(r.get("nbytes", 0) / (bw * 1e9), r.get("flops", 0) / (peak * 1e9))
            rows.append(dict(group=group, provider=provider, time_us=r["time"] * 1e6,
                             vs_reference=ref / r["time"] if ref else None,
                             vs_compile=comp / r["time"] if comp else None,
                             roofline=roof / r["time"] if roof else None,
                             gbs=r.get("nbytes", 0) / r["time"] / 1e9 if r.get("nbytes") else None,
                             kernels=r.get("kernels")))
    return rows


def markdown(rows: list[dict], machine: dict) -> str:
    fmt = lambda v, spec: "—" if v is None else format(v, spec)  # noqa: E731
    kernels = any(r.get("kernels") is not None for r in rows)
    out = [machine_line(machine) + " Roofline: the larger of bytes / bandwidth (CPU: cache bandwidth when "
           "the bytes fit in the cache) and FLOPs / GEMM peak.", "",
           "| group | provider | median µs | × vs reference | × vs compile | GB/s | % roofline |"
           + (" kernels / call |" if kernels else ""),
           "|---|---|---:|---:|---:|---:|---:|" + ("---:|" if kernels else "")]
    for r in rows:
        out.append(f"| {r['group']} | {r['provider']} | {r['time_us']:.1f} | {fmt(r['vs_reference'], '.2f')} | "
                   f"{fmt(r['vs_compile'], '.2f')} | {fmt(r['gbs'], '.1f')} | "
                   f"{fmt(None if r['roofline'] is None else 100 * r['roofline'], '.0f')} |"
                   + (f" {fmt(r.get('kernels'), 'd')} |" if kernels else ""))
    return "\n".join(out)


def chart(rows: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    groups = sorted({r["group"] for r in rows})
    provs = [p for p in ("compile", "native", "triton") if any(r["provider"] == p for r in rows)]
    fig, ax = plt.subplots(figsize=(max(8, 0.45 * len(groups) + 3), 5))
    width = 0.8 / max(len(provs), 1)
    for i, p in enumerate(provs):
        vals = [next((r["vs_reference"] or 0 for r in rows if r["group"] == g and r["provider"] == p), 0)
                for g in groups]
        ax.bar([j + i * width for j in range(len(groups))], vals, width, label=p)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks([j + width * (len(provs) - 1) / 2 for j in range(len(groups))])
    ax.set_xticklabels(groups, rotation=70, ha="right", fontsize=7)
    ax.set_ylabel("speed-up vs eager reference (×)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "profile":
        from bench.profile import main as profile_main
        return profile_main(argv[1:])
    if argv and argv[0] == "bandwidth":
        from bench.bandwidth import main as bandwidth_main
        return bandwidth_main(argv[1:])
    if argv and argv[0] == "traffic":
        from bench.traffic import main as traffic_main
        return traffic_main(argv[1:])
    if argv and argv[0] == "peers":
        from bench.peers import main as peers_main
        return peers_main(argv[1:])
    if argv and argv[0] == "paired":
        from bench.paired import main as paired_main
        return paired_main(argv[1:])
    if argv and argv[0] == "attention":
        from bench.attention import main as attention_main
        return attention_main(argv[1:])
    if argv and argv[0] == "gemm":
        from bench.gemm import main as gemm_main
        return gemm_main(argv[1:])
    p = argparse.ArgumentParser(prog="python -m bench", description="fasttrack benchmarks, side by side")
    p.add_argument("--quick", action="store_true", help="B=1 cases only, fewer rounds")
    p.add_argument("-k", default="", help="pytest -k expression to select benchmarks")
    p.add_argument("--out", default=os.path.join(HERE, "results"), help="directory for results.json / speedup.png")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                   help="where inputs and models live (cuda: every provider timed with CUDA events)")
    a = p.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: this process sees no CUDA device")
    os.environ["FASTTRACK_BENCH_DEVICE"] = a.device
    machine = measure_machine(a.device)
    print(machine_line(machine), flush=True)
    pytest_args = ["--benchmark-max-time=0.3" if a.quick else "--benchmark-max-time=1.0",
                   "--benchmark-min-rounds=3" if a.quick else "--benchmark-min-rounds=5"]
    k = " and ".join(e for e in (a.k, "not B32" if a.quick else "") if e)
    if k:
        pytest_args += ["-k", k]
    with tempfile.TemporaryDirectory() as d:
        raw_path = os.path.join(d, "raw.json")
        code = run_benchmarks(pytest_args, raw_path)
        if not os.path.exists(raw_path):
            print("no benchmark ran", file=sys.stderr)
            return code or 1
        with open(raw_path) as fh:
            raw = json.load(fh)
    rows = summarise(raw, machine)
    table = markdown(rows, machine)
    print(table)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "results.json"), "w") as fh:
        json.dump(dict(machine=machine, rows=rows), fh, indent=1)
    with open(os.path.join(a.out, "results.md"), "w") as fh:
        fh.write(table + "\n")
    chart(rows, os.path.join(a.out, "speedup.png"))
    print(f"\nwrote {a.out}/results.json, results.md, speedup.png")
    return code


if __name__ == "__main__":
    sys.exit(main())
