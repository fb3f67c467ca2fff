"""What every pretraining mode provides, and the model wrapper the training loop drives.

A mode (one file in modes/) subclasses `PretrainMode` and is registered with `@register_mode`:
- `name`, `towers` ("image", "text": the experts and embeddings its forward pass uses; the shared
  attention stack always is) and `heads` (regexes of the head parameters it trains): its path through the
  backbone, which models.trainable uses to decide what trains (and downstream tasks reuse by name).
- `add_args(group)`: its flags (added to main_pretrain_cook's parser for every registered mode).
- `resolve_defaults(args)`: fill in the defaults that depend on the mode (flags left at None).
- `check_inputs(args, grid)`: validate its flags against the patch grid and its own files, before any work.
- `starting_point(plan, tokenizer)`: the weights a run starts from when the flags name none (default: none).
- `model_overrides()`: registry overrides the mode needs (e.g. the dVAE vocabulary of the MIM head).
- `init_fresh(backbone, loaded, global_batch)`: initialise what depends on the run (not on the
  architecture) in the parameters no checkpoint provided (`loaded`: the names that were loaded).
- `setup(device)`: build what the mode needs beside the model (the dVAE tokenizer for image_mim).
- `before_training(backbone, env)`: work on the built model before the first step (the LiT embedding cache).
- `eval_towers()`: towers its evaluation needs beyond its path (kept on the device; models/parking.py).
- `build_data(tokenizer, image_state, rank, world_size, grid)` -> PretrainData: its dataset, collator and
  transforms.
- `prepare_batch(batch)`: targets computed on the device before the forward (dVAE tokens), no grad.
- `loss_units(batch)`: how many loss terms a batch holds (masked tokens, patches, rows), a 0-dim tensor;
  `loss(backbone, batch)`: {"loss": the SUM of the terms (differentiable), named detached metrics}.
- `eval_sets(data, tokenizer, image_state, rank, world_size)` -> [util.evaluation.EvalSet]: its evaluation.
- `post_step(backbone)`: a callable run after every optimizer step, or None.
- `monitor()`: an object with `observe(batches, metrics)` (every optimizer step, device ops only) and
  `report(stats, global_step)` (log steps, on every rank: may run collectives, adds to `stats`), or None.
- `eval_crop_pct`: the default evaluation centre-crop fraction of the mode's image evaluation.
- `accumulate`: how one optimizer step's micro-batches become gradients (None: the loop's default, which
  normalises by the global loss-unit count; a contrastive mode may cache features instead).

`PretrainModel(backbone, mode)` is what DDP wraps: its forward is the mode's loss, so DDP sees every
gradient. Checkpoints hold `backbone.state_dict()` (the backbone's own key names, no wrapper prefix).
"""
from dataclasses import dataclass

import torch.nn as nn

from models.lora import add_self_regularization


@dataclass
class PretrainData:
    train_loader: object
    train_sampler: object        # set_epoch(epoch, start=<samples already consumed on this rank>)
    val_loader: object
    batches_per_epoch: int
    num_train: int
    num_val: int
    val_dataset: object = None


class PretrainMode:
    name = None
    towers = ()
    heads = ()
    accumulate = None
    # Model kinds (config "kind", VLMo has none) the mode can train.
    model_kinds = (None,)
    eval_crop_pct = 0.875

    def __init__(self, args):
        self.args = args

    @staticmethod
    def add_args(group):
        """The mode's flags (every registered mode's are on the parser; each mode reads its own)."""

    @staticmethod
    def resolve_defaults(args):
        """Fill in the mode-dependent defaults of `args` in place (before any work starts)."""

    @staticmethod
    def check_inputs(args, grid):
        """Check (before any work starts) the mode's flags against the patch `grid` (rows, cols; None for a
        model without one) and its own input files; adjust what must fit the grid, with a printed line."""

    def starting_point(self, plan, tokenizer):
        """The util.resume.ResumePlan the run starts from, given the one --resume and the output folder chose
        (default: that one; text_distill starts a fresh run from its teacher)."""
        return plan

    def model_overrides(self):
        return {}

    def fresh_model_overrides(self, settable):
        """Registry overrides of a freshly initialised model (nothing loaded), among the keys `settable`: those the
        model has and neither --model_kwargs nor model_overrides() sets (default: none)."""
        return {}

    def init_fresh(self, backbone, loaded, global_batch):
        """Initialise run-dependent parameters that no checkpoint provided (default: nothing)."""

    def setup(self, device):
        """Build what the mode needs beside the model, on `device`."""

    def eval_towers(self):
        """Towers ("image", "text") the mode's evaluation runs beyond its training path (kept on the device)."""
        return ()

    def before_training(self, backbone, env):
        """Work that needs the built model (weights loaded, on env.device) before the first step, on every rank
        (it may run collectives): image_text_itc's --lit_cache build."""

    def check_model(self, backbone):
        kind = backbone.config.get("kind")
        if kind not in self.model_kinds:
            raise ValueError(f"the {kind or 'vlmo'} model does not train the {self.name!r} mode")

    def build_data(self, tokenizer, image_state, rank, world_size, grid):
        raise NotImplementedError

    def prepare_batch(self, batch):
        """Add device-side targets to a batch before its forward (default: none)."""

    def loss_units(self, batch):
        raise NotImplementedError

    def loss(self, backbone, batch):
        raise NotImplementedError

    def eval_sets(self, data, tokenizer, image_state, rank, world_size):
        return []

    def post_step(self, backbone):
        return None

    def monitor(self):
        return None


class PretrainModel(nn.Module):
    """backbone + the mode that trains it; `forward(batch, loss_normalizer, reg_scale)` is the training loss.

    loss_normalizer: denominator of the mode's summed loss (the global loss-unit count divided by the world
    size, so DDP's gradient averaging yields the gradient of the global mean); default: the batch's own count.
    reg_scale: multiplies the self-regularization term (the loop passes 1 for the last micro-batch of a step and 0,
    which skips computing it, for the others: the term is added once per optimizer step).
    """

    def __init__(self, backbone, mode):
        super().__init__()
        mode.check_model(backbone)
        self.backbone = backbone
        self.mode = mode  # not a module: holds no parameters (the dVAE stays outside the checkpoint)

    def outside_forward(self, fn, *args, **kwargs):
        """fn(*args, **kwargs): work on the backbone that is not the training forward (evaluation, a feature
        cache); FSDP treats this method as a forward (models/sharding.py), so the weights are gathered for it."""
        return fn(*args, **kwargs)

    @property
    def accumulate(self):
        return self.mode.accumulate

    def prepare_batch(self, batch):
        self.mode.prepare_batch(batch)

    def loss_units(self, batch):
        return self.mode.loss_units(batch)

    def forward(self, batch, loss_normalizer=None, reg_scale=1.0):
        out = self.mode.loss(self.backbone, batch)
        if loss_normalizer is None:
            loss_normalizer = self.mode.loss_units(batch).clamp(min=1).to(out["loss"].dtype)
        out["loss"] = out["loss"] / loss_normalizer
        return add_self_regularization(self.backbone, out, reg_scale)


def pretrain_model(backbone, mode_name, args=None):
    """PretrainModel of a registered mode by name (`args`: the mode's flags, when its loss reads any)."""
    from modes import get_mode

    return PretrainModel(backbone, get_mode(mode_name)(args))
