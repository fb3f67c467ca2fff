"""image_text_itc: image-text contrastive learning (CLIP softmax or SigLIP sigmoid), for the multiway
model and the CLIP-family dual encoder (`--model dual_encoder`): CLIP, SigLIP, LiT/SigLiT, Chinese CLIP.

Data: image-text pairs (custom_datasets/pair_dataset.py: CSV/TSV `text,image_path`, MUGE, WebDataset
shards); one random resized crop per image (keyed by (seed, epoch, sample index)), captions tokenized in
the workers by PairCollator.
Path: both towers and the shared attention stack, the ITC projections, the temperature (and SigLIP bias).
`--lock_image` / `--lock_text` (LiT): that tower is frozen and run without a graph; LoRA adapters then act
on the other modality only.
Loss (models/contrastive.py): features gathered across ranks with gradients, each rank the loss of its
own rows; summed over rows here and divided by the global row count, so N ranks equal one process on the
global batch. The CLIP temperature is clamped to [0, ln 100] after every optimizer step.
Evaluation: retrieval R@1/5/10 both ways on `--val_data_path` pairs, zero-shot top-1/5 on
`--zeroshot_data_path` (util/itc_eval.py).
"""
import contextlib

import torch
from torch.utils.data import DataLoader

from custom_datasets.image_dataset import (ImageFolderDataset, build_eval_transform, build_two_view_transform,
                                           collate_image_batch)
from custom_datasets.loaders import batches_per_epoch, eval_loader, train_loader
from custom_datasets.pair_collator import PairCollator
from custom_datasets.pair_dataset import build_pair_dataset, is_shard_path
from models.contrastive import clamp_logit_scale_, contrastive_loss
from models.vlmo import ITC_LOSSES
from modes import register_mode
from modes.base import PretrainData, PretrainMode
from util.itc_eval import retrieval_set, zero_shot_set
from util.logger import LOG
from util.retrieval_metrics import read_classnames, read_templates

class ImageView:
    """transform(pil, rng) -> normalised tensor: one random resized crop (+ flip) for contrastive training."""

    def __init__(self, image_state, scale):
        self.two_view = build_two_view_transform(image_state, color_jitter=0.0, scale=scale)

    def __call__(self, img, rng):
        return self.two_view(img, rng)["images"]


