"""Atomic checkpoint files, RNG states as tensors, and `weights_only` loading.

A checkpoint is written to `<path>.tmp` and renamed over `<path>`, so a crash mid-write never leaves a
truncated `checkpoint-latest.pth`: the previous one stays intact until the new one is complete.
"""
import os
import random

import numpy as np
import torch

from util.errors import UserError

LATEST = "checkpoint-latest.pth"


def save_atomic(obj, path):
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_file(path, flag="--resume"):
    """torch.load with weights_only=True; a missing or unreadable file is a UserError naming the flag."""
    if not os.path.isfile(path):
        raise UserError(f"{flag}: file not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the file is not ours
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{flag}: cannot read {path} as a PyTorch checkpoint ({first})") from None


def latest_in(output_dir):
    """Path of the run's latest training checkpoint in `output_dir`, or None."""
    path = os.path.join(output_dir, LATEST)
    return path if os.path.isfile(path) else None


def is_training_checkpoint(obj):
    return isinstance(obj, dict) and {"model", "optimizer", "epoch", "global_step"} <= set(obj)


def extract_state_dict(obj):
    """The model tensors of a checkpoint nested under model/module/state_dict (or a bare state dict)."""
    for key in ("model", "module", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            return extract_state_dict(obj[key])
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return {k[len("module."):] if k.startswith("module.") else k: v for k, v in obj.items()}
    return None


def rng_state():
    """This process's RNG states as tensors/ints (loadable with weights_only=True)."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "python": torch.tensor(random.getstate()[1], dtype=torch.int64),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    random.setstate((3, tuple(int(v) for v in state["python"].tolist()), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))
