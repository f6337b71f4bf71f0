#!/usr/bin/env python3
# Vendored from the workplace developer tools (shared/tools/triton_traffic.py) so that `python -m bench
# traffic`, `make aot` and tests/test_triton_traffic.py run wherever the repository is checked out.
"""triton_traffic -- GPU-free memory-traffic, FLOP and register/spill signals for Triton kernels.

Set TRITON_INTERPRET=1 before triton and your kernel modules are imported (`TRITON_INTERPRET=1 pytest`):
    from triton_traffic import traffic, aot_resources
    with traffic() as t:             # records every interpreted Triton launch made inside the block
        out = my_launcher(x, y)      # CPU tensors; any number of kernels and launches
    t.report()                       # {"launches": [dict per launch], "by_kernel": {...}, "total": {...}}
    print(t.table())                 # one row per launch, plus the total
    t.model(bandwidth=3.35e12)       # modelled H100 seconds: bytes / bandwidth, dot FLOPs / peak
    aot_resources(my_kernel, {"x_ptr": "*fp32", "n": "i32"}, {"BLOCK": 1024}, arch=90)
    # -> {"registers": 26, "spill_stores": 0, "spill_loads": 0, "shared": 0, ...}   (no GPU needed)
    python triton_traffic.py --self-test    # checks the tool on two demo kernels; exit 1 on failure

Record fields, summed over all programs of a launch (ld = loads, st = stores):
  ld_req, st_req           requested bytes: active (unmasked) lanes x element size
  ld/st_req_sectors        per op and program, distinct 32-byte sectors x 32; req / req_sectors well
                           below 1 means strided or uncoalesced access (table column coal%)
  ld_unique, st_unique     distinct addresses x element size (DRAM bytes with a perfect cache)
  ld_sectors, st_sectors   distinct 32-byte sectors x 32 (the same at DRAM granularity)
  atomic_req               bytes of atomic RMW/CAS lanes (each also counts as one load and one store)
  flops, mma_flops         2*M*N*K per tl.dot, padding lanes included; mma_flops by kind (fp16 = fp16
                           or bf16, tf32, fp32 = ieee, fp8, int8, fp64), tf32x3/bf16x3/bf16x6 per pass
Seen: tl.load/tl.store (masked or not), tensor-descriptor load/store/gather/scatter, atomics, tl.dot.
Not seen: caches or reuse across launches (totals add launches), tl.dot_scaled and non-dot FLOPs.
"""
import inspect
import math
import os
import pickle
import re
import subprocess
import sys
import tempfile

if __name__ == "__main__":  # the CLI self-test needs the interpreter on before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")
import numpy as np
import triton
import triton.language as tl

SECTOR = 32                   # bytes: DRAM/L2 access granularity of NVIDIA GPUs
H100_BW = 3.35e12             # H100 SXM HBM3 bytes/s; dense peak FLOP/s by dot kind below
PEAKS = {"fp16": 989e12, "tf32": 494e12, "fp32": 67e12, "fp8": 1979e12, "int8": 1979e12, "fp64": 67e12}
_COMPACT_AT = 1 << 22         # deduplicate buffered addresses once this many are pending
_FIELDS = [f"{k}_{f}" for k in ("ld", "st") for f in ("req", "req_sectors", "unique", "sectors")]
_ACTIVE, _SAVED = [], []      # recorders inside their `with`; (object, attr, original) patches


def _uniq(a):  # sorted distinct values; np.unique (hash-based in numpy >= 2.3) is ~100x slower here
    a = np.sort(a)
    return a[np.concatenate(([True], a[1:] != a[:-1]))] if a.size else a


