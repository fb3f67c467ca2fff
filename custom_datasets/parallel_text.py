"""Parallel sentences for cross-lingual distillation (modes/text_distill.py): `source,target` pairs, e.g. English
captions and their translations, from a CSV/TSV with a header, JSONL (objects with "source" and "target") or
parquet (columns source and target). Both sides are kept as packed UTF-8 (text_dataset.PackedStrings) and
tokenized in the data workers, each with its own tokenizer: the teacher's for the source, the student's for the
target.
"""
import os

import torch
from torch.utils.data import Dataset

from custom_datasets.pair_dataset import parse_key
from custom_datasets.records import csv_records, jsonl_records
from custom_datasets.text_dataset import PackedStrings
from util.errors import UserError

COLUMNS = ("source", "target")


def _rows(path, flag):
    ext = os.path.splitext(path)[1].lower()
    if ext in (".csv", ".tsv"):
        return ((r["source"], r["target"]) for _, r in csv_records(path, COLUMNS, (), f"{flag} {path}"))
    if ext in (".jsonl", ".json"):
        return ((str(r["source"]), str(r["target"])) for _, r in jsonl_records(path, COLUMNS, f"{flag} {path}"))
    if ext == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        missing = [c for c in COLUMNS if c not in table.column_names]
        if missing:
            raise UserError(f"{flag} {path}: no column(s) {', '.join(missing)}; columns: "
                            f"{', '.join(table.column_names)}")
        return zip(*(table.column(c).to_pylist() for c in COLUMNS))
    raise UserError(f"{flag} {path}: parallel sentences must be .csv, .tsv, .jsonl or .parquet (source,target)")


class ParallelTextDataset(Dataset):
    """item i (or a sampler's (epoch, i) key) -> {"source": str, "target": str, "index": i}."""

    def __init__(self, path, flag="--data_path"):
        if not os.path.isfile(path):
            raise UserError(f"{flag} {path}: file not found")
        self.sources, self.targets = PackedStrings(), PackedStrings()
        for source, target in _rows(path, flag):
            if not str(source).strip() or not str(target).strip():
                continue  # an empty side teaches nothing
            self.sources.append(str(source))
            self.targets.append(str(target))
        if not len(self.sources):
            raise UserError(f"{flag} {path}: no source,target pairs with text on both sides")
        self.sources.finish()
        self.targets.finish()

    def __len__(self):
        return len(self.sources)

    def __getitem__(self, key):
        _, i = parse_key(key)
        return {"source": self.sources.get(i), "target": self.targets.get(i), "index": i}


class ParallelCollator:
    """items -> {"text_ids", "text_masks": the targets in the student's tokens; "teacher_ids", "teacher_masks":
    the sources in the teacher's; "index": LongTensor[B]}."""

    def __init__(self, student_tokenizer, teacher_tokenizer):
        self.student, self.teacher = student_tokenizer, teacher_tokenizer

    def __call__(self, items):
        ids, masks = self.student.encode_batch([it["target"] for it in items])
        t_ids, t_masks = self.teacher.encode_batch([it["source"] for it in items])
        return {"text_ids": ids, "text_masks": masks, "teacher_ids": t_ids, "teacher_masks": t_masks,
                "index": torch.tensor([it["index"] for it in items], dtype=torch.long)}
