"""The op registry: one `OpDef` per `fasttrack::` op, and the backend dispatch of every call.

For each op this module wires, in one place:
- the schema: defined in C++ by `fasttrack._C` (`csrc/<op>.cpp`), or — when `_C` is absent —
  from Python with the same string, the reference as its CPU kernel;
- the fake (meta) kernel and the autograd formula (Python, `torch.library`);
- the CUDA kernel: a Triton launcher from `fasttrack.kernels` (registered here), or CUDA C++ from
  `_C` (gather/scatter);
- `dispatch(name, *args)`, which every public wrapper calls: it picks the kernel family from
  `fasttrack.backend` (reference / Triton-under-interpreter on CPU / the dispatcher).
"""
from __future__ import annotations

import dataclasses
import importlib
import re
from typing import Callable

import torch

from fasttrack import _extension, _opchecks, reference
from fasttrack.backend import current_backend, exporting_to_onnx

NAMESPACE = "fasttrack"


@dataclasses.dataclass
class CheckCase:
    """One parity case for `python -m fasttrack.check` and the tests: schema arguments, and the
    positions of the arguments that receive a gradient in the backward check."""
    name: str
    args: tuple
    grad: tuple = ()


@dataclasses.dataclass(kw_only=True)
class OpDef:
    name: str                         # the op's name; internal ops (`_name`) are not public wrappers
    schema: str                       # "(Tensor x, ...) -> Tensor", identical to the C++ m.def
    fake: Callable
    check: Callable                   # check(*schema_args): raises the documented message on bad metadata
    setup_context: Callable | None = None
    backward: Callable | None = None
    # The CUDA kernel: "triton:<module>:<function>" (a launcher in fasttrack.kernels), "cpp" (CUDA C++
    # in fasttrack._C), or None (a CPU-only internal op).
    cuda: str | None = None
    cases: Callable | None = None     # cases(device, dtype) -> list[CheckCase] at tracker shapes
    _overload: object = dataclasses.field(default=None, repr=False, compare=False)
    _cpu_kernel: Callable | None = dataclasses.field(default=None, repr=False, compare=False)

    def __post_init__(self):
        if not (self.cuda is None or self.cuda == "cpp" or re.fullmatch(r"triton:\w+:\w+", self.cuda)):
            raise ValueError(f"OpDef {self.name}: `cuda` must be 'triton:<module>:<function>', 'cpp' or None, "
                             f"got {self.cuda!r}")

    @property
    def triton(self) -> str | None:
        """"<module>:<function>" of the Triton launcher in fasttrack.kernels, or None."""
        return self.cuda[len("triton:"):] if self.cuda is not None and self.cuda.startswith("triton:") else None

    @property
    def cuda_cpp(self) -> bool:
        return self.cuda == "cpp"

    @property
    def qualname(self) -> str:
        return f"{NAMESPACE}::{self.name}"

    @property
    def reference(self) -> Callable:
        """The spec: `fasttrack.reference.<name>` (an internal op `_name`: `reference.<name>`)."""
        return getattr(reference, self.name.lstrip("_"))

    @property
    def packet(self):
        return getattr(torch.ops.fasttrack, self.name)

    @property
    def cpu_kernel(self) -> Callable | None:
        """`fasttrack._C.cpu.<op>`: the registered CPU kernel without the boxed dispatch (None
        without `_C`)."""
        if self._cpu_kernel is None and _extension.loaded:
            from fasttrack import _C
            self._cpu_kernel = getattr(_C.cpu, self.name)
        return self._cpu_kernel

    @property
    def overload(self):
        if self._overload is None:  # cached: attribute lookups on torch.ops cost ~0.3 µs a call
            self._overload = self.packet.default
        return self._overload

    def triton_launcher(self) -> Callable:
        if self.triton is None:
            raise RuntimeError(f"fasttrack.{self.name} has no Triton kernel")
        mod, fn = self.triton.split(":")
        return getattr(importlib.import_module(f"fasttrack.kernels.{mod}"), fn)


