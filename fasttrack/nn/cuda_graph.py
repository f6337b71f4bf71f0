"""CUDA-graph capture of a fused tracker step: `graphed(fn)` and the ``cuda_graph=True`` option of
the families' ``track`` methods.

Why: a B=1 tracker step on a GPU is launch-bound (a ViT-B over 320 tokens is ~0.1 ms of H100
compute, spread over ~150 kernel launches of a few µs of host time each). A CUDA graph replays all
of them with one launch. The fused forwards read nothing back on the host (tested: nn/ce.py,
`FusedBypassBlock`'s dispatch rule), which is what makes them capturable.

`GraphedStep(fn)` captures ``fn`` once per *input signature* — the shape, dtype, device and
strides of every tensor argument and the value of every other argument — and replays it:
- the tensor arguments are copied into the capture's static buffers, the graph replays, and the
  capture's static outputs are returned. They are overwritten by the next call with the same
  signature: clone what you keep across steps (``clone_outputs=True`` does it for you);
- the step runs under ``torch.inference_mode()`` (no autograd), after two eager warm-up runs on a
  side stream (Triton compiles, oneDNN/cuBLAS pick their algorithms, caches fill);
- everything ``fn`` reads that is not an argument (weights, cached constants) is read at the
  address it had when captured, and no Python runs in a replay: weights a kernel reads directly see
  in-place updates, but values derived from weights at capture (the head's BatchNorm-folded
  convolutions, `fasttrack.nn.derived`) and replaced tensors do not — call `reset()` after changing
  a model's weights;
- a call on CPU tensors raises ValueError naming the argument (CUDA graphs are a CUDA feature).
Outputs equal the eager fused step exactly: the same kernels run on the same values.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch
from torch.utils._pytree import tree_flatten, tree_map

__all__ = ["GraphedStep", "graphed", "require_cuda", "require_graph_inputs"]


def require_cuda(who: str, **tensors) -> None:
    """Raise a ValueError naming the first argument that is not a CUDA tensor."""
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.device.type != "cuda":
            raise ValueError(f"{who}: `cuda_graph=True` needs CUDA tensors (CUDA graphs are a CUDA feature); "
                             f"`{name}` is on {t.device}")
    if not torch.cuda.is_available():
        raise ValueError(f"{who}: `cuda_graph=True` needs a CUDA device; this process has none")


def require_graph_inputs(who: str, ce_template_mask, **tensors) -> None:
    """`require_cuda`, and a CE template mask a graph can replay: None, "ctr_point" or an int64 row
    index (a bool mask names its rows by value, which a replay cannot read)."""
    require_cuda(who, **tensors)
    if isinstance(ce_template_mask, torch.Tensor) and ce_template_mask.dtype == torch.bool:
        raise ValueError(f"{who}: with `cuda_graph=True`, `ce_template_mask` must be None, 'ctr_point' or an "
                         "int64 row index [B, R], not a bool mask (its rows are named by value, which a graph "
                         "replay cannot read); 'ctr_point' is the official tracker's setting")


@dataclasses.dataclass
class _Capture:
    graph: "torch.cuda.CUDAGraph"
    inputs: list            # static tensor arguments, in flattened order
    outputs: object         # the static output tree


def _signature(flat_args) -> tuple:
    key = []
    for a in flat_args:
        if isinstance(a, torch.Tensor):
            key.append(("T", tuple(a.shape), a.dtype, a.device, tuple(a.stride())))
        elif a is None or isinstance(a, (bool, int, float, str)):
            key.append(("V", type(a).__name__, a))
        else:
            raise TypeError(f"graphed: arguments must be tensors, None, bool, int, float or str (they key the "
                            f"capture), got {type(a).__name__}")
    return tuple(key)


class GraphedStep:
    """``fn`` captured in a CUDA graph per input signature (module docstring)."""

    def __init__(self, fn: Callable, *, name: str | None = None, warmup: int = 2, clone_outputs: bool = False):
        self.fn = fn
        self.name = name or getattr(fn, "__qualname__", type(fn).__name__)
        self.warmup = int(warmup)
        self.clone_outputs = bool(clone_outputs)
        self._captures: dict[tuple, _Capture] = {}
        self._pool = None

    def reset(self) -> None:
        """Forget every capture (after changing weights by assignment, or moving the model)."""
        self._captures.clear()
        self._pool = None

    @property
    def captures(self) -> int:
        return len(self._captures)

    def __call__(self, *args, **kwargs):
        flat, spec = tree_flatten((args, kwargs))
        for i, a in enumerate(flat):
            if isinstance(a, torch.Tensor) and a.device.type != "cuda":
                raise ValueError(f"{self.name}: a CUDA-graph step needs CUDA tensors (CUDA graphs are a CUDA "
                                 f"feature); tensor argument {i} is on {a.device}")
        key = _signature(flat)
        cap = self._captures.get(key)
        if cap is None:
            cap = self._captures[key] = self._capture(flat, spec)
        with torch.no_grad():
            for static, a in zip(cap.inputs, (a for a in flat if isinstance(a, torch.Tensor))):
                if static.data_ptr() != a.data_ptr():
                    static.copy_(a)
        cap.graph.replay()
        if self.clone_outputs:
            return tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, cap.outputs)
        return cap.outputs

    def _capture(self, flat, spec) -> _Capture:
        from torch.utils._pytree import tree_unflatten

        statics = [a.detach().clone() if isinstance(a, torch.Tensor) else a for a in flat]
        args, kwargs = tree_unflatten(statics, spec)
        with torch.inference_mode():
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(self.warmup):
                    self.fn(*args, **kwargs)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            with torch.cuda.graph(graph, pool=self._pool):
                outputs = self.fn(*args, **kwargs)
        return _Capture(graph, [s for s in statics if isinstance(s, torch.Tensor)], outputs)


def graphed(fn: Callable, example_inputs: tuple | None = None, *, warmup: int = 2,
            clone_outputs: bool = False) -> GraphedStep:
    """``fn`` (a fused module or any callable of tensors) captured in a CUDA graph once per input
    signature and replayed (module docstring: what is static, what is copied, exactness). E.g.
    ``step = fasttrack.graphed(fused_compresstracker, (z, x)); out = step(z, x)``.

    Args:
        fn: the step; its arguments are tensors, None, bool, int, float or str.
        example_inputs: a tuple of arguments to capture with right away (otherwise the first call
            of each signature captures).
        warmup: eager runs on a side stream before each capture.
        clone_outputs: return clones instead of the capture's output buffers.
    Returns:
        A `GraphedStep`, called like ``fn``."""
    step = GraphedStep(fn, warmup=warmup, clone_outputs=clone_outputs)
    if example_inputs is not None:
        step(*example_inputs)
    return step
