"""Regressions of issue 18 (adversarial input): every repro, fixed and pinned.

1. overflowing offset checks; 2. raw calls reaching the Triton launchers; 3. stale derived weights
after writes through ``.data``; 4. NaN through the fused head; 5. one acceptance rule per op (dtypes,
numpy / 0-d scalars, degenerate sizes) on every path; 6. the spec on non-finite rows, mixed dtypes,
empty sets; 7. float64; 8. life without the extension.
"""
import math
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch import nn

import fasttrack
from fasttrack import _extension, reference
from tests import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNELS = helpers.kernels()
# every path an op call can take here: the kernels of this machine and the spec itself
PATHS = KERNELS + ["reference"]


def on(path, fn, *args, **kw):
    if path == "reference":
        with fasttrack.use_backend("reference"):
            return fn(*args, **kw)
    return helpers.call(path, fn, *args, **kw)


def _outputs_equal(a, b, exact_floats=False):
    a, b = (a if isinstance(a, tuple) else (a,)), (b if isinstance(b, tuple) else (b,))
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.shape == y.shape and x.dtype == y.dtype, (x.shape, y.shape, x.dtype, y.dtype)
        if x.is_floating_point() and not exact_floats:
            torch.testing.assert_close(x, y, equal_nan=True, atol=1e-5, rtol=1e-5)
        else:
            assert torch.equal(x, y) or (x.is_floating_point() and torch.equal(x.isnan(), y.isnan())
                                         and torch.equal(x.nan_to_num(), y.nan_to_num())), (x, y)


# ------------------------------------------------------------------------------------- 1. offsets
@pytest.mark.parametrize("qk", [False, True])
def test_start_near_int64_max_is_refused_not_read(qk):
    """`start + length` wrapped in the C++ check: a start near 2^63 read before the attention buffer."""
    x, qi = torch.randn(1, 8, 4), torch.zeros(1, 1, dtype=torch.long)
    start, length = 2 ** 63 - 2, 2
    for path in PATHS:
        with pytest.raises(ValueError, match=r"`start \+ length` must be <= N=8"):
            if qk:
                q = torch.randn(1, 1, 8, 4)
                on(path, fasttrack.topk_select_qk, q, q, x, qi, 0.5, start=start, length=length)
            else:
                on(path, fasttrack.topk_select, torch.rand(1, 1, 8, 8), x, qi, 0.5, start=start, length=length)
    if _extension.loaded:   # the raw op: the C++ kernel's own check
        with pytest.raises(ValueError, match=r"`start \+ length` <= N=8"):
            torch.ops.fasttrack.topk_select(torch.rand(1, 1, 8, 8), x, qi, None, None, None, start, length, 0.5)


def test_pad_scatter_hw_product_cannot_wrap():
    kept, index = torch.randn(1, 2, 3), torch.tensor([[0, 1]])
    big = 2 ** 32
    for path in KERNELS[:1]:
        with pytest.raises(ValueError, match="`hw`"):
            torch.ops.fasttrack.pad_scatter(kept, index, 4, "nchw", [big, big + 4], True)


# --------------------------------------------------------------------------- 2. launchers check
@pytest.mark.skipif("triton" not in KERNELS, reason="needs the Triton interpreter")
def test_triton_launchers_refuse_what_the_op_check_refuses():
    """The launchers are the registered CUDA kernels: a raw torch.ops call on CUDA reaches them
    without the wrapper. Called directly (here on CPU tensors, under the interpreter) they refuse."""
    import fasttrack.kernels.merge_tokens as M
    import fasttrack.kernels.pruned_linear as P
    import fasttrack.kernels.topk_select as T
    with pytest.raises(ValueError, match=r"`weight.shape\[1\]` \(64\) must equal len\(in_index\) \(3\)"):
        P.pruned_linear(torch.randn(4, 16), torch.randn(8, 64), None, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"`start \+ length` must be <= N=8"):
        T.topk_select(torch.rand(1, 1, 8, 8), torch.randn(1, 8, 4), torch.zeros(1, 1, dtype=torch.long), None, None,
                      None, 5, 4, 0.5)
    with pytest.raises(ValueError, match="`x` has 7 tokens"):
        q = torch.randn(1, 1, 8, 4)
        T.topk_select_qk(q, q, torch.randn(1, 7, 4), torch.zeros(1, 1, dtype=torch.long), None, None, None, 1, 4,
                         0.5, 0.5)
    with pytest.raises(ValueError, match=r"`proj` must have shape \[4\]"):
        M.merge_tokens(torch.randn(1, 6, 4), None, torch.randn(5), None, 0.5, "sum")
    with pytest.raises(ValueError, match="`dst`"):
        M.cosine_argmax(torch.randn(1, 3, 4), torch.randn(1, 3, 5))


