"""Image -> fixed-size vector regression (e.g. predicting a prompt's text embedding from its image) with a
cosine loss; metric: mean cosine similarity over the evaluation set.

Files (`--data_path` for training, `--val_data_path` for evaluation), image paths relative to the file:
- CSV/TSV with a header holding `image_path` and `vector` (the vector as a JSON list or numbers
  separated by spaces/commas), or JSONL lines {"image_path": ..., "vector": [...]};
- or the same without a vector column/key, plus a NumPy file of the same name with `.npy` (train.csv ->
  train.npy) holding float [N, D], row i the target of line i.
Head: a linear layer on the mean-pooled patch tokens through the backbone's final norm (`--global_pool cls`:
the CLS token).
"""
import json
import os

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from custom_datasets.finetune_data import timm_train_transform
from custom_datasets.image_dataset import build_eval_transform
from custom_datasets.loaders import batches_per_epoch, eval_loader, train_loader
from custom_datasets.pair_dataset import decode_image, load_with_replacement, parse_key, read_file_bytes
from custom_datasets.records import csv_records, jsonl_records
from custom_datasets.text_dataset import PackedStrings
from tasks import register_task
from tasks.base import FinetuneData, Task, image_features, linear_head
from util.errors import UserError


def _parse_vector(text, where):
    text = text.strip()
    try:
        values = json.loads(text) if text.startswith("[") else [float(x) for x in text.replace(",", " ").split()]
    except ValueError as e:
        raise UserError(f"{where}: cannot read the vector ({e})") from None
    return values


def read_image_vectors(path, flag):
    """(image paths PackedStrings, float32 [N, D] targets) from one of the formats in the module docstring."""
    if not os.path.isfile(path):
        raise UserError(f"{flag} {path}: file not found")
    low, paths, vectors = path.lower(), PackedStrings(), []
    if low.endswith(".jsonl"):
        for _, rec in jsonl_records(path, ("image_path",), f"{flag} {path}"):
            paths.append(str(rec["image_path"]))
            if "vector" in rec:
                vectors.append(rec["vector"])
    elif low.endswith((".csv", ".tsv")):
        for line_no, rec in csv_records(path, ("image_path",), ("vector",), f"{flag} {path}"):
            paths.append(rec["image_path"])
            if "vector" in rec:
                vectors.append(_parse_vector(rec["vector"], f"{flag} {path}:{line_no}"))
    else:
        raise UserError(f"{flag} {path}: expected a .csv, .tsv or .jsonl file with image_path (and vector)")
    n = len(paths)
    if n == 0:
        raise UserError(f"{flag} {path}: no examples")
    if vectors:
        if len(vectors) != n:
            raise UserError(f"{flag} {path}: {n - len(vectors)} of {n} lines lack a vector")
        try:
            targets = np.asarray(vectors, dtype=np.float32)
        except ValueError:
            raise UserError(f"{flag} {path}: vectors of different lengths") from None
    else:
        npy = os.path.splitext(path)[0] + ".npy"
        if not os.path.isfile(npy):
            raise UserError(f"{flag} {path}: no vector column and no {npy} with the [N, D] targets")
        targets = np.load(npy, allow_pickle=False).astype(np.float32)
        if targets.ndim != 2 or targets.shape[0] != n:
            raise UserError(f"{flag} {npy}: expected shape [{n}, D] (one row per line of {path}), got {targets.shape}")
    if targets.ndim != 2 or targets.shape[1] < 1 or not np.isfinite(targets).all():
        raise UserError(f"{flag} {path}: targets must be finite vectors of one length, got shape {targets.shape}")
    return paths.finish(), targets


class ImageVectorDataset(Dataset):
    """dataset[key] -> {"images": [3, H, W], "target": [D], "index": int, "bad": [(path, reason)]}; an
    unreadable image is replaced by another (picked by a generator keyed like the sample) with its target."""

    def __init__(self, path, transform, seed, flag):
        self.paths, self.targets = read_image_vectors(path, flag)
        self.root, self.transform, self.seed, self.flag = os.path.dirname(os.path.abspath(path)), transform, seed, flag

    def __len__(self):
        return len(self.targets)

    def load(self, i):
        return decode_image(read_file_bytes(os.path.join(self.root, self.paths.get(i))))

    def __getitem__(self, key):
        epoch, index = parse_key(key)
        img, source, bad = load_with_replacement(self.load, self.paths.get, len(self), self.seed, epoch, index,
                                                 self.flag)
        rng = np.random.default_rng([self.seed, epoch, index])
        return {"images": self.transform(img, rng), "target": torch.from_numpy(self.targets[source]),
                "index": index, "bad": bad}


def collate_image_vectors(items):
    return {"images": torch.stack([it["images"] for it in items]),
            "target": torch.stack([it["target"] for it in items]),
            "index": torch.tensor([it["index"] for it in items], dtype=torch.long),
            "bad": [b for it in items for b in it["bad"]]}


@register_task("image_regression")
class ImageRegression(Task):
    mode = "image_mim"
    main_metric = "cos_sim"

    def build_data(self, tokenizer, preprocess, rank, world_size, train=True):
        a = self.args
        if not a.val_data_path:
            raise UserError("--val_data_path is required for image_regression (a file of image_path + vector)")
        val_set = ImageVectorDataset(a.val_data_path, build_eval_transform(preprocess), a.seed, "--val_data_path")
        train_set = None
        if train:
            if not a.data_path:
                raise UserError("--data_path is required for image_regression (a file of image_path + vector)")
            tf = timm_train_transform(preprocess, scale=(0.5, 1.0), auto_augment=None, color_jitter=None)
            train_set = ImageVectorDataset(a.data_path, tf, a.seed, "--data_path")
        dim = self.state.get("target_dim") or (train_set or val_set).targets.shape[1]
        for ds, flag in ((train_set, "--data_path"), (val_set, "--val_data_path")):
            if ds is not None and ds.targets.shape[1] != dim:
                raise UserError(f"{flag}: vectors have {ds.targets.shape[1]} values, the head predicts {dim}")
        self.state = {"target_dim": int(dim), "global_pool": self.pool}
        val = eval_loader(val_set, collate_image_vectors, a.batch_size, rank, world_size, min(a.num_workers, 2),
                          a.pin_mem)
        if train_set is None:
            return FinetuneData(None, None, val, 0, len(val_set), 0)
        loader, sampler = train_loader(train_set, collate_image_vectors, a.batch_size, rank, world_size, a.seed,
                                       a.num_workers, a.pin_mem, "--data_path")
        return FinetuneData(loader, sampler, val, len(train_set), len(val_set),
                            batches_per_epoch(sampler, a.batch_size))

    def build_head(self, backbone):
        return linear_head(backbone.config["embed_dim"], self.state["target_dim"], init_scale=1.0)

    def _cosine(self, backbone, head, batch):
        pred = head(image_features(backbone, batch["images"], self.pool)).float()
        return F.cosine_similarity(pred, batch["target"].float(), dim=-1)

    def loss(self, backbone, head, batch):
        cos = self._cosine(backbone, head, batch)
        return {"loss": (1.0 - cos).mean(), "cos_sim": cos.detach().mean()}

    def predict(self, backbone, head, batch):
        return {"index": batch["index"], "cos": self._cosine(backbone, head, batch)}

    def metrics(self, outputs):
        return {"cos_sim": outputs["cos"].double().mean().item()}
