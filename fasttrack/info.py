"""`python -m fasttrack.info`: versions, whether `fasttrack._C` loaded (and why not), CUDA / Triton
availability, and which kernel serves each op on each device under the current backend."""
from __future__ import annotations

import os
import platform
import sys

import torch

import fasttrack
from fasttrack import _extension
from fasttrack.backend import current_backend
from fasttrack.ops._registry import REGISTRY, serving_kernel


def _cpuinfo() -> dict:
    info = {}
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if not line.strip():
                    break   # the first processor is enough
                k, _, v = line.partition(":")
                info[k.strip()] = v.strip()
    except OSError:
        pass
    return info


def _microarchitecture(vendor: str, family: int | None, model: int | None) -> str | None:
    """AMD Zen generation from family / model (the generations this project's machines vary
    between, and that execute AVX-512 differently: Zen 4 as two 256-bit halves, Zen 5 natively)."""
    if vendor != "AuthenticAMD" or family is None or model is None:
        return None
    if family == 0x1A:
        return "Zen 5"
    if family == 0x19:
        return "Zen 4" if (0x10 <= model <= 0x1F or 0x60 <= model <= 0xAF) else "Zen 3"
    if family == 0x17:
        return "Zen 1/2"
    return None


def cpu_description() -> dict:
    """The CPU and the vector ISA the kernels use: ``model``, ``vendor``, ``family``, ``model_id``,
    ``uarch`` (e.g. "Zen 4"), ``flags`` (the vector features that matter here), ``isa`` (fasttrack's
    CPU kernels' level, capped by ATEN_CPU_CAPABILITY) and ``aten_isa`` (PyTorch's)."""
    info = _cpuinfo()

    def num(k):
        try:
            return int(info[k], 0)
        except (KeyError, ValueError):
            return None
    flags = set(info.get("flags", "").split())
    wanted = ("avx2", "fma", "avx512f", "avx512bw", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")
    isa = _extension._C.cpu_isa() if _extension.loaded else "reference (no _C)"
    try:
        aten = torch.backends.cpu.get_cpu_capability()
    except Exception:  # older torch
        aten = "?"
    vendor, family, model = info.get("vendor_id", "?"), num("cpu family"), num("model")
    return dict(model=info.get("model name", platform.processor() or platform.machine()), vendor=vendor,
                family=family, model_id=model, uarch=_microarchitecture(vendor, family, model),
                flags=[f for f in wanted if f in flags], isa=isa, aten_isa=aten, cores=os.cpu_count())


def cpu_line() -> str:
    """One line for benchmark and demo headers: model, family/model, microarchitecture, ISA in use."""
    d = cpu_description()
    fam = f"family {d['family']} model {d['model_id']}" if d["family"] is not None else "family ?"
    uarch = f", {d['uarch']}" if d["uarch"] else ""
    return (f"CPU: {d['model']} ({fam}{uarch}), {d['cores']} cores; vector ISA in use: fasttrack {d['isa']}, "
            f"ATen {d['aten_isa']}; flags {' '.join(d['flags']) or '-'}")


def report() -> str:
    lines = [f"fasttrack {fasttrack.__version__}  (python {platform.python_version()}, {platform.machine()})",
             f"torch {torch.__version__}  (CUDA build: {torch.version.cuda}, CUDA available: "
             f"{torch.cuda.is_available()}, threads: {torch.get_num_threads()})", cpu_line()]
    try:
        import triton
        import fasttrack.kernels as k
        lines.append(f"triton {triton.__version__}  (interpreter on CPU tensors: {k.INTERPRET})")
    except Exception as e:  # triton is optional at import time
        lines.append(f"triton: not available ({type(e).__name__}: {e})")
    if _extension.loaded:
        lines.append(f"fasttrack._C: loaded (CUDA kernels built: {_extension.cuda_built()}; CPU kernels' vector ISA: "
                     f"{_extension._C.cpu_isa()}, capped by ATEN_CPU_CAPABILITY)")
        lines.append(f"large-output cache: {_extension.cached_bytes() >> 20} MiB free buffers held, limit "
                     f"{_extension._C.output_cache_limit() >> 20} MiB (FASTTRACK_CPU_CACHE_MB)")
    else:
        lines.append(f"fasttrack._C: NOT loaded — {_extension.load_error}")
    lines.append(f"backend: {current_backend()}  (FASTTRACK_BACKEND=auto|native|triton|reference)")
    lines.append("")
    lines.append(f"{'op':<22} {'CPU':<36} {'CUDA':<28} registered dispatch keys")
    for name in REGISTRY:
        keys = [k for k in ("CPU", "CUDA", "Meta", "Autograd")
                if torch._C._dispatch_has_kernel_for_dispatch_key(f"fasttrack::{name}", k)]
        lines.append(f"{name:<22} {serving_kernel(name, 'cpu'):<36} {serving_kernel(name, 'cuda'):<28} "
                     f"{','.join(keys)}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
    sys.exit(0)
