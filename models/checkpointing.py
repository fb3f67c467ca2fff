"""Activation checkpointing per transformer block (`--grad_checkpointing [K]`): every K-th block (K = 1: all)
keeps only its input during the forward and recomputes its activations in the backward, trading about one extra
block forward for the memory of its activations. Non-reentrant torch.utils.checkpoint, which replays the RNG
state, so drop path and dropout draw the same masks and the gradients equal the run without it.
"""
import torch.utils.checkpoint as cp


def run_block(block, index, every, *args, **kwargs):
    """block(*args, **kwargs), checkpointed when `every` > 0, this is every `every`-th block and a graph is
    being built (evaluation and no_grad paths run plainly)."""
    import torch

    if every and index % every == 0 and torch.is_grad_enabled() and block.training:
        return cp.checkpoint(block, *args, use_reentrant=False, **kwargs)
    return block(*args, **kwargs)


def set_grad_checkpointing(model, every=1):
    """Turn activation checkpointing on for every `every`-th block of `model` (0: off): our multiway model and
    our text tower directly, a timm image tower through timm's own switch (all its blocks)."""
    for module in model.modules():
        if hasattr(module, "grad_checkpointing_every"):
            module.grad_checkpointing_every = int(every)
        elif hasattr(module, "set_grad_checkpointing") and module is not model and every:
            module.set_grad_checkpointing(True)
