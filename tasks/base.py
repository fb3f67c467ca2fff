"""What every downstream task provides, the model wrapper that joins backbone and head, the backbone set-up
(pretraining heads discarded, weights loaded, parameters off the task's path frozen) and a weight EMA.

A task (one file in tasks/) subclasses `Task` and is registered with `@register_task(name)`:
- `mode`: the pretraining mode whose path through the backbone trains (models.trainable.on_mode_path):
  "image_mim" for image tasks, "text_mlm" for text tasks, "image_text_itc" for both towers.
- `build_data(tokenizer, preprocess, rank, world_size, train)`: loaders; sets `self.state` (what the
  head depends on, e.g. class names), which travels in the checkpoint so `--eval` rebuilds the same head.
- `build_head(backbone)`: an nn.Module (or None), `loss(backbone, head, batch)`: dict with a
  differentiable `loss` and detached terms, `predict(backbone, head, batch)`: per-item tensors with
  "index", `metrics(outputs)`: floats over the whole evaluation set, `main_metric` (higher is better).
"""
import copy
from dataclasses import dataclass

import torch
import torch.nn as nn

from models.layers import trunc_normal_
from models.loading import load_pretrained_weights
from models.trainable import configure_trainable, tower_of

# Pretraining heads; a task keeps those it lists in `keep_heads`.
PRETRAINING_HEADS = ("mlm_head", "mim_head", "itc_image_proj", "itc_text_proj", "logit_scale", "logit_bias")
# Parameters on a pretraining mode's path that no downstream task uses.
_PRETRAINING_ONLY = ("mask_token",)


@dataclass
class FinetuneData:
    train_loader: object
    train_sampler: object
    val_loader: object
    num_train: int
    num_val: int
    batches_per_epoch: int


class Task:
    name = None
    mode = None
    main_metric = None
    keep_heads = ()
    needs_tokenizer = False

    def __init__(self, args, state=None):
        self.args = args
        self.state = dict(state or {})

    @property
    def pool(self):
        """How the head pools backbone tokens (--global_pool; a checkpoint's own choice wins)."""
        return self.state.get("global_pool") or self.args.global_pool

    @staticmethod
    def add_args(parser):
        """Task-specific flags (added to main_finetune's parser for every registered task)."""

    def build_data(self, tokenizer, preprocess, rank, world_size, train=True):
        raise NotImplementedError

    def build_head(self, backbone):
        return None

    def loss(self, backbone, head, batch):
        raise NotImplementedError

    def predict(self, backbone, head, batch):
        raise NotImplementedError

    def metrics(self, outputs):
        raise NotImplementedError

    def post_step(self, backbone):
        """A callable run after every optimizer step (e.g. clamping a temperature), or None."""
        return None


def linear_head(dim, out_dim, init_scale=1e-3):
    """Linear head, weights trunc-normal(0.02) times `init_scale`: BEiT's 1e-3 for classifiers keeps the first
    steps from wrecking the backbone; a cosine loss wants 1 (its gradient grows as the prediction shrinks)."""
    head = nn.Linear(dim, out_dim)
    trunc_normal_(head.weight, std=0.02)
    with torch.no_grad():
        head.weight.mul_(init_scale)
    nn.init.zeros_(head.bias)
    return head


GLOBAL_POOLS = ("avg", "cls")


def image_features(backbone, images, pool="avg"):
    """[B, 3, H, W] -> [B, D]. "avg": the mean of the patch tokens through the final norm (BEiT's fine-tuning
    choice: masked image modelling never trains the CLS token, whose output barely depends on the image at
    first); "cls": the CLS token through the final norm."""
    x = backbone.forward_image_features(images)
    return backbone.norm(x[:, 1:].mean(1)) if pool == "avg" else backbone.norm(x)[:, 0]


def text_features(backbone, text_ids, text_masks, pool="avg"):
    """[B, L] ids and mask -> [B, D]. "avg": the mean of the tokens after [CLS] (padding excluded) through the
    final norm; "cls": the [CLS] token through the final norm."""
    x = backbone.forward_text_features(text_ids, text_masks)
    if pool == "cls":
        return backbone.norm(x)[:, 0]
    keep = text_masks[:, 1:, None].to(x.dtype)
    return backbone.norm((x[:, 1:] * keep).sum(1) / keep.sum(1).clamp(min=1))


