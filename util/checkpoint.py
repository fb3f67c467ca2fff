"""Atomic checkpoint files with a checksum inside, RNG states as tensors, and `weights_only` loading.

A checkpoint is written to `<path>.tmp` and renamed over `<path>`, so a crash mid-write never leaves a
truncated `checkpoint-latest.pth`: the previous one stays intact until the new one is complete. A write
that fails (disk full, file-size limit, quota) removes its `.tmp` and raises util.errors.WriteFailed with
one line naming the file and the reason. Every dict written carries `checksum`: a CRC-32 over the bytes,
dtype and shape of every tensor in it (in order), checked when the file is read, so flipped bytes inside a
tensor are caught instead of loading silently.
"""
import glob
import os
import random
import zlib

import numpy as np
import torch

from util.errors import UserError, WriteFailed

LATEST = "checkpoint-latest.pth"
CHECKSUM = "checksum"


class CorruptCheckpoint(UserError):
    """A checkpoint that cannot be read or whose tensors do not match their checksum."""


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            if k != CHECKSUM:
                yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def tensor_checksum(obj):
    """CRC-32 of every tensor of `obj` (nested dicts/lists, in order): its dtype, shape and bytes."""
    crc = 0
    for t in _tensors(obj):
        t = t.detach()
        crc = zlib.crc32(f"{t.dtype}{tuple(t.shape)}".encode(), crc)
        if t.numel():
            flat = t.to("cpu").contiguous().reshape(-1)
            crc = zlib.crc32(flat.view(torch.uint8).numpy(), crc)
    return crc


def verify_checksum(obj, path):
    """Raise CorruptCheckpoint if `obj` (as read from `path`) holds a checksum its tensors do not match; files
    written before checksums existed pass."""
    if not isinstance(obj, dict) or CHECKSUM not in obj:
        return
    got = tensor_checksum(obj)
    if int(obj[CHECKSUM]) != got:
        raise CorruptCheckpoint(f"{path}: the tensors do not match the checksum stored in the file "
                                f"({int(obj[CHECKSUM]):08x} stored, {got:08x} computed): it changed after it was "
                                "written")


