import collections
import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from custom_datasets.demo_data import COLORS, MARKER, POSITIONS, SHAPES, SIZES, draw_shape, make_demo_data
from custom_datasets.mlm_collator import IGNORE_INDEX, MLMCollator
from custom_datasets.text_dataset import CaptionDataset
from custom_datasets.tokenizer import load_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import make_demo_data as make_demo_script  # noqa: E402

PALETTE = np.array(list(COLORS.values()))
TINY = dict(num_train_captions=40, num_val_captions=8, images_per_class_train=2, images_per_class_val=1,
            num_train_pairs=10, num_val_pairs=4, img_size=24)


def foreground_of(img):
    return foreground(img)[1].sum()


def foreground(path_or_image):
    """(colour name, bool mask [H, W]) of the palette colour covering most pixels."""
    img = path_or_image if isinstance(path_or_image, Image.Image) else Image.open(path_or_image)
    pixels = np.asarray(img.convert("RGB")).astype(int)
    close = np.abs(pixels[:, :, None, :] - PALETTE[None, None]).max(-1) < 40  # [H, W, colours]
    best = int(close.sum((0, 1)).argmax())
    return list(COLORS)[best], close[:, :, best]


def fill_ratio(mask):
    ys, xs = np.nonzero(mask)
    return mask.sum() / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1))


def tree(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(Path(root).rglob("*")) if p.is_file()}


def test_deterministic_and_seed_dependent(tmp_path):
    a, b, c = (make_demo_data(tmp_path / name, seed=seed, **TINY) for name, seed in (("a", 3), ("b", 3), ("c", 4)))
    tree_a = tree(a["root"])
    assert tree_a == tree(b["root"])
    tree_c = tree(c["root"])
    assert tree_a.keys() == tree_c.keys()
    assert tree_a["captions_train.json"] != tree_c["captions_train.json"]
    assert tree_a["pairs_train.csv"] != tree_c["pairs_train.csv"]


def test_layout_and_formats(demo_data, tiny_tokenizer):
    sizes = json.loads((demo_data["root"] / MARKER).read_text())  # the parameters it was made with
    train, val = CaptionDataset(demo_data["captions_train"]), CaptionDataset(demo_data["captions_val"])
    assert (len(train), len(val)) == (sizes["num_train_captions"], sizes["num_val_captions"])
    names = [line.split("\t") for line in demo_data["classnames"].read_text().splitlines()]
    assert len(names) >= 5 and all(wnid == name for wnid, name in names)
    for split, per_class in (("train", sizes["images_per_class_train"]), ("val", sizes["images_per_class_val"])):
        folder = demo_data[f"images_{split}"]
        assert sorted(p.name for p in folder.iterdir()) == sorted(w for w, _ in names)
        for wnid, _ in names:
            files = sorted((folder / wnid).glob("*.png"))
            assert len(files) == per_class
            assert Image.open(files[0]).size == (sizes["img_size"], sizes["img_size"])
    templates = demo_data["templates"].read_text().splitlines()
    assert templates and all(t.count("{}") == 1 for t in templates)
    texts = list(train.iter_captions()) + list(val.iter_captions()) + [t.format(n) for t in templates for _, n in names]
    for split in ("train", "val"):
        with open(demo_data[f"pairs_{split}"], newline="") as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == sizes[f"num_{split}_pairs"] and list(rows[0]) == ["text", "image_path"]
        assert all((demo_data["root"] / r["image_path"]).is_file() for r in rows)
        texts += [r["text"] for r in rows]
    # Every demo text is covered by the demo vocabulary.
    ids, mask = tiny_tokenizer.encode_batch(texts)
    assert not (ids == tiny_tokenizer.unk_id).any()
    assert load_tokenizer(demo_data["tokenizer"] / "vocab.txt").tokens == tiny_tokenizer.tokens


