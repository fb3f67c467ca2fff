"""What the console says about an image_text_itc run beyond its loss: the duplicate-caption fraction of
each GLOBAL batch, and one warning line when the loss sits at its chance value (the run is not learning).

The loop calls `observe(batches, metrics)` after every optimizer step (device ops only: no host sync) and
`report(stats, global_step)` at log steps on every rank (one all_gather of the window's caption hashes).
"""
import torch
import torch.distributed as dist

from util import dist as du
from util.logger import LOG


class ContrastiveMonitor:
    """patience: optimizer steps the loss must stay within `tolerance` (relative) of `chance_loss`
    (ln G for CLIP, the constant-logit loss for SigLIP) before the warning; it is printed once per stuck
    stretch (again only after the loss has left chance and come back)."""

    def __init__(self, patience=100, tolerance=0.01):
        self.patience, self.tolerance = patience, tolerance
        self.stuck_steps = None   # device: consecutive steps near chance, so far
        self.hashes = []          # this window's caption hashes, one [rows] tensor per step
        self.warned = False

    def observe(self, batches, metrics):
        if "caption_hash" in batches[0]:
            self.hashes.append(torch.cat([b["caption_hash"] for b in batches]))
        loss, chance = metrics["itc_loss"].float(), metrics["chance_loss"].float()
        near = ((loss - chance).abs() <= self.tolerance * chance).long()
        self.stuck_steps = near if self.stuck_steps is None else (self.stuck_steps + 1) * near

    def report(self, stats, global_step):
        if self.hashes:
            stats["duplicate_captions"] = global_duplicate_fraction(torch.stack(self.hashes))
            self.hashes = []
        stuck = int(self.stuck_steps) if self.stuck_steps is not None else 0
        if stuck < self.patience:
            self.warned = self.warned and stuck > 0
            return
        if self.warned:
            return
        self.warned = True
        LOG.warning(
            f"the contrastive loss has stayed within {self.tolerance:.0%} of its chance value "
            f"{stats.get('chance_loss', float('nan')):.4f} for {stuck} steps (to step {global_step}): the model is "
            f"not learning. Embedding spread (1 - mean cosine similarity within a batch; 0 = one embedding for "
            f"every input): image {stats.get('image_spread', float('nan')):.4f}, text "
            f"{stats.get('text_spread', float('nan')):.4f}; duplicate captions "
            f"{stats.get('duplicate_captions', 0.0):.3f}. Try: --itc_pool mean, a lower --blr or longer "
            f"--warmup_epochs, --clip_grad 1.0, and check that the captions belong to their images.")


def duplicate_fraction(hashes: torch.Tensor) -> float:
    """Fraction of the captions (hashes [N], e.g. a whole global batch) that repeat one seen earlier in it
    (0 when all differ). Identical captions are false negatives for a contrastive loss: a high value
    explains a loss that cannot reach zero."""
    if hashes.numel() == 0:
        return 0.0
    return 1.0 - torch.unique(hashes).numel() / hashes.numel()


def global_duplicate_fraction(hashes):
    """hashes [steps, rows] of this rank -> the mean over steps of the duplicate fraction of each step's
    global batch (every rank's rows of that step together); the same float on every rank."""
    if du.is_dist():
        parts = [torch.empty_like(hashes) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, hashes.contiguous())
        hashes = torch.cat(parts, dim=1)
    return sum(duplicate_fraction(h) for h in hashes) / len(hashes)
