"""Which checkpoint a run starts from: its own latest (requeue), an explicit training checkpoint, or
weights-only initialisation. A training checkpoint in the output folder always wins, so a requeued job
continues instead of restarting from the weights named by `--resume`.

The run's own checkpoints are tried newest first: the latest ones (`checkpoint-latest.pth`, and an `--fsdp`
run's sharded folder `checkpoint-latest.dcp`, or `checkpoint-latest.dcp.old` when a crash fell inside its
swap), then the kept `checkpoint-<epoch>.pth` / `.dcp` copies, each group ordered by the `global_step` stored
inside. Either format resumes with or without `--fsdp` (util/sharded_checkpoint.py). One that cannot be read or
fails its checksum is skipped with one line saying which and why; rank 0 reads and verifies, every rank
then loads the file it chose (the others would only repeat the checksum).
"""
import os
import re
from dataclasses import dataclass

import torch

from util import dist as du
from util.checkpoint import CorruptCheckpoint, extract_state_dict, is_training_checkpoint, latest_in, load_file
from util.errors import UserError
from util.logger import LOG
from util.sharded_checkpoint import LATEST_SHARDED, STATE_FILE, is_sharded, load_sharded, weights_view

_KEPT = re.compile(r"^checkpoint-(\d+)\.(pth|dcp)$")
_LATEST_SHARDED = (LATEST_SHARDED, LATEST_SHARDED + ".old")


@dataclass
class ResumePlan:
    kind: str            # "none" | "train" (full state) | "weights"
    path: str = None
    ckpt: dict = None
    reason: str = "no --resume given: starting from random initialisation"

    @property
    def state_dict(self):
        return extract_state_dict(self.ckpt) if self.ckpt is not None else None


def read_checkpoint(path, flag, verify=True):
    """A single-file checkpoint, or the non-tensor state of a sharded folder (its files verified)."""
    return load_sharded(path, flag, verify) if os.path.isdir(path) else load_file(path, flag, verify)


def _stored_step(path):
    """The global_step a checkpoint holds (read lazily: tensors are memory-mapped, not loaded)."""
    try:
        file = os.path.join(path, STATE_FILE) if os.path.isdir(path) else path
        return int(torch.load(file, map_location="cpu", weights_only=True, mmap=True)["global_step"])
    except Exception:  # noqa: BLE001 - unreadable: tried last, and skipped with its reason then
        return -1


def _has_own(output_dir):
    """Whether the folder holds any checkpoint of the run (names only: no file is read on any rank)."""
    return bool(own_candidates(output_dir, read=False))


def has_own_checkpoint(output_dir):
    """Whether a run in `output_dir` would continue from its own checkpoint (then --resume is not read)."""
    return bool(output_dir) and os.path.isdir(output_dir) and _has_own(output_dir)


def own_candidates(output_dir, read=True):
    """The run's training checkpoints in the order they are tried: the latest ones, then kept copies, each by
    stored step (`read` False: names only, unordered)."""
    kept = [os.path.join(output_dir, n) for n in os.listdir(output_dir) if _KEPT.match(n)]
    latest = [p for p in [latest_in(output_dir)] + [os.path.join(output_dir, n) for n in _LATEST_SHARDED]
              if p and (os.path.isfile(p) or is_sharded(p))]
    if read:
        for group in (latest, kept):
            group.sort(key=lambda p: (_stored_step(p), p), reverse=True)
    return latest + kept


def _choose_own(output_dir):
    """(rank 0) (path, checkpoint) of the newest readable, verified checkpoint of the run (or None, None),
    and the skipped ones with their reasons."""
    skipped = []
    for path in own_candidates(output_dir):
        try:
            ckpt = read_checkpoint(path, "--output_dir")
        except CorruptCheckpoint as e:
            skipped.append((path, str(e)))
            continue
        if not is_training_checkpoint(ckpt):
            skipped.append((path, "not a training checkpoint"))
            continue
        return path, ckpt, skipped
    return None, None, skipped


def load_own(output_dir):
    """(path, checkpoint) of the run's own checkpoint to continue, or (None, None) when it has none."""
    if not has_own_checkpoint(output_dir):
        return None, None
    path, ckpt, skipped = _choose_own(output_dir) if du.rank() == 0 else (None, None, None)
    path, skipped = du.broadcast_object((path, skipped))
    for bad, why in skipped:
        LOG.warning(f"skipping {bad}: {why}" + (f"; falling back to {path}" if path else ""))
    if path is None:
        raise UserError(f"--output_dir {output_dir}: no readable training checkpoint "
                        f"({'; '.join(why for _, why in skipped)}); restore one, or move the folder away to "
                        "start fresh")
    if ckpt is None:  # ranks other than 0: the file rank 0 verified
        ckpt = read_checkpoint(path, "--output_dir", verify=False)
    return path, ckpt


def plan_resume(output_dir, resume, mode):
    """Decide and load (weights_only, checksum verified) the checkpoint a run starts from."""
    own, ckpt = load_own(output_dir)
    if own and ckpt.get("mode") not in (None, mode):
        raise UserError(f"--output_dir {output_dir}: holds {own}, a checkpoint of a {ckpt['mode']} run, and this "
                        f"is a {mode} run; pick another --output_dir (to start from those weights, add --resume "
                        f"{own})")
    if own:
        note = f" (takes precedence over --resume {resume})" if resume and resume != "auto" else ""
        return ResumePlan("train", own, ckpt, f"resuming this run from {own} (global step {ckpt['global_step']})"
                                              f"{note}")
    if not resume:
        return ResumePlan("none")
    if resume == "auto":
        return ResumePlan("none", reason=f"--resume auto: no checkpoint in {output_dir}, starting fresh")
    ckpt = read_checkpoint(resume, "--resume")
    if is_training_checkpoint(ckpt) and ckpt.get("mode") == mode:
        return ResumePlan("train", resume, ckpt, f"resuming the training state of {resume}")
    if isinstance(ckpt, dict) and ckpt.get("sharded"):  # a new stage from a sharded run: its weights alone
        ckpt = weights_view(ckpt, resume)
    if extract_state_dict(ckpt) is None:
        raise UserError(f"--resume {resume}: no model weights found (expected a state dict, possibly under "
                        "'model', 'module' or 'state_dict')")
    return ResumePlan("weights", resume, ckpt, f"initialising weights from {resume}")