class FinetuneModel(nn.Module):
    """backbone (VLMo) + the task's head; `forward(batch, loss_normalizer)` is the training loss (the task's
    per-batch mean divided by `loss_normalizer`, the number of micro-batches per optimizer step),
    `predict(batch)` evaluation. The training loop (engine_pretrain.py) drives it as it drives pretraining.

    State dict keys: `backbone.*` and `head.*`.
    """

    def __init__(self, backbone, head, task):
        super().__init__()
        self.backbone, self.head = backbone, head
        self.task = task  # not a module: holds no parameters

    def prepare_batch(self, batch):
        """Tasks compute no device-side targets."""

    def loss_units(self, batch):
        """None: a task's loss is already a per-batch mean."""
        return None

    def forward(self, batch, loss_normalizer=1.0, reg_scale=1.0):
        """reg_scale is accepted for the loop's uniform call; fine-tuning has no self-regularization term."""
        out = self.task.loss(self.backbone, self.head, batch)
        out["loss"] = out["loss"] / loss_normalizer
        return out

    @torch.no_grad()
    def predict(self, batch):
        return self.task.predict(self.backbone, self.head, batch)


def discard_pretraining_heads(backbone, keep=()):
    """Remove the pretraining heads the task does not use from the backbone; returns their names."""
    dropped = []
    for name in PRETRAINING_HEADS:
        if name not in keep and getattr(backbone, name, None) is not None:
            setattr(backbone, name, None)  # unregisters the module / parameter: no longer saved or trained
            dropped.append(name)
    return dropped


def split_finetune_state(state_dict):
    """A checkpoint's model tensors as backbone tensors: `backbone.*` keys of a fine-tuned model lose the
    prefix and its `head.*` is dropped (fine-tuning again from a fine-tuned model); others pass through."""
    if any(k.startswith("backbone.") for k in state_dict):
        return {k[len("backbone."):]: v for k, v in state_dict.items() if k.startswith("backbone.")}
    return dict(state_dict)


def load_backbone_weights(backbone, state_dict, path, ckpt_config, discarded):
    """Load pretrained weights (models.loading: architecture checks, relative position tables resized)
    without the discarded heads. Returns (report, lines describing what happened)."""
    state_dict = split_finetune_state(state_dict)
    heads = {}
    for k in list(state_dict):
        root = k.split(".")[0]
        if root in discarded or (root in PRETRAINING_HEADS and getattr(backbone, root, None) is None):
            heads[root] = heads.get(root, 0) + 1
            del state_dict[k]
    report = load_pretrained_weights(backbone, state_dict, path, "--finetune", ckpt_config)
    lines = [f"loaded {len(report['loaded'])} tensors from {path}"]
    if heads:
        lines.append("discarded pretraining heads: " + ", ".join(f"{h} ({n} tensors)" for h, n in heads.items()))
    if report["resized"]:
        lines.append(f"resized relative position tables for grid {tuple(backbone.grid_hw)}: {len(report['resized'])}")
    if report["dropped"]:
        lines.append(f"dropped heads of another shape: {report['dropped']}")
    if report["missing"]:
        lines.append(f"newly initialised ({len(report['missing'])}): " + _abbrev(report["missing"]))
    if report["unused"]:
        lines.append(f"unused ({len(report['unused'])}): " + _abbrev(report["unused"]))
    return report, lines


def _abbrev(names, n=6):
    return ", ".join(names[:n]) + (f", ... ({len(names) - n} more)" if len(names) > n else "")


def set_trainable(backbone, head, task, lora_rank=0, lora_alpha=1.0, provided=()):
    """Freeze the backbone off the task's path (before the optimizer and DDP exist); with lora_rank > 0
    every provided on-path weight is frozen and adapted through LoRA. The head always trains.
    Returns {group: [names]} of trainable parameters (names relative to FinetuneModel)."""
    configure_trainable(backbone, task.mode, lora_rank, lora_alpha, provided)
    for name, p in backbone.named_parameters():
        if name.split(".")[0] in _PRETRAINING_ONLY:
            p.requires_grad_(False)
    groups = {}
    for name, p in backbone.named_parameters():
        if p.requires_grad:
            groups.setdefault("lora" if ".lora_" in name else tower_of(name), []).append(f"backbone.{name}")
    if head is not None:
        for name, p in head.named_parameters():
            p.requires_grad_(True)
            groups.setdefault("task_head", []).append(f"head.{name}")
    return groups


class WeightEma:
    """Exponential moving average of a FinetuneModel's trainable weights (frozen ones never change, and
    buffers are copied): `module` is an evaluation copy sharing the task object."""

    def __init__(self, model, decay):
        self.decay = float(decay)
        self.module = FinetuneModel(copy.deepcopy(model.backbone), copy.deepcopy(model.head), model.task).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self._pairs = [(e, p) for e, p in zip(self.module.parameters(), model.parameters()) if p.requires_grad]
        self._buffers = list(zip(self.module.buffers(), model.buffers()))

    @torch.no_grad()
    def update(self):
        for e, p in self._pairs:
            e.lerp_(p.detach(), 1.0 - self.decay)
        for e, b in self._buffers:
            e.copy_(b)

    def state_dict(self):
        return self.module.state_dict()

    def load_state_dict(self, state):
        self.module.load_state_dict(state)