def test_pair_captions_match_images(demo_data):
    areas = {}
    for split in ("train", "val"):
        with open(demo_data[f"pairs_{split}"], newline="") as f:
            for row in csv.DictReader(f):
                text = row["text"]
                words = text.rstrip(".").split()
                size, color, shape = (next(w for w in words if w in group) for group in (SIZES, COLORS, SHAPES))
                position = next(p for p in POSITIONS if text.rstrip(".").endswith(p))
                seen_color, mask = foreground(demo_data["root"] / row["image_path"])
                assert seen_color == color, text
                ys, xs = np.nonzero(mask)
                centre = np.array([xs.mean(), ys.mean()]) / mask.shape[0]
                assert np.abs(centre - POSITIONS[position]).max() < 0.12, (text, centre)
                areas.setdefault(shape, {}).setdefault(size, []).append(mask.sum())
    compared = 0
    for shape, by_size in areas.items():
        if "small" in by_size and "large" in by_size:
            assert max(by_size["small"]) < min(by_size["large"]), shape
            compared += 1
    assert compared >= 2


def test_class_folders_hold_their_shape(demo_data):
    ratios = {shape: [fill_ratio(foreground(p)[1]) for p in sorted((demo_data["images_train"] / shape).glob("*.png"))]
              for shape in ("circle", "star", "triangle")}
    assert min(ratios["circle"]) > 0.7
    assert max(ratios["star"]) < 0.5 and max(ratios["triangle"]) < 0.58


def test_marker_skips_and_parameter_change_regenerates(tmp_path):
    paths = make_demo_data(tmp_path / "d", **TINY)
    marker = paths["root"] / MARKER
    assert json.loads(marker.read_text())["img_size"] == TINY["img_size"]
    stamp = paths["pairs_train"].stat().st_mtime_ns
    assert make_demo_data(tmp_path / "d", **TINY) == paths
    assert paths["pairs_train"].stat().st_mtime_ns == stamp
    make_demo_data(tmp_path / "d", **{**TINY, "images_per_class_train": 1})
    assert len(list((paths["images_train"] / "circle").glob("*.png"))) == 1  # stale images removed


def test_script(tmp_path, capsys):
    out = tmp_path / "demo"
    assert make_demo_script.main(["--out", str(out), "--num_train", "20", "--num_val", "4",
                                  "--images_per_class", "1", "--val_images_per_class", "1",
                                  "--num_train_pairs", "4", "--num_val_pairs", "2", "--img_size", "16"]) == 0
    assert len(CaptionDataset(out / "captions_train.json")) == 20
    assert make_demo_script.main(["--out", str(out), "--img_size", "8"]) == 2
    assert "--img_size" in capsys.readouterr().err


@pytest.mark.parametrize("shape", SHAPES)
def test_every_shape_draws(shape):
    img = draw_shape(np.random.default_rng(0), 32, shape, "red", 0.3, (0.5, 0.5))
    assert img.size == (32, 32) and img.mode == "RGB"
    assert foreground_of(img) > 0.1 * 32 * 32


def test_captions_are_learnable(demo_data, tiny_tokenizer):
    """Masked tokens of val captions are mostly predictable from their two neighbours in train
    captions: the structure a small model can pick up in a few hundred steps."""
    train, val = CaptionDataset(demo_data["captions_train"]), CaptionDataset(demo_data["captions_val"])
    ids, mask = tiny_tokenizer.encode_batch(list(train.iter_captions()))
    context = collections.defaultdict(collections.Counter)
    for row, n in zip(ids.tolist(), mask.sum(1).tolist()):
        for j in range(1, n - 1):
            context[row[j - 1], row[j + 1]][row[j]] += 1
    batch = MLMCollator(tiny_tokenizer, seed=0)([val[i] for i in range(len(val))])
    original = tiny_tokenizer.encode_batch(list(val.iter_captions()))[0].tolist()
    hits = []
    for r, c in (batch["text_labels"] != IGNORE_INDEX).nonzero().tolist():
        seen = context.get((original[r][c - 1], original[r][c + 1]))
        hits.append(bool(seen) and seen.most_common(1)[0][0] == original[r][c])
    assert len(hits) >= 20 and np.mean(hits) > 0.35, np.mean(hits)  # chance is 1 / vocab_size
