"""train_one_epoch / evaluate for downstream tasks. Takes built objects (model, loaders, optimizer), never argv.

The model is a tasks.base.FinetuneModel (possibly inside DDP): `model(batch)` returns the task's loss dict,
`raw_model.predict(batch)` per-item evaluation outputs.
"""
import contextlib
import math
import time
from dataclasses import dataclass

import torch

from engine_pretrain import NonFiniteLoss
from util import dist as du
from util.logger import LOG, MetricWindow, format_duration, peak_memory_gb
from util.lr_sched import lr_at_step, set_lr
from util.run_common import autocast_context, batch_to_device, optimizer_step

__all__ = ["FinetuneConfig", "NonFiniteLoss", "evaluate", "train_one_epoch"]


@dataclass
class FinetuneConfig:
    device: torch.device
    steps_per_epoch: int          # optimizer steps per epoch
    epochs: int
    samples_per_step: int         # global: batch_size * accum_iter * world size
    lr: float
    min_lr: float
    warmup_steps: int
    accum_iter: int = 1
    clip_grad: float = None
    autocast_dtype: torch.dtype = None
    log_freq: int = 20

    @property
    def total_steps(self):
        return self.epochs * self.steps_per_epoch


def train_one_epoch(model, raw_model, loader, optimizer, scaler, epoch, start_step, global_step, cfg, ema=None,
                    post_step=None, checkpointer=None, run_log=None, bad_sample_sink=None):
    """Optimizer steps `start_step .. cfg.steps_per_epoch - 1` of `epoch`; returns the new global step.

    The loss of each of the `accum_iter` micro-batches is divided by accum_iter, so a step's gradient is
    the mean over them. Nothing leaves the device except at log steps.
    """
    model.train()
    window, nonfinite = MetricWindow(), (checkpointer.nonfinite if checkpointer is not None else
                                         torch.zeros((), dtype=torch.bool, device=cfg.device))
    trainable = [p for p in raw_model.parameters() if p.requires_grad]
    data_iter, run_start = iter(loader), time.perf_counter()
    window_start, data_time, window_steps = run_start, 0.0, 0
    for step in range(start_step, cfg.steps_per_epoch):
        t0 = time.perf_counter()
        micro = [batch_to_device(next(data_iter), cfg.device) for _ in range(cfg.accum_iter)]
        data_time += time.perf_counter() - t0
        if bad_sample_sink is not None:
            bad_sample_sink([b for _, meta in micro for b in meta.get("bad", [])], epoch)
        lr = lr_at_step(global_step, cfg.lr, cfg.min_lr, cfg.warmup_steps, cfg.total_steps)
        set_lr(optimizer, lr)
        step_metrics = {}
        for i, (batch, _) in enumerate(micro):
            sync = i == len(micro) - 1 or not hasattr(model, "no_sync")
            no_sync = contextlib.nullcontext() if sync else model.no_sync()
            with no_sync, autocast_context(cfg.device, cfg.autocast_dtype):
                out = model(batch)
            loss = out.pop("loss") / cfg.accum_iter
            (scaler.scale(loss) if scaler is not None else loss).backward()
            nonfinite |= ~torch.isfinite(loss.detach())
            step_metrics["loss"] = step_metrics.get("loss", 0) + loss.detach()
            for k, v in out.items():
                step_metrics[k] = step_metrics.get(k, 0) + v.detach().float() / cfg.accum_iter
        window.add(step_metrics)
        log_now = (step + 1) % cfg.log_freq == 0 or step + 1 == cfg.steps_per_epoch
        grad_norm = optimizer_step(optimizer, scaler, trainable, cfg.clip_grad, log_now, post_step)
        if ema is not None:
            ema.update()
        global_step += 1
        window_steps += 1
        if log_now:
            stats = window.reduce()
            stats["grad_norm"] = float(grad_norm)
            now = time.perf_counter()
            samples_s = window_steps * cfg.samples_per_step / max(now - window_start, 1e-9)
            eta = (now - run_start) / max(step + 1 - start_step, 1) * (cfg.total_steps - global_step)
            mem = peak_memory_gb(cfg.device)
            LOG.info(f"epoch {epoch + 1}/{cfg.epochs} step {step + 1}/{cfg.steps_per_epoch} | eta "
                     f"{format_duration(eta)} | {samples_s:.1f} samples/s | data {data_time / window_steps:.3f}s "
                     f"step {(now - window_start) / window_steps:.3f}s | "
                     + " ".join(f"{k} {v:.4f}" for k, v in stats.items()) + f" | lr {lr:.3e} | peak mem {mem:.2f} GB")
            if run_log is not None:
                run_log.write({"epoch": epoch, "step": step + 1, **stats, "lr": lr, "samples_per_s": samples_s,
                               "data_time": data_time / window_steps, "peak_mem_gb": mem}, global_step)
            if not all(math.isfinite(v) for k, v in stats.items() if k != "grad_norm"):
                raise NonFiniteLoss(f"non-finite loss at epoch {epoch + 1} step {step + 1} ({stats}); no checkpoint "
                                    "was written after it. Lower --blr, set --clip_grad, or check the data.")
            window_start, data_time, window_steps = time.perf_counter(), 0.0, 0
        if checkpointer is not None:
            checkpointer.after_step(epoch, step + 1, global_step, log_now)
    return global_step


@torch.no_grad()
def evaluate(raw_model, loader, num_items, cfg):
    """The task's metrics over exactly the `num_items` evaluation items, on every rank.

    Each rank predicts its shard (ShardedEvalSampler); the per-item outputs of all ranks are gathered,
    put back in dataset order by their "index" and checked to cover every item once, so every rank
    computes the same numbers as a single process would.
    """
    was_training = raw_model.training
    raw_model.eval()
    parts = {}
    for batch in loader:
        b, _ = batch_to_device(batch, cfg.device)
        with autocast_context(cfg.device, cfg.autocast_dtype):
            out = raw_model.predict(b)
        for k, v in out.items():
            parts.setdefault(k, []).append(v.detach())
    local = {k: torch.cat(v).cpu() for k, v in parts.items()}
    shards = [s for s in du.all_gather_objects(local) if s]
    if not shards:
        raise RuntimeError("evaluation produced no outputs on any rank")
    merged = {k: torch.cat([s[k] for s in shards]) for k in shards[0]}
    order = torch.argsort(merged["index"])
    merged = {k: v[order] for k, v in merged.items()}
    if not torch.equal(merged["index"], torch.arange(num_items)):
        raise RuntimeError(f"evaluation covered {merged['index'].numel()} items ({merged['index'].unique().numel()} "
                           f"distinct), expected each of {num_items} exactly once")
    raw_model.train(was_training)
    metrics = raw_model.task.metrics(merged)
    metrics["n_items"] = num_items
    return metrics
