"""`python -m bench bandwidth [--rounds N]` — the B=32 memory-bandwidth targets, measured paired.

`topk_select`, `pad_scatter` and `gather_tokens` at B=32 are judged by the fraction of this
machine's memory bandwidth they reach on the bytes they must move. On a shared machine that
bandwidth drifts with the neighbours (38–78 GB/s on this project's VM within one session), so a
fraction taken against a bandwidth measured minutes earlier (as `python -m bench` does once at its
start) says little. Here each round measures the DRAM copy bandwidth (as `python -m bench` does) and
then times the op right after it; the table gives every round's ratio and their median.
Bytes are the ones the benchmarks in bench/ count (`moved_bytes`, and the same formulas for
pad_scatter / gather_tokens).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import fasttrack
from bench.machine import copy_bandwidth
from bench.bench_pad_scatter import SHAPES as MAP_SHAPES
from bench.bench_topk_select import moved_bytes
from fasttrack.ops.pad_scatter import random_index
from fasttrack.ops.topk_select import SHAPES as TOPK_SHAPES
from fasttrack.ops.topk_select import make_inputs
from fasttrack.info import cpu_line

B = 32
TARGETS = {"topk_select": 0.5, "pad_scatter": 0.6, "gather_tokens": 0.6}


def _median_time(fn, reps=10):
    fn()
    fn()  # first calls warm the allocator (glibc's mmap threshold, fasttrack's output cache)
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def _cases():
    for name, all_rows in (("ostrack256", False), ("ostrack256", True), ("ostrack384", False)):
        for dtype in (torch.float32, torch.bfloat16):
            def build(name=name, all_rows=all_rows, dtype=dtype):
                attn, x, qi, w, bonus, gi, start, L, ratio = make_inputs(
                    name, B, dtype, all_rows=all_rows, generator=torch.Generator().manual_seed(0))
                nbytes = moved_bytes(TOPK_SHAPES[name], B, qi.shape[1], dtype, False)
                return (lambda: fasttrack.topk_select(attn, x, qi, ratio, start=start, length=L, query_weight=w,
                                                      bonus=bonus, global_index=gi)), nbytes
            yield "topk_select", f"{name}-R{64 if all_rows else 1}/{str(dtype)[6:]}", build
    for name, L, k, C, hw in MAP_SHAPES:
        for layout in ("tokens", "nchw"):
            for dtype in (torch.float32, torch.bfloat16):
                def build_scatter(L=L, k=k, C=C, hw=hw, layout=layout, dtype=dtype):
                    kept, index = torch.randn(B, k, C).to(dtype), random_index(B, L, k)
                    es = kept.element_size()
                    hw_arg = list(hw) if layout == "nchw" else []
                    return (lambda: fasttrack.pad_scatter(kept, index, L, layout, hw_arg)), \
                        B * (k + L) * C * es + index.numel() * 8

                def build_gather(L=L, k=k, C=C, hw=hw, layout=layout, dtype=dtype):
                    x = torch.randn(*((B, L, C) if layout == "tokens" else (B, C, *hw))).to(dtype)
                    index = random_index(B, L, k)
                    es = x.element_size()
                    read = B * (L if layout == "nchw" else k) * C * es
                    return (lambda: fasttrack.gather_tokens(x, index, layout)), read + B * k * C * es + index.numel() * 8

                yield "pad_scatter", f"{name}-{layout}/{str(dtype)[6:]}", build_scatter
                yield "gather_tokens", f"{name}-{layout}/{str(dtype)[6:]}", build_gather


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench bandwidth", description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("-k", default="", help="substring of 'op/case' to select")
    args = p.parse_args(argv)
    print(cpu_line(), flush=True)
    print("| op | case (B=32) | GB/s | copy GB/s (same round) | fraction per round | median | target |")
    print("|---|---|---:|---:|---|---:|---:|")
    misses = 0
    for op, case, build in _cases():
        if args.k not in f"{op}/{case}":
            continue
        fn, nbytes = build()
        rounds = []
        for _ in range(args.rounds):
            bw = copy_bandwidth(256 * 2**20)
            rounds.append((nbytes / _median_time(fn), bw))
        fractions = [a / b for a, b in rounds]
        med = statistics.median(fractions)
        ok = med >= TARGETS[op]
        misses += not ok
        print(f"| {op} | {case} | {statistics.median(a for a, _ in rounds) / 1e9:.1f} | "
              f"{statistics.median(b for _, b in rounds) / 1e9:.1f} | "
              f"{' '.join(f'{100 * f:.0f}%' for f in fractions)} | {100 * med:.0f}% | "
              f"{100 * TARGETS[op]:.0f}%{'' if ok else ' MISS'} |", flush=True)
        del fn
    print(f"\n{misses} case(s) below target")
    return 0
