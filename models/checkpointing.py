"""Opt-in scale levers on the transformer blocks, applied in torchtitan's order (activation checkpointing, then
compile, then sharding):

- `set_grad_checkpointing(model, K)` (`--grad_checkpointing [K]`): every K-th block (K = 1: all) keeps only its
  input during the forward and recomputes its activations in the backward, trading about one extra block
  forward for their memory. Non-reentrant torch.utils.checkpoint, inside the block's forward (so a compiled
  block compiles the checkpoint too); it replays the RNG state, so drop path and dropout draw the same masks and
  the gradients equal the run without it.
- `compile_blocks(model, backend)` (`--compile [backend]`): torch.compile of each block, not the whole model
  (one small graph reused by every block of a kind; the loop, the losses and the data stay eager). Text lengths
  are bucketed to a multiple of 8 (custom_datasets/tokenizer.py), so a run sees a few shapes, not one per step.
"""
import torch
import torch.utils.checkpoint as cp

from util.config import COMPILE_BACKENDS


def maybe_checkpoint(block, forward, *args, **kwargs):
    """forward(*args, **kwargs), checkpointed when the block is marked (`block.checkpointed`), a graph is being
    built and the block trains (evaluation and no_grad paths run plainly)."""
    if getattr(block, "checkpointed", False) and block.training and torch.is_grad_enabled():
        return cp.checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return forward(*args, **kwargs)


def _block_lists(model, names=("blocks",)):
    """The ModuleLists of transformer blocks in `model` (ours and timm's: `blocks`; with names ("blocks", "layer")
    also a Hugging Face encoder's `encoder.layer`), in order."""
    return [m for name, m in model.named_modules() if name.split(".")[-1] in names and
            isinstance(m, torch.nn.ModuleList | torch.nn.Sequential)]


def set_grad_checkpointing(model, every=1):
    """Mark every `every`-th block of each block stack of `model` for checkpointing (0: none). A timm image tower
    (the dual encoder's) uses timm's own switch on all its blocks."""
    for blocks in _block_lists(model):
        for i, block in enumerate(blocks):
            block.checkpointed = bool(every) and i % every == 0
    for module in model.modules():
        if module is not model and hasattr(module, "set_grad_checkpointing") and every:
            module.set_grad_checkpointing(True)


def compile_blocks(model, backend="inductor"):
    """torch.compile each transformer block of `model` in place; returns how many were compiled."""
    if backend not in COMPILE_BACKENDS:
        raise ValueError(f"compile backend must be one of {COMPILE_BACKENDS}, got {backend!r}")
    n = 0
    for blocks in _block_lists(model):
        for block in blocks:
            block.compile(backend=backend)
            n += 1
    return n


def apply_block_options(model, grad_checkpointing=0, compile_backend=None, log=print):
    """The entry points' --grad_checkpointing and --compile, in that order (AC, then compile)."""
    set_grad_checkpointing(model, grad_checkpointing)
    if compile_backend:
        log(f"compiling {compile_blocks(model, compile_backend)} blocks with {compile_backend} (at their first call)")
