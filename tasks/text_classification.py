"""Text classification from CSV/TSV (header with `text` and `label` columns) or JSONL ({"text", "label"}).

Files: `--data_path` (training) and `--val_data_path`, or `--data_path` a folder holding train.* and val.*
(.csv, .tsv or .jsonl). Labels are integers (class ids; the class count is the largest id + 1 unless
--nb_classes says more) or strings (class ids in sorted order of the training labels); the class list is
saved with the checkpoint, so `--eval` maps labels the same way. Head: a linear layer on the mean of the text
tokens after [CLS] (padding excluded) through the backbone's final norm (`--global_pool cls`: the [CLS] token).
Metric: accuracy (percent) and cross-entropy.
"""
import os
import re

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from custom_datasets.loaders import batches_per_epoch, eval_loader, train_loader
from custom_datasets.pair_dataset import parse_key
from custom_datasets.records import csv_records, jsonl_records
from custom_datasets.text_dataset import PackedStrings
from tasks import register_task
from tasks.base import FinetuneData, Task, linear_head, text_features
from util.errors import UserError

_INT = re.compile(r"^[+-]?\d+$")
_EXTENSIONS = (".csv", ".tsv", ".jsonl")


def read_text_labels(path, flag):
    """(texts PackedStrings, labels list[str | int]) from a CSV/TSV/JSONL file."""
    if not os.path.isfile(path):
        raise UserError(f"{flag} {path}: file not found")
    texts, labels = PackedStrings(), []
    low = path.lower()
    if low.endswith(".jsonl"):
        for _, rec in jsonl_records(path, ("text", "label"), f"{flag} {path}"):
            texts.append(str(rec["text"]))
            labels.append(rec["label"])
    elif low.endswith((".csv", ".tsv")):
        for _, rec in csv_records(path, ("text", "label"), (), f"{flag} {path}"):
            texts.append(rec["text"])
            labels.append(rec["label"].strip())
    else:
        raise UserError(f"{flag} {path}: expected a .csv, .tsv or .jsonl file of text,label")
    if not labels:
        raise UserError(f"{flag} {path}: no examples")
    return texts.finish(), labels


def _is_int(label):
    return isinstance(label, int) and not isinstance(label, bool) or isinstance(label, str) and bool(_INT.match(label))


class TextLabelDataset(Dataset):
    """dataset[key] -> {"text": str, "label": int, "index": int}; key an int or (epoch, index)."""

    def __init__(self, texts, label_ids):
        self.texts, self.labels = texts, np.asarray(label_ids, dtype=np.int64)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, key):
        _, index = parse_key(key)
        return {"text": self.texts.get(index), "label": int(self.labels[index]), "index": index}


