"""Console/file logging on rank 0, and a metric window reduced across ranks only at log steps.

Per-step metrics stay on the device as detached tensors; `MetricWindow.reduce` does the one
all-reduce and host transfer of a log step, so the hot loop never synchronises for logging.
"""
import json
import logging
import os
import sys
import time

import torch

from util import dist as du

LOG = logging.getLogger("vlmo")


class _Held(logging.Handler):
    """Keeps the records logged before the run's folder exists, for console.log once it does."""

    def __init__(self):
        super().__init__()
        self.records = []

    def emit(self, record):
        self.records.append(record)


def setup_logging(output_dir, rank, filename="console.log"):
    """Rank 0 logs INFO to stdout and `<output_dir>/console.log`; other ranks log warnings only. Without an
    `output_dir` only the console is set up, and what is logged is held for `attach_log_file`."""
    LOG.handlers.clear()
    LOG.propagate = False
    LOG.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    fmt = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S") if rank == 0 else \
        logging.Formatter(f"%(asctime)s [rank {rank}] %(message)s", "%H:%M:%S")
    stream = logging.StreamHandler(sys.stdout if rank == 0 else sys.stderr)
    stream.setFormatter(fmt)
    LOG.addHandler(stream)
    if rank == 0:
        if output_dir:
            attach_log_file(output_dir, filename)
        else:
            LOG.addHandler(_Held())
    return LOG


def attach_log_file(output_dir, filename="console.log"):
    """(rank 0) Start `<output_dir>/<filename>` (appended to), beginning with the lines held since start-up."""
    os.makedirs(output_dir, exist_ok=True)
    fh = logging.FileHandler(os.path.join(output_dir, filename))
    fh.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    for held in [h for h in LOG.handlers if isinstance(h, _Held)]:
        for record in held.records:
            fh.handle(record)
        LOG.removeHandler(held)
    LOG.addHandler(fh)


def warn_once(message):
    """A warning about the run's settings, printed by rank 0 only (every rank would print the same)."""
    if du.launch_rank() == 0:
        LOG.warning(message)


def write_to_log_file(message):
    """Append `message` to console.log only (the console already shows it), when the run has one."""
    record = LOG.makeRecord(LOG.name, logging.ERROR, __file__, 0, message, None, None)
    for h in LOG.handlers:
        if isinstance(h, logging.FileHandler):
            h.handle(record)


class MetricWindow:
    """Sums of per-step detached scalars since the last log step."""

    def __init__(self):
        self.sums, self.steps = {}, 0

    def add(self, metrics):
        for k, v in metrics.items():
            v = v.detach().float()
            self.sums[k] = self.sums[k] + v if k in self.sums else v
        self.steps += 1

    def reduce(self):
        """Mean over steps and ranks, as floats (one collective, one host sync). Resets the window."""
        if not self.sums:
            return {}
        keys = sorted(self.sums)
        stacked = torch.stack([self.sums[k] for k in keys]) / max(self.steps, 1)
        stacked = du.all_reduce_sum(stacked) / du.world_size()
        values = dict(zip(keys, stacked.tolist()))
        self.sums, self.steps = {}, 0
        return values


class RunLog:
    """TensorBoard scalars under `log_dir` and JSON lines in `<output_dir>/log.jsonl` (rank 0 only)."""

    def __init__(self, output_dir, log_dir, enabled):
        self.enabled = enabled
        self.writer = None
        self.jsonl = os.path.join(output_dir, "log.jsonl") if output_dir else None
        if enabled and log_dir:
            from torch.utils.tensorboard import SummaryWriter
            os.makedirs(log_dir, exist_ok=True)
            self.writer = SummaryWriter(log_dir=log_dir)

    def write(self, record, step, prefix="train"):
        if not self.enabled:
            return
        if self.writer is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("epoch", "step", "global_step"):
                    self.writer.add_scalar(f"{prefix}/{k}", v, step)
        if self.jsonl:
            line = json.dumps({"split": prefix, "global_step": step, **record, "time": time.time()}) + "\n"
            try:
                with open(self.jsonl, "a") as f:
                    start = f.tell()
                    try:
                        f.write(line)
                        f.flush()
                    except OSError:
                        f.truncate(start)  # no half record left behind
                        raise
            except OSError as e:
                from util.checkpoint import failure_reason
                LOG.error(f"{failure_reason(e)} writing {self.jsonl}: it stops here (its last record is whole); "
                          "training goes on, and a checkpoint that cannot be written stops the run (exit 4)")
                self.jsonl = None

    def visuals(self, visuals, step, prefix="val"):
        """TensorBoard pictures ({"images": {tag: [N, 3, H, W] in [0, 1]}}) and markdown ({"text": {tag: str}})."""
        if not self.enabled or self.writer is None:
            return
        for tag, images in visuals.get("images", {}).items():
            self.writer.add_images(f"{prefix}/{tag}", images.detach().float().cpu(), step, dataformats="NCHW")
        for tag, text in visuals.get("text", {}).items():
            self.writer.add_text(f"{prefix}/{tag}", text, step)

    def close(self):
        if self.writer is not None:
            self.writer.close()


def format_duration(seconds):
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}"


def peak_memory_gb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    try:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # Linux reports KiB
    except ImportError:
        return float("nan")
