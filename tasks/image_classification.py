"""Image classification on an ImageNet-style folder: `--data_path` holds `train/<class>/*` and `val/<class>/*`.

Training: timm's RandAugment / random erasing (keyed per sample), timm Mixup/CutMix applied to each batch
in the data workers (keyed per batch), label smoothing. Head: a linear layer on the mean-pooled patch tokens
through the backbone's final norm (`--global_pool cls`: the CLS token). Evaluation: top-1 / top-5 accuracy
(percent) and cross-entropy.
"""
import os

import numpy as np
import torch
import torch.nn.functional as F

from custom_datasets.finetune_data import WithKey, batch_seed, seeded_global_rngs, timm_train_transform
from custom_datasets.image_dataset import ImageFolderDataset, build_eval_transform, collate_image_batch
from custom_datasets.loaders import batches_per_epoch, eval_loader, train_loader
from tasks import register_task
from tasks.base import FinetuneData, Task, image_features, linear_head
from util.errors import UserError


class ClassificationCollator:
    """[(sample, target)] -> {"images": [B,3,H,W], "targets": [B] long, "index": [B] long, "bad": [...]}
    plus "soft_targets" [B, C] when mixup/cutmix is on (mixed images replace "images")."""

    def __init__(self, mixup=None, seed=0):
        self.mixup, self.seed = mixup, seed

    def __call__(self, items):
        keys = [sample.pop("key") for sample, _ in items]
        batch, targets = collate_image_batch(items)
        batch["targets"] = targets
        batch["index"] = torch.tensor([k[1] for k in keys], dtype=torch.long)
        if self.mixup is not None:
            with seeded_global_rngs(batch_seed(self.seed, keys)):
                batch["images"], batch["soft_targets"] = self.mixup(batch["images"], targets)
        return batch


class RemappedTargets(torch.utils.data.Dataset):
    """Targets re-indexed into the run's class list (a val folder may hold a subset of the classes)."""

    def __init__(self, dataset, mapping):
        self.dataset, self.mapping = dataset, mapping

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        sample, target = self.dataset[key]
        return sample, int(self.mapping[target])


