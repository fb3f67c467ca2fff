"""What an evaluation is, for the one `engine_pretrain.evaluate` loop: a loader over held-out items (a
ShardedEvalSampler split: rank r holds items r, r+W, r+2W, ...), a per-batch `predict` returning per-item
tensors, and `metrics` over all items at once, so every rank computes what one process would."""
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from util import dist as du


@dataclass(kw_only=True)
class EvalSet:
    loader: object
    num_items: int
    # predict(model, batch, prepared) -> {name: tensor [B, ...]} (detached); `prepared` is what
    # prepare(model) returned once per evaluation (e.g. zero-shot class weights), else None.
    predict: Callable
    # metrics({name: tensor [num_items, ...]} in item order) -> {metric: float}
    metrics: Callable
    prepare: Optional[Callable] = None
    # visualize(model, first batch, merged outputs) -> {"images": {tag: [N, 3, H, W] in [0, 1]}, "text":
    # {tag: markdown}} for TensorBoard (util/eval_visuals.py); called on rank 0 only, so no collectives
    visualize: Optional[Callable] = None


def gather_items(local, num_items):
    """{name: [n_r, ...] CPU tensors} of every rank -> {name: [num_items, ...]} in item order, on every rank.
    A rank with an empty shard sends {} (it may not know the names or shapes)."""
    shards = du.all_gather_objects(local)
    world = len(shards)
    names = next((list(s) for s in shards if s), None)
    if names is None:
        raise RuntimeError("evaluation produced no outputs on any rank")
    merged = {}
    for k in names:
        parts = [s[k] if s else None for s in shards]
        ref = next(p for p in parts if p is not None)
        out = torch.empty((sum(p.shape[0] for p in parts if p is not None), *ref.shape[1:]), dtype=ref.dtype)
        for r, p in enumerate(parts):
            if p is not None:
                out[r::world] = p
        merged[k] = out
    n = next(iter(merged.values())).shape[0]
    if n != num_items or ("index" in merged and not torch.equal(merged["index"], torch.arange(num_items))):
        raise RuntimeError(f"evaluation covered {n} items, expected each of {num_items} exactly once")
    return merged
