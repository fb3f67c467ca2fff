"""Two small building blocks of the backbone, defined here so that building a model does not import timm (whose
layer package loads torchvision: about 4 s at every process start, paid by every rank and data worker launch).
Both draw exactly what timm's `trunc_normal_` and `DropPath` draw (tests/test_model.py compares them), so
initialisation and stochastic depth are unchanged.
"""
import math

import torch
import torch.nn as nn


@torch.no_grad()
def trunc_normal_(tensor, mean=0.0, std=1.0, a=-2.0, b=2.0):
    """Fill `tensor` from N(mean, std^2) truncated to [a, b] (absolute bounds), by the inverse-CDF method: a
    uniform draw between the CDF values of the bounds, mapped back through the inverse normal CDF."""
    def cdf(x):
        return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))

    lo, hi = cdf((a - mean) / std), cdf((b - mean) / std)
    tensor.uniform_(2 * lo - 1, 2 * hi - 1)  # erfinv maps (-1, 1) onto the real line
    tensor.erfinv_().mul_(std * math.sqrt(2.0)).add_(mean)
    return tensor.clamp_(min=a, max=b)


class DropPath(nn.Module):
    """Stochastic depth: in training, each sample's residual branch is zeroed with probability `drop_prob` and the
    kept ones are scaled by 1 / (1 - drop_prob)."""

    def __init__(self, drop_prob=0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self):
        return f"drop_prob={self.drop_prob:.3f}"
