"""Pieces every entry point and training loop share: precision setup, the trainable-parameter report, the
optimizer step, run start, the training-checkpoint contents, restoring a resumed run's optimizer state, and
the `main()` wrapper that turns each kind of stop into one line and its exit code (util/errors.py)."""
import sys
from dataclasses import dataclass

import torch

from util import dist as du
from util.errors import (EXIT_NONFINITE, EXIT_PREEMPTED, EXIT_SAVE_FAILED, EXIT_USER_ERROR, NonFiniteLoss, Preempted,
                         UserError, WriteFailed)
from util.logger import LOG


def autocast_setup(precision, device):
    """(autocast dtype or None, GradScaler or None): auto = bf16 on CUDA, fp32 on CPU; fp16 gets a scaler."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return dtype, (torch.amp.GradScaler(device.type) if precision == "fp16" else None)


def log_trainable(model, groups):
    """One line: total parameters, trainable ones, and each group's count."""
    params = dict(model.named_parameters())
    total = sum(p.numel() for p in model.parameters())
    counts = {g: sum(params[n].numel() for n in names) for g, names in groups.items()}
    LOG.info(f"parameters: {total / 1e6:.2f}M total, {sum(counts.values()) / 1e6:.3f}M trainable: "
             + ", ".join(f"{g} {n / 1e6:.3f}M ({len(groups[g])} tensors)" for g, n in sorted(counts.items())))


def optimizer_step(optimizer, scaler, trainable, clip_grad, need_grad_norm, post_step=None):
    """Unscale, clip (or just measure when `need_grad_norm`), step, zero grads, then `post_step()`.
    Returns the gradient norm tensor (no host sync) or None when neither clipping nor logging asks for it."""
    if scaler is not None:
        scaler.unscale_(optimizer)
    grad_norm = None
    if clip_grad or need_grad_norm:
        grad_norm = du.clip_grad_norm(trainable, clip_grad or float("inf"))
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if post_step is not None:
        post_step()
    return grad_norm


def batch_to_device(batch, device):
    """The tensor entries of a collated batch on `device`; the user's (dict, targets) image format becomes
    the dict with "targets". Host-side entries (raw text, bad-sample lists) stay behind, returned as `meta`."""
    if isinstance(batch, (tuple, list)):
        batch = {**batch[0], "targets": batch[1]}
    tensors = {k: v.to(device, non_blocking=True) for k, v in batch.items() if isinstance(v, torch.Tensor)}
    meta = {k: v for k, v in batch.items() if not isinstance(v, torch.Tensor)}
    return tensors, meta


def autocast_context(device, dtype):
    """torch.autocast for `dtype` on `device`, or a no-op for fp32 (dtype None)."""
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype is not None)


def resolve_batch_and_lr(args, world_size):
    """World size, effective batch (per-process batch x accumulation x ranks) and lr = blr * batch / 256."""
    args.world_size = world_size
    args.effective_batch_size = args.batch_size * args.accum_iter * world_size
    args.lr_from_blr = args.lr is None
    if args.lr is None:
        args.lr = args.blr * args.effective_batch_size / 256
    return args


