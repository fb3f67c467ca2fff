"""Samplers that yield `(epoch, index)` keys, so keyed data randomness always knows the epoch (even in
persistent workers) and a resumed epoch can start at the first unseen sample."""
import math

import torch
from torch.utils.data import Sampler


class KeyedDistributedSampler(Sampler):
    """DistributedSampler's order (same seed+epoch permutation, padded, rank::world) as (epoch, index) keys.

    `set_epoch(epoch, start=k)` skips this rank's first k samples (mid-epoch resume). `order(seed, epoch)`,
    when given, replaces the permutation (a dataset's own order, e.g. parquet row groups for locality). Ranks
    always take every world-th entry, so what a run has consumed is a prefix of the order on any world size
    (a resume on another number of ranks continues exactly).
    """

    def __init__(self, num_items, num_replicas=1, rank=0, shuffle=True, seed=0, order=None):
        self.num_items, self.num_replicas, self.rank = num_items, num_replicas, rank
        self.shuffle, self.seed, self.order = shuffle, seed, order
        self.num_samples = math.ceil(num_items / num_replicas)
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch, start=0):
        self.epoch, self.start = epoch, start

    def rank_indices(self, epoch):
        if self.order is not None:
            order = list(self.order(self.seed, epoch))
        elif self.shuffle:
            g = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(self.num_items, generator=g).tolist()
        else:
            order = list(range(self.num_items))
        total = self.num_samples * self.num_replicas
        order += (order * math.ceil(total / max(len(order), 1)))[: total - len(order)]
        return order[self.rank:total:self.num_replicas]

    def __iter__(self):
        for idx in self.rank_indices(self.epoch)[self.start:]:
            yield (self.epoch, idx)

    def __len__(self):
        return self.num_samples - self.start


class ShardedEvalSampler(Sampler):
    """Each held-out item exactly once over all ranks (rank::world, no padding), with a fixed key epoch so
    evaluation masks are the same every epoch and on any number of ranks."""

    def __init__(self, num_items, num_replicas=1, rank=0, key_epoch=0):
        self.indices = list(range(rank, num_items, num_replicas))
        self.key_epoch = key_epoch

    def __iter__(self):
        return ((self.key_epoch, i) for i in self.indices)

    def __len__(self):
        return len(self.indices)