# --------------------------------------------------------------------------- 3. stale weights
@pytest.mark.skipif(not _extension.loaded, reason="the content stamp is a _C function")
def test_fastlinear_sees_writes_through_data():
    lin = fasttrack.nn.linear.FastLinear(16, 8).eval()
    x = torch.randn(3, 16)
    with torch.no_grad():
        first = lin(x)
        lin.weight.data.mul_(2)                  # invisible to the version counter
        torch.testing.assert_close(lin(x), torch.nn.functional.linear(x, lin.weight, lin.bias))
        lin.bias.data.zero_()
        torch.testing.assert_close(lin(x), x @ lin.weight.t())
        assert not torch.allclose(first, lin(x))


@pytest.mark.skipif(not _extension.loaded, reason="the content stamp is a _C function")
def test_ema_update_through_data_reaches_fused_networks():
    """A 2-block CompressTracker after an EMA-style `.data` update: fused vs reference was off by
    729; every derived cache (packed linears, the folded head) follows now."""
    from fasttrack import zoo
    case = zoo.build("compresstracker", 1, torch.float32, depth=2)
    with torch.no_grad():
        case.fused(*case.inputs)                 # caches filled
        for p in case.reference.parameters():
            p.data.mul_(0.9).add_(torch.randn_like(p) * 0.01)
        for b in case.reference.modules():
            if isinstance(b, nn.BatchNorm2d):
                b.running_var.data.mul_(1.5)
        res = case.parity(case.reference(*case.inputs), case.fused(*case.inputs))
    assert res["feature_max_abs"] < 1e-3 and res["box_max_abs"] < 1e-4, res


@pytest.mark.parametrize("native", [True, False], ids=["sources_key", "python_key"])
def test_derived_rebuilds_on_every_visible_change(native, monkeypatch):
    """`Derived.get` hits while nothing changed and rebuilds after each kind of change its contract
    names, with the C++ state (`_C.sources_key`) and with the Python one used without `_C`."""
    from fasttrack.nn import derived
    if native and not _extension.loaded:
        pytest.skip("fasttrack._C not built")
    if not native:
        monkeypatch.setattr(derived._extension, "loaded", False)
    big = nn.Parameter(torch.randn(300, 40))               # > 4096 elements: sampled
    small = torch.randn(7).to(torch.bfloat16)              # 14 bytes: one word and a 6-byte tail
    cache, builds = derived.Derived(), []

    def get(*sources):
        return cache.get(sources, lambda: builds.append(1) or len(builds))

    assert get(big, small, None) == 1 and get(big, small, None) == 1
    with torch.no_grad():
        big.mul_(2)                                         # version counter
    assert get(big, small, None) == 2
    assert get(big, small) == 3                             # one source fewer
    assert get(big, None, small) == 4                       # another order
    assert get(big, small.clone(), None) == 5               # a new tensor, same values
    s2 = small.clone()
    assert get(big, s2, None) == 6 and get(big, s2, None) == 6
    assert get(big, s2.float(), None) == 7                  # dtype
    assert get(big.t(), s2, None) == 8                      # strides
    assert get(big, s2, None) == 9
    if native:                                              # the content stamp: writes .data hides
        s2.data[6] = 5.0                                    # the last element, in the tail bytes
        assert get(big, s2, None) == 10
        big.data[100:160].fill_(0.5)                        # a run of > numel / 255 elements
        assert get(big, s2, None) == 11
        big.data.mul_(0.9)                                  # every element (an EMA step)
        assert get(big, s2, None) == 12
        assert get(big, s2, None) == 12
    with torch.inference_mode():
        inf = torch.randn(5)
    assert get(inf) == len(builds) and get(inf) == len(builds)   # inference tensors have no version


