"""DataLoaders for training (every rank the same number of equal batches) and held-out evaluation."""
import torch
from torch.utils.data import DataLoader

from custom_datasets.sampler import KeyedDistributedSampler, ShardedEvalSampler
from util.errors import UserError
from util.preemption import ignore_stop_signals


def train_loader(dataset, collate_fn, batch_size, rank, world_size, seed, num_workers, pin_memory, flag):
    """Shuffled keyed sampler; drop_last so every rank takes the same number of full batches."""
    if len(dataset) < batch_size * world_size:
        raise UserError(f"{flag}: {len(dataset)} samples are fewer than one global batch "
                        f"({batch_size} x {world_size} ranks); lower --batch_size")
    sampler = KeyedDistributedSampler(len(dataset), world_size, rank, shuffle=True, seed=seed,
                                      order=getattr(dataset, "epoch_order", None))
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate_fn,
                        num_workers=num_workers, pin_memory=pin_memory and torch.cuda.is_available(),
                        drop_last=True, persistent_workers=num_workers > 0,
                        # Own generator: worker seeding must not consume the model's RNG stream, or a
                        # resumed run (which creates its iterator at another point) would diverge.
                        generator=torch.Generator().manual_seed(seed),
                        prefetch_factor=4 if num_workers > 0 else None, worker_init_fn=ignore_stop_signals)
    return loader, sampler


def eval_loader(dataset, collate_fn, batch_size, rank, world_size, num_workers, pin_memory):
    """Each held-out item exactly once across ranks, in order, with fixed masking keys."""
    sampler = ShardedEvalSampler(len(dataset), world_size, rank)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate_fn,
                      num_workers=num_workers, pin_memory=pin_memory and torch.cuda.is_available(),
                      drop_last=False, persistent_workers=num_workers > 0, generator=torch.Generator(),
                      worker_init_fn=ignore_stop_signals)


def batches_per_epoch(sampler, batch_size):
    """Full micro-batches one rank draws per epoch (before any mid-epoch skip)."""
    return sampler.num_samples // batch_size
