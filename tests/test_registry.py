"""The op registry itself: schemas, the _C-less fallback, the backend switch, `import kernels`,
and the generic contract every registered op must meet (fake = real metadata, opcheck)."""
import os
import subprocess
import sys

import pytest
import torch

import fasttrack
from fasttrack import _extension
from fasttrack.ops._registry import REGISTRY, dispatch, serving_kernel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALL_OPS = ["topk_select", "topk_select_qk", "gather_tokens", "pad_scatter", "merge_tokens", "cosine_argmax",
           "pruned_linear", "_pruned_linear_gather", "_attention", "_layer_norm"]


def _python(code, **env):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, **env})


def test_every_op_is_registered():
    assert sorted(REGISTRY) == sorted(ALL_OPS)
    for name in ALL_OPS:
        assert hasattr(torch.ops.fasttrack, name)
        if REGISTRY[name].backward is not None:
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fasttrack::{name}", "Autograd")


@pytest.mark.skipif(not _extension.loaded, reason="compares the C++ schemas with the Python ones")
@pytest.mark.parametrize("name", ALL_OPS)
def test_cpp_schema_equals_python_fallback_schema(name):
    cpp = str(getattr(torch.ops.fasttrack, name).default._schema)
    py = torch._C.parse_schema(f"fasttrack::{name}{REGISTRY[name].schema}")
    assert cpp == str(py)


@pytest.mark.skipif(not _extension.loaded, reason="native CPU kernels need _C")
@pytest.mark.parametrize("name", ALL_OPS)
def test_cpp_registers_a_cpu_kernel(name):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fasttrack::{name}", "CPU")
    assert serving_kernel(name, "cpu") == "native C++"


@pytest.mark.parametrize("name", [n for n in ALL_OPS if REGISTRY[n].triton is not None])
def test_triton_ops_register_a_cuda_kernel(name):
    # the Triton launcher is the CUDA kernel; registering it needs no GPU
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fasttrack::{name}", "CUDA")


def test_import_without_C_warns_once_and_runs_reference():
    code = (
        "import warnings\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import fasttrack, fasttrack.ops, importlib\n"
        "    import torch\n"
        "msgs = [str(x.message) for x in w if '_C is not available' in str(x.message)]\n"
        "assert len(msgs) == 1, msgs\n"
        "from fasttrack import _extension\n"
        "assert not _extension.loaded and 'FASTTRACK_DISABLE_C' in _extension.load_error\n"
        "from fasttrack.ops._registry import serving_kernel\n"
        "assert serving_kernel('pad_scatter', 'cpu').startswith('reference')\n"
        "kept = torch.randn(2, 3, 4); idx = torch.tensor([[0, 5, 2], [1, 2, 3]])\n"
        "out = fasttrack.pad_scatter(kept, idx, 6)\n"
        "assert torch.equal(out[0, 5], kept[0, 1]) and torch.equal(out[0, 1], torch.zeros(4))\n"
        "print('ok')\n"
    )
    r = _python(code, FASTTRACK_DISABLE_C="1")
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr


def test_import_kernels_top_level_fails_clearly():
    r = _python("import kernels")
    assert r.returncode != 0
    assert "fasttrack.kernels" in r.stderr and "another PyPI project" in r.stderr


def test_kernels_import_as_fasttrack_kernels():
    import fasttrack.kernels as k
    assert k.__name__ == "fasttrack.kernels"


def test_backend_context_manager_and_env():
    assert fasttrack.current_backend() in fasttrack.BACKENDS
    with fasttrack.use_backend("reference"):
        assert fasttrack.current_backend() == "reference"
        assert serving_kernel("pad_scatter", "cpu") == "reference (PyTorch)"
        with fasttrack.use_backend("triton"):
            assert serving_kernel("topk_select", "cpu") == "triton (interpreter)"
            # documented rule: ops whose GPU kernel is CUDA C++ have no Triton kernel and stay native
            assert serving_kernel("pad_scatter", "cpu") != "triton (interpreter)"
    with pytest.raises(ValueError, match="FASTTRACK_BACKEND must be one of"):
        with fasttrack.use_backend("fast"):
            pass
    r = _python("import fasttrack; print(fasttrack.current_backend())", FASTTRACK_BACKEND="reference")
    assert r.stdout.strip() == "reference", r.stderr
    r = _python("import fasttrack; fasttrack.current_backend()", FASTTRACK_BACKEND="gpu")
    assert r.returncode != 0 and "FASTTRACK_BACKEND must be one of" in r.stderr