def test_refresh_drops_every_derived_cache():
    from fasttrack import zoo
    from fasttrack.nn.derived import refresh
    case = zoo.build("ostrack", 1, torch.float32, depth=1)
    with torch.no_grad():
        case.fused(*case.inputs)
    assert refresh(case.fused) >= 5           # qkv, proj, fc1, fc2 and the head's fold
    import copy
    clone = copy.deepcopy(case.fused)          # caches are not state: the copy starts empty
    with torch.no_grad():
        torch.testing.assert_close(clone(*case.inputs)["pred_boxes"], case.fused(*case.inputs)["pred_boxes"])


# ------------------------------------------------------------------------------------ 4. NaN head
def test_fused_head_propagates_nan_like_the_reference():
    from fasttrack.nn.head import CenterPredictor, FusedCenterPredictor
    ref = CenterPredictor(32, 64, 8, 16).eval()
    fused = FusedCenterPredictor.from_reference(ref).eval()
    x = torch.randn(2, 32, 8, 8)
    x[0, :, 2, 3] = math.nan                    # a diverging tracker's features, sample 0 only
    with torch.no_grad():
        r, f = ref(x), fused(x)
    assert torch.isnan(r[1][0]).all() and torch.isnan(f[1][0]).all()
    assert torch.isfinite(f[1][1]).all()
    torch.testing.assert_close(f[1][1], r[1][1])
    for a, b in zip(f, r):
        assert torch.equal(a.isnan(), b.isnan())


# ---------------------------------------------------------------------------- 5. one rule per op
def test_topk_select_qk_refuses_mixed_dtypes_on_every_path():
    q, x, qi = torch.randn(1, 2, 8, 4), torch.randn(1, 8, 4), torch.zeros(1, 1, dtype=torch.long)
    for path in PATHS:
        with pytest.raises(TypeError, match="`k` must have q's dtype"):
            on(path, fasttrack.topk_select_qk, q, q.double(), x, qi, 0.5, start=2)
    if _extension.loaded:
        with pytest.raises(TypeError, match="`k` must have q's dtype"):
            torch.ops.fasttrack.topk_select_qk(q, q.double(), x, qi, None, None, None, 2, 6, 0.5, 0.5)


@pytest.mark.parametrize("kind", ["numpy", "tensor"])
def test_numpy_and_0d_tensor_scalars_are_accepted_on_every_path(kind):
    conv = (lambda v: np.array(v)[()]) if kind == "numpy" else torch.tensor
    attn, x, qi = torch.rand(1, 1, 8, 8), torch.randn(1, 8, 4), torch.zeros(1, 1, dtype=torch.long)
    want = reference.topk_select(attn, x, qi, None, None, None, 2, 6, 0.5)
    for path in PATHS:
        for grad in (False, True):             # the autograd path refused them with a wrong message
            xx = x.clone().requires_grad_(grad)
            got = on(path, fasttrack.topk_select, attn, xx, qi, conv(0.5), start=conv(2), length=conv(6))
            _outputs_equal(tuple(t.detach() for t in got), want)
        out = on(path, fasttrack.merge_tokens, torch.randn(1, 9, 4), conv(0.5), proj=torch.randn(4))
        assert out.merged.shape == (1, 4, 4)
        assert on(path, fasttrack.pad_scatter, torch.randn(1, 2, 3), torch.tensor([[0, 4]]), conv(5)).shape == (1, 5, 3)
    with pytest.raises(TypeError, match="`start` must be an int"):
        fasttrack.topk_select(attn, x, qi, 0.5, start=2.5)


