"""The one training loop (`train_one_epoch`) and evaluation loop (`evaluate`), for every pretraining mode
(modes/) and every downstream task (tasks/). Takes built objects, never argv.

The model the loop drives (modes.base.PretrainModel or tasks.base.FinetuneModel, possibly inside DDP)
offers `prepare_batch(batch)` (device-side targets), `loss_units(batch)` (a 0-dim count of the batch's loss
terms, or None when its loss is already a per-batch mean) and `forward(batch, loss_normalizer, reg_scale)`
returning {"loss": differentiable, named detached terms}; optionally `accumulate`, a function that replaces
`accumulate_gradients` for the way one optimizer step's micro-batches become gradients.
"""
import contextlib
import math
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from util import dist as du
from util.errors import NonFiniteLoss, Preempted
from util.evaluation import gather_items
from util.logger import LOG, MetricWindow, format_duration, peak_memory_gb
from util.lr_sched import lr_at_step, set_lr
from util.run_common import autocast_context, batch_to_device, optimizer_step

__all__ = ["NonFiniteLoss", "RunConfig", "Trainer", "run_config", "accumulate_gradients", "evaluate", "held_out",
           "train_one_epoch", "stop_for_preemption"]


@dataclass(kw_only=True)
class RunConfig:
    device: torch.device
    steps_per_epoch: int          # optimizer steps per epoch
    epochs: int
    samples_per_step: int         # global: batch_size * accum_iter * world size
    lr: float
    min_lr: float
    warmup_steps: int
    accum_iter: int = 1
    clip_grad: Optional[float] = None
    autocast_dtype: Optional[torch.dtype] = None
    log_freq: int = 20

    @property
    def total_steps(self):
        return self.epochs * self.steps_per_epoch


def run_config(args, device, steps_per_epoch, autocast_dtype):
    """The RunConfig of an entry point's resolved args (both entry points share these flags)."""
    return RunConfig(device=device, steps_per_epoch=steps_per_epoch, epochs=args.epochs,
                     samples_per_step=args.effective_batch_size, lr=args.lr, min_lr=args.min_lr,
                     warmup_steps=int(args.warmup_epochs * steps_per_epoch), accum_iter=args.accum_iter,
                     clip_grad=args.clip_grad, autocast_dtype=autocast_dtype, log_freq=args.log_freq)


@dataclass(kw_only=True)
class Trainer:
    """Everything a training epoch touches. `model` is what runs the forward (DDP or the raw model),
    `raw_model` the unwrapped module; `post_step` runs after every optimizer step (temperature clamp, EMA);
    `monitor` (modes.base.PretrainMode.monitor) observes every step's metrics and reports at log steps."""
    model: torch.nn.Module
    raw_model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: object
    cfg: RunConfig
    post_step: Optional[Callable] = None
    monitor: object = None
    preemption: object = None     # util.preemption.PreemptionWatch: checked (all ranks agree) after every step
    checkpointer: object = None
    run_log: object = None
    bad_samples: Optional[Callable] = None


def _nonfinite_flag(trainer):
    if trainer.checkpointer is not None:
        return trainer.checkpointer.nonfinite
    return torch.zeros((), dtype=torch.bool, device=trainer.cfg.device)


def accumulate_gradients(trainer, batches, nonfinite):
    """Forward and backward every micro-batch of one optimizer step; returns the step's metric sums.

    The batches' loss units (masked tokens, patches, rows) are summed over micro-batches and ranks first, so
    every micro-step's summed loss is normalised by the global count and the update equals one step on the
    whole global batch. A model whose loss is a per-batch mean (loss_units None) is divided by the number
    of micro-batches. DDP (or FSDP) synchronises gradients on the last micro-batch only.
    """
    model, raw, cfg, scaler = trainer.model, trainer.raw_model, trainer.cfg, trainer.scaler
    units = [raw.loss_units(b) for b in batches]
    if units[0] is None:
        normalizer = float(len(batches))
    else:
        normalizer = du.all_reduce_sum(torch.stack(units).sum().float()).clamp(min=1) / du.world_size()
    metrics = {}
    for i, b in enumerate(batches):
        with du.gradient_sync(model, i == len(batches) - 1), autocast_context(cfg.device, cfg.autocast_dtype):
            # the self-regularization term, the same for every micro-batch of a step, enters once (the last)
            out = model(b, loss_normalizer=normalizer, reg_scale=float(i == len(batches) - 1))
        loss = out.pop("loss")
        (scaler.scale(loss) if scaler is not None else loss).backward()
        nonfinite |= ~torch.isfinite(loss.detach())
        # `loss` adds up to the step's objective over micro-steps; named terms are per-micro means.
        metrics["loss"] = metrics.get("loss", 0) + loss.detach()
        for k, v in out.items():  # reg_loss comes with the last micro-batch only
            metrics[k] = v.detach().float() if k == "reg_loss" else \
                metrics.get(k, 0) + v.detach().float() / len(batches)
    return metrics


