"""Parameter initialisation with a fixed algorithm, so that a seeded network has the same weights
on every supported torch version (tests and the demo compare networks built from a seed;
`nn.init.trunc_normal_` changed the random stream it draws between torch releases)."""
from __future__ import annotations

import math

import torch

__all__ = ["trunc_normal_"]


def trunc_normal_(tensor: torch.Tensor, mean: float = 0.0, std: float = 1.0, a: float = -2.0, b: float = 2.0
                  ) -> torch.Tensor:
    """Fill ``tensor`` in place from N(mean, std²) truncated to [a, b], by inverse transform sampling
    of one ``torch.rand`` draw of the tensor's size from the default CPU generator (timm's method).
    Works on any device (the draw happens on the CPU and is copied) and on meta tensors."""
    def cdf(x):
        return (1.0 + math.erf(x / math.sqrt(2.0))) / 2.0
    lo, hi = cdf((a - mean) / std), cdf((b - mean) / std)
    with torch.no_grad():
        u = torch.rand(tensor.shape, dtype=torch.float32)
        t = (u * (2 * (hi - lo)) + (2 * lo - 1)).erfinv_().mul_(std * math.sqrt(2.0)).add_(mean).clamp_(a, b)
        if tensor.device.type != "meta":
            tensor.copy_(t)
    return tensor