DEGENERATE = {
    "merge_tokens C=0 (proj)": lambda: fasttrack.merge_tokens(torch.randn(2, 7, 0), 0.5, proj=torch.randn(0)),
    "merge_tokens C=0 (score)": lambda: fasttrack.merge_tokens(torch.randn(2, 7, 0), 0.5, score=torch.randn(2, 7)),
    "merge_tokens B=0": lambda: fasttrack.merge_tokens(torch.randn(0, 7, 4), 0.5, proj=torch.randn(4)),
    "cosine_argmax Cm=0": lambda: fasttrack.cosine_argmax(torch.randn(2, 3, 0), torch.randn(2, 4, 0)),
    "cosine_argmax S=0": lambda: fasttrack.cosine_argmax(torch.randn(2, 0, 5), torch.randn(2, 4, 5)),
    "cosine_argmax S=T=0": lambda: fasttrack.cosine_argmax(torch.randn(2, 0, 5), torch.randn(2, 0, 5)),
    "pruned_linear d_out=0": lambda: fasttrack.pruned_linear(torch.randn(3, 8), torch.randn(0, 4), None,
                                                             torch.arange(4)),
    "pruned_linear d_in=0": lambda: fasttrack.pruned_linear(torch.randn(3, 0), torch.randn(5, 0), torch.randn(5),
                                                            torch.arange(0)),
    "pruned_linear kept=0 + LN": lambda: fasttrack.pruned_linear(torch.randn(3, 8), torch.randn(5, 0), torch.randn(5),
                                                                 torch.arange(0), norm=(torch.ones(8), None, 1e-5)),
    "topk_select B=0": lambda: fasttrack.topk_select(torch.rand(0, 1, 8, 8), torch.randn(0, 8, 4),
                                                     torch.zeros(0, 1, dtype=torch.long), 0.5, start=2),
    "bipartite_merge N=0": lambda: fasttrack.bipartite_merge(torch.randn(2, 0, 4), 3),
    "bipartite_merge N=1": lambda: fasttrack.bipartite_merge(torch.randn(2, 1, 4), 3),
}


@pytest.mark.parametrize("name", list(DEGENERATE))
def test_degenerate_sizes_follow_the_spec_on_every_path(name):
    torch.manual_seed(1)
    want = on("reference", DEGENERATE[name])
    for path in KERNELS:
        torch.manual_seed(1)
        _outputs_equal(tuple(on(path, DEGENERATE[name])), tuple(want))


def test_head_refuses_an_empty_batch_naming_x():
    from fasttrack.nn.head import CenterPredictor, FusedCenterPredictor
    ref = CenterPredictor(16, 32, 8, 16).eval()
    for m in (ref, FusedCenterPredictor.from_reference(ref).eval()):
        with torch.no_grad(), pytest.raises(ValueError, match=r"`x` must be \[B >= 1"):
            m(torch.randn(0, 16, 8, 8))


# ------------------------------------------------------------------------------------- 6. the spec
def test_cosine_argmax_non_finite_rows_agree_everywhere():
    """A row with NaN or inf has NaN similarities: they never win; all-NaN -> index 0, max NaN."""
    g = torch.Generator().manual_seed(0)
    src, dst = torch.randn(2, 6, 5, generator=g), torch.randn(2, 7, 5, generator=g)
    src[0, 1, 2] = math.nan
    src[0, 2, 0] = math.inf
    src[1, 3] = 0.0
    dst[0, 0, 1] = math.nan        # target 0 is NaN for everyone: the argmax skips it
    dst[1, 4, 4] = -math.inf
    want = reference.cosine_argmax(src, dst)
    assert want[1][0, 1] == 0 and math.isnan(want[0][0, 1]) and want[1][0, 2] == 0
    assert (want[1][0, 3:] != 0).all()
    for path in KERNELS:
        _outputs_equal(on(path, fasttrack.cosine_argmax, src, dst), want)
        # merge_tokens ranks the same rows through the same rule
        z = torch.cat([dst, src], 1)
        score = torch.arange(13, 0, -1, dtype=torch.float32).expand(2, 13).contiguous()
        _outputs_equal(tuple(on(path, fasttrack.merge_tokens, z, 7 / 13, score=score)),
                       tuple(reference.merge_tokens(z, score, None, None, 7 / 13)))


