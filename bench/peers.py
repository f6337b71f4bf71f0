"""`python -m bench peers` — fused fasttrack against the CPU runtimes a deployment engineer would pick.

Each family's *reference* network (`fasttrack.zoo`, full depth) is exported to ONNX with
``torch.onnx.export(dynamo=True)`` (no shims: every fasttrack op exports as its reference
decomposition, `fasttrack.backend.exporting_to_onnx`), then run by
- ONNX Runtime (CPU execution provider, all graph optimisations, ``intra_op_num_threads`` = T), and
- OpenVINO (CPU plugin, ``PERFORMANCE_HINT=LATENCY``, ``INFERENCE_NUM_THREADS`` = T, precision
  hint f32, and bf16 for the bf16 rows; ONNX Runtime has no bf16 CPU path, so its bf16 cells are "—"),
beside the eager reference, ``torch.compile`` of the reference (``--compile``: an Inductor compile of
a 12-block ViT costs minutes on 2 cores) and fused fasttrack (`torch.set_num_threads(T)`).

Parity first, on fresh inputs (not the export's): every peer's outputs against the PyTorch
reference (fp32 for the fp32 rows and for OpenVINO-bf16, whose model is the fp32 export):
``feat`` max abs difference of the backbone features, ``idx`` the fraction of kept / removed token
indices (or bypass decisions) shared, ``box`` max abs difference of the predicted boxes.

Timing: per (network, B, T) all providers of both dtypes run round by round, each round in a
rotated order, one call each (after 3 warm-up calls); the table gives median times and the median
of the per-round ratios fused / peer with their spread (min–max over rounds) — < 1 means fused
fasttrack is faster. The machine line names the CPU and the vector ISA in use; the load average is
printed before and after.

    python -m bench peers [--families ostrack,utptrack-o,compresstracker] [--batch 1,8]
                          [--threads 1,2] [--rounds 20] [--compile] [--out DIR]
    python -m bench peers --smoke      # depth-reduced export + parity only (what `make test` runs)

Writes DIR/peers.json (every round's times), DIR/peers.md and DIR/peers.png.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import statistics
import sys
import tempfile
import warnings

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from bench.interleaved import time_rounds
from fasttrack import zoo
from fasttrack.info import cpu_line

FAMILIES = ("ostrack", "utptrack-o", "compresstracker", "abtrack", "etctrack")
DEFAULT_FAMILIES = ("ostrack", "utptrack-o", "compresstracker", "abtrack")
SMOKE_DEPTH = 4     # CE at block 3 (OSTrack / UTPTrack-O), one gated block (ABTrack), one HIBlock (ETCTrack)


def require_runtimes():
    """onnx / onnxscript / onnxruntime / openvino, or a clear error naming what is missing."""
    missing = []
    for name in ("onnx", "onnxscript", "onnxruntime", "openvino"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise RuntimeError(f"python -m bench peers needs {', '.join(missing)}: `make bench` installs them "
                           "(pip install onnx onnxscript onnxruntime openvino)")


def export_onnx(module, inputs, path: str) -> None:
    """``torch.onnx.export(dynamo=True)`` of ``module`` at ``inputs`` (static shapes), quietly."""
    buf = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        warnings.simplefilter("ignore")
        level = logging.root.manager.disable
        logging.disable(logging.WARNING)
        try:
            with torch.no_grad():
                torch.onnx.export(module, inputs, path, dynamo=True)
        except Exception as e:
            raise RuntimeError(f"ONNX export failed: {e}\n{buf.getvalue()[-4000:]}") from e
        finally:
            logging.disable(level)


def tensor_inputs(inputs) -> list[torch.Tensor]:
    return [t for t in inputs if isinstance(t, torch.Tensor)]


def fresh_inputs(inputs, seed: int = 12345) -> tuple:
    """Inputs of the same shapes and dtypes as ``inputs``, new random values (parity must not be
    checked on the values the graph was traced with)."""
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(t.shape, generator=g).to(t.dtype) if isinstance(t, torch.Tensor) and t.is_floating_point()
                 else t for t in inputs)


class OrtRunner:
    def __init__(self, path: str, threads: int):
        import onnxruntime as ort
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self.session = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        self.names = [i.name for i in self.session.get_inputs()]

    def feeds(self, inputs):
        return dict(zip(self.names, (t.numpy() for t in tensor_inputs(inputs))))

    def __call__(self, feeds):
        return self.session.run(None, feeds)


class OpenVinoRunner:
    def __init__(self, path: str, threads: int, precision: str):
        import openvino as ov
        core = ov.Core()
        model = core.read_model(path)
        self.compiled = core.compile_model(model, "CPU", {"PERFORMANCE_HINT": "LATENCY",
                                                          "INFERENCE_NUM_THREADS": threads,
                                                          "INFERENCE_PRECISION_HINT": precision})
        self.request = self.compiled.create_infer_request()
        self.n_out = len(self.compiled.outputs)

    def feeds(self, inputs):
        return [t.numpy() for t in tensor_inputs(inputs)]

    def __call__(self, feeds):
        self.request.infer(feeds)
        return [self.request.get_output_tensor(i).data.copy() for i in range(self.n_out)]


def as_output(reference_out, arrays):
    """The peer's flat ONNX outputs put back into the reference output's structure (the exporter
    flattens the output pytree, tensors in order)."""
    leaves, spec = tree_flatten(reference_out)
    it = iter(arrays)
    rebuilt = []
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            a = torch.from_numpy(next(it))
            rebuilt.append(a.to(leaf.dtype) if a.dtype != leaf.dtype else a)
        else:
            rebuilt.append(leaf)
    if next(it, None) is not None:
        raise RuntimeError("the ONNX model has more outputs than the reference network")
    return tree_unflatten(rebuilt, spec)


def parity(case, ref_out, out) -> dict:
    r = case.parity(ref_out, out)
    return dict(feat=r["feature_max_abs"], idx=r["index_agreement"], box=r["box_max_abs"])


def parity_text(p: dict | None) -> str:
    if p is None:
        return "—"
    parts = [f"feat {p['feat']:.1e}"]
    if p["idx"] is not None:
        parts.append(f"idx {p['idx']:.2f}")
    if p["box"] is not None:
        parts.append(f"box {p['box']:.1e}")
    return ", ".join(parts)


def check_peers(family: str, batch: int, depth: int | None, threads: int, workdir: str, bf16: bool = True):
    """Export ``family``'s reference network and check ONNX Runtime and OpenVINO (f32, and bf16
    with ``bf16``) against it on fresh inputs. Returns ``(case, fresh inputs, reference output,
    {peer: runner}, {peer: parity dict})``."""
    case = zoo.build(family, batch, torch.float32, depth=depth)
    path = os.path.join(workdir, f"{family}-B{batch}-d{depth or 'full'}.onnx")
    if not os.path.exists(path):   # one export per network and batch, for every thread count
        export_onnx(case.reference, case.inputs, path)
    inputs = fresh_inputs(case.inputs)
    with torch.no_grad():
        ref_out = case.reference(*inputs)
    runners = {"ort": OrtRunner(path, threads), "ov": OpenVinoRunner(path, threads, "f32")}
    if bf16:
        runners["ov-bf16"] = OpenVinoRunner(path, threads, "bf16")
    checks = {}
    for name, run in runners.items():
        checks[name] = parity(case, ref_out, as_output(ref_out, run(run.feeds(inputs))))
    return case, inputs, ref_out, runners, checks


def _ratio(times, a, b):
    """Median and (min, max) over rounds of time[a] / time[b]."""
    if a not in times or b not in times:
        return None
    rs = [x / y for x, y in zip(times[a], times[b])]
    return dict(median=statistics.median(rs), lo=min(rs), hi=max(rs))


def run_config(family: str, batch: int, threads: int, rounds: int, use_compile: bool, workdir: str) -> list[dict]:
    """One (network, B, T): parity of every peer, then all providers of both dtypes interleaved."""
    torch.set_num_threads(threads)
    case, inputs, ref_out, runners, checks = check_peers(family, batch, None, threads, workdir)
    case16 = zoo.build(family, batch, torch.bfloat16)
    inputs16 = tuple(t.to(torch.bfloat16) if isinstance(t, torch.Tensor) and t.is_floating_point() else t
                     for t in inputs)
    with torch.no_grad():
        checks["fused"] = parity(case, ref_out, case.fused(*inputs))
        checks["fused-bf16"] = parity(case16, case16.reference(*inputs16), case16.fused(*inputs16))
    feeds = {n: r.feeds(inputs) for n, r in runners.items()}
    providers = {
        "eager": lambda: case.reference(*inputs),
        "fused": lambda: case.fused(*inputs),
        "ort": lambda: runners["ort"](feeds["ort"]),
        "ov": lambda: runners["ov"](feeds["ov"]),
        "eager-bf16": lambda: case16.reference(*inputs16),
        "fused-bf16": lambda: case16.fused(*inputs16),
        "ov-bf16": lambda: runners["ov-bf16"](feeds["ov-bf16"]),
    }
    if use_compile:
        c32 = torch.compile(case.reference, dynamic=False)
        c16 = torch.compile(case16.reference, dynamic=False)
        providers["compile"] = lambda: c32(*inputs)
        providers["compile-bf16"] = lambda: c16(*inputs16)
    with torch.no_grad():
        times = time_rounds(providers, rounds, warmup=3)
    if use_compile:
        torch._dynamo.reset()
    rows = []
    for dt, sfx in (("fp32", ""), ("bf16", "-bf16")):
        med = {n: statistics.median(v) for n, v in times.items()}
        rows.append(dict(
            family=family, batch=batch, threads=threads, dtype=dt,
            eager_ms=1e3 * med["eager" + sfx], compile_ms=1e3 * med["compile" + sfx] if use_compile else None,
            fused_ms=1e3 * med["fused" + sfx], ort_ms=1e3 * med["ort"] if not sfx else None,
            ov_ms=1e3 * med["ov" + sfx],
            fused_vs_ort=_ratio(times, "fused", "ort") if not sfx else None,
            fused_vs_ov=_ratio(times, "fused" + sfx, "ov" + sfx),
            fused_speedup_vs_eager=med["eager" + sfx] / med["fused" + sfx],
            parity_fused=checks["fused" + sfx], parity_ort=checks["ort"] if not sfx else None,
            parity_ov=checks["ov" + sfx],
            rounds={n: v for n, v in times.items() if n.endswith(sfx) or (not sfx and "bf16" not in n)}))
    return rows


def markdown(rows: list[dict]) -> str:
    f = lambda v: "—" if v is None else f"{v:.1f}"   # noqa: E731
    r_ = lambda r: "—" if r is None else f"{r['median']:.2f} ({r['lo']:.2f}–{r['hi']:.2f})"  # noqa: E731
    out = ["| network | B | threads | dtype | eager ms | compile ms | fused ms | ORT ms | OpenVINO ms | "
           "fused / ORT | fused / OpenVINO | fused × eager | parity fused | parity ORT | parity OpenVINO |",
           "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|"]
    for r in rows:
        out.append(f"| {r['family']} | {r['batch']} | {r['threads']} | {r['dtype']} | {f(r['eager_ms'])} | "
                   f"{f(r['compile_ms'])} | {f(r['fused_ms'])} | {f(r['ort_ms'])} | {f(r['ov_ms'])} | "
                   f"{r_(r['fused_vs_ort'])} | {r_(r['fused_vs_ov'])} | {r['fused_speedup_vs_eager']:.2f} | "
                   f"{parity_text(r['parity_fused'])} | {parity_text(r['parity_ort'])} | {parity_text(r['parity_ov'])} |")
    return "\n".join(out)


def chart(rows: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    labels = [f"{r['family']}/B{r['batch']}/T{r['threads']}/{r['dtype']}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(8, 0.5 * len(rows) + 3), 5))
    w = 0.4
    for i, (key, name) in enumerate((("fused_vs_ort", "fused / ONNX Runtime"), ("fused_vs_ov", "fused / OpenVINO"))):
        ax.bar([j + i * w for j in range(len(rows))], [r[key]["median"] if r[key] else 0 for r in rows], w, label=name)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks([j + w / 2 for j in range(len(rows))])
    ax.set_xticklabels(labels, rotation=70, ha="right", fontsize=7)
    ax.set_ylabel("time ratio (< 1: fused fasttrack faster)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# Mismatches of a peer runtime on a graph that ONNX Runtime runs exactly (the same .onnx file, either
# exporter), found by the parity check. They are printed, and the smoke run fails if one goes away
# (then remove the entry) or another appears.
KNOWN_PEER_MISMATCHES = {
    # OpenVINO 2026.4.1 CPU, any precision hint: the CENTER head's score / size / offset maps are off
    # (boxes by ~0.2) when the head follows the UTPTrack-O backbone in one graph; the backbone
    # features and kept indices are exact, and the head exported alone is exact.
    ("utptrack-o", "ov"): "OpenVINO CPU miscomputes the head after the UTPTrack-O backbone",
}


def parity_ok(p: dict) -> bool:
    return p["feat"] <= 1e-3 and (p["idx"] is None or p["idx"] == 1.0) and (p["box"] is None or p["box"] <= 1e-3)


def smoke(families, workdir: str) -> int:
    """Depth-reduced export of every family, ONNX Runtime and OpenVINO (f32) parity, no timing."""
    bad = 0
    for fam in families:
        _, _, _, _, checks = check_peers(fam, 1, SMOKE_DEPTH, 2, workdir, bf16=False)
        for peer, p in checks.items():
            ok = parity_ok(p)
            known = KNOWN_PEER_MISMATCHES.get((fam, peer))
            bad += ok == bool(known)
            verdict = ("ok" if ok else "MISMATCH") + (f" (known: {known}{'' if not ok else ' — gone: remove the entry'})"
                                                      if known else "")
            print(f"{fam} depth {SMOKE_DEPTH} {peer}: {parity_text(p)} {verdict}", flush=True)
    return 1 if bad else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench peers", description=__doc__.split("\n")[0])
    p.add_argument("--families", default=",".join(DEFAULT_FAMILIES), help=f"comma-separated, of {FAMILIES}")
    p.add_argument("--batch", default="1,8")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--rounds", type=int, default=0, help="rounds per configuration (default 20 at B=1, 10 above)")
    p.add_argument("--compile", action="store_true", help="add torch.compile of the reference (minutes per network)")
    p.add_argument("--smoke", action="store_true", help="depth-reduced export + parity only, no timing")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    a = p.parse_args(argv)
    require_runtimes()
    families = [f for f in a.families.split(",") if f]
    for f in families:
        if f not in FAMILIES:
            p.error(f"--families: {f!r} is not one of {FAMILIES}")
    import onnxruntime
    import openvino
    print(cpu_line())
    print(f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, openvino {openvino.__version__}; "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    with tempfile.TemporaryDirectory() as workdir:
        if a.smoke:
            return smoke(families, workdir)
        rows = []
        for fam in families:
            for B in (int(b) for b in a.batch.split(",")):
                for T in (int(t) for t in a.threads.split(",")):
                    rounds = a.rounds or (20 if B == 1 else 10)
                    print(f"{fam} B={B} threads={T}: exporting, checking, {rounds} rounds ...", flush=True)
                    rows += run_config(fam, B, T, rounds, a.compile, workdir)
                    print(markdown(rows[-2:]).split("\n", 2)[2], flush=True)
    table = markdown(rows)
    print(f"\n{cpu_line()}\nload average after: {os.getloadavg()[0]:.2f}\n\n{table}")
    os.makedirs(a.out, exist_ok=True)
    machine = dict(cpu=cpu_line(), torch=torch.__version__, onnxruntime=onnxruntime.__version__,
                   openvino=openvino.__version__)
    with open(os.path.join(a.out, "peers.json"), "w") as fh:
        json.dump(dict(machine=machine, rows=rows), fh, indent=1)
    with open(os.path.join(a.out, "peers.md"), "w") as fh:
        fh.write(machine["cpu"] + "\n\n" + table + "\n")
    chart(rows, os.path.join(a.out, "peers.png"))
    print(f"\nwrote {a.out}/peers.json, peers.md, peers.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