def train_one_epoch(trainer, loader, epoch, start_step, global_step):
    """Run optimizer steps `start_step .. cfg.steps_per_epoch-1` of `epoch` (0-based); returns the new
    global step. Nothing leaves the device except at log steps."""
    cfg, raw = trainer.cfg, trainer.raw_model
    trainer.model.train()
    window, timer = MetricWindow(), _StepTimer()
    nonfinite = _nonfinite_flag(trainer)
    accumulate = getattr(raw, "accumulate", None) or accumulate_gradients
    data_iter = iter(loader)
    run_start, steps_done = time.perf_counter(), 0
    trainable = [p for g in trainer.optimizer.param_groups for p in g["params"]]  # (FSDP: the sharded ones)
    for step in range(start_step, cfg.steps_per_epoch):
        t0 = time.perf_counter()
        micro = [batch_to_device(next(data_iter), cfg.device) for _ in range(cfg.accum_iter)]
        timer.data += time.perf_counter() - t0
        if trainer.bad_samples is not None:
            trainer.bad_samples([m for _, meta in micro for m in meta.get("bad", [])], epoch)
        batches = [b for b, _ in micro]
        for b in batches:
            raw.prepare_batch(b)
        lr = lr_at_step(global_step, cfg.lr, cfg.min_lr, cfg.warmup_steps, cfg.total_steps)
        set_lr(trainer.optimizer, lr)
        metrics = accumulate(trainer, batches, nonfinite)
        window.add(metrics)
        if trainer.monitor is not None:
            trainer.monitor.observe(batches, metrics)
        log_now = (step + 1) % cfg.log_freq == 0 or step + 1 == cfg.steps_per_epoch
        du.finish_gradients(trainer.model)  # FSDP: the scalars it keeps whole
        grad_norm = optimizer_step(trainer.optimizer, trainer.scaler, trainable, cfg.clip_grad, log_now,
                                   trainer.post_step)
        global_step += 1
        steps_done += 1
        timer.steps += 1
        if log_now:
            stats = window.reduce()
            stats["grad_norm"] = float(grad_norm)
            if trainer.monitor is not None:
                trainer.monitor.report(stats, global_step)
            _log_step(trainer, stats, (epoch, step, global_step, lr), timer, run_start, steps_done)
            if not all(math.isfinite(v) for k, v in stats.items() if k != "grad_norm"):
                raise NonFiniteLoss(f"non-finite loss at epoch {epoch + 1} step {step + 1} ({stats}); no checkpoint "
                                    "was written after it. Lower --blr, set --clip_grad, or check the data.")
            timer.reset()
        if trainer.checkpointer is not None:
            with _holding(trainer):
                trainer.checkpointer.after_step(epoch, step + 1, global_step, log_now)
        if trainer.preemption is not None and trainer.preemption.pending():
            stop_for_preemption(trainer, epoch, step + 1, global_step)
    if trainer.bad_samples is not None:
        trainer.bad_samples.end_epoch(epoch, global_step, trainer.run_log, cfg.device)
    return global_step


def _holding(trainer):
    """No preemption deadline during a save (see util.preemption)."""
    return trainer.preemption.holding() if trainer.preemption is not None else contextlib.nullcontext()


def stop_for_preemption(trainer, epoch, step_in_epoch, global_step, saved=False):
    """Every rank: write the checkpoint of this position together (unless `saved`), then raise Preempted."""
    if trainer.checkpointer is not None and not saved:
        with _holding(trainer):
            trainer.checkpointer.save(epoch, step_in_epoch, global_step)
    what = trainer.preemption.received or "a signal received by another rank"
    latest = getattr(trainer.checkpointer, "latest_name", "checkpoint-latest.pth")
    raise Preempted(f"{what}: {latest} holds global step {global_step}; the same command (or "
                    "--resume auto) continues from it")