@pytest.mark.parametrize("case", ["cosine", "merge_proj", "pruned_ln"])
def test_mixed_dtypes_are_refused_on_every_path(case):
    calls = {
        "cosine": (lambda: fasttrack.cosine_argmax(torch.randn(2, 3, 5), torch.randn(2, 4, 5).double()),
                   "`dst` must have src's dtype"),
        "merge_proj": (lambda: fasttrack.merge_tokens(torch.randn(2, 7, 4), 0.5, proj=torch.randn(4).double()),
                       "`proj` must have z's dtype"),
        "pruned_ln": (lambda: fasttrack.pruned_linear(torch.randn(3, 8), torch.randn(5, 4), None, torch.arange(4),
                                                      norm=(torch.ones(8).double(), None, 1e-5)),
                      "`ln_weight` must have x's dtype"),
    }
    fn, match = calls[case]
    for path in PATHS:
        with pytest.raises(TypeError, match=match):
            on(path, fn)


def test_bipartite_merge_tome_edges():
    """ToMe: r is clamped to (N - protected) // 2, and r <= 0 returns x unchanged (do_nothing)."""
    x = torch.randn(2, 9, 4)
    out, size = fasttrack.bipartite_merge(x, 0)
    assert out is x and torch.equal(size, torch.ones(2, 9, 1))
    s = torch.rand(2, 9, 1) + 0.5
    assert fasttrack.bipartite_merge(x, 0, size=s)[1] is s
    big, _ = fasttrack.bipartite_merge(x, 100)
    torch.testing.assert_close(big, fasttrack.bipartite_merge(x, 4)[0])
    assert big.shape == (2, 5, 4)


# ----------------------------------------------------------------------------------- 7. float64
def test_merge_mean_backward_in_float64():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 9, 3, dtype=torch.float64, generator=g, requires_grad=True)
    score = torch.randn(2, 9, dtype=torch.float64, generator=g)
    fn = lambda t: fasttrack.merge_tokens(t, 0.5, score=score, reduce="mean").merged  # noqa: E731
    assert torch.autograd.gradcheck(fn, (z,))
    assert torch.autograd.gradgradcheck(fn, (z,))


@pytest.mark.skipif("triton" not in KERNELS, reason="needs the Triton interpreter")
def test_triton_merge_refuses_float64():
    with fasttrack.use_backend("triton"), pytest.raises(TypeError, match="float32"):
        fasttrack.merge_tokens(torch.randn(1, 8, 4, dtype=torch.float64), 0.5, proj=torch.randn(4, dtype=torch.float64))


# -------------------------------------------------------------------------- 8. without _C
def _python(code, env=None, cwd=ROOT):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, cwd=cwd, timeout=300)


def test_reference_fallback_checks_values():
    r = _python("""
        import warnings; warnings.simplefilter("ignore")
        import torch, fasttrack
        for call in (lambda: fasttrack.gather_tokens(torch.randn(1, 5, 3), torch.tensor([[1, 1]])),
                     lambda: torch.ops.fasttrack.topk_select(torch.rand(1, 1, 8, 8), torch.randn(1, 8, 4),
                         torch.zeros(1, 1, dtype=torch.long), None, None, None, 2, 6, 0.0),
                     lambda: torch.ops.fasttrack.topk_select(torch.rand(1, 1, 8, 8), torch.randn(1, 8, 4),
                         torch.full((1, 1), 9), None, None, None, 2, 6, 0.5),
                     lambda: torch.ops.fasttrack.pruned_linear(torch.randn(3, 8), torch.randn(2, 3), None,
                         torch.tensor([0, 2, 2]))):
            try:
                call()
                print("ACCEPTED")
            except ValueError as e:
                print("refused:", e)
    """, {"FASTTRACK_DISABLE_C": "1"})
    assert r.returncode == 0, r.stderr
    assert "ACCEPTED" not in r.stdout and r.stdout.count("refused: fasttrack.") == 4, r.stdout


