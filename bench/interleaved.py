"""What the interleaved comparison tools (`python -m bench attention`, `gemm`, `peers`) share: their
command line and the rotated-order timing loop. On this shared VM the memory bandwidth and the
neighbours' load drift within minutes, so providers are timed call by call in one loop, each round
starting with the next provider (whichever runs right after a larger one finds its caches cold, and a
fixed order would always charge the same one), and ratios are taken of medians over rounds."""
from __future__ import annotations

import argparse
import time

import torch

from fasttrack.info import cpu_line


def tool_args(prog: str, doc: str, rounds: int, select: str, argv=None) -> argparse.Namespace:
    """``--rounds``, ``--threads`` (applied here) and ``-k`` (a substring of ``select``); prints the
    CPU line with the thread count."""
    p = argparse.ArgumentParser(prog=f"python -m bench {prog}", description=doc.split("\n")[0])
    p.add_argument("--rounds", type=int, default=rounds)
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (default: leave as is)")
    p.add_argument("-k", default="", help=f"substring of '{select}' to select")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    print(cpu_line(), f"| threads {torch.get_num_threads()}", flush=True)
    return a


def time_rounds(providers: dict, rounds: int, warmup: int = 0) -> dict:
    """``{name: [seconds per round]}``: every provider once per round, the order rotated each round,
    after ``warmup`` calls of each."""
    names = list(providers)
    for fn in providers.values():
        for _ in range(warmup):
            fn()
    times = {n: [] for n in names}
    for r in range(rounds):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            t = time.perf_counter()
            providers[n]()
            times[n].append(time.perf_counter() - t)
    return times
