"""Pair datasets: CSV, TSV, MUGE and WebDataset shards load the same samples; corrupt entries of
every kind are replaced, reported and found by the validator; shards give equal step counts."""
import base64
import io
import json
import tarfile

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader

from custom_datasets.pair_collator import PairCollator, caption_hashes
from util.itc_monitor import duplicate_fraction
from custom_datasets.pair_dataset import CsvPairDataset, MugePairDataset, build_pair_dataset
from custom_datasets.wds_pairs import WdsPairDataset
from util import make_pair_shards, validate_pairs
from util.errors import UserError

N_GOOD = 6


def plain(img, rng):
    return torch.from_numpy(np.asarray(img.resize((8, 8)), dtype=np.float32) / 255).permute(2, 0, 1)


def flip(img, rng):
    out = plain(img, rng)
    return out.flip(-1) if rng.random() < 0.5 else out


class StandInTokenizer:
    """encode_batch contract of custom_datasets/tokenizer.py: ids from characters, padded."""

    def encode_batch(self, texts):
        rows = [[1] + [ord(c) % 50 + 3 for c in t][:14] + [2] for t in texts]
        width = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), 1
        return ids, mask


@pytest.fixture
def tokenizer(request):
    try:  # the project's tiny WordPiece tokenizer when tests/conftest.py provides it
        return request.getfixturevalue("tiny_tokenizer")
    except pytest.FixtureLookupError:
        return StandInTokenizer()


