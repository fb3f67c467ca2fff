"""Distributed setup for torchrun and SLURM (srun) environments; nccl on CUDA, gloo on CPU."""
import contextlib
import gc
import os
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str = ""
    launcher: str = "none"

    @property
    def distributed(self):
        return self.world_size > 1

    @property
    def is_main(self):
        return self.rank == 0


def first_slurm_host(nodelist):
    """'gpu[003-005,009],cpu01' -> 'gpu003' (first host of a SLURM nodelist)."""
    first = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist.strip())
    if first is None:
        raise ValueError(f"cannot parse SLURM_NODELIST={nodelist!r}")
    prefix, ranges = first.group(1), first.group(3)
    if ranges is None:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def read_launch_env(environ=None):
    """(launcher, rank, world_size, local_rank) from torchrun's variables, else SLURM's, else a single process.

    torchrun's variables win when both are present (srun wrapping torchrun); with SLURM alone, the
    rendezvous address defaults to the job's first node, as torchrun would need it set anyway.
    """
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return "torchrun", int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        rank, world = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
        local = int(env.get("SLURM_LOCALID", 0))
        env.setdefault("MASTER_ADDR", first_slurm_host(env.get("SLURM_NODELIST", "127.0.0.1")))
        env.setdefault("MASTER_PORT", str(29500 + int(env.get("SLURM_JOB_ID", "0")) % 1000))
        env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"] = str(rank), str(world), str(local)
        return "slurm", rank, world, local
    return "none", 0, 1, 0