class _ShardEpochs:
    """`set_epoch(epoch, start=samples)` for a WebDataset pair stream (which counts in steps)."""

    def __init__(self, dataset, batch_size):
        self.dataset, self.batch_size = dataset, batch_size

    def set_epoch(self, epoch, start=0):
        self.dataset.set_epoch(epoch, start // self.batch_size)


@register_mode
class ImageTextITC(PretrainMode):
    name = "image_text_itc"
    towers = ("image", "text")
    heads = (r"itc_(image|text)_proj\.", r"logit_scale$", r"logit_bias$")
    model_kinds = (None, "dual_encoder")

    @staticmethod
    def add_args(group):
        group.add_argument("--itc_loss", default="clip", choices=ITC_LOSSES, help="image_text_itc: the loss")
        group.add_argument("--itc_crop_min_scale", type=float, default=0.5,
                           help="image_text_itc: smallest random-crop area share of a training image")
        group.add_argument("--itc_pool", default="cls", choices=["cls", "mean"],
                           help="embedding of each tower: the CLS token (VLMo), or the mean of its tokens, which "
                                "trains from random initialisation much sooner on small models")
        group.add_argument("--lock_image", action="store_true", help="LiT: image tower frozen, embeddings unchanged")
        group.add_argument("--lock_text", action="store_true", help="text tower frozen")
        group.add_argument("--zeroshot_data_path", default=None, help="ImageNet-style folder for zero-shot evaluation")
        group.add_argument("--zeroshot_classnames", default=None, help="wnid<TAB>name file (default: folder names)")
        group.add_argument("--zeroshot_templates", default=None, help="prompt templates, one per line with {}")

    def model_overrides(self):
        return {"itc_loss": self.args.itc_loss, "itc_pool": self.args.itc_pool}

    def build_data(self, tokenizer, image_state, rank, world_size, grid):
        a = self.args
        collate = PairCollator(tokenizer)
        train_set = build_pair_dataset(a.data_path, ImageView(image_state, (a.itc_crop_min_scale, 1.0)),
                                       seed=a.seed, batch_size=a.batch_size, rank=rank, world_size=world_size)
        if is_shard_path(a.data_path):
            loader = DataLoader(train_set, batch_size=a.batch_size, collate_fn=collate, num_workers=a.num_workers,
                                pin_memory=a.pin_mem and torch.cuda.is_available(),
                                persistent_workers=a.num_workers > 0)
            sampler, steps = _ShardEpochs(train_set, a.batch_size), train_set.steps_per_epoch
            num_train = steps * a.batch_size * world_size
        else:
            loader, sampler = train_loader(train_set, collate, a.batch_size, rank, world_size, a.seed,
                                           a.num_workers, a.pin_mem, "--data_path")
            steps, num_train = batches_per_epoch(sampler, a.batch_size), len(train_set)
        val, val_set = None, None
        if a.val_data_path:
            val_set = build_pair_dataset(a.val_data_path, build_eval_transform(image_state), seed=a.seed,
                                         flag="--val_data_path", split="valid")
            val = eval_loader(val_set, collate, a.batch_size, rank, world_size, min(a.num_workers, 2), a.pin_mem)
        return PretrainData(loader, sampler, val, steps, num_train, len(val_set) if val_set is not None else 0,
                            val_set)

    def loss_units(self, batch):
        return torch.tensor(batch["images"].shape[0], device=batch["images"].device)

    def loss(self, backbone, batch):
        img, txt = encode_pair(backbone, batch)
        out = contrastive_loss(backbone, img, txt)
        rows = self.loss_units(batch)
        total = out.pop("loss") * rows  # per-row mean -> sum over this rank's rows
        metrics = {k: v.detach() for k, v in out.items()}
        metrics["itc_loss"] = total.detach() / rows
        if "duplicate_caption_fraction" in batch:
            metrics["duplicate_captions"] = batch["duplicate_caption_fraction"].float()
        return {"loss": total, **metrics}

    def eval_sets(self, data, tokenizer, image_state, rank, world_size):
        sets = []
        if data.val_loader is not None:
            sets.append(retrieval_set(data.val_loader, getattr(data.val_dataset, "image_index",
                                                               range(data.num_val))))
        if self.args.zeroshot_data_path:
            sets.append(build_zero_shot(self.args, tokenizer, image_state, rank, world_size))
        return sets

    def post_step(self, backbone):
        if backbone.config["itc_loss"] != "clip":
            return None
        return lambda: clamp_logit_scale_(backbone.logit_scale)


def build_zero_shot(args, tokenizer, image_state, rank, world_size):
    """The zero-shot EvalSet of `--zeroshot_data_path` (also used by util/eval_itc.py)."""
    dataset = ImageFolderDataset(args.zeroshot_data_path, build_eval_transform(image_state), seed=args.seed)
    names = read_classnames(args.zeroshot_classnames, wnids=dataset.classes) if args.zeroshot_classnames else \
        [c.replace("_", " ") for c in dataset.classes]
    loader = eval_loader(dataset, collate_image_batch, args.batch_size, rank, world_size, min(args.num_workers, 2),
                         args.pin_mem)
    LOG.info(f"zero-shot evaluation: {len(dataset)} images of {len(names)} classes in {args.zeroshot_data_path}")
    return zero_shot_set(loader, len(dataset), names, read_templates(args.zeroshot_templates), tokenizer)


def encode_pair(backbone, batch):
    """(image, text) embeddings [B, D]; a locked tower (LiT) runs without building a graph: its embeddings
    cannot change anyway."""
    with torch.no_grad() if "image" in backbone.locked_towers else contextlib.nullcontext():
        img = backbone.encode_image(batch["images"])
    with torch.no_grad() if "text" in backbone.locked_towers else contextlib.nullcontext():
        txt = backbone.encode_text(batch["text_ids"], batch["text_masks"])
    return img, txt