def test_reference_backend_runs_reference_code():
    kept, idx = torch.randn(1, 2, 3), torch.tensor([[2, 0]])
    with fasttrack.use_backend("reference"):
        out = fasttrack.pad_scatter(kept, idx, 4)
    assert out.shape == (1, 4, 3) and torch.equal(out[0, 2], kept[0, 0])


def test_info_and_check_cli_run():
    r = subprocess.run([sys.executable, "-m", "fasttrack.info"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    for name in ALL_OPS:
        assert name in r.stdout
    r = subprocess.run([sys.executable, "-m", "fasttrack.check", "--dtype", "bogus"], capture_output=True,
                       text=True, cwd=ROOT)
    assert r.returncode == 2 and "--dtype" in r.stderr


@pytest.mark.parametrize("name", ALL_OPS)
def test_every_op_lists_check_cases(name):
    op = REGISTRY[name]
    assert op.cases is not None, f"{name} has no CheckCases for python -m fasttrack.check"
    cases = op.cases(torch.device("cpu"), torch.float32)
    assert cases, name


def _cases(dtype=torch.float32):
    for name in ALL_OPS:
        op = REGISTRY[name]
        if op.cases is None:
            continue
        for case in op.cases(torch.device("cpu"), dtype):
            yield pytest.param(name, case, id=f"{name}-{case.name}")


@pytest.mark.skipif(not _extension.loaded, reason="native CPU kernels need _C")
@pytest.mark.parametrize("name,case", list(_cases()))
def test_check_case_native_matches_reference_and_fake(name, case):
    """The same comparison `python -m fasttrack.check` makes, for every case every op lists, plus
    fake-kernel metadata equal to the real kernel's."""
    from fasttrack.check import _compare, _run
    op = REGISTRY[name]
    exp, exp_g = _run(op, "reference", case.args, case.grad, ())
    upstream = [torch.randn_like(o) if o.is_floating_point() else None for o in exp]
    exp, exp_g = _run(op, "reference", case.args, case.grad, upstream)
    got, got_g = _run(op, "native", case.args, case.grad, upstream)
    dtype = next(a.dtype for a in case.args if isinstance(a, torch.Tensor) and a.is_floating_point())
    assert _compare(got, exp, dtype)[3]
    if case.grad:
        assert _compare(got_g, exp_g, dtype)[3]
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in case.args]
        fake = op.packet(*fake_args)
    fake = fake if isinstance(fake, tuple) else (fake,)
    for f, r in zip(fake, got):
        assert f.shape == r.shape and f.dtype == r.dtype and f.device == r.device


def test_inference_fast_path_only_for_plain_cpu_calls():
    """`dispatch` goes straight to the CPU kernel only when nothing above it (autograd, a dispatch
    mode, tracing) needs to see the call; the result is the same kernel's either way."""
    from fasttrack.ops._registry import _plain_cpu_inference
    kept, idx = torch.randn(1, 3, 4), torch.tensor([[2, 0, 1]])
    args = (kept, idx, 5, "tokens", [], True)
    with torch.no_grad():
        assert _plain_cpu_inference(args)
    assert _plain_cpu_inference(args)  # grad enabled but nothing requires grad
    assert not _plain_cpu_inference((kept.requires_grad_(), idx, 5, "tokens", [], True))
    with torch._subclasses.fake_tensor.FakeTensorMode():
        assert not _plain_cpu_inference(args)
    # a module's weights (Parameters) are plain; another Tensor subclass is not, nor is a Parameter
    # that needs a gradient under grad mode
    weight = torch.nn.Parameter(torch.randn(1, 3, 4), requires_grad=False)
    assert _plain_cpu_inference((weight, idx, 5, "tokens", [], True))
    trainable = torch.nn.Parameter(torch.randn(1, 3, 4))
    assert not _plain_cpu_inference((trainable, idx, 5, "tokens", [], True))
    with torch.no_grad():
        assert _plain_cpu_inference((trainable, idx, 5, "tokens", [], True))

    class Sub(torch.Tensor):
        pass
    assert not _plain_cpu_inference((kept.detach().as_subclass(Sub), idx, 5, "tokens", [], True))
    out = fasttrack.pad_scatter(kept, idx, 5)
    out.sum().backward()  # the autograd path still runs when a gradient is needed
    assert torch.equal(kept.grad, torch.ones_like(kept))


@pytest.mark.skipif(not _extension.loaded, reason="needs fasttrack._C")
@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_plain_cpu_calls_run_the_cpp_kernel_and_check_only_on_failure(name, monkeypatch):
    """The fast path calls `fasttrack._C.cpu.<op>` (the registered CPU kernel without the boxed
    dispatch) and skips the Python check; when the kernel raises, the Python check runs so bad
    metadata still gets the documented message."""
    from fasttrack import _C
    op = REGISTRY[name]
    assert op.cpu_kernel is getattr(_C.cpu, name)
    case = op.cases("cpu", torch.float32)[0]
    calls = {"kernel": 0, "check": 0}
    kernel, check = op.cpu_kernel, op.check

    def counting_kernel(*a):
        calls["kernel"] += 1
        return kernel(*a)

    def counting_check(*a):
        calls["check"] += 1
        return check(*a)

    monkeypatch.setattr(op, "_cpu_kernel", counting_kernel)
    monkeypatch.setattr(op, "check", counting_check)
    with torch.no_grad():
        expected = op.overload(*case.args)
        got = dispatch(name, *case.args)
    assert calls == {"kernel": 1, "check": 0}
    for g, e in zip(got if isinstance(got, tuple) else (got,), expected if isinstance(expected, tuple) else (expected,)):
        assert torch.equal(g, e)
    # every tensor argument with the wrong dtype (floating <-> int64): the kernel must refuse it
    # too, and the message is the Python check's
    positions = [i for i, a in enumerate(case.args) if isinstance(a, torch.Tensor)]
    for i in positions:
        a = case.args[i]
        bad = case.args[:i] + (a.long() if a.is_floating_point() else a.float(),) + case.args[i + 1:]
        with torch.no_grad(), pytest.raises((ValueError, TypeError), match=rf"fasttrack\.{name}: `"):
            dispatch(name, *bad)
    assert calls == {"kernel": 1 + len(positions), "check": len(positions)}


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_op_runs_under_inference_mode(name):
    """Trackers run under torch.inference_mode: the kernels (and the threads they use) must accept it
    and give the same result as under no_grad."""
    op = REGISTRY[name]
    for case in op.cases("cpu", torch.float32)[:2]:
        with torch.no_grad():
            expected = dispatch(name, *case.args)
        with torch.inference_mode():
            args = tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in case.args)
            got = dispatch(name, *args)
        for g, e in zip(got if isinstance(got, tuple) else (got,), expected if isinstance(expected, tuple) else (expected,)):
            assert torch.equal(g, e)


