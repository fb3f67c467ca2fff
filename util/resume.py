"""Which checkpoint a run starts from: its own latest (requeue), an explicit training checkpoint, or
weights-only initialisation. A training checkpoint in the output folder always wins, so a requeued job
continues instead of restarting from the weights named by `--resume`."""
from dataclasses import dataclass

from util.checkpoint import extract_state_dict, is_training_checkpoint, latest_in, load_file
from util.errors import UserError


@dataclass
class ResumePlan:
    kind: str            # "none" | "train" (full state) | "weights"
    path: str = None
    ckpt: dict = None
    reason: str = "no --resume given: starting from random initialisation"

    @property
    def state_dict(self):
        return extract_state_dict(self.ckpt) if self.ckpt is not None else None


def plan_resume(output_dir, resume, mode):
    """Decide and load (weights_only) the checkpoint a run starts from."""
    own = latest_in(output_dir) if output_dir else None
    if own:
        ckpt = load_file(own, "--output_dir")
        note = f" (takes precedence over --resume {resume})" if resume and resume != "auto" else ""
        return ResumePlan("train", own, ckpt, f"resuming this run from {own}{note}")
    if not resume:
        return ResumePlan("none")
    if resume == "auto":
        return ResumePlan("none", reason=f"--resume auto: no checkpoint in {output_dir}, starting fresh")
    ckpt = load_file(resume, "--resume")
    if is_training_checkpoint(ckpt) and ckpt.get("mode") == mode:
        return ResumePlan("train", resume, ckpt, f"resuming the training state of {resume}")
    if extract_state_dict(ckpt) is None:
        raise UserError(f"--resume {resume}: no model weights found (expected a state dict, possibly under "
                        "'model', 'module' or 'state_dict')")
    return ResumePlan("weights", resume, ckpt, f"initialising weights from {resume}")
