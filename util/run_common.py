"""Pieces every entry point and training loop share: precision setup, the trainable-parameter report, the
optimizer step, run start, the training-checkpoint contents, restoring a resumed run's optimizer state, and
the `main()` wrapper that turns a UserError into one line and exit code 2."""
import sys
from dataclasses import dataclass

import torch

from util import dist as du
from util.errors import UserError
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
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, clip_grad or float("inf"))
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
    if args.lr is None:
        args.lr = args.blr * args.effective_batch_size / 256
    return args


def entry_point(parse_args, run, argv):
    """Parse and run; a UserError (bad flag, file or format) prints `error: ...` and exits 2, no traceback."""
    try:
        args = parse_args(argv)
        return run(args, argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    finally:
        du.cleanup()


def start_run(args, resolve_run_args, console_name="console.log"):
    """Process group, device check, resolved args, output folder and logging: the first steps of every run."""
    import os

    env = du.init_distributed(args.dist_backend, "cpu" if args.device == "cpu" else None)
    if args.device == "cuda" and env.device.type != "cuda":
        raise UserError("--device cuda: no CUDA device is available")
    resolve_run_args(args, env.world_size)
    os.makedirs(args.output_dir, exist_ok=True)
    from util.logger import setup_logging
    setup_logging(args.output_dir, env.rank, console_name)
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


def training_state(*, model_state, model_config, optimizer, scaler, position, mode, args, accum_iter, provided,
                   data_state, extra=None):
    """The contents of a training checkpoint (both entry points): weights, optimizer and scaler, the position
    (`batches_consumed` per rank for the data), `args` as plain values, the weights a checkpoint provided
    (LoRA targets), and `data_state` (tokenizer, image preprocessing) so the next stage is fed the same way.
    `extra` adds entry-specific entries (task, EMA, best metric). RNG states are added by the Checkpointer."""
    from util.config import plain_args

    return {"model": model_state, "model_config": model_config, "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None, "epoch": position.epoch,
            "step_in_epoch": position.step_in_epoch, "global_step": position.global_step, "mode": mode,
            "batches_consumed": position.step_in_epoch * accum_iter, "args": plain_args(vars(args)),
            "provided_keys": list(provided), **data_state, **(extra or {})}


def restore_training_state(ckpt, optimizer, scaler, rank):
    """Optimizer, scaler and this rank's RNG state from a training checkpoint; returns its RunPosition."""
    from util.checkpoint import set_rng_state

    optimizer.load_state_dict(ckpt["optimizer"])
    if scaler is not None and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    rngs = ckpt.get("rng") or []
    if rngs:
        set_rng_state(rngs[rank % len(rngs)])
    return RunPosition(epoch=ckpt["epoch"], step_in_epoch=ckpt["step_in_epoch"], global_step=ckpt["global_step"])


def wrap_ddp(model, env):
    """DDP around `model` for a distributed run (the model itself otherwise). Parameters off the run's path
    are frozen before this, so DDP needs no find_unused_parameters."""
    if not env.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[env.device.index] if env.device.type == "cuda" else None)
