"""Sharded training checkpoints (an `--fsdp` run): a folder `checkpoint-latest.dcp/` written by every rank.

Layout of a folder:
- the DCP files of {"model": backbone state dict, "optimizer": the optimizer state keyed by parameter name}:
  `.metadata` and one `__<rank>_0.distcp` per rank (each rank writes its own shards, in parallel);
- `state.pth`: everything else (epoch, step, per-rank RNG states, args, tokenizer, preprocessing), written by
  rank 0 with util.checkpoint.save_atomic (its own checksum);
- `checksums.json`: the CRC-32 of every DCP file (each rank computes those of the files it wrote).

The rules of the single-file checkpoints hold: the folder is written as `<name>.tmp/` and renamed into place
only once every rank's files and the checksums are complete (the previous folder is moved to `<name>.old/`
for the instant of the swap and removed after, so a crash at any point leaves one complete checkpoint, which
util.resume finds); a failed write on any rank makes every rank raise WriteFailed together and removes the
partial folder; reading verifies every file against `checksums.json`. DCP reshards on load, so a folder
written by N ranks resumes on any number of ranks, with or without `--fsdp`.
"""
import contextlib
import json
import os
import shutil
import warnings
import zlib

import torch

from util import dist as du
from util.checkpoint import CHECKSUM, CorruptCheckpoint, failure_reason, load_file, save_atomic
from util.errors import UserError, WriteFailed

SUFFIX = ".dcp"
LATEST_SHARDED = "checkpoint-latest" + SUFFIX
STATE_FILE = "state.pth"
CHECKSUMS = "checksums.json"
TENSOR_KEYS = ("model", "optimizer")


def is_sharded(path):
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, STATE_FILE))


def file_crc(path, chunk=1 << 24):
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            crc = zlib.crc32(block, crc)
    return crc


def remove_tree(path):
    shutil.rmtree(path, ignore_errors=True)


def _together(action, path):
    """action() on this rank; if it failed on any rank, every rank raises the same WriteFailed (after rank 0
    removed the partial folder)."""
    try:
        action()
        reason = None
    except Exception as e:  # noqa: BLE001 - any failure of a write is reported as one
        reason = failure_reason(e)
    reasons = [r for r in du.all_gather_objects(reason) if r]
    if reasons:
        if du.rank() == 0:
            remove_tree(f"{path}.tmp")
        raise WriteFailed(f"{reasons[0]} writing {path} (the previous checkpoint, if any, is intact)")


@contextlib.contextmanager
def _single_process_quiet(distributed):
    """DCP warns that it assumes a single process when no process group exists: in one process, that is the intent."""
    with warnings.catch_warnings():
        if not distributed:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _fresh_folder(tmp, path):
    """Every rank: rank 0 makes the empty folder `tmp` that the write of `path` fills."""
    def start():
        if du.rank() == 0:
            remove_tree(tmp)
            os.makedirs(tmp)
    _together(start, path)


def swap_into_place(tmp, path):
    """Rename the complete folder `tmp` to `path`; a previous `path` is moved aside first and removed after. An
    `.old` is removed only while `path` exists (without `path`, `.old` may be the one complete checkpoint: a
    crash inside an earlier swap)."""
    old = f"{path}.old"
    if os.path.exists(path):
        remove_tree(old)
        os.replace(path, old)
    os.replace(tmp, path)
    remove_tree(old)


