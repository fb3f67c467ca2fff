"""`--fsdp`: FSDP2 `fully_shard` on every transformer block, then on the root (the last of torchtitan's three
wraps: activation checkpointing, compile, sharding; models/checkpointing.py does the first two).

Each rank keeps 1/world of every parameter, gradient and optimizer state (DTensors sharded on dim 0); a block's
(ours, timm's, a Hugging Face text tower's layer) full weights are all-gathered just before its forward and
backward and freed after, and its gradients are
reduce-scattered (averaged) in its backward, so the update equals DDP's on the same global batch.

- Scalar parameters (the ITC log-temperature and bias) cannot be sharded: they stay whole on every rank, outside
  FSDP, and `util.dist.finish_gradients` averages their gradients over the ranks once per optimizer step (DDP's rule).
- Frozen parameters (LoRA's base weights, a locked tower) shard like the others and get no gradient.
- Mixed precision on CUDA: bf16 parameters for the compute, gradients reduced in fp32, the fp32 shards updated by
  the optimizer (`MixedPrecisionPolicy`); fp16 is refused with --fsdp.
- Work outside the root's forward (evaluation, the contrastive feature cache) runs through
  `util.dist.call_whole(model, fn)`: the root's `outside_forward(fn)` is registered as an FSDP forward method, so
  it all-gathers the root's own parameters as a forward would; the blocks gather theirs in their forward. `util.dist.gradient_sync` skips the reduction on all but the last micro-batch of a step.
"""
import torch

from models.checkpointing import _block_lists

SHARDED_LISTS = ("blocks", "layer")  # ours and timm's blocks, a Hugging Face text tower's encoder.layer


def shard_model(model, param_dtype=None):
    """fully_shard each block of `model`, then `model` itself; `param_dtype` (CUDA: the autocast dtype) is the
    compute dtype of the parameters, gradients are reduced in fp32. Returns `model` (sharded in place)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    # Inputs keep their dtype (autocast decides the compute dtype, as under DDP): a cast of the forward's inputs
    # would round the fp32 loss normaliser, the cached contrastive features and the residual stream to bf16.
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None,
                                  cast_forward_inputs=False)
    scalars = {p for p in model.parameters() if p.ndim == 0}
    for blocks in _block_lists(model, SHARDED_LISTS):
        for block in blocks:
            fully_shard(block, mp_policy=policy, ignored_params=scalars & set(block.parameters()))
    fully_shard(model, mp_policy=policy, ignored_params=scalars)
    register_fsdp_forward_method(model, "outside_forward")
    model._replicated_params = [p for p in model.parameters() if p.ndim == 0 and p.requires_grad]
    model._compute_dtype = param_dtype
    return model


def describe_shards(model):
    """One line: how much of the parameters this rank holds."""
    from torch.distributed.tensor import DTensor

    local = sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in model.parameters())
    total = sum(p.numel() for p in model.parameters())
    return (f"FSDP: {sum(len(b) for b in _block_lists(model, SHARDED_LISTS))} blocks and the root sharded; this rank holds "
            f"{local / 1e6:.3f}M of {total / 1e6:.3f}M parameters (and their gradients and optimizer state)")
