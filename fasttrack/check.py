"""`python -m fasttrack.check [--device cpu|cuda] [--dtype float32,bfloat16] [--op NAME] [--kernel K]`

Runs every available kernel of every op (native C++ on CPU, Triton — under the interpreter on CPU —,
CUDA) against `fasttrack.reference` at the tracker shapes each op lists (`OpDef.cases`), forward and
backward, and prints a table: max abs / rel error per output, index agreement, pass/fail. Exit status
1 on any mismatch. This is the first thing to run on a machine with a GPU: fasttrack's own CI has none.
"""
from __future__ import annotations

import argparse
import sys

import torch

import fasttrack  # noqa: F401  (registers the ops)
from fasttrack import _extension
from fasttrack.backend import use_backend
from fasttrack.ops._registry import REGISTRY, dispatch
from fasttrack.testing import tolerance

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def available_kernels(op, device: str) -> list[str]:
    """Kernel families that really run `op` on `device` (never the reference in disguise)."""
    if device == "cuda":
        if op.cuda_cpp:
            return ["cuda"] if _extension.cuda_built() else []
        return ["triton"] if op.triton else []
    kernels = ["native"] if _extension.loaded else []
    if op.triton:
        import fasttrack.kernels as k
        if k.INTERPRET:
            kernels.append("triton")
    return kernels


def _as_tuple(out):
    return out if isinstance(out, (tuple, list)) else (out,)


def _run(op, kernel, args, grad_pos, upstream):
    """Forward outputs and gradients w.r.t. args[grad_pos], given upstream grads for float outputs
    (no backward when `upstream` is empty: the first reference run only shapes the upstream grads)."""
    args = [a.detach().clone().requires_grad_(True) if i in grad_pos else a for i, a in enumerate(args)]
    if kernel == "reference":
        out = op.reference(*args)
    else:
        with use_backend("triton" if kernel == "triton" else "native"):
            out = dispatch(op.name, *args)
    outs = _as_tuple(out)
    grads = ()
    if grad_pos and upstream:
        pairs = [(o, g) for o, g in zip(outs, upstream) if g is not None]
        loss = sum((o.float() * g.float()).sum() for o, g in pairs)
        grads = torch.autograd.grad(loss, [args[i] for i in grad_pos], allow_unused=True)
    return [o.detach() for o in outs], grads


def _compare(actual, expected, dtype):
    """-> (max_abs, max_rel, index_agreement, ok)"""
    atol, rtol = tolerance(dtype)
    max_abs = max_rel = 0.0
    agree, ok = 1.0, True
    for a, e in zip(actual, expected):
        if a is None or e is None:
            ok &= a is None and e is None
            continue
        if a.shape != e.shape:
            return float("nan"), float("nan"), 0.0, False
        if e.is_floating_point():
            if e.numel():
                d = (a.double() - e.double()).abs()
                max_abs = max(max_abs, d.max().item())
                max_rel = max(max_rel, (d / e.double().abs().clamp_min(atol)).max().item())
                ok &= torch.allclose(a.double(), e.double(), atol=atol, rtol=rtol)
        elif e.numel():
            frac = (a == e).double().mean().item()
            agree = min(agree, frac)
            ok &= frac == 1.0
    return max_abs, max_rel, agree, ok


def run(device="cpu", dtypes=("float32",), ops=None, kernels=None, out=sys.stdout) -> bool:
    rows, all_ok = [], True
    for name, op in REGISTRY.items():
        if ops and name not in ops or op.cases is None:
            continue
        ks = [k for k in available_kernels(op, device) if not kernels or k in kernels]
        for dname in dtypes:
            dtype = DTYPES[dname]
            for case in op.cases(torch.device(device), dtype):
                torch.manual_seed(0)
                exp_out, exp_grads = _run(op, "reference", case.args, case.grad, ())
                upstream = [torch.randn_like(o) if o.is_floating_point() else None for o in exp_out]
                exp_out, exp_grads = _run(op, "reference", case.args, case.grad, upstream)
                for k in ks:
                    try:
                        got_out, got_grads = _run(op, k, case.args, case.grad, upstream)
                        fa, fr, agree, ok_f = _compare(got_out, exp_out, dtype)
                        ba, _, _, ok_b = _compare(got_grads, exp_grads, dtype) if case.grad else (0.0, 0, 1, True)
                        ok, err = ok_f and ok_b, ""
                    except Exception as e:  # a kernel that raises is a failure, reported in the table
                        fa = fr = ba = float("nan")
                        agree, ok, err = 0.0, False, f"{type(e).__name__}: {e}"[:80]
                    all_ok &= ok
                    rows.append((name, case.name, dname, k, fa, fr, agree, ba, "PASS" if ok else "FAIL", err))
    header = ("op", "case", "dtype", "kernel", "fwd max abs", "fwd max rel", "index agree", "bwd max abs", "result")
    print("| " + " | ".join(header) + " |", file=out)
    print("|" + "---|" * len(header), file=out)
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]:.2e} | {r[5]:.2e} | {r[6]:.3f} | {r[7]:.2e} | "
              f"{r[8]}{' ' + r[9] if r[9] else ''} |", file=out)
    if not rows:
        print("no kernel to check on this device", file=out)
    print(f"\n{sum(r[8] == 'PASS' for r in rows)} passed, {sum(r[8] == 'FAIL' for r in rows)} failed", file=out)
    return all_ok


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fasttrack.check", description=__doc__.split("\n\n")[1])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    p.add_argument("--dtype", default="float32,float16,bfloat16", help="comma-separated: " + ",".join(DTYPES))
    p.add_argument("--op", default="", help="comma-separated op names (default: all)")
    p.add_argument("--kernel", default="", help="comma-separated: native,triton,cuda (default: all available)")
    a = p.parse_args(argv)
    split = lambda s: [t for t in s.split(",") if t]  # noqa: E731
    bad = [d for d in split(a.dtype) if d not in DTYPES]
    if bad:
        p.error(f"--dtype: unknown {bad}; choose from {list(DTYPES)}")
    unknown = [o for o in split(a.op) if o not in REGISTRY]
    if unknown:
        p.error(f"--op: unknown {unknown}; ops are {list(REGISTRY)}")
    return 0 if run(a.device, split(a.dtype), split(a.op), split(a.kernel)) else 1


if __name__ == "__main__":
    sys.exit(main())