def entry_point(parse_args, run, argv):
    """Parse and run; each way a run stops becomes one line and its exit code (util/errors.py): a UserError
    (bad flag, file or format) `error: ...` and 2, a non-finite loss 3, a failed write 4, a preemption 75.
    A user error is printed by rank 0 (every rank sees the same flags and files) and, once the run's folder
    exists, also appended to its console.log; from then on another rank prints its own too, marked with its
    rank (an error in its share of the data would otherwise show nowhere)."""
    from util.logger import setup_logging

    setup_logging(None, du.launch_rank())  # the console; lines are held for console.log until it exists
    _RUN["folder_open"] = False
    try:
        args = parse_args(argv)
        code = run(args, argv)
        du.barrier()  # the ranks leave together: one still writing while its peers tear their groups down aborts
        return code
    except UserError as e:
        rank = du.launch_rank()
        if rank == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
            from util.logger import write_to_log_file
            write_to_log_file(f"error: {e}")
        elif _RUN["folder_open"]:  # found while running (e.g. in this rank's share of the data): say it too
            print(f"error: [rank {rank}] {e}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_USER_ERROR) from None
    except NonFiniteLoss as e:
        LOG.error(f"stopping: {e}")
        raise SystemExit(EXIT_NONFINITE) from None
    except WriteFailed as e:
        LOG.error(f"stopping: {e}. Free space (or raise the quota), then run the same command again: it resumes "
                  "from the last checkpoint written")
        raise SystemExit(EXIT_SAVE_FAILED) from None
    except Preempted as e:
        LOG.warning(f"stopping: {e}")
        raise SystemExit(EXIT_PREEMPTED) from None
    finally:
        from util.preemption import stop_data_workers, uninstall_all
        uninstall_all()
        stop_data_workers()
        du.cleanup()


_RUN = {"folder_open": False}  # set once the run's folder exists: errors after it may be one rank's own


def start_processes(args, resolve_run_args):
    """Process group, device check and resolved args. Creates no file: console.log starts in open_run_folder
    (with the lines logged before it)."""
    env = du.init_distributed(args.dist_backend, "cpu" if args.device == "cpu" else None)
    if args.device == "cuda" and env.device.type != "cuda":
        raise UserError("--device cuda: no CUDA device is available")
    resolve_run_args(args, env.world_size)
    return env


def open_run_folder(args, env, console_name="console.log"):
    """The output folder and its console.log (with the lines logged since start-up); stale partial files of
    a stopped writer removed."""
    import os

    try:  # the folder was checked with the flags (util.flag_checks.check_output_dir); this is what remains
        os.makedirs(args.output_dir, exist_ok=True)
    except OSError as e:
        raise UserError(f"--output_dir {args.output_dir}: cannot be created ({e.strerror})") from None
    _RUN["folder_open"] = True
    if env.is_main:
        from util.logger import attach_log_file
        attach_log_file(args.output_dir, console_name)
        from util.checkpoint import remove_stale_partials
        stale = remove_stale_partials(args.output_dir)
        if stale:
            LOG.warning(f"removed {len(stale)} partial file(s) a stopped writer left in {args.output_dir}: "
                        f"{', '.join(stale)}")
    du.barrier()


def start_run(args, resolve_run_args, console_name="console.log"):
    """start_processes, then open_run_folder: the first steps of a run that reads nothing before."""
    env = start_processes(args, resolve_run_args)
    open_run_folder(args, env, console_name)
    return env


def load_full_state(model, state_dict, path, hint=""):
    """Strict load of a resumed run's model state; a mismatch names the file (and what to check)."""
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as e:
        raise UserError(f"--resume {path}: does not match this run's model{hint} "
                        f"({str(e).splitlines()[0]})") from None


@dataclass(kw_only=True)
class RunPosition:
    """Where a run is: `epoch` (0-based, the one in progress), optimizer steps done in it, global step."""
    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0


def training_state(*, model_state, model_config, optimizer_state, scaler, position, mode, args, accum_iter, provided,
                   data_state, extra=None):
    """The contents of a training checkpoint (both entry points): weights, optimizer state and scaler, the position
    (`batches_consumed` per rank for the data), `args` as plain values, the weights a checkpoint provided
    (LoRA targets), and `data_state` (tokenizer, image preprocessing) so the next stage is fed the same way.
    `extra` adds entry-specific entries (task, EMA, best metric). RNG states are added by the Checkpointer."""
    from util.config import plain_args

    return {"model": model_state, "model_config": model_config, "optimizer": optimizer_state,
            "scaler": scaler.state_dict() if scaler is not None else None, "epoch": position.epoch,
            "step_in_epoch": position.step_in_epoch, "global_step": position.global_step, "mode": mode,
            "batches_consumed": position.step_in_epoch * accum_iter, "args": plain_args(vars(args)),
            "provided_keys": list(provided), **data_state, **(extra or {})}


def restore_training_state(ckpt, optimizer, scaler, rank, world_size, seed, path="the checkpoint", model=None):
    """Optimizer, scaler and this rank's RNG state from a training checkpoint; returns its RunPosition. Saved by
    another number of ranks, the RNG states cannot be matched to ranks: each rank starts its own stream from
    (seed, global step, rank) instead of reusing another rank's. With `model` (the module the optimizer's
    parameter names refer to), either checkpoint format fits a sharded or unsharded run
    (util.sharded_checkpoint.load_optimizer_state)."""
    from util.checkpoint import set_rng_state
    from util.sharded_checkpoint import load_optimizer_state

    try:
        load_optimizer_state(ckpt, model, optimizer)
    except (ValueError, KeyError) as e:  # the checkpoint trained another set of parameters
        raise UserError(f"--resume {path}: its optimizer state does not fit this run's trainable parameters ({e}): it continues "
                        "only with the flags it was trained with (--lock_image, --lora_rank, --mode, ...); to start "
                        "a new stage from its weights, save them alone (torch.save({'model': ckpt['model'], "
                        "'model_config': ckpt['model_config']}, path)) and pass that file") from None
    if scaler is not None and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    rngs = ckpt.get("rng") or []
    if len(rngs) == world_size:
        set_rng_state(rngs[rank])
    else:
        fresh_rng_streams(seed, ckpt["global_step"], rank)
        if rngs:
            LOG.warning(f"the checkpoint holds the RNG states of {len(rngs)} rank(s), this run has {world_size}: "
                        "every rank starts a fresh random stream (dropout, drop path) from the seed, the step "
                        "and its rank; the data order is unaffected")
    return RunPosition(epoch=ckpt["epoch"], step_in_epoch=ckpt["step_in_epoch"], global_step=ckpt["global_step"])


def fresh_rng_streams(seed, global_step, rank):
    """Seed torch, numpy and random with one value per (seed, global step, rank): distinct across ranks."""
    import random

    import numpy as np

    value = (int(seed) * 1_000_003 + int(global_step) * 7919 + int(rank)) % (2 ** 32)
    torch.manual_seed(value)
    np.random.seed(value)
    random.seed(value)


def adapt_to_world_size(args, ckpt, path, sharded=False):
    """A training checkpoint resumed on another number of ranks: keep its effective batch (so the data
    position, the step count and the lr schedule mean what they meant) by re-deriving --accum_iter; refuse
    with one line when this world size cannot reach it, or when the data is WebDataset shards mid-epoch
    (`sharded`: shards are dealt to ranks, so a rank's position does not carry over). Call before building the
    data."""
    saved_args = ckpt.get("args") or {}
    world, old_world = args.world_size, saved_args.get("world_size", args.world_size)
    if old_world != world and ckpt.get("step_in_epoch") and sharded:
        raise UserError(f"--resume {path}: saved mid-epoch on {old_world} rank(s) from WebDataset shards, which are "
                        f"dealt to ranks; resume on {old_world} rank(s), or from a checkpoint written at an epoch end")
    saved = saved_args.get("effective_batch_size")
    if not saved or saved == args.effective_batch_size:
        return
    per_rank = args.batch_size * world
    if saved % per_rank:
        raise UserError(f"--resume {path}: saved with an effective batch of {saved} on {old_world} rank(s); this "
                        f"launch has --batch_size {args.batch_size} x {world} rank(s), which cannot reach it. Pick "
                        f"--batch_size B and --accum_iter A with B x A x {world} = {saved}, or start a new run from "
                        f"its weights (another --output_dir, --resume {path})")
    accum = saved // per_rank
    LOG.warning(f"resuming {path} (effective batch {saved}, {old_world} rank(s)) on {world} rank(s): --accum_iter "
                f"{args.accum_iter} -> {accum} keeps the effective batch, the data position and the lr schedule")
    args.accum_iter = accum
    args.effective_batch_size = args.batch_size * accum * world
    if args.lr_from_blr:
        args.lr = args.blr * args.effective_batch_size / 256


def wrap_ddp(model, env):
    """DDP around `model` for a distributed run (the model itself otherwise). Parameters off the run's path
    are frozen before this, so DDP needs no find_unused_parameters."""
    if not env.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    # Our buffers are index tables rebuilt identically on every rank (relative positions, position ids), never
    # trained: re-broadcasting them before every forward is wasted traffic. A timm tower with BatchNorm has
    # running statistics, which rank 0's broadcast keeps equal on every rank.
    batch_norm = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    return DistributedDataParallel(model, device_ids=[env.device.index] if env.device.type == "cuda" else None,
                                   broadcast_buffers=batch_norm)