REGISTRY: dict[str, OpDef] = {}
_fallback_lib: torch.library.Library | None = None
_keepalive: list = []


def register(op: OpDef) -> OpDef:
    global _fallback_lib
    if _extension.loaded:
        if not hasattr(torch.ops.fasttrack, op.name):
            raise RuntimeError(f"fasttrack._C is loaded but does not define fasttrack::{op.name}; rebuild it")
    else:
        if _fallback_lib is None:
            _fallback_lib = torch.library.Library(NAMESPACE, "DEF")
        _fallback_lib.define(op.name + op.schema)
        _fallback_lib.impl(op.name, _checked_reference(op), "CPU")
    torch.library.register_fake(op.qualname)(op.fake)
    if op.backward is not None:
        torch.library.register_autograd(op.qualname, op.backward, setup_context=op.setup_context)
    if op.triton is not None:
        lib = torch.library.Library(NAMESPACE, "IMPL")
        lib.impl(op.name, _lazy_triton(op), "CUDA")
        _keepalive.append(lib)
    REGISTRY[op.name] = op
    return op


def _checked_reference(op: OpDef) -> Callable:
    """The CPU kernel without `_C`: the reference, behind the checks the C++ kernel would run (a raw
    torch.ops call reaches it without the wrapper's)."""
    def cpu_kernel(*args):
        op.check(*args)
        _opchecks.values(op.name, *args)
        return op.reference(*args)
    cpu_kernel.__name__ = f"{op.name}_reference"
    return cpu_kernel


def _lazy_triton(op: OpDef) -> Callable:
    def cuda_kernel(*args):
        return op.triton_launcher()(*args)
    cuda_kernel.__name__ = f"{op.name}_triton"
    return cuda_kernel


def _device_of(args) -> torch.device:
    for a in args:
        if isinstance(a, torch.Tensor):
            return a.device
    raise ValueError("no tensor argument")


def dispatch(name: str, *args):
    """Run op `name` on the current backend (see `fasttrack.backend`); `args` in schema order.

    Plain CPU inference calls go straight to the C++ kernel (`OpDef.cpu_kernel`), which validates
    everything it reads before writing anything; only when it raises does the Python check run, so
    bad metadata still gets the documented message (~1-5 µs of Python checks saved per call, as much
    as a tracker-sized kernel). Every other path checks first."""
    op = REGISTRY[name]
    backend = current_backend()
    if _calls_cpu_kernel(op, backend, args):
        try:
            return op.cpu_kernel(*args)
        except Exception:
            op.check(*args)
            raise
    op.check(*args)
    if exporting_to_onnx():
        # the graph holds the spec's aten ops (values are symbolic here: no value checks)
        return op.reference(*args)
    if backend == "reference":
        _opchecks.values(name, *args)   # the kernels' value checks, so the spec refuses what they refuse
        return op.reference(*args)
    if backend == "triton" and op.triton is not None and _device_of(args).type == "cpu":
        return _TritonOnCPU.apply(op, *args)
    # auto / native, and ops whose GPU kernel is CUDA C++ (documented: `triton` leaves them native)
    if _plain_cpu_inference(args):  # no _C: the Python-defined schema and reference kernel
        return op.overload.redispatch(_CPU_KEYS, *args)
    return op.packet(*args)


def _calls_cpu_kernel(op: OpDef, backend: str, args) -> bool:
    return (backend != "reference" and not (backend == "triton" and op.triton is not None)
            and _plain_cpu_inference(args) and op.cpu_kernel is not None)   # is_compiling first


def calls_cpu_kernel(name: str, *args) -> bool:
    """Whether `dispatch(name, *args)` calls the op's C++ CPU kernel directly (a plain CPU inference
    call on the auto / native backend, `_C` loaded): C++ code that calls the kernel itself (the
    fused ViT block, `fasttrack.nn.vit.native_block_serves`) runs exactly what the op call would."""
    return _calls_cpu_kernel(REGISTRY[name], current_backend(), args)


