"""Triton AOT check: every kernel in fasttrack.kernels compiles for sm_80 and sm_90 (no GPU needed)
for each dtype signature its launcher uses, without register spills.

Runs `python -m fasttrack.kernels._aot` in a subprocess (TRITON_INTERPRET=0: the interpreter would
replace @triton.jit; TRITON_DEFAULT_FP_FUSION pinned to 1, what the JIT launchers get) once for the
module, then checks its JSON report. Triton ships its own ptxas, so nothing here can be absent.
"""
from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys
import textwrap

import pytest

from fasttrack.kernels._aot import ARCHS, FLOAT_TYPES, KERNEL_MODULES

ROOT = pathlib.Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.build


def _run_aot(json_path, *extra, pythonpath=None):
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(pythonpath), env.get("PYTHONPATH")]))
    r = subprocess.run([sys.executable, "-m", "fasttrack.kernels._aot", "--json", str(json_path),
                        "--jobs", os.environ.get("MAX_JOBS", "2"), *extra],
                       capture_output=True, text=True, env=env, timeout=3600)
    report = json.loads(pathlib.Path(json_path).read_text()) if pathlib.Path(json_path).exists() else None
    return r, report


@pytest.fixture(scope="module")
def aot(tmp_path_factory):
    r, report = _run_aot(tmp_path_factory.mktemp("aot") / "aot.json")
    assert report is not None, f"_aot wrote no report (exit {r.returncode}):\n{r.stdout}\n{r.stderr}"
    return r, report


def test_aot_compiles_without_spills(aot):
    r, report = aot
    assert not report["import_errors"], f"kernel modules that do not import: {report['import_errors']}"
    errors = [f"{x['module']}.{x['kernel']} [{x['name']}] sm_{x['arch']}: {x['error']}"
              for x in report["reports"] if "error" in x]
    assert not errors, "compile errors:\n" + "\n".join(errors)
    spills = [f"{x['module']}.{x['kernel']} [{x['name']}] sm_{x['arch']}: {x['spill_stores']} B stores / "
              f"{x['spill_loads']} B loads, {x['registers']} registers"
              for x in report["reports"] if x["spill_stores"] or x["spill_loads"]]
    assert not spills, "register spills:\n" + "\n".join(spills)
    assert report["fp_fusion"] is True
    assert r.returncode == 0, r.stdout + r.stderr


def test_aot_covers_every_dtype_and_arch(aot):
    _, report = aot
    want = {(t, a) for t in FLOAT_TYPES for a in ARCHS}
    by_module, by_kernel = {}, {}
    for x in report["reports"]:
        if "error" not in x:
            by_module.setdefault(x["module"], set()).add((x["dtype"], x["arch"]))
            by_kernel.setdefault((x["module"], x["kernel"]), set()).add((x["dtype"], x["arch"]))
    for mod in KERNEL_MODULES:
        got = by_module.get(f"fasttrack.kernels.{mod}", set())
        assert want <= got, f"kernels/{mod}.py: no compiled spec for {sorted(want - got)} (dtype, sm)"
    # a kernel compiled for a half dtype serves every dtype: all three must be there
    for (mod, kernel), got in by_kernel.items():
        if {d for d, _ in got} & {"fp16", "bf16"}:
            assert want <= got, f"{mod}.{kernel}: no compiled spec for {sorted(want - got)} (dtype, sm)"


def test_aot_covers_every_launched_kernel(aot):
    """Each @triton.jit entry point (a jit function that no code calls directly: it is launched as
    ``kernel[grid](...)``, maybe through a table) has an AotSpec; helpers are inlined into them."""
    _, report = aot
    compiled = {(x["module"], x["kernel"]) for x in report["reports"]}
    for mod in KERNEL_MODULES:
        path = ROOT / "kernels" / f"{mod}.py"
        if not path.exists():
            pytest.fail(f"{path.relative_to(ROOT)} is missing (listed in KERNEL_MODULES)")
        src = path.read_text()
        jitted = set(re.findall(r"@triton\.jit[^\n]*\n(?:@[^\n]*\n)*def (\w+)", src))
        launched = {k for k in jitted if not re.search(rf"(?<!def )\b{k}\s*\(", src)}
        assert launched, f"kernels/{mod}.py has no @triton.jit entry point"
        missing = sorted(k for k in launched if (f"fasttrack.kernels.{mod}", k) not in compiled)
        assert not missing, f"kernels/{mod}.py: launched kernels without an AotSpec: {missing}"


def test_kernel_module_list_is_complete():
    from fasttrack.ops import REGISTRY

    on_disk = {p.stem for p in (ROOT / "kernels").glob("*.py") if not p.stem.startswith("_")}
    assert on_disk <= set(KERNEL_MODULES), f"kernel modules not in _aot.KERNEL_MODULES: {on_disk - set(KERNEL_MODULES)}"
    used = {op.triton.split(":")[0] for op in REGISTRY.values() if op.triton}
    assert used <= set(KERNEL_MODULES), f"registered Triton kernels outside KERNEL_MODULES: {used - set(KERNEL_MODULES)}"


def test_aot_fails_on_spills(tmp_path):
    """The checker itself: a clean kernel passes for all dtypes and archs; one that spills fails the run."""
    (tmp_path / "aot_probe.py").write_text(textwrap.dedent("""
        import triton
        import triton.language as tl
        from fasttrack.kernels._aot import AotSpec

        @triton.jit
        def scale(x_ptr, y_ptr, n, alpha, BLOCK: tl.constexpr):
            offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
            x = tl.load(x_ptr + offs, mask=offs < n).to(tl.float32)
            tl.store(y_ptr + offs, (x * alpha).to(y_ptr.dtype.element_ty), mask=offs < n)

        @triton.jit
        def hog(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
            # one warp keeps BLOCK values live across a reduction: far beyond 255 registers a thread
            offs = tl.arange(0, BLOCK)
            x = tl.load(x_ptr + offs, mask=offs < n)
            tl.store(y_ptr + offs, x / tl.sum(x * x, axis=0) + tl.sqrt(x), mask=offs < n)

        AOT_SPECS = [AotSpec(scale, {"x_ptr": f"*{t}", "y_ptr": f"*{t}", "n": "i32", "alpha": "fp32"},
                             {"BLOCK": 1024}, name=t) for t in ("fp32", "fp16", "bf16")]
        AOT_SPECS.append(AotSpec(hog, {"x_ptr": "*fp32", "y_ptr": "*fp32", "n": "i32"}, {"BLOCK": 16384},
                                 num_warps=1, name="hog"))
    """))
    r, report = _run_aot(tmp_path / "probe.json", "--modules", "aot_probe", pythonpath=tmp_path)
    assert report is not None, r.stdout + r.stderr
    assert r.returncode == 1 and "SPILLS" in r.stdout, r.stdout + r.stderr
    rows = {(x["kernel"], x["dtype"], x["arch"]): x for x in report["reports"]}
    assert set(rows) == {(k, t, a) for k, ts in (("scale", FLOAT_TYPES), ("hog", ("fp32",))) for t in ts for a in ARCHS}
    for (k, _, _), x in rows.items():
        assert "error" not in x, x
        assert (x["spill_stores"] + x["spill_loads"] > 0) == (k == "hog"), x
