"""This machine's measured limits, for the benchmark tables: copy bandwidth (DRAM and last-level
cache), fp32 GEMM throughput, the CPU and ISA, and a CUDA device's bandwidth / GEMM rates."""
from __future__ import annotations

import os
import platform
import time

import torch


def best_of(fn, reps=5):
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def llc_bytes() -> int:
    try:
        with open("/sys/devices/system/cpu/cpu0/cache/index3/size") as fh:
            v = fh.read().strip()
        return int(v[:-1]) * {"K": 2**10, "M": 2**20}[v[-1]] if v[-1] in "KM" else int(v)
    except (OSError, ValueError):
        return 16 * 2**20


def copy_bandwidth(nbytes: int) -> float:
    n = nbytes // 4
    src, dst = torch.randn(n), torch.empty(n)
    return 2 * n * 4 / best_of(lambda: dst.copy_(src), reps=20)


def measure_device(device: str) -> dict:
    """A CUDA device's copy bandwidth (bytes read + written, 1 GiB through DRAM) and dense GEMM
    throughput (fp32 without TF32, and bf16), measured with CUDA events in this run."""
    from bench.harness import cuda_median_ms
    n = 2**28
    src, dst = torch.randn(n, device=device), torch.empty(n, device=device)
    bw = 2 * n * 4 / (cuda_median_ms(dst.copy_, src) / 1e3)
    del src, dst
    out = dict(device=device, gpu=torch.cuda.get_device_name(device), device_bandwidth_gbs=bw / 1e9)
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a = torch.randn(8192, 8192, device=device, dtype=dt)
        out[f"device_gemm_{name}_tflops"] = 2 * 8192**3 / (cuda_median_ms(torch.matmul, a, a) / 1e3) / 1e12
    torch.backends.cuda.matmul.allow_tf32 = prev
    return out


def measure_machine(device: str = "cpu") -> dict:
    """Copy bandwidth (bytes read + written) from DRAM and from the last-level cache, and the fp32
    GEMM throughput of the fastest path fasttrack uses (oneDNN with a pre-packed weight); with a
    CUDA ``device``, that device's too (`measure_device`)."""
    from fasttrack.nn.linear import FastLinear
    llc = llc_bytes()
    bw = copy_bandwidth(256 * 2**20)          # well past the last-level cache
    cache_bw = copy_bandwidth(llc // 4)       # source + destination fit in it
    lin = FastLinear(2048, 2048, bias=False).eval()
    a = torch.randn(2048, 2048)
    with torch.no_grad():
        gemm = 2 * 2048**3 / best_of(lambda: lin(a))
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    from fasttrack.info import cpu_description
    d = cpu_description()
    out = dict(cpu=cpu, cpu_isa=d["isa"], cpu_family=d["family"], cpu_model=d["model_id"], cpu_uarch=d["uarch"],
               cores=os.cpu_count(), threads=torch.get_num_threads(),
               torch=torch.__version__, python=platform.python_version(), bandwidth_gbs=bw / 1e9,
               cache_bandwidth_gbs=cache_bw / 1e9, llc_bytes=llc, gemm_gflops=gemm / 1e9,
               cuda=torch.cuda.get_device_name() if torch.cuda.is_available() else None, device="cpu")
    if device != "cpu":
        out.update(measure_device(device))
    return out


def machine_line(machine: dict) -> str:
    uarch = f", {machine['cpu_uarch']}" if machine.get("cpu_uarch") else ""
    line = (f"Machine: {machine['cpu']} (family {machine.get('cpu_family')} model {machine.get('cpu_model')}{uarch}; "
            f"vector ISA {machine.get('cpu_isa', '?')}), {machine['cores']} cores, "
            f"{machine['threads']} threads, torch {machine['torch']}; measured copy bandwidth "
            f"{machine['bandwidth_gbs']:.1f} GB/s (DRAM), {machine['cache_bandwidth_gbs']:.0f} GB/s (last-level cache, "
            f"{machine['llc_bytes'] >> 20} MiB), fp32 GEMM {machine['gemm_gflops']:.0f} GFLOP/s (oneDNN, packed weight).")
    if machine.get("device", "cpu") != "cpu":
        line += (f" Device: {machine['gpu']}, copy {machine['device_bandwidth_gbs']:.0f} GB/s, GEMM "
                 f"{machine['device_gemm_fp32_tflops']:.0f} TFLOP/s fp32 / {machine['device_gemm_bf16_tflops']:.0f} bf16 "
                 "(CUDA events, this run); every time below is on the device.")
    return line