def launch_rank(environ=None):
    """This process's rank as its launcher set it (torchrun, srun), before any process group exists; 0 alone."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"])
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return int(env["SLURM_PROCID"])
    return 0


def init_distributed(backend=None, device=None):
    """Initialise the process group (if launched with several processes) and pick this rank's device."""
    launcher, rank, world, local = read_launch_env()
    use_cuda = torch.cuda.is_available() and device != "cpu"
    dev = torch.device(f"cuda:{local}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    backend = backend or ("nccl" if use_cuda else "gloo")
    if world > 1 and not dist.is_initialized():
        kwargs = {"device_id": dev} if backend == "nccl" else {}
        dist.init_process_group(backend=backend, rank=rank, world_size=world, **_round_store(rank, world), **kwargs)
    return DistEnv(rank, world, local, dev, backend if world > 1 else "", launcher)


def _round_store(rank, world):
    """{"store": ...} under torchrun (its elastic agent), else {} (env:// as usual).

    torchrun's workers share the agent's TCPStore across restart rounds (--max-restarts), and the process
    group writes its keys (each rank's gloo/nccl address) under the same names every round: a restarted rank
    could read the address of the rank that died and fail with "connectFullMesh ... Connection refused" (or
    hang), or not, depending on which rank writes first. The keys get a round prefix that every rank derives
    the same way: each rank counts its own initialisations in the store (`TORCHELASTIC_RESTART_COUNT` would
    not do: an agent restarted only because another node re-joined does not count it). Assumes a fixed world
    size (`--nnodes N`, not an elastic range): a rank number new to the store would start from 1."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return {}
    from torch.distributed.rendezvous import rendezvous

    store, _, _ = next(rendezvous("env://", rank=rank, world_size=world))
    generation = store.add(f"vlmo_round/rank{rank}", 1)
    return {"store": dist.PrefixStore(f"vlmo_round_{generation}", store)}


def is_dist():
    return dist.is_available() and dist.is_initialized()


def world_size():
    return dist.get_world_size() if is_dist() else 1


def rank():
    return dist.get_rank() if is_dist() else 0


def all_reduce_sum(t):
    """In-place sum across ranks (no-op in a single process); returns t."""
    if is_dist():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_objects(obj):
    """List of `obj` from every rank (in rank order)."""
    if not is_dist():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj):
    """Rank 0's picklable `obj`, on every rank."""
    if not is_dist():
        return obj
    box = [obj if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def broadcast_flag(flag, device):
    """Rank 0's boolean, on every rank (decisions that must not diverge, like time-triggered saves)."""
    if not is_dist():
        return bool(flag)
    t = torch.tensor([1 if flag else 0], device=device)
    dist.broadcast(t, src=0)
    return bool(t.item())


def barrier():
    if is_dist():
        dist.barrier()


def slow_barrier(hours=24):
    """A barrier for waits longer than the process group's timeout (NCCL: 10 minutes), e.g. ranks waiting for the
    slowest one's share of a one-time pass over the data: through a gloo group created with `hours`."""
    if is_dist():
        import datetime

        dist.barrier(group=dist.new_group(backend="gloo", timeout=datetime.timedelta(hours=hours)))


def any_rank(flag, device):
    """True on every rank if `flag` holds on any (so all ranks raise, or go on, together)."""
    if not is_dist():
        return bool(flag)
    t = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def cleanup():
    """Tear the process groups down, after collecting the run's objects while the interpreter is whole: models
    with hooks form reference cycles that would otherwise be freed during interpreter shutdown, where a
    communication thread that releases a tensor aborts the process ('terminate called without an active
    exception')."""
    if is_dist():
        gc.collect()
        dist.destroy_process_group()


def gather_rows_in_index_order(local):
    """Rows of a ShardedEvalSampler split (rank r holds items r, r+W, r+2W, ...) gathered from every rank
    and put back in item order: [n_r, ...] per rank -> [N, ...] on every rank."""
    if not is_dist():
        return local
    world = dist.get_world_size()
    counts = torch.tensor([local.shape[0]], device=local.device)
    all_counts = [torch.zeros_like(counts) for _ in range(world)]
    dist.all_gather(all_counts, counts)
    longest = max(int(c.item()) for c in all_counts)
    padded = torch.zeros((longest, *local.shape[1:]), dtype=local.dtype, device=local.device)
    padded[: local.shape[0]] = local
    parts = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    total = sum(int(c.item()) for c in all_counts)
    out = torch.empty((total, *local.shape[1:]), dtype=local.dtype, device=local.device)
    for r, (part, c) in enumerate(zip(parts, all_counts)):
        out[r::world] = part[: int(c.item())]
    return out


def clip_grad_norm(params, max_norm):
    """torch.nn.utils.clip_grad_norm_ over gradients that may be sharded (FSDP's DTensors: each rank holds a
    part, the squares of the parts are summed over the ranks) or whole (plain tensors, the same on every rank);
    returns the total norm (a tensor on the gradients' device, no host sync)."""
    grads = [p.grad for p in params if p.grad is not None]
    from torch.distributed.tensor import DTensor

    if not any(isinstance(g, DTensor) for g in grads):
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    local = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
    sharded = sum(g.float().pow(2).sum() for g, full in zip(local, grads) if isinstance(full, DTensor))
    dist.all_reduce(sharded)
    whole = [g for g, full in zip(local, grads) if not isinstance(full, DTensor)]
    total = (sharded + sum(g.float().pow(2).sum() for g in whole)).sqrt()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in local:
        g.mul_(coef.to(g.dtype))
    return total


def is_fsdp(model):
    """Whether `model` is FSDP2-sharded (models/sharding.py)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def finish_gradients(model):
    """Average over the ranks, in one all-reduce, the gradients of the parameters a sharded model keeps whole
    (its scalars, `_replicated_params`); call once per optimizer step, after the last backward. No-op otherwise."""
    params = getattr(model, "_replicated_params", [])
    if not params or world_size() == 1:
        return
    # the same tensor on every rank, whatever the gradients (a parameter no rank used keeps none, as under DDP:
    # every rank takes the same path through the model, so none or all have one)
    flat = torch.stack([p.grad.reshape(()).float() if p.grad is not None else torch.zeros((), device=p.device)
                        for p in params])
    dist.all_reduce(flat)
    flat /= world_size()
    for p, g in zip(params, flat):
        if p.grad is not None:
            p.grad.copy_(g)


@contextlib.contextmanager
def gradient_sync(model, sync):
    """Inside: backward passes reduce gradients across ranks only when `sync` (the last micro-batch of an
    optimizer step): DDP's no_sync, FSDP's set_requires_gradient_sync, nothing for a single process."""
    if not sync and is_fsdp(model):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    elif not sync and hasattr(model, "no_sync"):
        with model.no_sync():
            yield
    else:
        yield


def call_whole(model, fn, *args, **kwargs):
    """fn(*args, **kwargs) with a sharded model's weights gathered whole for its duration (evaluation, a feature
    cache: work that is not the root's forward), sharded again after; a plain call for any other model.

    It runs inside the root's `outside_forward` (registered as an FSDP forward method: the root's own weights are
    gathered as in a forward), with every block gathered once and kept gathered, so the blocks' forwards inside
    need no collective: ranks may run different numbers of them (evaluation shards), and rank 0 alone may run
    one more (TensorBoard pictures). A model sharded with bf16 compute weights (`_compute_dtype`) runs it under
    autocast to that dtype, so inputs of any float dtype meet them."""
    if not is_fsdp(model):
        return fn(*args, **kwargs)
    from torch.distributed.fsdp import FSDPModule

    blocks = [m for m in model.modules() if isinstance(m, FSDPModule) and m is not model]

    def gathered():
        for m in blocks:
            m.set_reshard_after_forward(False, recurse=False)
            m.unshard()
        try:
            return fn(*args, **kwargs)
        finally:
            for m in blocks:
                m.reshard()
                m.set_reshard_after_forward(True, recurse=False)
    dtype = getattr(model, "_compute_dtype", None)
    try:
        with torch.autocast(next(model.parameters()).device.type, dtype=dtype, enabled=dtype is not None):
            return model.outside_forward(gathered)
    finally:
        model.reshard()  # FSDP keeps a root gathered after its forward; training lists its sharded parameters
