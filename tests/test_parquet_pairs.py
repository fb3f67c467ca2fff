"""Parquet pairs: images as bytes or relative paths, read a row group at a time by the workers, in a
(seed, epoch) order of row groups shuffled within each group, with the same corrupt-row handling as the other
formats; the validator, the shard writer and a training run take the file."""
import csv
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import main_pretrain_cook
from custom_datasets.image_dataset import build_eval_transform, image_preprocess_state
from custom_datasets.pair_dataset import CsvPairDataset, build_pair_dataset
from custom_datasets.parquet_pairs import ParquetPairDataset
from custom_datasets.sampler import KeyedDistributedSampler
from run_helpers import run_entry


def write_parquet(demo_data, path, as_bytes=True, row_group_size=10, corrupt=()):
    """The demo pairs as parquet (image_id, image, text_id, caption); `corrupt`: row -> 'bytes'|'path'|'caption'."""
    root = os.path.dirname(demo_data["pairs_train"])
    rows = list(csv.DictReader(open(demo_data["pairs_train"], encoding="utf-8")))
    images, captions = [], []
    for i, r in enumerate(rows):
        full = os.path.join(root, r["image_path"])
        if as_bytes:
            images.append(b"not an image" if corrupt and corrupt.get(i) == "bytes" else open(full, "rb").read())
        else:
            rel = os.path.relpath(full, os.path.dirname(path))
            images.append(rel + ".missing" if corrupt and corrupt.get(i) == "path" else rel)
        captions.append("  " if corrupt and corrupt.get(i) == "caption" else r["text"])
    table = pa.table({"image_id": [r["image_path"] for r in rows],
                      "image": pa.array(images, pa.binary() if as_bytes else pa.string()),
                      "text_id": list(range(len(rows))), "caption": captions})
    pq.write_table(table, path, row_group_size=row_group_size)
    return rows


@pytest.fixture(scope="module")
def transform():
    return build_eval_transform(image_preprocess_state(32, crop_pct=1.0))


@pytest.mark.parametrize("as_bytes", [True, False])
def test_rows_equal_the_csv_reader_on_the_same_pairs(demo_data, tmp_path, transform, as_bytes):
    path = str(tmp_path / "pairs.parquet")
    rows = write_parquet(demo_data, path, as_bytes=as_bytes)
    pq_ds, csv_ds = ParquetPairDataset(path, transform), CsvPairDataset(str(demo_data["pairs_train"]), transform)
    assert len(pq_ds) == len(csv_ds) == len(rows) and len(pq_ds.groups) == -(-len(rows) // 10)
    for i in (0, 9, 10, len(rows) - 1):
        a, b = pq_ds[(1, i)], csv_ds[(1, i)]
        assert a["raw_text"] == b["raw_text"] and torch.equal(a["image"], b["image"]) and not a["bad"]
    assert np.array_equal(pq_ds.image_index, csv_ds.image_index)
    assert isinstance(build_pair_dataset(path, transform), ParquetPairDataset)
    assert len(pq_ds._cache) <= 2  # only the last two row groups stay in memory


def test_the_order_permutes_row_groups_then_rows_and_resumes_exactly(demo_data, tmp_path):
    path = str(tmp_path / "pairs.parquet")
    write_parquet(demo_data, path)
    ds = ParquetPairDataset(path)
    order = ds.epoch_order(0, 3)
    assert sorted(order) == list(range(len(ds))) and order == ds.epoch_order(0, 3) and order != ds.epoch_order(0, 4)
    groups = [int(np.searchsorted(ds.starts, i, side="right") - 1) for i in order]
    runs = [g for k, g in enumerate(groups) if k == 0 or g != groups[k - 1]]
    assert len(runs) == len(set(runs)) == len(ds.groups)  # each row group is one contiguous run
    samplers = [KeyedDistributedSampler(len(ds), 2, r, seed=0, order=ds.epoch_order) for r in (0, 1)]
    for s in samplers:
        s.set_epoch(3)
    full = [list(s) for s in samplers]
    assert sorted(i for f in full for _, i in f) == list(range(len(ds)))  # every row once over the ranks
    samplers[1].set_epoch(3, start=5)
    assert list(samplers[1]) == full[1][5:]  # a resumed epoch continues with the next unseen row
    seen = {i for f in full for _, i in f[:5]}  # 5 steps of batch 1 on 2 ranks, then resumed on 1 rank
    alone = KeyedDistributedSampler(len(ds), 1, 0, seed=0, order=ds.epoch_order)
    alone.set_epoch(3, start=10)
    rest = [i for _, i in alone]
    assert not seen & set(rest) and seen | set(rest) == set(range(len(ds)))  # nothing repeated or skipped


def test_corrupt_rows_are_replaced_and_listed(demo_data, tmp_path, transform):
    path = str(tmp_path / "bad.parquet")
    write_parquet(demo_data, path, corrupt={1: "bytes", 2: "caption"})
    ds = ParquetPairDataset(path, transform)
    assert ds[(0, 1)]["bad"] == [("bad.parquet:group0:row1", "not an image")]
    assert ds[(0, 2)]["bad"][0][1] == "empty caption"
    paths = str(tmp_path / "paths.parquet")
    write_parquet(demo_data, paths, as_bytes=False, corrupt={3: "path"})
    assert ParquetPairDataset(paths, transform)[(0, 3)]["bad"][0][1] == "missing file"


def test_the_validator_shard_writer_and_a_training_run_take_parquet(demo_data, tmp_path):
    path = str(tmp_path / "pairs.parquet")
    rows = write_parquet(demo_data, path, corrupt={4: "bytes"})
    listed = tmp_path / "bad_entries.tsv"
    proc = run_entry("util/validate_pairs.py", ["--data_path", path, "--workers", "1", "--out", str(listed)])
    assert f"{len(rows)} entries, {len(rows) - 1} ok, 1 bad" in proc.stdout
    assert listed.read_text().split() == ["pairs.parquet:group0:row4", "not", "an", "image"]
    run_entry("util/make_pair_shards.py", ["--src", path, "--out_dir", str(tmp_path / "shards"),
                                           "--samples_per_shard", "20"])
    assert os.path.exists(tmp_path / "shards" / "sizes.json")
    argv = ["--exp_name", "image_text_itc", "--model", "vlmo_tiny_patch16", "--data_path", path, "--tokenizer",
            str(demo_data["tokenizer"]), "--batch_size", "4", "--epochs", "1", "--warmup_epochs", "0",
            "--num_workers", "2", "--output_dir", str(tmp_path / "run")]
    assert main_pretrain_cook.main(argv) == 0
    bad = open(tmp_path / "run" / "bad_samples_rank0.tsv").read().splitlines()
    assert len(bad) == 1 and bad[0].split("\t")[1:] == ["pairs.parquet:group0:row4", "not an image"]