def save_sharded(state, path, distributed=True):
    """Every rank: write `state` (its "model" and "optimizer" entries may hold DTensors) as the folder `path`."""
    import torch.distributed.checkpoint as dcp

    tmp, rank = f"{path}.tmp", du.rank()
    tensors = {k: state[k] for k in TENSOR_KEYS}
    rest = {k: v for k, v in state.items() if k not in TENSOR_KEYS}

    _fresh_folder(tmp, path)
    crcs = {}

    def write():
        with _single_process_quiet(distributed):
            dcp.save(tensors, checkpoint_id=tmp, no_dist=not distributed)
        mine = [n for n in os.listdir(tmp) if _written_by(n, rank)]  # its shards; rank 0 also .metadata
        crcs.update({n: file_crc(os.path.join(tmp, n)) for n in mine})
    _together(write, path)
    every = {}
    for part in du.all_gather_objects(crcs) if distributed else [crcs]:
        every.update(part)

    def finish():
        if rank == 0:
            with open(os.path.join(tmp, CHECKSUMS), "w") as f:
                json.dump(every, f, indent=1, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            save_atomic(rest, os.path.join(tmp, STATE_FILE))
            swap_into_place(tmp, path)
    _together(finish, path)


def _written_by(name, rank):
    """Whether the file `name` of a sharded folder is rank `rank`'s to copy: its own shards; rank 0 the rest."""
    return name.startswith(f"__{rank}_") or (rank == 0 and not name.startswith("__"))


def copy_sharded(src, dst):
    """Every rank: the folder `src` copied to `dst` through `dst`.tmp, each rank copying the shards it wrote (real
    copies, not links: a kept copy must survive damage to the latest's files)."""
    tmp, rank = f"{dst}.tmp", du.rank()

    _fresh_folder(tmp, dst)

    def copy():
        for name in os.listdir(src):
            if _written_by(name, rank):
                shutil.copy2(os.path.join(src, name), os.path.join(tmp, name))
    _together(copy, dst)
    _together(lambda: swap_into_place(tmp, dst) if rank == 0 else None, dst)


def verify_files(path, flag):
    """CorruptCheckpoint naming the first DCP file of `path` that is missing or does not match its checksum."""
    listed = os.path.join(path, CHECKSUMS)
    try:
        with open(listed) as f:
            expected = json.load(f)
    except (OSError, ValueError) as e:
        raise CorruptCheckpoint(f"{flag}: {listed} cannot be read ({failure_reason(e)})") from None
    for name, crc in sorted(expected.items()):
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            raise CorruptCheckpoint(f"{flag}: {file} is missing from the sharded checkpoint")
        got = file_crc(file)
        if got != int(crc):
            raise CorruptCheckpoint(f"{flag}: {file} does not match its checksum ({int(crc):08x} stored, {got:08x} "
                                    "computed): it changed after it was written")


def load_sharded(path, flag="--resume", verify=True):
    """The non-tensor state of the sharded checkpoint `path` (state.pth), with "sharded": `path`; the tensors
    are read later, into the built model and optimizer (load_model_state, load_optimizer_state)."""
    if not is_sharded(path):
        raise CorruptCheckpoint(f"{flag}: {path} is not a complete sharded checkpoint (no {STATE_FILE})")
    if verify:
        verify_files(path, flag)
    state = load_file(os.path.join(path, STATE_FILE), flag, verify=verify)
    return {**state, "sharded": path}


def stored_model(path):
    """{name: DCP metadata} of the "model" entries a sharded checkpoint holds (its metadata file, nothing else)."""
    import torch.distributed.checkpoint as dcp

    return {k[len("model."):]: meta for k, meta in dcp.FileSystemReader(path).read_metadata().state_dict_metadata.items()
            if k.startswith("model.")}


def _last_line(error):
    lines = str(error).strip().splitlines()
    return lines[-1] if lines else type(error).__name__


def records(state):
    """A sharded checkpoint's state without the markers of its reading (the single-file checkpoint's entries)."""
    return {k: v for k, v in state.items() if k not in ("sharded", CHECKSUM)}


def weights_view(state, path):
    """The sharded checkpoint `path` as a weights file reads: its records (`state`, as load_sharded returned them)
    and its "model" tensors, whole, read by this process alone (no collective; the optimizer state is not read)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    model = {name: torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
             for name, meta in stored_model(path).items() if isinstance(meta, TensorStorageMetadata)}
    with _single_process_quiet(False):
        dcp.load({"model": model}, checkpoint_id=path, no_dist=True)
    return {**records(state), "model": model}


def load_model_state(module, path, flag="--resume"):
    """Fill `module`'s tensors (plain or sharded) from the "model" entry of the sharded checkpoint `path`; a key
    set that differs from the module's is a UserError naming the file."""
    import torch.distributed.checkpoint as dcp

    state = module.state_dict()
    saved = set(stored_model(path))
    missing, unexpected = sorted(set(state) - saved), sorted(saved - set(state))
    if missing or unexpected:
        raise UserError(f"{flag} {path}: does not match this run's model (missing {missing[:3]}, unexpected "
                        f"{unexpected[:3]})")
    if any(t.is_meta for t in state.values()):  # --check builds the model on the meta device: names are enough
        return
    try:
        dcp.load({"model": state}, checkpoint_id=path, no_dist=not du.is_dist())
    except Exception as e:  # noqa: BLE001 - DCP wraps a shape mismatch or a read error in its own exception
        raise UserError(f"{flag} {path}: cannot be read into this run's model ({_last_line(e)})") from None
    module.load_state_dict(state)


def ids_to_names(osd):
    """An optimizer.state_dict() (parameters numbered) keyed by parameter name instead (DCP's layout); needs the
    names the optimizer was built with (util.optim_factory keeps them as `param_names`)."""
    groups = osd["param_groups"]
    if not all("param_names" in g for g in groups):
        raise UserError("the checkpoint's optimizer state does not name its parameters (written before sharded "
                        "checkpoints existed): resume it once without --fsdp, then convert the checkpoint it writes")
    if any(len(g["params"]) != len(g["param_names"]) for g in groups):
        raise UserError("the checkpoint's optimizer state names a different number of parameters than it holds")
    name_of = {i: n for g in groups for i, n in zip(g["params"], g["param_names"])}
    return {"state": {name_of[i]: s for i, s in osd["state"].items()},
            "param_groups": [{**g, "params": [name_of[i] for i in g["params"]]} for g in groups]}


def names_to_ids(osd):
    """The inverse of ids_to_names: parameters numbered in the order of their groups (optimizer.state_dict())."""
    number, groups = {}, []
    for g in osd["param_groups"]:
        groups.append({**g, "params": [number.setdefault(n, len(number)) for n in g["params"]]})
    return {"state": {number[n]: s for n, s in osd["state"].items()}, "param_groups": groups}


def regrouped(osd, optimizer):
    """`osd` (an optimizer.state_dict()) in `optimizer`'s grouping when both name the same parameters but group
    them differently (a checkpoint written under an earlier weight-decay rule, util.optim_factory): each moment
    follows its parameter's name, the groups' hyperparameters are this run's. Returned unchanged otherwise."""
    current = optimizer.state_dict()
    saved_names = [g.get("param_names") for g in osd["param_groups"]]
    names = [g.get("param_names") for g in current["param_groups"]]
    if None in saved_names or None in names or saved_names == names or \
            sorted(n for g in saved_names for n in g) != sorted(n for g in names for n in g):
        return osd
    by_name = ids_to_names(osd)["state"]
    number = {n: i for g in current["param_groups"] for i, n in zip(g["params"], g["param_names"])}
    return {"state": {number[n]: s for n, s in by_name.items()}, "param_groups": current["param_groups"]}


def optimizer_state(module, optimizer):
    """The optimizer state keyed by parameter name, as a sharded checkpoint stores it (DTensors under FSDP)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(module, optimizer)


def load_optimizer_state(ckpt, module, optimizer):
    """Restore `optimizer` (over `module`'s parameters, sharded or not) from a training checkpoint of either
    format: a sharded folder (read through DCP, resharded to this run), or a single file (its whole tensors
    sharded here when the run is). `module` (what the parameter names refer to) may be None for a single file
    in an unsharded run."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    from torch.distributed.tensor import DTensor

    if ckpt.get("sharded"):
        import torch.distributed.checkpoint as dcp

        osd = optimizer_state(module, optimizer)
        try:
            dcp.load({"optimizer": osd}, checkpoint_id=ckpt["sharded"], no_dist=not du.is_dist())
        except Exception as e:  # noqa: BLE001 - DCP reports a missing key as a generic error
            raise ValueError(_last_line(e)) from None
        set_optimizer_state_dict(module, optimizer, osd)
    elif any(isinstance(p, DTensor) for g in optimizer.param_groups for p in g["params"]):
        names = {n for g in optimizer.param_groups for n in g["param_names"]}
        osd = ids_to_names(ckpt["optimizer"])
        if set(osd["state"]) - names:
            raise ValueError(f"it has state for parameters this run does not train: {sorted(set(osd['state']) - names)[:3]}")
        set_optimizer_state_dict(module, optimizer, osd, options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(regrouped(ckpt["optimizer"], optimizer))


def full_model_state(module):
    """Every rank: the whole (unsharded) state dict of `module` on the CPU, for a single-file export."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                  broadcast_from_rank0=False))


def tensors_of(path):
    """(rank 0 or a single process) every tensor of the sharded checkpoint `path`, whole, as nested dicts."""
    import tempfile

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(path))) as tmp:
        out = os.path.join(tmp, "tensors.pth")
        with _single_process_quiet(False):
            dcp_to_torch_save(path, out)
        return torch.load(out, map_location="cpu", weights_only=True)
