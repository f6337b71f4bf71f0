"""The Triton kernels' modelled GPU memory traffic (bench/traffic.py, the vendored interpreter
traffic recorder): `merge_tokens` in at most two launches, every other kernel within 1.25x of the
fewest bytes its op must move, at tracker shapes. One representative case per kernel here (the
interpreter is slow); `python -m bench traffic` runs them all."""
import pytest

from bench import traffic
from tests import helpers

pytestmark = pytest.mark.skipif("triton" not in helpers.kernels(native=False, cuda=False),
                                reason="the traffic recorder runs kernels under the Triton interpreter")

CASES = ["ostrack256-Rctr-B1", "T5L64-r0.9-B1", "S32-T288-C768", "proj-M320-k540"]


@pytest.fixture(scope="module")
def rows():
    import triton
    from fasttrack.kernels import TRITON_VERSION
    if TRITON_VERSION < (3, 9):
        pytest.skip(f"the recorder hooks triton 3.9's interpreter (have {triton.__version__})")
    return traffic.measure(case_names=CASES)


def test_every_triton_op_is_measured(rows):
    from fasttrack.ops._registry import REGISTRY
    assert {r["op"] for r in rows} == {n for n, op in REGISTRY.items() if op.triton is not None}


def test_merge_tokens_in_two_launches(rows):
    for r in rows:
        if r["op"] == "merge_tokens":
            assert r["launches"] <= traffic.MAX_MERGE_LAUNCHES, r
            assert r["ratio"] < 1.6, r   # 2.0x with the four-launch kernel it replaced


def test_other_kernels_move_at_most_125_percent_of_the_minimum(rows):
    for r in rows:
        if r["op"] != "merge_tokens":
            assert r["launches"] == 1 and r["ratio"] <= traffic.MAX_RATIO, r
