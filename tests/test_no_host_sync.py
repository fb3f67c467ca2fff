"""The training step never waits for the device: through the real entry point, with shims counting the calls
that synchronise with a GPU (`.item()`, `.cpu()`, `.tolist()`, `.numpy()`, `bool()` of a tensor, `nonzero`,
`masked_select`, boolean-mask indexing, and tensors made from Python data with `torch.tensor`/`as_tensor`)
made by this project's code inside the step: the batch's device-side preparation, the micro-batches' forward
and backward (the plain loop and ITC's exact accumulation), the monitor, and the optimizer step of every
non-log step. Log, save and evaluation steps may synchronise and are not counted; library internals (PyTorch's
host-side optimizer step counters) are not this project's calls. On CUDA, the same steps run under
`torch.cuda.set_sync_debug_mode("error")` (scripts/bench_gpu.py)."""
import os
import sys

import pytest
import torch

import engine_pretrain
import main_pretrain_cook
import modes.base
import modes.image_text_itc
import util.itc_monitor

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV = os.path.join(REPO, ".venv")


class SyncCounter:
    """Patches the syncing calls; counts those whose caller is project code while `active`."""

    def __init__(self, monkeypatch):
        self.active, self.calls, self.entered = False, [], 0
        for name in ("item", "cpu", "tolist", "numpy", "__bool__", "nonzero", "masked_select", "__getitem__"):
            self._wrap(monkeypatch, torch.Tensor, name)
        for name in ("tensor", "as_tensor", "nonzero", "masked_select"):
            self._wrap(monkeypatch, torch, name)

    def _wrap(self, monkeypatch, owner, name):
        original = getattr(owner, name)
        counter = self

        def shim(*args, **kwargs):
            if counter.active and (name != "__getitem__" or _bool_index(args[1])):
                caller = sys._getframe(1).f_code.co_filename
                if caller.startswith(REPO) and not caller.startswith(VENV):
                    counter.calls.append(f"{name} at {os.path.relpath(caller, REPO)}:{sys._getframe(1).f_lineno}")
            return original(*args, **kwargs)
        monkeypatch.setattr(owner, name, shim)

    def counting(self, fn, when=lambda *a, **k: True):
        def wrapped(*args, **kwargs):
            before, self.active = self.active, when(*args, **kwargs)
            self.entered += self.active
            try:
                return fn(*args, **kwargs)
            finally:
                self.active = before
        return wrapped


def _bool_index(index):
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


@pytest.fixture
def counter(monkeypatch):
    c = SyncCounter(monkeypatch)
    monkeypatch.setattr(engine_pretrain, "accumulate_gradients", c.counting(engine_pretrain.accumulate_gradients))
    monkeypatch.setattr(modes.image_text_itc, "accumulate_exactly", c.counting(modes.image_text_itc.accumulate_exactly))
    monkeypatch.setattr(modes.base.PretrainModel, "prepare_batch", c.counting(modes.base.PretrainModel.prepare_batch))
    monkeypatch.setattr(util.itc_monitor.ContrastiveMonitor, "observe",
                        c.counting(util.itc_monitor.ContrastiveMonitor.observe))
    # the optimizer step of a non-log step (need_grad_norm False), post_step (temperature clamp) included
    monkeypatch.setattr(engine_pretrain, "optimizer_step",
                        c.counting(engine_pretrain.optimizer_step, lambda *a, **k: not a[4]))
    return c


def _common(demo, out):
    return ["--model", "vlmo_tiny_patch16", "--tokenizer", str(demo["tokenizer"]), "--epochs", "1",
            "--drop_path", "0.1", "--num_workers", "0", "--log_freq", "1000", "--output_dir", str(out)]


CASES = {
    "text_mlm": lambda d: ["--mode", "text_mlm", "--data_path", str(d["captions_train"]), "--batch_size", "32",
                           "--lora_rank", "2", "--self_regularization", "--reg_loss_weight", "1"],
    "image_mim pixel": lambda d: ["--mode", "image_mim", "--mim_target", "pixel", "--data_path",
                                  str(d["images_train"]), "--batch_size", "4", "--num_mask_patches", "2",
                                  "--min_mask_patches", "1"],
    "image_text_itc clip, accumulation": lambda d: ["--mode", "image_text_itc", "--data_path", str(d["pairs_train"]),
                                                    "--batch_size", "4", "--accum_iter", "2"],
    "image_text_itc siglip": lambda d: ["--mode", "image_text_itc", "--itc_loss", "siglip", "--data_path",
                                        str(d["pairs_train"]), "--batch_size", "8"],
}


@pytest.mark.parametrize("case", list(CASES))
def test_training_step_does_not_synchronise(case, demo_data, tmp_path, counter):
    assert main_pretrain_cook.main(CASES[case](demo_data) + _common(demo_data, tmp_path / "run")) == 0
    assert counter.entered >= 4  # the counted regions ran (prepare, accumulate, optimizer steps)
    assert counter.calls == [], "\n".join(sorted(set(counter.calls)))


def test_the_shims_see_a_sync(counter):
    """The counter is live: project code that synchronises inside a counted region is reported."""
    def step_with_a_sync(x):
        return float(x.sum().item()) + bool(x[x > 0].numel())
    counter.counting(step_with_a_sync)(torch.ones(3))
    assert [c.split(" at ")[0] for c in counter.calls] == ["item", "__getitem__"]