class _StepTimer:
    """Wall time per log window, split into waiting for data and the rest."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.start, self.data, self.steps = time.perf_counter(), 0.0, 0


def _log_step(trainer, stats, where, timer, run_start, steps_done):
    cfg = trainer.cfg
    epoch, step, global_step, lr = where
    elapsed = time.perf_counter() - timer.start
    per_step = (time.perf_counter() - run_start) / max(steps_done, 1)
    samples_s = timer.steps * cfg.samples_per_step / max(elapsed, 1e-9)
    mem = peak_memory_gb(cfg.device)
    terms = " ".join(f"{k} {v:.4f}" for k, v in stats.items() if k != "grad_norm")
    LOG.info(f"epoch {epoch + 1}/{cfg.epochs} step {step + 1}/{cfg.steps_per_epoch} | eta "
             f"{format_duration(per_step * (cfg.total_steps - global_step))} | {samples_s:.1f} samples/s | data "
             f"{timer.data / max(timer.steps, 1):.3f}s step {elapsed / max(timer.steps, 1):.3f}s | {terms} | "
             f"lr {lr:.3e} | grad_norm {stats['grad_norm']:.3f} | peak mem {mem:.2f} GB")
    if trainer.run_log is not None:
        trainer.run_log.write({"epoch": epoch + 1, "step": step + 1, **stats, "lr": lr, "samples_per_s": samples_s,
                               "data_time": timer.data / max(timer.steps, 1), "peak_mem_gb": mem}, global_step)


@torch.no_grad()
def evaluate(eval_set, model, device, autocast_dtype=None, visuals=None):
    """`eval_set.metrics` over exactly its `num_items` items (util.evaluation.EvalSet), on every rank.

    Each rank predicts its shard; the per-item outputs of all ranks are gathered back into item order (and
    checked to cover every item once), so every rank computes the numbers one process would. Runs on the
    unwrapped model (no DDP; an FSDP model gathered whole by util.dist.call_whole), so ranks may hold different
    batch counts. With a `visuals` dict, rank 0 adds
    the eval set's pictures and texts to it (EvalSet.visualize).
    """
    was_training = model.training
    model.eval()
    with autocast_context(device, autocast_dtype):
        prepared = eval_set.prepare(model) if eval_set.prepare is not None else None
    parts, progress, first = {}, _EvalProgress(eval_set.loader, eval_set.num_items), None
    for i, batch in enumerate(eval_set.loader):
        b, _ = batch_to_device(batch, device)
        with autocast_context(device, autocast_dtype):
            out = eval_set.predict(model, b, prepared)
        if i == 0:
            first = b
        for k, v in out.items():
            parts.setdefault(k, []).append(v.detach())
        progress.after(i + 1)
    progress.done()
    local = {k: torch.cat(v).cpu() for k, v in parts.items()}
    merged = gather_items(local, eval_set.num_items)
    if visuals is not None and eval_set.visualize is not None and du.rank() == 0 and first is not None:
        try:  # pictures are for people: a failure here must not stop (or desynchronise) the run
            with autocast_context(device, autocast_dtype):
                visuals.update(eval_set.visualize(model, first, merged))
        except Exception as e:  # noqa: BLE001
            LOG.warning(f"TensorBoard pictures of this evaluation skipped: {type(e).__name__}: {e}")
    model.train(was_training)
    return eval_set.metrics(merged)


class _EvalProgress:
    """Console lines while an evaluation runs: at a quarter, half and three quarters of this rank's batches
    (with the ETA), and when it is done."""

    def __init__(self, loader, items):
        try:
            batches = len(loader)
        except TypeError:  # an iterable dataset without a length: only the final line
            batches = 0
        self.batches, self.items, self.start = batches, items, time.perf_counter()
        self.marks = {max(1, batches * q // 4) for q in (1, 2, 3)} - {batches}

    def after(self, done):
        elapsed = time.perf_counter() - self.start
        if done in self.marks:
            LOG.info(f"evaluating {self.items} held-out items: batch {done}/{self.batches} | "
                     f"{elapsed:.1f}s | eta {format_duration(elapsed / done * (self.batches - done))}")

    def done(self):
        LOG.info(f"evaluated {self.items} held-out items in {time.perf_counter() - self.start:.1f}s")


def held_out(eval_sets, backbone, cfg, epoch, global_step, run_log):
    """Evaluate on every rank, log the numbers (console, TensorBoard, log.jsonl); stop on non-finite ones."""
    stats, visuals = {}, {}
    for eval_set in eval_sets:
        stats.update(evaluate(eval_set, backbone, cfg.device, cfg.autocast_dtype, visuals))
    when = "before training" if epoch == 0 else f"after epoch {epoch}"
    LOG.info(f"held-out {when}: " + " ".join(f"{k} {v:.4f}" for k, v in stats.items()))
    run_log.write({"epoch": epoch, **stats}, global_step, prefix="val")
    run_log.visuals(visuals, global_step)
    if not all(math.isfinite(v) for v in stats.values()):
        raise NonFiniteLoss(f"non-finite held-out metrics {when}: {stats}")