class TextLabelCollator:
    """items -> {"text_ids": [B, L], "text_masks": [B, L], "targets": [B], "index": [B]} (tokenized in workers)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, items):
        ids, masks = self.tokenizer.encode_batch([it["text"] for it in items])
        return {"text_ids": ids, "text_masks": masks,
                "targets": torch.tensor([it["label"] for it in items], dtype=torch.long),
                "index": torch.tensor([it["index"] for it in items], dtype=torch.long)}


@register_task("text_classification")
class TextClassification(Task):
    mode = "text_mlm"
    main_metric = "acc"
    needs_tokenizer = True

    def _files(self):
        a = self.args
        if a.data_path and os.path.isdir(a.data_path):
            found = {}
            for split in ("train", "val"):
                names = [split + ext for ext in _EXTENSIONS if os.path.isfile(os.path.join(a.data_path, split + ext))]
                found[split] = os.path.join(a.data_path, names[0]) if names else None
            if a.val_data_path:
                found["val"] = a.val_data_path
            if found["val"] is None:
                raise UserError(f"--data_path {a.data_path}: no val.csv/val.tsv/val.jsonl (or give --val_data_path)")
            return found["train"], found["val"]
        if not a.val_data_path:
            raise UserError("--val_data_path is required for text_classification (or a --data_path folder "
                            "holding train.csv and val.csv)")
        return a.data_path, a.val_data_path

    def _label_ids(self, labels, path, flag):
        classes = self.state["classes"]
        if self.state["int_labels"]:
            if not all(_is_int(x) for x in labels):
                raise UserError(f"{flag} {path}: labels must be integers like the training labels")
            ids = [int(x) for x in labels]
            bad = [i for i in ids if not 0 <= i < len(classes)]
        else:
            index = {c: i for i, c in enumerate(classes)}
            ids = [index.get(str(x), -1) for x in labels]
            bad = [labels[i] for i, v in enumerate(ids) if v < 0]
        if bad:
            raise UserError(f"{flag} {path}: labels outside the {len(classes)} training classes: "
                            f"{sorted(set(map(str, bad)))[:5]}")
        return ids

    def _set_classes(self, labels):
        nb = self.args.nb_classes
        if all(_is_int(x) for x in labels):
            n = max(int(x) for x in labels) + 1
            if min(int(x) for x in labels) < 0:
                raise UserError("--data_path: integer labels must be >= 0")
            classes, int_labels = [str(i) for i in range(max(n, nb or 0))], True
        else:
            classes, int_labels = sorted({str(x) for x in labels}), False
            if nb and nb < len(classes):
                raise UserError(f"--nb_classes {nb} is smaller than the {len(classes)} labels of --data_path")
            classes += [f"<unused {i}>" for i in range(len(classes), nb or 0)]
        self.state = {"classes": classes, "int_labels": int_labels, "nb_classes": len(classes),
                      "global_pool": self.pool}

    def build_data(self, tokenizer, preprocess, rank, world_size, train=True):
        a = self.args
        train_path, val_path = self._files()
        train_set = None
        if train:
            if not train_path:
                raise UserError("--data_path is required: a training file (or folder with train.csv) of text,label")
            texts, labels = read_text_labels(train_path, "--data_path")
            if "classes" not in self.state:
                self._set_classes(labels)
            train_set = TextLabelDataset(texts, self._label_ids(labels, train_path, "--data_path"))
        elif "classes" not in self.state:
            raise UserError("--eval needs the class list: evaluate a fine-tuned checkpoint (--resume)")
        texts, labels = read_text_labels(val_path, "--val_data_path")
        val_set = TextLabelDataset(texts, self._label_ids(labels, val_path, "--val_data_path"))
        collate = TextLabelCollator(tokenizer)
        val = eval_loader(val_set, collate, a.batch_size, rank, world_size, min(a.num_workers, 2), a.pin_mem)
        if train_set is None:
            return FinetuneData(None, None, val, 0, len(val_set), 0)
        loader, sampler = train_loader(train_set, collate, a.batch_size, rank, world_size, a.seed, a.num_workers,
                                       a.pin_mem, "--data_path")
        return FinetuneData(loader, sampler, val, len(train_set), len(val_set),
                            batches_per_epoch(sampler, a.batch_size))

    def build_head(self, backbone):
        return linear_head(backbone.config["embed_dim"], self.state["nb_classes"])

    def _logits(self, backbone, head, batch):
        return head(text_features(backbone, batch["text_ids"], batch["text_masks"], self.pool)).float()

    def loss(self, backbone, head, batch):
        logits = self._logits(backbone, head, batch)
        loss = F.cross_entropy(logits, batch["targets"], label_smoothing=self.args.smoothing)
        return {"loss": loss, "acc": (logits.detach().argmax(-1) == batch["targets"]).float().mean() * 100}

    def predict(self, backbone, head, batch):
        logits = self._logits(backbone, head, batch)
        return {"index": batch["index"], "targets": batch["targets"], "pred": logits.argmax(-1),
                "loss": F.cross_entropy(logits, batch["targets"], reduction="none")}

    def metrics(self, outputs):
        return {"acc": 100.0 * (outputs["pred"] == outputs["targets"]).double().mean().item(),
                "loss": outputs["loss"].double().mean().item()}