@register_task("image_classification")
class ImageClassification(Task):
    mode = "image_mim"
    main_metric = "acc1"

    @staticmethod
    def add_args(parser):
        g = parser.add_argument_group("image_classification")
        g.add_argument("--aa", default="rand-m9-mstd0.5-inc1", help="timm auto-augment policy ('' for none)")
        g.add_argument("--reprob", type=float, default=0.25, help="random erasing probability")
        g.add_argument("--color_jitter", type=float, default=0.4, help="used when --aa is off")
        g.add_argument("--mixup_prob", type=float, default=1.0, help="share of batches mixed (mixup or cutmix)")
        g.add_argument("--mixup_switch_prob", type=float, default=0.5,
                       help="with both on: chance of cutmix instead of mixup")
        g.add_argument("--mixup_mode", default="batch", choices=["batch", "pair", "elem"],
                       help="one mixing factor per batch, per pair or per element")
        g.add_argument("--train_crop_scale", type=float, nargs=2, default=[0.08, 1.0],
                       help="random resized crop: area range (min max)")

    def _folder(self, split):
        root = self.args.data_path
        if not root:
            raise UserError("--data_path is required: a folder with train/ and val/ class folders")
        path = os.path.join(root, split)
        if not os.path.isdir(path):
            raise UserError(f"--data_path {root}: no {split}/ folder; expected {split}/<class>/<image>")
        return path

    def _classes(self, train_set, val_set):
        classes = self.state.get("classes")
        if classes is None:
            if train_set is None:
                raise UserError("--eval needs the class list: evaluate a fine-tuned checkpoint (--resume) or give "
                                "--data_path with a train/ folder")
            classes = list(train_set.classes)
        nb = self.args.nb_classes or self.state.get("nb_classes") or len(classes)
        if nb < len(classes):
            raise UserError(f"--nb_classes {nb} is smaller than the {len(classes)} class folders of --data_path")
        if train_set is not None and list(train_set.classes) != classes:
            raise UserError(f"--data_path {self.args.data_path}: train/ classes differ from the checkpoint's "
                            f"{len(classes)} classes")
        unknown = [c for c in val_set.classes if c not in classes]
        if unknown:
            raise UserError(f"--data_path {self.args.data_path}: val/ has classes not in training: {unknown[:5]}")
        self.state = {"classes": classes, "nb_classes": int(nb), "global_pool": self.pool}
        return np.array([classes.index(c) for c in val_set.classes], dtype=np.int64)

    def build_data(self, tokenizer, preprocess, rank, world_size, train=True):
        a = self.args
        val_set = ImageFolderDataset(self._folder("val"), build_eval_transform(preprocess), seed=a.seed)
        train_set = None
        if train:
            tf = timm_train_transform(preprocess, scale=a.train_crop_scale, auto_augment=a.aa, re_prob=a.reprob,
                                      color_jitter=a.color_jitter)
            train_set = ImageFolderDataset(self._folder("train"), tf, seed=a.seed)
        mapping = self._classes(train_set, val_set)
        val = eval_loader(RemappedTargets(WithKey(val_set), mapping), ClassificationCollator(), a.batch_size, rank,
                          world_size, min(a.num_workers, 2), a.pin_mem)
        if not train:
            return FinetuneData(None, None, val, 0, len(val_set), 0)
        loader, sampler = train_loader(WithKey(train_set), ClassificationCollator(self._mixup(), a.seed),
                                       a.batch_size, rank, world_size, a.seed, a.num_workers, a.pin_mem, "--data_path")
        return FinetuneData(loader, sampler, val, len(train_set), len(val_set),
                            batches_per_epoch(sampler, a.batch_size))

    def _mixup(self):
        a = self.args
        if a.mixup <= 0 and a.cutmix <= 0:
            return None
        if a.mixup_mode == "batch" and a.batch_size % 2:
            raise UserError(f"--mixup/--cutmix with --mixup_mode batch need an even --batch_size, got {a.batch_size}")
        from timm.data import Mixup

        return Mixup(mixup_alpha=a.mixup, cutmix_alpha=a.cutmix, prob=a.mixup_prob, switch_prob=a.mixup_switch_prob,
                     mode=a.mixup_mode, label_smoothing=a.smoothing, num_classes=self.state["nb_classes"])

    def build_head(self, backbone):
        return linear_head(backbone.config["embed_dim"], self.state["nb_classes"])

    def loss(self, backbone, head, batch):
        logits = head(image_features(backbone, batch["images"], self.pool)).float()
        if "soft_targets" in batch:
            from timm.loss import SoftTargetCrossEntropy

            return {"loss": SoftTargetCrossEntropy()(logits, batch["soft_targets"])}
        if self.args.smoothing > 0:
            from timm.loss import LabelSmoothingCrossEntropy

            loss = LabelSmoothingCrossEntropy(self.args.smoothing)(logits, batch["targets"])
        else:
            loss = F.cross_entropy(logits, batch["targets"])
        return {"loss": loss, "acc1": (logits.detach().argmax(-1) == batch["targets"]).float().mean() * 100}

    def predict(self, backbone, head, batch):
        logits = head(image_features(backbone, batch["images"], self.pool)).float()
        return {"index": batch["index"], "targets": batch["targets"],
                "top": logits.topk(min(5, logits.shape[1]), dim=1).indices,
                "loss": F.cross_entropy(logits, batch["targets"], reduction="none")}

    def metrics(self, outputs):
        hits = outputs["top"] == outputs["targets"][:, None]
        return {"acc1": 100.0 * hits[:, 0].double().mean().item(), "acc5": 100.0 * hits.any(1).double().mean().item(),
                "loss": outputs["loss"].double().mean().item()}

