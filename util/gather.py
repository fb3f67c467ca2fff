"""Gather features across ranks with gradients flowing back to each rank's own slice.

Why SUM in the backward pass: with W ranks, rank r computes a loss L_r over its own rows, but
L_r depends on every rank's features (through the gathered similarity matrix). The gradient of
the total sum_r L_r with respect to the features that rank k produced is sum_r dL_r/dx_k, and
rank r holds dL_r/dx_k in slice k of its gathered tensor's gradient. An all_reduce(SUM) of that
gradient followed by taking slice k therefore gives rank k exactly d(sum_r L_r)/dx_k. DDP then
averages parameter gradients over ranks, so each parameter receives (1/W) d(sum_r L_r)/dtheta,
which equals the single-process gradient whenever the per-rank losses are normalised so that
sum_r L_r = W * L_global (each rank divides by its local row count B = G / W; see
models/contrastive.py). Both losses here are defined that way.
"""
import torch
import torch.distributed as dist


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class _AllGatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        world = dist.get_world_size()
        ctx.rank, ctx.batch = dist.get_rank(), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = ctx.rank * ctx.batch
        return grad[start:start + ctx.batch]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate x from every rank in rank order, keeping the autograd graph.

    Args:
        x: [B, D] local features; B must be the same on every rank (all_gather needs equal shapes).
    Returns:
        [world * B, D]; rows [rank * B, (rank + 1) * B) are this rank's own x. Without an
        initialised process group (or with one rank) x itself is returned.
    The backward pass all-reduces (SUM) the gradient and keeps this rank's slice; every rank must
    call backward (as in any DDP step), or the others wait on the collective.
    """
    if _world() == 1:
        return x
    return _AllGatherWithGrad.apply(x)
