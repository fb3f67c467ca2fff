"""train_one_epoch / evaluate for every pretraining mode. Takes built objects, never argv."""
import contextlib
import math
import time
from dataclasses import dataclass

import torch

from models.objectives import loss_units
from util import dist as du
from util.logger import LOG, MetricWindow, format_duration, peak_memory_gb
from util.lr_sched import lr_at_step, set_lr
from util.run_common import autocast_context, batch_to_device, optimizer_step


class NonFiniteLoss(RuntimeError):
    pass


@dataclass
class EngineConfig:
    mode: str
    device: torch.device
    accum_iter: int
    steps_per_epoch: int          # optimizer steps per epoch
    epochs: int
    batch_size: int               # per rank, per micro-step
    lr: float
    min_lr: float
    warmup_steps: int
    clip_grad: float = None
    autocast_dtype: torch.dtype = None
    log_freq: int = 20

    @property
    def total_steps(self):
        return self.epochs * self.steps_per_epoch

    @property
    def samples_per_step(self):
        return self.batch_size * self.accum_iter * du.world_size()


class StepTimer:
    """Wall time per log window, split into waiting for data and the rest."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.start, self.data, self.steps = time.perf_counter(), 0.0, 0


def train_one_epoch(model, raw_model, loader, optimizer, scaler, epoch, start_step, global_step, cfg,
                    target_fn=None, post_step=None, checkpointer=None, run_log=None, bad_sample_sink=None):
    """Run optimizer steps `start_step .. cfg.steps_per_epoch-1` of `epoch`; returns the new global step.

    Each optimizer step takes `accum_iter` micro-batches; their loss units (masked tokens, patches, rows)
    are summed over micro-batches and ranks first, so every micro-step's loss is normalised by the global
    count and the update equals one step on the whole global batch.
    """
    model.train()
    window, timer = MetricWindow(), StepTimer()
    nonfinite = checkpointer.nonfinite if checkpointer is not None else torch.zeros((), dtype=torch.bool,
                                                                                     device=cfg.device)
    data_iter = iter(loader)
    run_start = time.perf_counter()
    steps_done = 0
    trainable = [p for p in raw_model.parameters() if p.requires_grad]
    for step in range(start_step, cfg.steps_per_epoch):
        t0 = time.perf_counter()
        micro = [batch_to_device(next(data_iter), cfg.device) for _ in range(cfg.accum_iter)]
        timer.data += time.perf_counter() - t0
        if bad_sample_sink is not None:
            bad_sample_sink([m for _, meta in micro for m in meta.get("bad", [])], epoch)
        batches = [b for b, _ in micro]
        if target_fn is not None:
            for b in batches:
                target_fn(b)
        units = torch.stack([loss_units(b, cfg.mode) for b in batches]).sum().float()
        normalizer = du.all_reduce_sum(units).clamp(min=1) / du.world_size()
        lr = lr_at_step(global_step, cfg.lr, cfg.min_lr, cfg.warmup_steps, cfg.total_steps)
        set_lr(optimizer, lr)
        step_metrics = {}
        for i, b in enumerate(batches):
            sync = i == len(batches) - 1 or not hasattr(model, "no_sync")
            no_sync = contextlib.nullcontext() if sync else model.no_sync()
            with no_sync, autocast_context(cfg.device, cfg.autocast_dtype):
                out = model(b, cfg.mode, loss_normalizer=normalizer, reg_scale=1.0 / cfg.accum_iter)
            loss = out.pop("loss")
            (scaler.scale(loss) if scaler is not None else loss).backward()
            nonfinite |= ~torch.isfinite(loss.detach())
            # `loss` adds up to the step's objective over micro-steps; named terms are per-micro means.
            step_metrics["loss"] = step_metrics.get("loss", 0) + loss.detach()
            for k, v in out.items():
                step_metrics[k] = step_metrics.get(k, 0) + v / len(batches)
        window.add(step_metrics)
        log_now = (step + 1) % cfg.log_freq == 0 or step + 1 == cfg.steps_per_epoch
        grad_norm = optimizer_step(optimizer, scaler, trainable, cfg.clip_grad, log_now, post_step)
        global_step += 1
        steps_done += 1
        timer.steps += 1
        if log_now:
            stats = window.reduce()
            stats["grad_norm"] = float(grad_norm)
            _log_step(stats, epoch, step, global_step, lr, timer, cfg, run_start, steps_done, run_log)
            if not all(math.isfinite(v) for k, v in stats.items() if k != "grad_norm"):
                raise NonFiniteLoss(f"non-finite loss at epoch {epoch} step {step + 1} ({stats}); no checkpoint "
                                    "was written after it. Lower --blr, set --clip_grad, or check the data.")
            timer.reset()
        if checkpointer is not None:
            checkpointer.after_step(epoch, step + 1, global_step, log_now)
    return global_step


def _log_step(stats, epoch, step, global_step, lr, timer, cfg, run_start, steps_done, run_log):
    elapsed = time.perf_counter() - timer.start
    per_step = (time.perf_counter() - run_start) / max(steps_done, 1)
    remaining = cfg.total_steps - global_step
    samples_s = timer.steps * cfg.samples_per_step / max(elapsed, 1e-9)
    mem = peak_memory_gb(cfg.device)
    terms = " ".join(f"{k} {v:.4f}" for k, v in stats.items() if k != "grad_norm")
    LOG.info(f"epoch {epoch + 1}/{cfg.epochs} step {step + 1}/{cfg.steps_per_epoch} | eta "
             f"{format_duration(per_step * remaining)} | {samples_s:.1f} samples/s | data "
             f"{timer.data / max(timer.steps, 1):.3f}s step {elapsed / max(timer.steps, 1):.3f}s | {terms} | "
             f"lr {lr:.3e} | grad_norm {stats['grad_norm']:.3f} | peak mem {mem:.2f} GB")
    if run_log is not None:
        run_log.write({"epoch": epoch, "step": step + 1, **stats, "lr": lr, "samples_per_s": samples_s,
                       "data_time": timer.data / max(timer.steps, 1), "peak_mem_gb": mem}, global_step)


@torch.no_grad()
def evaluate(raw_model, loader, cfg, target_fn=None):
    """Held-out metrics over exactly the items of `loader` (each rank its shard), averaged per loss unit
    across all ranks. Runs on every rank; no DDP wrapper, so ranks may hold different batch counts."""
    raw_model.eval()
    sums, count = {}, torch.zeros((), device=cfg.device)
    for batch in loader:
        b, _ = batch_to_device(batch, cfg.device)
        if target_fn is not None:
            target_fn(b)
        with autocast_context(cfg.device, cfg.autocast_dtype):
            out = raw_model(b, cfg.mode)
        units = loss_units(b, cfg.mode).float()
        for k, v in out.items():
            if k not in ("loss", "reg_loss"):
                sums[k] = sums.get(k, 0) + v.float() * units
        count += units
    # A rank whose shard is empty has no metric names yet; agree on them so the collective matches.
    keys = sorted(set().union(*du.all_gather_objects(sorted(sums))))
    sums = {k: sums.get(k, torch.zeros((), device=cfg.device)) for k in keys}
    packed = du.all_reduce_sum(torch.stack([sums[k] for k in keys] + [count]))
    raw_model.train()
    total = max(packed[-1].item(), 1.0)
    return {k: v / total for k, v in zip(keys, packed[:-1].tolist())}
