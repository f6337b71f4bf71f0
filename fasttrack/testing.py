"""Parity tolerances per dtype, used by the test-suite, `python -m fasttrack.check` and the
benchmarks: (atol, rtol). Kernels accumulate in fp32 in a different order than the reference;
fp16/bf16 outputs are rounded once from fp32 accumulators, so their error is about one unit in the
last place of the output."""
from __future__ import annotations

import torch

TOL = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


def tolerance(dtype: torch.dtype, scale: float = 1.0) -> tuple[float, float]:
    atol, rtol = TOL[dtype]
    return atol * scale, rtol * scale


def assert_close(actual, expected, dtype=None, scale=1.0):
    """`scale` widens the tolerance for long reductions (e.g. GEMMs with K in the thousands)."""
    atol, rtol = tolerance(dtype or expected.dtype, scale)
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


def cuda_device_present() -> bool:
    """A CUDA device this process can use (tests and checks then run the compiled GPU kernels)."""
    return torch.cuda.is_available() and torch.cuda.device_count() > 0


# ------------------------------------------------------------------------------------------------
# Counting what a forward dispatches (tests and benchmarks)
# ------------------------------------------------------------------------------------------------
# Ops that only re-describe memory (no kernel on any device); everything else counts as an op.
VIEW_OPS = frozenset(("view", "_unsafe_view", "reshape", "_reshape_alias", "flatten", "unflatten", "expand",
                      "permute", "transpose", "t", "unsqueeze", "squeeze", "slice", "select", "narrow", "unbind",
                      "split", "split_with_sizes", "chunk", "detach", "alias", "as_strided", "view_as",
                      "expand_as", "lift_fresh"))
# Ops that read a device value on the host: each one stalls a GPU stream until the device catches
# up, and none can be captured in a CUDA graph.
HOST_READ_OPS = frozenset(("_local_scalar_dense", "item", "is_nonzero", "nonzero", "tolist", "equal",
                           "masked_select", "unique", "_unique", "_unique2", "unique_consecutive",
                           "unique_dim", "repeat_interleave", "_assert_tensor_metadata_sync"))


def count_dispatched(fn, *args, **kwargs):
    """``(fn's result, Counter of the ops it dispatched, by ``namespace::name``)``, recorded with a
    ``TorchDispatchMode`` below autograd (what runs, not what Python called). Copies to the CPU of
    a tensor on another device count as ``"<to cpu>"``: a host read as well."""
    import collections

    from torch.utils._python_dispatch import TorchDispatchMode

    counts = collections.Counter()

    class _Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            name = func._schema.name
            counts[name] += 1
            if name in ("aten::_to_copy", "aten::to", "aten::copy_"):
                src = args[1] if name == "aten::copy_" else args[0]
                dst = args[0].device if name == "aten::copy_" else kwargs.get("device")
                if isinstance(src, torch.Tensor) and src.device.type not in ("cpu", "meta") and dst is not None \
                        and torch.device(dst).type == "cpu":
                    counts["<to cpu>"] += 1
            return func(*args, **kwargs)

    with _Count():
        out = fn(*args, **kwargs)
    return out, counts


def non_view_count(counts) -> int:
    """Dispatched ops that are not pure views (`VIEW_OPS`)."""
    return sum(n for k, n in counts.items() if k.split("::")[-1] not in VIEW_OPS and not k.startswith("<"))


def host_reads(counts) -> dict:
    """The ops of `counts` that read a device value on the host (`HOST_READ_OPS`, ``<to cpu>``)."""
    return {k: n for k, n in counts.items() if k.split("::")[-1] in HOST_READ_OPS or k == "<to cpu>"}