def test_opdef_takes_keywords_and_one_cuda_kernel_field():
    from fasttrack.ops._registry import OpDef
    with pytest.raises(TypeError):
        OpDef("x", "() -> Tensor", lambda: None, lambda: None)
    with pytest.raises(ValueError, match="`cuda` must be"):
        OpDef(name="x", schema="() -> Tensor", fake=lambda: None, check=lambda: None, cuda="triton:topk_select")
    assert REGISTRY["gather_tokens"].cuda_cpp and REGISTRY["gather_tokens"].triton is None
    assert REGISTRY["pruned_linear"].triton == "pruned_linear:pruned_linear" and not REGISTRY["pruned_linear"].cuda_cpp
    internal = REGISTRY["_pruned_linear_gather"]
    assert internal.cuda is None and internal.triton is None and not internal.cuda_cpp
    assert not torch._C._dispatch_has_kernel_for_dispatch_key("fasttrack::_pruned_linear_gather", "CUDA")
    assert serving_kernel("_pruned_linear_gather", "cuda") == "none (CPU-only internal op)"


@pytest.mark.skipif(not _extension.loaded, reason="PrunedLinear's packed path needs fasttrack._C")
def test_pruned_linear_module_gathers_through_dispatch(monkeypatch):
    """The internal op is a registered op like the others: PrunedLinear's packed path reaches it
    through `dispatch` (the plain-CPU fast path to `fasttrack._C.cpu`), not a hand-made copy of it."""
    from fasttrack.nn.pruned import PrunedLinear
    op = REGISTRY["_pruned_linear_gather"]
    calls = []
    kernel = op.cpu_kernel
    monkeypatch.setattr(op, "_cpu_kernel", lambda *a: calls.append(a) or kernel(*a))
    lin = PrunedLinear(64, 32, torch.arange(0, 64, 2)).eval()
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        assert lin.uses_packed(x)
        out = lin(x)
    assert len(calls) == 1
    torch.testing.assert_close(out, fasttrack.reference.pruned_linear(x, lin.weight, lin.bias, lin.in_index))