def _sector_ids(addr, size):  # an element may straddle a sector boundary: count both of its ends
    return _uniq(np.concatenate([addr // SECTOR, (addr + (size - 1)) // SECTOR]))


class _Launch:
    """Counters of one kernel launch; addresses are buffered per element size, deduplicated lazily."""

    def __init__(self, name, constexprs):
        self.rec = dict(kernel=name, constexprs=constexprs, grid=None, programs=0, atomic_req=0,
                        flops=0, mma_flops={}, **dict.fromkeys(_FIELDS, 0))
        self.addrs, self.pending = {"ld": {}, "st": {}}, 0

    def access(self, kind, ptrs, mask, size):  # -> number of active lanes
        addr = ptrs.data if mask is None else ptrs.data[np.broadcast_to(mask.data, ptrs.data.shape)]
        addr = np.asarray(addr, dtype=np.uint64).ravel()
        self.rec[kind + "_req"] += addr.size * size
        self.rec[kind + "_req_sectors"] += _sector_ids(addr, size).size * SECTOR
        self.addrs[kind].setdefault(size, []).append(addr)
        self.pending += addr.size
        if self.pending >= _COMPACT_AT:
            self._compact()
        return addr.size

    def _compact(self):
        for per_size in self.addrs.values():
            for size, bufs in per_size.items():
                per_size[size] = [_uniq(np.concatenate(bufs))]
        self.pending = 0

    def finish(self):
        self._compact()
        for kind, per_size in self.addrs.items():
            self.rec[kind + "_unique"] = sum(b[0].size * s for s, b in per_size.items())
            sec = [_sector_ids(b[0], s) for s, b in per_size.items()]
            self.rec[kind + "_sectors"] = (_uniq(np.concatenate(sec)).size if sec else 0) * SECTOR
        self.addrs = None
        return self.rec


def _each(fn):  # apply fn to the open launch record of every active recorder
    for t in _ACTIVE:
        if t._cur is not None:
            fn(t._cur)


def _size(ptrs):  # element bytes behind a pointer handle (int1 is stored as one byte)
    return max(1, ptrs.get_element_ty().primitive_bitwidth // 8)


def _atomic(L, ptr, mask):  # an atomic reads and writes every active lane
    L.access("st", ptr, mask, _size(ptr))
    L.rec["atomic_req"] += L.access("ld", ptr, mask, _size(ptr)) * _size(ptr)


def _dot(a, b, precision):
    *batch, m, k = a.data.shape
    flops, dt, prec = 2 * math.prod(batch) * m * k * b.data.shape[-1], a.dtype, getattr(precision, "name", "")
    if dt == tl.float32:  # fp32 operands run on tf32 tensor cores unless input_precision="ieee"
        kind, passes = {"TF32": ("tf32", 1), "TF32x3": ("tf32", 3), "BF16x3": ("fp16", 3),
                        "BF16x6": ("fp16", 6)}.get(prec, ("fp32", 1))
    else:
        kind, passes = ("fp8" if dt.is_fp8() else "int8" if dt in (tl.int8, tl.uint8) else
                        "fp64" if dt == tl.float64 else "fp16"), 1

    def rec(L):
        L.rec["flops"] += flops
        L.rec["mma_flops"][kind] = L.rec["mma_flops"].get(kind, 0) + passes * flops
    _each(rec)


def _launch(orig):  # GridExecutor.__call__ runs one whole launch: open a record, close it after
    def call(self, *args, **kwargs):
        bound = {**dict(zip(self.arg_names, args)), **kwargs}
        for t in _ACTIVE:
            t._cur = _Launch(self.fn.__name__, {k: bound[k] for k in self.constexprs if k in bound})
        try:
            return orig(self, *args, **kwargs)
        finally:
            for t in _ACTIVE:
                if t._cur is not None:
                    t.launches.append(t._cur.finish())
                t._cur = None
    return call


def _compiled_run(orig):  # a JITFunction launched in interpreter mode was made before TRITON_INTERPRET=1
    def run(self, *args, **kwargs):
        if not kwargs.get("warmup"):
            raise RuntimeError(f"triton_traffic: kernel '{self.__name__}' is a compiled-mode JITFunction the "
                               "interpreter cannot see: set TRITON_INTERPRET=1 in the environment before "
                               "triton and the module defining the kernel are imported.")
        return orig(self, *args, **kwargs)
    return run


def _install():
    from triton.runtime import interpreter
    from triton.runtime.jit import JITFunction
    # Hooks run before the methods of the one builder all interpreted tl.* calls go through. Every memory
    # access ends in create_masked_load/store (plain, atomic, descriptor, gather/scatter loads and stores
    # delegate to them) or an atomic RMW/CAS; some callers pass keywords after the leading positionals.
    hooks = {"create_masked_load": lambda p, mask, *a, **k: _each(lambda L: L.access("ld", p, mask, _size(p))),
             "create_masked_store": lambda p, v, mask, *a, **k: _each(lambda L: L.access("st", p, mask, _size(p))),
             "create_atomic_rmw": lambda op, p, v, mask, *a, **k: _each(lambda L: _atomic(L, p, mask)),
             "create_atomic_cas": lambda p, *a, **k: _each(lambda L: _atomic(L, p, None)),
             "create_dot": lambda a, b, d, precision=None, *r, **k: _dot(a, b, precision),
             "set_grid_dim": lambda x, y, z: _each(lambda L: L.rec.update(grid=(x, y, z), programs=x * y * z))}
    b = interpreter.interpreter_builder
    patches = [(b, name, lambda orig, h=h: lambda *a, **k: (h(*a, **k), orig(*a, **k))[1])
               for name, h in hooks.items()]
    patches += [(interpreter.GridExecutor, "__call__", _launch), (JITFunction, "run", _compiled_run)]
    for obj, name, make in patches:
        _SAVED.append((obj, name, vars(obj).get(name)))  # None: it was not in the instance's own dict
        setattr(obj, name, make(getattr(obj, name)))


def _uninstall():
    while _SAVED:
        obj, name, original = _SAVED.pop()
        setattr(obj, name, original) if original is not None else delattr(obj, name)


def _sum(recs, name):
    out = dict(kernel=name, launches=len(recs), programs=0, atomic_req=0, flops=0, mma_flops={},
               **dict.fromkeys(_FIELDS, 0))
    for r in recs:
        for f in ["programs", "atomic_req", "flops"] + _FIELDS:
            out[f] += r[f]
        for k, v in r["mma_flops"].items():
            out["mma_flops"][k] = out["mma_flops"].get(k, 0) + v
    return out


class traffic:
    """Context manager recording loads, stores and dot FLOPs of every interpreted Triton launch.
    strict=True (default) raises at exit if nothing was launched (e.g. the code took a non-Triton
    path), so a report is never silently empty. Nested traffic() blocks each see their launches."""

    def __init__(self, strict=True):
        self.strict, self.launches, self._cur = strict, [], None

    def __enter__(self):
        if not triton.knobs.runtime.interpret:
            raise RuntimeError("triton_traffic: the Triton interpreter is off. Set TRITON_INTERPRET=1 in the "
                               "environment before triton and your kernel modules are imported (e.g. "
                               "`TRITON_INTERPRET=1 python bench.py`); kernels made before that cannot be traced.")
        if not _ACTIVE:
            try:
                _install()
            except AttributeError as e:
                _uninstall()
                raise RuntimeError(f"triton_traffic needs triton 3.9 interpreter internals (have "
                                   f"{triton.__version__}): {e}") from e
        _ACTIVE.append(self)
        return self

    def __exit__(self, exc_type, exc, tb):
        _ACTIVE.remove(self)
        if not _ACTIVE:
            _uninstall()
        if exc_type is None and self.strict and not self.launches:
            raise RuntimeError("triton_traffic: no Triton kernel was launched inside traffic() "
                               "(use traffic(strict=False) if that is expected)")

    def report(self):
        groups = {}
        for r in self.launches:
            groups.setdefault(r["kernel"], []).append(r)
        return {"launches": [dict(r) for r in self.launches], "total": _sum(self.launches, "TOTAL"),
                "by_kernel": {k: _sum(v, k) for k, v in groups.items()}}

    def model(self, bandwidth=H100_BW, peaks=None):
        """Modelled seconds per launch and in total. t_unique, t_sectors, t_requested: load+store bytes
        (unique; unique 32-B sectors; requested = L2-unfriendly upper bound) / bandwidth; t_compute:
        mma_flops / peaks (a dict by kind, or one number for all); t_roofline = max(t_sectors, t_compute)."""
        pk = dict.fromkeys(PEAKS, peaks) if isinstance(peaks, (int, float)) else {**PEAKS, **(peaks or {})}

        def one(r):
            m = {"kernel": r["kernel"], "t_compute": sum(v / pk[k] for k, v in r["mma_flops"].items())}
            for key, f in (("t_unique", "unique"), ("t_sectors", "sectors"), ("t_requested", "req")):
                m[key] = (r["ld_" + f] + r["st_" + f]) / bandwidth
            m["t_roofline"] = max(m["t_sectors"], m["t_compute"])
            m["bound"] = "compute" if m["t_compute"] > m["t_sectors"] else "memory"
            return m
        rep = self.report()
        return {"launches": [one(r) for r in rep["launches"]], "total": one(rep["total"]), "peaks": pk}

    def table(self, bandwidth=H100_BW, peaks=None):
        rep, mod = self.report(), self.model(bandwidth, peaks)
        rows = [("kernel", "grid", "ld_req", "ld_unique", "st_req", "st_unique", "sectors", "coal%", "GFLOP",
                 "t_unique_us", "t_req_us", "t_mma_us")]
        for r, m in zip(rep["launches"] + [rep["total"]], mod["launches"] + [mod["total"]]):
            coal = (r["ld_req"] + r["st_req"]) / max(1, r["ld_req_sectors"] + r["st_req_sectors"])
            rows.append((r["kernel"][:24], "x".join(map(str, r.get("grid") or "-")), r["ld_req"], r["ld_unique"],
                         r["st_req"], r["st_unique"], r["ld_sectors"] + r["st_sectors"], f"{100 * coal:.0f}",
                         f"{r['flops'] / 1e9:.4g}", *(f"{m[k] * 1e6:.3g}" for k in ("t_unique", "t_requested",
                                                                                    "t_compute"))))
        w = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
        return "\n".join("  ".join(str(c).rjust(w[i]) for i, c in enumerate(row)) for row in rows)


def _unwrap(fn):  # Autotuner / Heuristics keep the kernel in .fn; stop at the @triton.jit object
    for _ in range(8):
        if not hasattr(fn, "fn") or inspect.isfunction(fn.fn):
            break
        fn = fn.fn
    return fn


def aot_resources(jit_fn, signature, constexprs=None, arch=90, num_warps=4, num_stages=3, ptxas=None,
                  divisible_by_16=None, **options):
    """Compile `jit_fn` for sm_<arch> without a GPU; return ptxas' register/spill report and shared memory.

    signature: {arg: "*fp16" | "i32" | ...} for runtime args; constexprs: {arg: value}.
    divisible_by_16: args specialised as multiples of 16, as Triton does at launch; default: every
    pointer arg (torch allocations are aligned). ptxas: default the ptxas Triton uses for `arch`;
    with another (e.g. the CUDA toolkit's own ptxas) the PTX version is pinned to one both accept.
    Returns registers, spill_stores, spill_loads, stack_frame (bytes), shared (dynamic shared memory
    Triton requests at launch), ptxas_smem (static), ptxas_log. **options go to triton.compile."""
    kw = dict(signature=signature, constexprs=dict(constexprs or {}), arch=arch, num_warps=num_warps,
              num_stages=num_stages, ptxas=ptxas, divisible_by_16=divisible_by_16, **options)
    fn = _unwrap(jit_fn)
    if not inspect.isfunction(getattr(fn, "fn", None)):
        raise TypeError(f"aot_resources: expected a @triton.jit kernel, got {jit_fn!r}")
    sig = {**dict.fromkeys(kw["constexprs"], "constexpr"), **signature}
    missing, unknown = [a for a in fn.arg_names if a not in sig], [a for a in sig if a not in fn.arg_names]
    if missing or unknown:
        raise ValueError(f"aot_resources({fn.__name__}): signature + constexprs must name every argument of "
                         f"{tuple(fn.arg_names)}; missing {missing}, unknown {unknown}")
    if triton.knobs.runtime.interpret:
        # Here every @triton.jit object (tl.zeros, tl.sum, ... too) is interpreter-only and the interpreter
        # leaves tl.* patched after device-function calls, so triton.compile cannot run in this process:
        # compile in a child that re-imports the kernel's module with the interpreter off.
        f = fn.fn
        if "<locals>" in f.__qualname__:
            raise ValueError(f"aot_resources: under TRITON_INTERPRET=1 the kernel must be defined at module "
                             f"level (got {f.__qualname__}); or call aot_resources with TRITON_INTERPRET unset")
        with tempfile.TemporaryDirectory() as d:
            io = os.path.join(d, "io.pkl")
            with open(io, "wb") as fh:
                pickle.dump(kw, fh)
            env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
            r = subprocess.run([sys.executable, os.path.abspath(__file__), "--aot-child", f.__module__,
                                inspect.getsourcefile(f), f.__qualname__, io], env=env, capture_output=True, text=True)
            if r.returncode:
                raise RuntimeError(f"aot_resources({f.__qualname__}): compile process (TRITON_INTERPRET=0, "
                                   f"module re-imported) failed:\n{r.stderr[-6000:]}")
            with open(io, "rb") as fh:
                return pickle.load(fh)
    from triton.compiler import ASTSource
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas, ptx_get_version, sm_arch_from_capability
    exe = ptxas or get_ptxas(arch).path
    if ptxas:  # emit PTX that both this ptxas and Triton's own (which builds the cubin) can read
        ver = re.search(r"release (\d+\.\d+)", subprocess.run([exe, "--version"], capture_output=True,
                                                               text=True).stdout).group(1)
        options.setdefault("ptx_version", min(ptx_get_version(ver), ptx_get_version(get_ptxas(arch).version)))
    sig = {a: sig[a] for a in fn.arg_names}  # in argument order
    div = [a for a in sig if sig[a].startswith("*")] if divisible_by_16 is None else divisible_by_16
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in div}
    k = triton.compile(ASTSource(fn, sig, constexprs=kw["constexprs"], attrs=attrs), target=GPUTarget("cuda", arch, 32),
                       options=dict(num_warps=num_warps, num_stages=num_stages, **options))
    with tempfile.TemporaryDirectory() as d:  # rerun ptxas -v with Triton's flags and read its report
        with open(os.path.join(d, "k.ptx"), "w") as fh:
            fh.write(k.asm["ptx"])
        cmd = [exe, "-v", "--regAllocOptLevel=2", f"--gpu-name={sm_arch_from_capability(arch)}",
               os.path.join(d, "k.ptx"), "-o", os.path.join(d, "k.cubin")]
        r = subprocess.run(cmd + ([] if k.metadata.enable_fp_fusion else ["--fmad=false"]),
                           capture_output=True, text=True)
    log = r.stdout + r.stderr
    if r.returncode:
        raise RuntimeError(f"aot_resources: ptxas failed ({' '.join(cmd)}):\n{log}")
    entry = log.split(f"Compiling entry function '{k.metadata.name}'")[-1]  # its section; spills: all
    num = lambda pat, text=entry: sum(int(x) for x in re.findall(pat, text))
    return {"kernel": k.metadata.name, "arch": sm_arch_from_capability(arch), "num_warps": num_warps,
            "num_stages": num_stages, "registers": num(r"Used (\d+) registers"),
            "spill_stores": num(r"(\d+) bytes spill stores", log), "spill_loads": num(r"(\d+) bytes spill loads", log),
            "stack_frame": num(r"(\d+) bytes stack frame"), "shared": k.metadata.shared,
            "ptxas_smem": num(r"(\d+) bytes smem"), "ptxas": exe, "ptxas_log": log}


def _aot_child(mod_name, src_path, qual, io):  # the compile process started by aot_resources
    import importlib
    import importlib.util
    triton.knobs.runtime.interpret = False  # wins even if the module sets TRITON_INTERPRET=1 itself
    try:
        mod = importlib.import_module(mod_name) if mod_name != "__main__" else None
    except ImportError:
        mod = None
    if mod is None:  # a script, or not importable by name: load its file
        spec = importlib.util.spec_from_file_location("_triton_traffic_kernels", src_path)
        mod = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    fns = [v for v in vars(mod).values() if inspect.isfunction(getattr(_unwrap(v), "fn", None))
           and _unwrap(v).fn.__qualname__ == qual]
    if not fns:
        raise LookupError(f"no @triton.jit kernel {qual} at module level of {mod_name} ({src_path})")
    fns.sort(key=lambda v: inspect.getsourcefile(_unwrap(v).fn) != src_path)  # prefer one defined there
    with open(io, "rb") as fh:
        kw = pickle.load(fh)
    with open(io, "wb") as fh:
        pickle.dump(aot_resources(fns[0], **kw), fh)


# ------------------------------------------------------------------------------------------ self-test
@triton.jit
def demo_add(x_ptr, y_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n  # the last program is partly masked when n % BLOCK != 0
    tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=mask) + tl.load(y_ptr + offs, mask=mask), mask=mask)


@triton.jit
def demo_matmul(a, b, c, M, N, K, sam, sak, sbk, sbn, scm, scn, BM: tl.constexpr, BN: tl.constexpr,
                BK: tl.constexpr):
    rm, rn = tl.program_id(0) * BM + tl.arange(0, BM), tl.program_id(1) * BN + tl.arange(0, BN)
    acc = tl.zeros((BM, BN), tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        x = tl.load(a + rm[:, None] * sam + rk[None, :] * sak, mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.)
        y = tl.load(b + rk[:, None] * sbk + rn[None, :] * sbn, mask=(rk[:, None] < K) & (rn[None, :] < N), other=0.)
        acc = tl.dot(x, y, acc)
    tl.store(c + rm[:, None] * scm + rn[None, :] * scn, acc, mask=(rm[:, None] < M) & (rn[None, :] < N))


def _self_test(archs):
    import torch
    fails, (M, N, K, BM, BN, BK), sizes = [], (70, 50, 40, 32, 32, 16), (1000, 4096, 1000)
    check = lambda ok, what: ok or fails.append(what)
    a, b, c = torch.randn(M, K, dtype=torch.float16), torch.randn(K, N, dtype=torch.float16), torch.empty(M, N)
    with traffic() as t:
        for n in sizes:  # several launches of one kernel; n=1000 leaves the last program partly masked
            x, y, out = torch.randn(n), torch.randn(n), torch.empty(n)
            demo_add[(triton.cdiv(n, 256),)](x, y, out, n, BLOCK=256)
            check(torch.equal(out, x + y), f"vector add n={n}: wrong result")
        demo_matmul[(triton.cdiv(M, BM), triton.cdiv(N, BN))](a, b, c, M, N, K, *a.stride(), *b.stride(),
                                                                *c.stride(), BM=BM, BN=BN, BK=BK)
    check(torch.allclose(c, a.float() @ b.float(), atol=1e-2, rtol=1e-2), "matmul: wrong result")
    print(t.table())
    rep, pad = t.report(), lambda v, blk: -(-v // blk) * blk
    for n, r in zip(sizes, rep["launches"]):
        check((r["ld_req"], r["ld_unique"], r["st_req"], r["st_unique"]) == (8 * n, 8 * n, 4 * n, 4 * n),
              f"vector add n={n}: expected 8n bytes loaded and 4n stored, got {r}")
    r = rep["by_kernel"]["demo_matmul"]
    check(r["ld_req"] > r["ld_unique"] == 2 * (M * K + K * N) and r["st_req"] == r["st_unique"] == 4 * M * N,
          f"matmul bytes: {r}")
    check(r["mma_flops"] == {"fp16": 2 * pad(M, BM) * pad(N, BN) * pad(K, BK)}, f"matmul flops: {r}")
    check(rep["by_kernel"]["demo_add"]["launches"] == len(sizes), "demo_add launch count")
    mod = t.model()["total"]
    check(mod["t_requested"] > mod["t_unique"] > 0 < mod["t_compute"], f"model: {mod}")
    print(f"\nmodelled H100 total: unique {mod['t_unique'] * 1e6:.3g} us, requested "
          f"{mod['t_requested'] * 1e6:.3g} us, dot {mod['t_compute'] * 1e6:.3g} us\n\naot_resources:")
    mm_sig = dict(a="*fp16", b="*fp16", c="*fp32", **dict.fromkeys("M N K sam sak sbk sbn scm scn".split(), "i32"))
    for arch in archs:
        for fn, sig, cx in ((demo_add, dict(x_ptr="*fp32", y_ptr="*fp32", out_ptr="*fp32", n="i32"), dict(BLOCK=1024)),
                            (demo_matmul, mm_sig, dict(BM=64, BN=64, BK=32))):
            res = aot_resources(fn, sig, cx, arch=arch)
            print("  " + ", ".join(f"{k}={v}" for k, v in res.items() if k not in ("ptxas", "ptxas_log")))
            check(0 < res["registers"] <= 255 and res["spill_stores"] == res["spill_loads"] == 0,
                  f"aot_resources {fn.__name__} sm_{arch}: {res}")
            check(fn is demo_add or res["shared"] > 0, f"matmul sm_{arch} should use shared memory: {res}")
    print("\nSELF-TEST " + ("FAILED:\n  " + "\n  ".join(fails) if fails else "PASSED"))
    return 1 if fails else 0


if __name__ == "__main__":
    import argparse
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--self-test", action="store_true", help="run the demo kernels and check the counts")
    p.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="archs for aot_resources")
    p.add_argument("--aot-child", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.aot_child:
        sys.exit(_aot_child(*args.aot_child))
    sys.exit(_self_test(args.arch) if args.self_test else p.print_help())
