"""When to write the run's checkpoints, and writing them safely from every rank's point of view.

Triggers: every epoch end (`checkpoint-latest.pth`), a kept copy every `save_per_epochs`, every
`save_every_steps` optimizer steps, and every `save_every_minutes` of wall time. The time trigger is
decided by rank 0 at log steps and broadcast, so ranks never disagree about entering a save (which
gathers RNG states from every rank). A non-finite loss seen by any rank since the last save blocks it.
`sharded` (an `--fsdp` run): every rank writes its shards into `checkpoint-latest.dcp/` (and `checkpoint-<N>.dcp/`
for a kept copy), util/sharded_checkpoint.py; otherwise rank 0 writes the single files.
"""
import os
import time

import torch

from util import dist as du
from util.checkpoint import LATEST, rng_state, save_atomic, written_by_rank0
from util.errors import NonFiniteLoss
from util.logger import LOG
from util.sharded_checkpoint import LATEST_SHARDED, SUFFIX, copy_sharded, save_sharded


class NonFiniteCheckpoint(NonFiniteLoss):
    pass


class Checkpointer:
    def __init__(self, output_dir, build_state, device, save_per_epochs=0, save_every_steps=0,
                 save_every_minutes=0.0, sharded=False):
        """build_state(epoch, step_in_epoch, global_step) -> dict of everything but the RNG states (called on rank
        0 only, or on every rank when `sharded`)."""
        self.output_dir, self.build_state, self.device, self.sharded = output_dir, build_state, device, sharded
        self.latest_name = LATEST_SHARDED if sharded else LATEST
        self.save_per_epochs, self.save_every_steps = save_per_epochs, save_every_steps
        self.save_every_minutes = save_every_minutes
        self.last_save = time.monotonic()
        # Set by the training loop (on the device, no sync) when any step's loss is non-finite.
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=device)

    def after_step(self, epoch, step_in_epoch, global_step, is_log_step):
        due = bool(self.save_every_steps) and global_step % self.save_every_steps == 0
        if self.save_every_minutes and is_log_step:
            late = time.monotonic() - self.last_save >= self.save_every_minutes * 60
            due = du.broadcast_flag(late, self.device) or due
        if due:
            self.save(epoch, step_in_epoch, global_step)

    def end_of_epoch(self, epoch, num_epochs, global_step):
        """Latest checkpoint pointing at the next epoch; a kept copy every save_per_epochs and at the end, named
        after the epoch it completes (1-based: `checkpoint-4.pth` after the 4th)."""
        keep = (self.save_per_epochs and (epoch + 1) % self.save_per_epochs == 0) or epoch + 1 == num_epochs
        self.save(epoch + 1, 0, global_step, keep_name=f"checkpoint-{epoch + 1}.pth" if keep else None)

    def save(self, epoch, step_in_epoch, global_step, keep_name=None):
        bad = du.all_reduce_sum(self.nonfinite.to(torch.float32).reshape(1))
        if bad.item() > 0:
            raise NonFiniteCheckpoint(
                f"a non-finite loss occurred before global step {global_step}; not writing a checkpoint over the "
                "last good one. Lower --blr, set --clip_grad, or check the data, then resume with --resume auto.")
        rngs = du.all_gather_objects(rng_state())
        at = f"after epoch {epoch}" if step_in_epoch == 0 and epoch > 0 else \
            f"epoch {epoch + 1}, {step_in_epoch} step(s) into it"

        def state():
            return {**self.build_state(epoch, step_in_epoch, global_step), "rng": rngs}

        def saved(where, how=""):
            LOG.info(f"saved {where} ({at}, global step {global_step}{how})")
            self.last_save = time.monotonic()

        if self.sharded:  # every rank writes its shards
            latest = os.path.join(self.output_dir, LATEST_SHARDED)
            save_sharded(state(), latest)
            if keep_name:
                keep_name = keep_name.replace(".pth", SUFFIX)
                copy_sharded(latest, os.path.join(self.output_dir, keep_name))
            return saved(LATEST_SHARDED + (f" and {keep_name}" if keep_name else ""), "; every rank wrote its shards")

        def write():
            full = state()
            save_atomic(full, os.path.join(self.output_dir, LATEST))
            if keep_name:
                save_atomic(full, os.path.join(self.output_dir, keep_name))

        written_by_rank0(write, self.device)
        saved(LATEST + (f" and {keep_name}" if keep_name else ""))
