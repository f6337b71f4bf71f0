"""Ahead-of-time compilation of the Triton kernels for sm_80 / sm_90 without a GPU.

Every kernel module in `fasttrack.kernels` lists, in ``AOT_SPECS``, one `AotSpec` per signature
its launcher compiles (dtypes, constexpr block sizes, warps). `compile_report` compiles one with
`triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))` and reruns the produced PTX
through ptxas -v, with the flags Triton's own cubin step uses, to read registers and spills (the
cubin metadata that holds them is only filled in by loading it on a GPU).

    TRITON_INTERPRET=0 python -m fasttrack.kernels._aot [--jobs N] [--json FILE] [--modules a.b,c.d]

prints the table for every spec and exits non-zero on a spill, a compile error or a module that
does not import. Run it with TRITON_INTERPRET=0 (else `fasttrack.kernels` turns the interpreter on
where there is no GPU, and it replaces @triton.jit). FP fusion is pinned: TRITON_DEFAULT_FP_FUSION
(default 1, what the JIT launchers get) is passed to the compiler explicitly and reported.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import importlib
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
from typing import Any

KERNEL_MODULES = ("topk_select", "merge_tokens", "pruned_linear")
ARCHS = (80, 90)
FLOAT_TYPES = ("fp32", "fp16", "bf16")


@dataclasses.dataclass
class AotSpec:
    kernel: Any                 # the @triton.jit function
    signature: dict             # {arg: "*fp32" | "i32" | "fp32" | ...} for runtime args
    constexprs: dict            # {arg: value}
    num_warps: int = 4
    num_stages: int = 3
    name: str = ""              # label, e.g. "fp16/L1024"

    @property
    def dtype(self) -> str | None:
        """The data dtype this signature serves: the half type among its float pointers if any
        (fp32 pointers beside it are scratch/accumulators), else fp32, else None (index-only)."""
        types = {t[1:] for t in self.signature.values() if t.startswith("*") and t[1:] in FLOAT_TYPES}
        return next((t for t in ("fp16", "bf16", "fp32") if t in types), None)


def fp_fusion() -> bool:
    return os.environ.get("TRITON_DEFAULT_FP_FUSION", "1").lower() not in ("0", "false", "off", "no")


def compile_report(spec: AotSpec, arch: int) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
    from triton.compiler import ASTSource

    fn = spec.kernel
    sig = {**dict.fromkeys(spec.constexprs, "constexpr"), **spec.signature}
    missing = [a for a in fn.arg_names if a not in sig]
    if missing:
        raise ValueError(f"{fn.__name__}: AotSpec does not name arguments {missing}")
    unknown = [a for a in sig if a not in fn.arg_names]
    if unknown:
        raise ValueError(f"{fn.__name__}: AotSpec names arguments the kernel does not have: {unknown}")
    sig = {a: sig[a] for a in fn.arg_names}
    # torch allocations are 16-byte aligned: Triton specialises pointers that way at launch
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in sig if sig[a].startswith("*")}
    fusion = fp_fusion()
    k = triton.compile(ASTSource(fn, sig, constexprs=spec.constexprs, attrs=attrs),
                       target=GPUTarget("cuda", arch, 32),
                       options=dict(num_warps=spec.num_warps, num_stages=spec.num_stages, enable_fp_fusion=fusion))
    ptxas = get_ptxas(arch).path
    with tempfile.TemporaryDirectory() as d:
        ptx = os.path.join(d, "k.ptx")
        with open(ptx, "w") as fh:
            fh.write(k.asm["ptx"])
        # The flags of triton's make_cubin (backends/nvidia/compiler.py): register allocation
        # depends on them (--regAllocOptLevel=2 works around a ptxas 13 bug there).
        cmd = [ptxas, "-lineinfo", *([] if fusion else ["--fmad=false"]), "-v", "--regAllocOptLevel=2",
               f"--gpu-name={sm_arch_from_capability(arch)}", ptx, "-o", os.path.join(d, "k.cubin")]
        r = subprocess.run(cmd, capture_output=True, text=True)
    log = r.stdout + r.stderr
    if r.returncode:
        raise RuntimeError(f"ptxas failed for {fn.__name__}:\n{log}")
    if "bytes spill stores" not in log:
        raise RuntimeError(f"no ptxas -v resource report for {fn.__name__}:\n{log}")

    def total(pat):  # summed over every function ptxas reports (the kernel and any noinline callee)
        return sum(int(m) for m in re.findall(pat, log))

    regs = [int(m) for m in re.findall(r"Used (\d+) registers", log)]
    return dict(kernel=fn.__name__, name=spec.name, dtype=spec.dtype, arch=arch, registers=max(regs, default=0),
                spill_stores=total(r"(\d+) bytes spill stores"), spill_loads=total(r"(\d+) bytes spill loads"),
                shared=k.metadata.shared, num_warps=spec.num_warps, fp_fusion=fusion)


def all_specs(modules=None):
    """(module, index, spec) for every spec; a module that fails to import yields (module, None, error)."""
    for mod in modules or [f"fasttrack.kernels.{m}" for m in KERNEL_MODULES]:
        try:
            m = importlib.import_module(mod)
        except Exception as e:
            yield mod, None, e
            continue
        for i, spec in enumerate(getattr(m, "AOT_SPECS", ())):
            yield mod, i, spec


def _compile_job(mod: str, index: int, arch: int) -> dict:
    spec = importlib.import_module(mod).AOT_SPECS[index]
    try:
        return compile_report(spec, arch)
    except Exception as e:  # reported in the table, then the run fails
        return dict(kernel=spec.kernel.__name__, name=spec.name, dtype=spec.dtype, arch=arch,
                    error=f"{type(e).__name__}: {e}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fasttrack.kernels._aot", description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=int(os.environ.get("MAX_JOBS", os.cpu_count() or 1)),
                    help="parallel compiles (default: MAX_JOBS or the CPU count)")
    ap.add_argument("--json", help="also write every report (and import errors) to this JSON file")
    ap.add_argument("--modules", help="comma-separated importable modules to compile instead of "
                                      f"fasttrack.kernels.{{{','.join(KERNEL_MODULES)}}}")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("run with TRITON_INTERPRET=0: the interpreter replaces @triton.jit kernels", file=sys.stderr)
        return 2
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # also silences Triton 3.9's warning
    modules = args.modules.split(",") if args.modules else None

    jobs, import_errors = [], {}
    for mod, i, spec in all_specs(modules):
        if i is None:
            import_errors[mod] = f"{type(spec).__name__}: {spec}"
        else:
            jobs += [(mod, i, arch) for arch in ARCHS]
    print(f"fp_fusion={fp_fusion()}  archs={ARCHS}  compiles={len(jobs)}  jobs={args.jobs}")
    for mod, err in import_errors.items():
        print(f"{mod}: IMPORT ERROR: {err}")
    if args.jobs > 1 and len(jobs) > 1:
        # fork: the workers inherit the imported modules (and TRITON_INTERPRET=0)
        with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("fork")) as ex:
            reports = list(ex.map(_compile_job, *zip(*jobs)))
    else:
        reports = [_compile_job(*j) for j in jobs]

    bad = len(import_errors)
    print(f"{'module':<14} {'kernel':<28} {'spec':<22} {'sm':>3} {'regs':>5} {'spill st/ld':>12} {'smem':>7}")
    for (mod, _, _), r in zip(jobs, reports):
        r["module"] = mod
        short = mod.rpartition(".")[2]
        if "error" in r:
            print(f"{short:<14} {r['kernel']:<28} {r['name']:<22} {r['arch']:>3} COMPILE ERROR: {r['error']}")
            bad += 1
            continue
        spill = r["spill_stores"] + r["spill_loads"]
        bad += spill > 0
        print(f"{short:<14} {r['kernel']:<28} {r['name']:<22} {r['arch']:>3} {r['registers']:>5} "
              f"{r['spill_stores']:>5}/{r['spill_loads']:<6} {r['shared']:>7}" + ("  SPILLS" if spill else ""))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(fp_fusion=fp_fusion(), archs=list(ARCHS), import_errors=import_errors, reports=reports),
                      fh, indent=1)
    print(f"{len(reports) - sum('error' in r for r in reports)} compiled, {bad} failed")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
