"""Ahead-of-time compilation of the Triton kernels for sm_80 / sm_90 without a GPU.

Every kernel module in `fasttrack.kernels` lists, in ``AOT_SPECS``, one `AotSpec` per signature
its launcher compiles (dtypes, constexpr block sizes, warps). `compile_report` compiles one with
`triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))` and reruns the produced PTX
through ptxas -v to read registers and spills. `python -m fasttrack.kernels._aot` prints the table
for every spec and exits non-zero on a spill or a compile error. Run it with TRITON_INTERPRET=0
(else `fasttrack.kernels` turns the interpreter on where there is no GPU, and it replaces @triton.jit).
"""
from __future__ import annotations

import dataclasses
import importlib
import os
import re
import subprocess
import sys
import tempfile
from typing import Any

KERNEL_MODULES = ("topk_select", "merge_tokens", "pruned_linear")
ARCHS = (80, 90)


@dataclasses.dataclass
class AotSpec:
    kernel: Any                 # the @triton.jit function
    signature: dict             # {arg: "*fp32" | "i32" | "fp32" | ...} for runtime args
    constexprs: dict            # {arg: value}
    num_warps: int = 4
    num_stages: int = 3
    name: str = ""              # label, e.g. "fp16/L1024"


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
    sig = {a: sig[a] for a in fn.arg_names}
    # torch allocations are 16-byte aligned: Triton specialises pointers that way at launch
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in sig if sig[a].startswith("*")}
    k = triton.compile(ASTSource(fn, sig, constexprs=spec.constexprs, attrs=attrs),
                       target=GPUTarget("cuda", arch, 32),
                       options=dict(num_warps=spec.num_warps, num_stages=spec.num_stages))
    ptxas = get_ptxas(arch).path
    with tempfile.TemporaryDirectory() as d:
        ptx = os.path.join(d, "k.ptx")
        with open(ptx, "w") as fh:
            fh.write(k.asm["ptx"])
        cmd = [ptxas, "-v", f"--gpu-name={sm_arch_from_capability(arch)}", ptx, "-o", os.path.join(d, "k.cubin")]
        r = subprocess.run(cmd, capture_output=True, text=True)
    log = r.stdout + r.stderr
    if r.returncode:
        raise RuntimeError(f"ptxas failed for {fn.__name__}:\n{log}")

    def num(pat):
        m = re.search(pat, log)
        return int(m.group(1)) if m else 0

    return dict(kernel=fn.__name__, name=spec.name, arch=arch, registers=num(r"Used (\d+) registers"),
                spill_stores=num(r"(\d+) bytes spill stores"), spill_loads=num(r"(\d+) bytes spill loads"),
                shared=k.metadata.shared, num_warps=spec.num_warps)


def all_specs():
    for mod in KERNEL_MODULES:
        m = importlib.import_module(f"fasttrack.kernels.{mod}")
        for spec in getattr(m, "AOT_SPECS", ()):
            yield mod, spec


def main() -> int:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("run with TRITON_INTERPRET=0: the interpreter replaces @triton.jit kernels", file=sys.stderr)
        return 2
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    bad = 0
    print(f"{'module':<14} {'kernel':<28} {'spec':<22} {'sm':>3} {'regs':>5} {'spill st/ld':>12} {'smem':>7}")
    for mod, spec in all_specs():
        for arch in ARCHS:
            try:
                r = compile_report(spec, arch)
            except Exception as e:  # report every failure, then fail
                print(f"{mod:<14} {spec.kernel.__name__:<28} {spec.name:<22} {arch:>3} COMPILE ERROR: {e}")
                bad += 1
                continue
            spill = r["spill_stores"] + r["spill_loads"]
            bad += spill > 0
            print(f"{mod:<14} {r['kernel']:<28} {r['name']:<22} {arch:>3} {r['registers']:>5} "
                  f"{r['spill_stores']:>5}/{r['spill_loads']:<6} {r['shared']:>7}" + ("  SPILLS" if spill else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