class _WriteRecorder:
    """A file wrapper that keeps the first OSError of a write: torch.save reports a failed write as a generic
    RuntimeError ("enforce fail at inline_container.cc"), which does not say the disk is full."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data):
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self):
        return self.f.flush()


def _remove(path):
    try:
        os.remove(path)
    except OSError:
        pass


def failure_reason(error):
    """One lower-case phrase for why a write failed ("no space left on device", "file too large", ...)."""
    if isinstance(error, OSError) and error.errno:
        return os.strerror(error.errno).lower()
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def save_atomic(obj, path):
    """torch.save `obj` (a dict gets its checksum) to `path` via `path.tmp`; on failure the partial file is
    removed, `path` is left as it was, and WriteFailed names the file and the reason."""
    if isinstance(obj, dict):
        obj = {**{k: v for k, v in obj.items() if k != CHECKSUM}, CHECKSUM: tensor_checksum(obj)}

    def write(tmp):
        with open(tmp, "wb") as f:
            recorder = _WriteRecorder(f)
            try:
                torch.save(obj, recorder)
            except Exception:
                if recorder.error is not None:  # torch.save's own message hides the errno
                    raise recorder.error from None
                raise
            f.flush()
            os.fsync(f.fileno())
    replace_atomically(path, write)


def copy_atomic(src, dst):
    """Copy `src` over `dst` via `dst.tmp` (the same failure handling as save_atomic)."""
    import shutil

    replace_atomically(dst, lambda tmp: shutil.copyfile(src, tmp))


def replace_atomically(path, write):
    """write(`path`.tmp), then rename it over `path`; on a failure the partial file is removed, `path` is left
    as it was, and WriteFailed names the file and the reason."""
    tmp = f"{path}.tmp"
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        _remove(tmp)
        if not isinstance(e, Exception):  # KeyboardInterrupt, SystemExit: not a write failure
            raise
        raise WriteFailed(f"{failure_reason(e)} writing {path} (the previous file, if any, is intact)") from None


def written_by_rank0(write, device):
    """Run `write()` on rank 0 only and tell every rank whether it failed: all raise the WriteFailed together
    (exit 4), so no rank is left waiting in a collective for one that stopped."""
    from util import dist as du

    failure = None
    if du.rank() == 0:
        try:
            write()
        except WriteFailed as e:
            failure = e
    if du.broadcast_flag(failure is not None, device):
        raise failure or WriteFailed("rank 0 could not write a file of the run (its message says which)")


def remove_stale_partials(output_dir):
    """Delete `*.tmp` files and folders (a sharded checkpoint's) a killed writer left in `output_dir` (they can
    fill the disk the next save needs); returns their names. (A sharded folder's `.old`, which a crash inside its
    swap leaves, is a resume candidate: the next save of that name removes it.)"""
    import shutil

    stale = sorted(glob.glob(os.path.join(glob.escape(output_dir), "*.tmp")))
    for path in stale:
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            _remove(path)
    return [os.path.basename(p) for p in stale]


def load_file(path, flag="--resume", verify=True):
    """torch.load with weights_only=True, the checksum verified (`verify`); a missing file is a UserError
    naming the flag, an unreadable or mismatching one a CorruptCheckpoint (a UserError) naming it too. A sharded
    checkpoint folder (an --fsdp run's) reads as its weights and records, without the optimizer state, so every
    tool that takes a checkpoint file takes the folder too."""
    from util import sharded_checkpoint  # (it imports this module)

    if sharded_checkpoint.is_sharded(path):
        return sharded_checkpoint.weights_view(sharded_checkpoint.load_sharded(path, flag, verify), path)
    if not os.path.isfile(path):
        raise UserError(f"{flag}: file not found: {path}")
    try:
        obj = _load_mapped(path)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the file is not ours
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CorruptCheckpoint(f"{flag}: cannot read {path} as a PyTorch checkpoint ({first})") from None
    if verify:
        try:
            verify_checksum(obj, path)
        except CorruptCheckpoint as e:
            raise CorruptCheckpoint(f"{flag}: {e}") from None
    return obj


def _load_mapped(path):
    """torch.load memory-mapped (tensors are read from the page cache as they are used, and ranks on one node
    share those pages); a file in the legacy (non-zip) format cannot be mapped and is read whole."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e) and "zip" not in str(e):
            raise
        return torch.load(path, map_location="cpu", weights_only=True)


def latest_in(output_dir):
    """Path of the run's latest training checkpoint in `output_dir`, or None."""
    path = os.path.join(output_dir, LATEST)
    return path if os.path.isfile(path) else None


def is_training_checkpoint(obj):
    """A run's full state: a single file, or the state of a sharded folder (util.sharded_checkpoint)."""
    return isinstance(obj, dict) and {"epoch", "global_step"} <= set(obj) and \
        ({"model", "optimizer"} <= set(obj) or bool(obj.get("sharded")))


def extract_state_dict(obj):
    """The model tensors of a checkpoint nested under model/module/state_dict (or a bare state dict)."""
    for key in ("model", "module", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            return extract_state_dict(obj[key])
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return {k[len("module."):] if k.startswith("module.") else k: v for k, v in obj.items()}
    return None


def rng_state():
    """This process's RNG states as tensors/ints (loadable with weights_only=True); CUDA: this process's
    device only, so the state restores on a node with any number of visible GPUs."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "python": torch.tensor(random.getstate()[1], dtype=torch.int64),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    random.setstate((3, tuple(int(v) for v in state["python"].tolist()), None))
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if cuda.dim() == 2:  # older checkpoints stacked every visible GPU's state: take this device's row
            cuda = cuda[min(torch.cuda.current_device(), cuda.shape[0] - 1)]
        torch.cuda.set_rng_state(cuda)