_CPU_KEYS = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
# Bound once: attribute lookups through `torch.` cost ~0.1 µs each on every op call.
_is_compiling = torch.compiler.is_compiling
_jit_tracing = torch._C._is_tracing
_dispatch_stack_len = torch._C._len_torch_dispatch_stack
_functorch_active = torch._C._are_functorch_transforms_active
_grad_enabled = torch.is_grad_enabled
_Tensor = torch.Tensor
# Plain tensors and Parameters (a module's weights; Parameter disables __torch_function__, so the
# kernel sees exactly what the dispatcher would). Any other subclass takes the dispatcher path.
_PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)
# Schema scalars, recognised by exact type first: `isinstance(x, torch.Tensor)` on a non-tensor goes
# through the tensor metaclass's __instancecheck__ (~0.08 µs for a str); scanning by type took this
# check from ~0.54 to ~0.46 µs a call.
_SCALAR_TYPES = frozenset((str, bool, int, float, list, tuple, type(None)))


def _plain_cpu_inference(args) -> bool:
    """True when a call can go straight to the CPU kernel: plain CPU tensors, nothing needing a
    gradient, no tracing, no dispatch mode or functorch transform. That skips only the Python
    autograd layer that `register_autograd` puts in front of the kernel (~6 µs a call) and the boxed
    argument conversion (~2 µs; `fasttrack._C.cpu`), as much as the kernel itself at tracker sizes;
    the kernel that runs is the same."""
    # is_compiling first: Dynamo cannot trace the other queries. Under torch.jit.trace (and the
    # legacy ONNX exporter) a direct C++ call would be invisible to the tracer: a constant in the graph.
    if _is_compiling() or _jit_tracing() or _dispatch_stack_len() or _functorch_active():
        return False
    grad = None
    for a in args:
        t = type(a)
        if t in _SCALAR_TYPES:
            continue
        if t not in _PLAIN_TENSOR_TYPES:
            if isinstance(a, _Tensor):  # a tensor subclass
                return False
            continue
        if not a.is_cpu:
            return False
        if grad is None:
            grad = _grad_enabled()
        if grad and a.requires_grad:
            return False
    return True


def serving_kernel(name: str, device: str) -> str:
    """Which kernel serves `name` on `device` under the current backend (for `fasttrack.info`)."""
    op = REGISTRY[name]
    backend = current_backend()
    if backend == "reference":
        return "reference (PyTorch)"
    if device == "cpu":
        if backend == "triton" and op.triton is not None:
            return "triton (interpreter)"
        if not _extension.loaded:
            return "reference (PyTorch; _C not loaded)"
        has_cpu = torch._C._dispatch_has_kernel_for_dispatch_key(op.qualname, "CPU")
        return "native C++" if has_cpu else "none (_C has no CPU kernel)"
    if op.cuda_cpp:
        return "CUDA C++" if _extension.cuda_built() else "none (_C built without CUDA)"
    return "triton" if op.triton is not None else "none (CPU-only internal op)"


class _TritonOnCPU(torch.autograd.Function):
    """Eager autograd around a Triton launcher run by the interpreter on CPU tensors, reusing the
    op's registered setup_context/backward (the same formula the dispatcher path uses)."""

    @staticmethod
    def forward(ctx, op, *args):
        out = op.triton_launcher()(*args)
        outs = out if isinstance(out, tuple) else (out,)
        ctx.mark_non_differentiable(*[o for o in outs if not o.is_floating_point()])
        if op.setup_context is not None:
            op.setup_context(ctx, args, out)
        ctx.op = op
        return out

    @staticmethod
    def backward(ctx, *grads):
        if ctx.op.backward is None:
            raise RuntimeError(f"fasttrack.{ctx.op.name} is not differentiable")
        g = ctx.op.backward(ctx, *grads) if len(grads) > 1 else ctx.op.backward(ctx, grads[0])
        g = g if isinstance(g, tuple) else (g,)
        return (None, *g)