def image_bytes(k, fmt="JPEG"):
    rng = np.random.default_rng(k)
    arr = (rng.random((24, 24, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt)
    return buf.getvalue()


def good_pairs():
    """[(caption, file name, bytes)]; one PNG among JPEGs, one caption with quote characters."""
    out = []
    for k in range(N_GOOD):
        fmt = "PNG" if k == 3 else "JPEG"
        text = f'caption {k} "quoted"' if k == 1 else f"caption number {k}"
        out.append((text, f"{k}.{'png' if fmt == 'PNG' else 'jpg'}", image_bytes(k, fmt)))
    return out


def truncated_jpeg():
    data = image_bytes(99)
    return data[: len(data) * 2 // 3]


def write_folder_data(root, with_bad=True):
    """imgs/ plus pairs.csv (text,image_path) and pairs.tsv (image_path<TAB>text, other order).
    Returns the relative paths of the bad entries."""
    (root / "imgs").mkdir(parents=True)
    rows = []
    for text, name, data in good_pairs():
        (root / "imgs" / name).write_bytes(data)
        rows.append((text, f"imgs/{name}"))
    bad = []
    if with_bad:
        (root / "imgs" / "trunc.jpg").write_bytes(truncated_jpeg())
        (root / "imgs" / "empty.jpg").write_bytes(b"")
        (root / "imgs" / "notimage.jpg").write_bytes(b"this is text, not a JPEG\n")
        bad = ["imgs/trunc.jpg", "imgs/empty.jpg", "imgs/notimage.jpg", "imgs/missing.jpg"]
        rows[2:2] = [(f"bad {i}", p) for i, p in enumerate(bad)]
    with open(root / "pairs.csv", "w", encoding="utf-8") as f:
        f.write("text,image_path\n")
        for text, path in rows:
            f.write('"{}",{}\n'.format(text.replace('"', '""'), path))
    with open(root / "pairs.tsv", "w", encoding="utf-8") as f:
        f.write("image_path\ttext\n")
        for text, path in rows:
            f.write(f"{path}\t{text}\n")
    return bad


def write_muge(root, with_bad=True):
    """train_texts.jsonl / train_imgs.tsv; a bad text lists 3 bad images (one sample each)."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "train_imgs.tsv", "w", encoding="utf-8") as f:
        for k, (_, _, data) in enumerate(good_pairs()):
            b64 = base64.urlsafe_b64encode(data) if k % 2 else base64.b64encode(data)
            f.write(f"{1000 + k}\t{b64.decode()}\n")
        if with_bad:
            f.write("2000\tnot*base64!!\n")
            f.write(f"2001\t{base64.b64encode(truncated_jpeg()).decode()}\n")
    with open(root / "train_texts.jsonl", "w", encoding="utf-8") as f:
        for k, (text, _, _) in enumerate(good_pairs()):
            f.write(json.dumps({"text_id": k, "text": text, "image_ids": [1000 + k]}) + "\n")
        if with_bad:
            f.write(json.dumps({"text_id": 99, "text": "bad", "image_ids": [2000, 2001, 3000]})
                    + "\n")
    return ["train_imgs.tsv:2000", "train_imgs.tsv:2001", "train_imgs.tsv:3000"]


def sample_set(items):
    return {(it["raw_text"], it["image"].numpy().tobytes()) for it in items}


def test_all_formats_load_the_same_samples(tmp_path):
    write_folder_data(tmp_path / "f", with_bad=False)
    write_muge(tmp_path / "m", with_bad=False)
    csv_ds = build_pair_dataset(str(tmp_path / "f" / "pairs.csv"), plain)
    tsv_ds = build_pair_dataset(str(tmp_path / "f" / "pairs.tsv"), plain)
    muge_ds = build_pair_dataset(str(tmp_path / "m"), plain)
    assert isinstance(csv_ds, CsvPairDataset) and isinstance(muge_ds, MugePairDataset)
    jsonl = str(tmp_path / "m" / "train_texts.jsonl")
    assert isinstance(build_pair_dataset(jsonl), MugePairDataset)
    assert make_pair_shards.main(["--src", str(tmp_path / "f" / "pairs.csv"), "--out_dir",
                                  str(tmp_path / "s"), "--samples_per_shard", "4"]) == 0
    shard_ds = build_pair_dataset(str(tmp_path / "s" / "shard-{000000..000001}.tar"), plain,
                                  batch_size=1, shuffle_buffer=3)
    assert isinstance(shard_ds, WdsPairDataset) and len(shard_ds) == N_GOOD
    expected = {(t, plain(Image.open(io.BytesIO(d)).convert("RGB"), None).numpy().tobytes())
                for t, _, d in good_pairs()}
    for ds in (csv_ds, tsv_ds, muge_ds):
        assert len(ds) == N_GOOD
        assert sample_set(ds[i] for i in range(len(ds))) == expected
    assert sample_set(shard_ds) == expected
    # a MUGE folder also converts, and image_index numbers the distinct images
    assert make_pair_shards.main(["--src", str(tmp_path / "m"), "--out_dir",
                                  str(tmp_path / "s2"), "--samples_per_shard", "10"]) == 0
    assert sample_set(build_pair_dataset(str(tmp_path / "s2"), plain, batch_size=2)) == expected
    assert muge_ds.image_index.tolist() == list(range(N_GOOD))


def test_keyed_items_and_collated_batches(tmp_path, tokenizer):
    write_folder_data(tmp_path, with_bad=False)
    ds = CsvPairDataset(str(tmp_path / "pairs.csv"), flip, seed=3)
    a, b = ds[(2, 4)], ds[(2, 4)]
    assert torch.equal(a["image"], b["image"]) and (a["epoch"], a["index"]) == (2, 4)
    assert ds[4]["epoch"] == 0
    flips = {bool(torch.equal(ds[(e, 4)]["image"], ds[(0, 4)]["image"])) for e in range(1, 12)}
    assert flips == {True, False}  # the flip is drawn per (seed, epoch, index)
    loader = DataLoader(ds, batch_size=4, collate_fn=PairCollator(tokenizer))
    batch = next(iter(loader))
    assert batch["images"].shape == (4, 3, 8, 8)
    assert batch["text_ids"].shape == batch["text_masks"].shape and batch["text_ids"].shape[0] == 4
    assert batch["bad"] == [] and batch["index"].tolist() == [0, 1, 2, 3]
    assert torch.equal(batch["caption_hash"], caption_hashes(batch["text_ids"], batch["text_masks"]))
    ids = torch.tensor([[5, 6, 0, 0], [7, 8, 9, 0], [5, 6, 0, 0], [5, 6, 0, 0]])
    masks = (ids > 0).long()
    assert duplicate_fraction(caption_hashes(ids, masks)) == 0.5
    # padding is not part of a caption: the same caption padded to another batch's length hashes alike
    assert torch.equal(caption_hashes(ids[:1, :2], masks[:1, :2]), caption_hashes(ids[:1], masks[:1]))


def test_corrupt_entries_are_replaced_listed_and_validated(tmp_path, tokenizer):
    bad_csv = write_folder_data(tmp_path / "f")
    bad_muge = write_muge(tmp_path / "m")
    reasons = ("truncated", "zero-byte", "not an image", "missing file", "base64", "not in the")
    for path, bad_ids in ((tmp_path / "f" / "pairs.csv", bad_csv),
                          (tmp_path / "f" / "pairs.tsv", bad_csv),
                          (tmp_path / "m", bad_muge)):
        ds = build_pair_dataset(str(path), plain)
        assert len(ds) == N_GOOD + len(bad_ids)
        batches = list(DataLoader(ds, batch_size=3, collate_fn=PairCollator(tokenizer)))
        # every key yields a sample: no batch shrinks
        assert sum(b["images"].shape[0] for b in batches) == len(ds)
        reported = [entry for b in batches for entry in b["bad"]]
        # (a replacement may itself be bad: it is then reported too, and replaced in turn)
        assert {i for i, _ in reported} == set(bad_ids)
        assert all(any(r in reason for r in reasons) for _, reason in reported), reported
        good_texts = {t for t, _, _ in good_pairs()}
        for i in range(len(ds)):  # replacements are good samples, the same for the same key
            item = ds[(1, i)]
            assert item["raw_text"] in good_texts
            assert torch.equal(item["image"], ds[(1, i)]["image"])
        out = tmp_path / f"bad_{path.name}.tsv"
        args = ["--data_path", str(path), "--out", str(out), "--workers", "2"]
        assert validate_pairs.main(args) == len(bad_ids)
        listed = [line.split("\t")[0] for line in out.read_text().splitlines()]
        assert sorted(listed) == sorted(bad_ids)
    # the converter leaves bad entries out of the shards and says how many
    assert make_pair_shards.main(["--src", str(tmp_path / "f" / "pairs.csv"), "--out_dir",
                                  str(tmp_path / "s")]) == len(bad_csv)


def write_tar(path, samples):
    with wds.TarWriter(str(path), encoder=False) as w:
        for s in samples:
            w.write(s)


def test_corrupt_shard_samples_are_skipped_and_reported(tmp_path):
    goods = good_pairs()
    d = tmp_path / "shards"
    d.mkdir()
    write_tar(d / "a.tar", [
        {"__key__": "g0", "jpg": goods[0][2], "txt": goods[0][0].encode()},
        {"__key__": "trunc", "jpg": truncated_jpeg(), "txt": b"x"},
        {"__key__": "empty", "jpg": b"", "txt": b"x"},
        {"__key__": "g1", "jpg": goods[1][2], "txt": goods[1][0].encode()}])
    write_tar(d / "b.tar", [
        {"__key__": "notimg", "jpg": b"plain text", "txt": b"x"},
        {"__key__": "notxt", "jpg": goods[2][2]},
        {"__key__": "g3", "png": goods[3][2], "txt": goods[3][0].encode()}])
    (d / "c.tar").write_bytes(b"\x00garbage, not a tar archive" * 40)
    ds = WdsPairDataset(str(d), plain, batch_size=2, shuffle_buffer=2)
    assert ds.samples_per_epoch == 7  # counted from the tar headers (image members)
    items = list(ds)
    assert len(items) == 6 and {it["raw_text"] for it in items} <= {g[0] for g in goods}
    reported = {i: r for it in items for i, r in it["bad"]}
    assert {"a.tar:trunc", "a.tar:empty", "b.tar:notimg", "b.tar:notxt", "c.tar"} <= set(reported)
    assert "shard error" in reported["c.tar"] and "zero-byte" in reported["a.tar:empty"]
    out = tmp_path / "bad.tsv"
    assert validate_pairs.main(["--data_path", str(d), "--out", str(out), "--workers", "0"]) == 5


@pytest.mark.parametrize("per_shard", [5, 2])  # fewer shards than reading slots, and more
def test_shards_give_every_rank_the_same_steps(tmp_path, per_shard):
    rows = [(f"text {k}", f"{k}.png", image_bytes(k, "PNG")) for k in range(14)]
    (tmp_path / "imgs").mkdir()
    with open(tmp_path / "p.csv", "w") as f:
        f.write("text,image_path\n")
        for text, name, data in rows:
            (tmp_path / "imgs" / name).write_bytes(data)
            f.write(f"{text},imgs/{name}\n")
    make_pair_shards.main(["--src", str(tmp_path / "p.csv"), "--out_dir", str(tmp_path / "s"),
                           "--samples_per_shard", str(per_shard), "--shuffle"])
    seen, steps = [], []
    collate = PairCollator(StandInTokenizer())
    for rank in range(2):
        ds = WdsPairDataset(str(tmp_path / "s"), plain, batch_size=2, shuffle_buffer=3,
                            rank=rank, world_size=2)
        loader = DataLoader(ds, batch_size=2, num_workers=2, collate_fn=collate,
                            persistent_workers=True)  # set_epoch must still reach them
        batches = list(loader)
        steps.append(len(batches))
        assert len(batches) == len(loader) == ds.steps_per_epoch == 3  # 14 // 2 ranks // 2
        assert all(b["images"].shape[0] == 2 for b in batches)
        seen += [i for b in batches for i in b["index"].tolist()]
        if rank == 0 and per_shard == 2:
            # mid-epoch resume replays the remaining batches exactly; epochs are reproducible
            ds.set_epoch(0, start_step=1)
            resumed = list(loader)
            assert [b["index"].tolist() for b in resumed] == \
                [b["index"].tolist() for b in batches[1:]]
            assert all(torch.equal(r["images"], b["images"]) for r, b in zip(resumed, batches[1:]))
            ds.set_epoch(0)
            assert all(torch.equal(r["images"], b["images"])
                       for r, b in zip(list(loader), batches))
    assert steps == [3, 3]
    assert sorted(seen) == list(range(12))  # index = rank * len + position, unique


def test_user_errors(tmp_path):
    (tmp_path / "x.csv").write_text("caption_text,file\na,b.jpg\n")
    with pytest.raises(UserError, match="text"):
        build_pair_dataset(str(tmp_path / "x.csv"))
    with pytest.raises(UserError, match="not found"):
        build_pair_dataset(str(tmp_path / "nope.csv"))
    with pytest.raises(UserError, match="shards not found"):
        build_pair_dataset(str(tmp_path / "shard-{000000..000003}.tar"), batch_size=2)
    with tarfile.open(tmp_path / "one.tar", "w"):
        pass
    with pytest.raises(UserError, match="fewer than one batch"):
        build_pair_dataset(str(tmp_path / "one.tar"), batch_size=2)


def test_demo_pairs_load_and_collate(demo_data, tiny_tokenizer):
    ds = build_pair_dataset(str(demo_data["pairs_val"]), plain)
    batch = PairCollator(tiny_tokenizer)([ds[(1, i)] for i in range(4)])
    assert batch["images"].shape == (4, 3, 8, 8) and batch["bad"] == []
    assert (batch["text_masks"].sum(1) > 2).all()  # captions tokenized beyond [CLS] [SEP]