def _package_copy(tmp_path, so_bytes=None):
    """fasttrack copied into tmp_path (with `kernels` as fasttrack/kernels), its _C replaced."""
    dst = tmp_path / "fasttrack"
    shutil.copytree(os.path.join(ROOT, "fasttrack"), dst, ignore=shutil.ignore_patterns("_C*.so", "__pycache__"))
    shutil.copytree(os.path.join(ROOT, "kernels"), dst / "kernels", ignore=shutil.ignore_patterns("__pycache__"))
    if so_bytes is not None:
        (dst / "_C.cpython-311-x86_64-linux-gnu.so").write_bytes(so_bytes)
        import sysconfig
        suffix = sysconfig.get_config_var("EXT_SUFFIX")
        (dst / "_C.cpython-311-x86_64-linux-gnu.so").rename(dst / f"_C{suffix}")
    return tmp_path


def _import_in(path):
    return _python("""
        import sys, warnings
        # the development install's finder would map fasttrack._C to the repository's build
        sys.meta_path = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            import fasttrack
        print("loaded:", fasttrack._extension.loaded, fasttrack.__file__)
        print("warnings:", [str(x.message) for x in w])
    """, env={"PYTHONPATH": str(path)}, cwd=str(path))


def test_missing_extension_says_so(tmp_path):
    r = _import_in(_package_copy(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "loaded: False" in r.stdout and "not built" in r.stdout and "circular" not in r.stdout, r.stdout


@pytest.mark.skipif(not _extension.loaded, reason="needs the built extension to truncate")
def test_truncated_extension_is_refused_not_a_crash(tmp_path):
    so = next(f for f in os.listdir(os.path.join(ROOT, "fasttrack")) if f.startswith("_C") and f.endswith(".so"))
    data = open(os.path.join(ROOT, "fasttrack", so), "rb").read()
    r = _import_in(_package_copy(tmp_path, data[: len(data) // 3]))
    assert r.returncode == 0, f"import died (signal {-r.returncode})" if r.returncode < 0 else r.stderr
    assert "loaded: False" in r.stdout and "truncated" in r.stdout, r.stdout


@pytest.mark.skipif(not _extension.loaded, reason="the output cache is part of _C")
def test_huge_cache_limit_saturates():
    r = _python("import fasttrack; print(fasttrack._extension._C.output_cache_limit())",
                {"FASTTRACK_CPU_CACHE_MB": str(2 ** 43 + 5)})
    assert r.returncode == 0, r.stderr
    assert int(r.stdout.strip()) > 0


@pytest.mark.parametrize("grad", [False, True], ids=["inference", "autograd"])
def test_pruned_linear_module_with_a_mismatched_weight_names_it(grad):
    """A PrunedLinear whose weight was reassigned with another width: the packed inference path must
    not hand oneDNN the mismatch (its message names nothing); the op's check names it on every path."""
    from fasttrack.nn.pruned import PrunedLinear
    lin = PrunedLinear(64, 32, torch.arange(0, 64, 2)).eval()
    lin.weight = nn.Parameter(torch.randn(32, 31))
    x = torch.randn(2, 5, 64)
    with torch.set_grad_enabled(grad):
        assert not lin.uses_packed(x)
        with pytest.raises(ValueError, match=r"fasttrack\.pruned_linear: `weight.shape\[1\]` \(31\) must equal len\(in_index\) \(32\)"):
            lin(x)


def test_fast_linear_with_a_mismatched_width_raises_nn_linears_error():
    """FastLinear is a drop-in nn.Linear: a wrong input width (or a weight reassigned with another
    width) must raise what nn.Linear raises, not oneDNN's primitive-descriptor message."""
    from fasttrack.nn.linear import FastLinear
    lin, ref = FastLinear(16, 8).eval(), nn.Linear(16, 8).eval()
    with torch.no_grad():
        for x in (torch.randn(3, 15), torch.randn(2, 4, 17)):
            assert not lin.uses_packed(x)
            with pytest.raises(RuntimeError) as want:
                ref(x)
            with pytest.raises(RuntimeError, match="mat1 and mat2 shapes cannot be multiplied") as got:
                lin(x)
            assert str(got.value) == str(want.value)
        lin.weight = nn.Parameter(torch.randn(8, 15))
        with pytest.raises(RuntimeError, match="mat1 and mat2 shapes cannot be multiplied"):
            lin(torch.randn(3, 16))
