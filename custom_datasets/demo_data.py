"""A small, learnable demo dataset of coloured shapes, written in the real on-disk formats.

Layout under `out` (see make_demo_data): caption JSON lists for text MLM, an ImageNet-style folder
per split (class = shape), image-text pair CSVs, class names and prompt templates for zero-shot
evaluation, and a WordPiece tokenizer trained on the demo's training text. Everything is a
function of the seed: each caption and image draws from an RNG keyed by (seed, part, index).
"""
import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from custom_datasets.tokenizer import train_wordpiece

FORMAT_VERSION = 1
MARKER = ".demo_complete.json"
SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond", "hexagon")
COLORS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 210, 40),
    "purple": (140, 60, 190), "orange": (245, 140, 30), "white": (245, 245, 245), "black": (15, 15, 15),
}
SIZES = {"small": (0.12, 0.16), "large": (0.22, 0.28)}  # shape radius as a fraction of the image
POSITIONS = {  # phrase -> shape centre as a fraction of the image (x, y)
    "on the left": (0.3, 0.5), "on the right": (0.7, 0.5), "at the top": (0.5, 0.3),
    "at the bottom": (0.5, 0.7), "in the center": (0.5, 0.5),
}
RELATIONS = ("above", "below", "to the left of", "to the right of", "next to")
TEMPLATES = ("a photo of a {}.", "a drawing of a {}.", "a picture of a {}.", "a {} shape.",
             "a coloured {}.")
# Part ids key the RNG streams so that changing one count never changes another part's content.
_PART_IDS = {"captions_train": 1, "captions_val": 2, "images_train": 3, "images_val": 4,
             "pairs_train": 5, "pairs_val": 6}
_OWNED = ("images", "pair_images", "tokenizer")


def _pick(rng, options):
    return options[int(rng.integers(len(options)))]


def scene_caption(rng):
    """Two shapes and their relation; the follow-up sentence repeats attributes, so masked
    colours and shapes can be recovered from context (that is what makes MLM learnable here)."""
    (s1, s2), (c1, c2) = [_pick(rng, tuple(SIZES)) for _ in "ab"], [_pick(rng, tuple(COLORS)) for _ in "ab"]
    h1, h2 = rng.choice(len(SHAPES), size=2, replace=False)
    h1, h2, rel = SHAPES[h1], SHAPES[h2], _pick(rng, RELATIONS)
    templates = (
        f"a {s1} {c1} {h1} {rel} a {s2} {c2} {h2}.",
        f"a {s1} {c1} {h1} {rel} a {s2} {c2} {h2}. the {h1} is {c1} and the {h2} is {c2}.",
        f"there is a {c1} {h1} {rel} a {c2} {h2}. the {h1} is {s1} and the {h2} is {s2}.",
        f"a {c1} {h1} and a {c2} {h2}. the {c1} {h1} is {rel} the {c2} {h2}.",
    )
    return _pick(rng, templates)


def shape_caption(rng, size, color, shape, position):
    """Caption of one pictured shape."""
    core = f"{size} {color} {shape} {position}"
    return _pick(rng, (f"a {core}.", f"a picture of a {core}.", f"there is a {core}."))


def _polygon(shape, cx, cy, r, angle):
    """Vertices of `shape` centred at (cx, cy) with radius r, rotated by `angle` radians."""
    if shape == "square":
        pts = [(r * math.cos(a), r * math.sin(a)) for a in np.arange(4) * math.pi / 2 + math.pi / 4]
    elif shape == "triangle":
        pts = [(r * math.cos(a), r * math.sin(a)) for a in np.arange(3) * 2 * math.pi / 3 - math.pi / 2]
    elif shape == "star":
        pts = [((r if k % 2 == 0 else 0.45 * r) * math.cos(a), (r if k % 2 == 0 else 0.45 * r) * math.sin(a))
               for k, a in enumerate(np.arange(10) * math.pi / 5 - math.pi / 2)]
    elif shape == "cross":
        w = 0.33 * r
        pts = [(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w), (w, r), (-w, r), (-w, w), (-r, w),
               (-r, -w), (-w, -w)]
    elif shape == "diamond":
        pts = [(0, -r), (0.6 * r, 0), (0, r), (-0.6 * r, 0)]
    elif shape == "hexagon":
        pts = [(r * math.cos(a), r * math.sin(a)) for a in np.arange(6) * math.pi / 3]
    else:
        raise ValueError(f"unknown shape {shape!r}")
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts]


def draw_shape(rng, img_size, shape, color, radius, center):
    """One shape on a noisy grey background -> PIL RGB image. radius, center: fractions of img_size."""
    base = rng.uniform(90, 160) + rng.uniform(-10, 10, size=3)
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8)[None, None].repeat(img_size, 0).repeat(img_size, 1))
    draw = ImageDraw.Draw(img)
    cx, cy, r = center[0] * img_size, center[1] * img_size, radius * img_size
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=COLORS[color])
    else:
        draw.polygon(_polygon(shape, cx, cy, r, rng.uniform(-0.35, 0.35)), fill=COLORS[color])
    noise = rng.normal(0, 6, size=(img_size, img_size, 3))
    return Image.fromarray(np.clip(np.asarray(img, dtype=np.float32) + noise, 0, 255).astype(np.uint8))


def _rng(seed, part, index):
    return np.random.default_rng([seed, _PART_IDS[part], index])


def _write_png(img, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, compress_level=1)


def _class_image(rng, img_size, shape):
    """Random colour, size and free position (the shape always fits inside the image)."""
    radius = rng.uniform(0.12, 0.3)
    center = rng.uniform(radius + 0.02, 1 - radius - 0.02, size=2)
    return draw_shape(rng, img_size, shape, _pick(rng, tuple(COLORS)), radius, center)


def pair_sample(rng, img_size):
    """(caption, image, attributes) of one image-text pair; attributes name size/colour/shape/position."""
    size, color = _pick(rng, tuple(SIZES)), _pick(rng, tuple(COLORS))
    shape, position = _pick(rng, SHAPES), _pick(rng, tuple(POSITIONS))
    radius = rng.uniform(*SIZES[size])
    center = np.array(POSITIONS[position]) + rng.uniform(-0.04, 0.04, size=2)
    attrs = {"size": size, "color": color, "shape": shape, "position": position, "radius": radius,
             "center": center.tolist()}
    return shape_caption(rng, size, color, shape, position), draw_shape(rng, img_size, shape, color, radius, center), attrs


def _write_pairs(root, split, num, img_size, seed):
    rows = []
    for i in range(num):
        caption, img, _ = pair_sample(_rng(seed, f"pairs_{split}", i), img_size)
        rel = f"pair_images/{split}/{i:06d}.png"
        _write_png(img, root / rel)
        rows.append((caption, rel))
    path = root / f"pairs_{split}.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "image_path"])
        writer.writerows(rows)
    return path, [caption for caption, _ in rows]


def _write_captions(root, split, num, seed):
    captions = [scene_caption(_rng(seed, f"captions_{split}", i)) for i in range(num)]
    path = root / f"captions_{split}.json"
    with open(path, "w", encoding="utf-8") as f:
        json.dump([{"caption": c} for c in captions], f, indent=0)
    return path, captions


def _paths(root):
    return {
        "root": root, "captions_train": root / "captions_train.json", "captions_val": root / "captions_val.json",
        "tokenizer": root / "tokenizer", "images_train": root / "images" / "train",
        "images_val": root / "images" / "val", "pairs_train": root / "pairs_train.csv",
        "pairs_val": root / "pairs_val.csv", "classnames": root / "classnames.txt",
        "templates": root / "templates.txt",
    }


def make_demo_data(out, num_train_captions=4000, num_val_captions=200, images_per_class_train=100,
                   images_per_class_val=20, num_train_pairs=2000, num_val_pairs=200, img_size=64,
                   vocab_size=1000, seed=0):
    """Generate the demo dataset under `out` and return a dict of its paths (pathlib.Path).

    Keys: root, captions_train, captions_val, tokenizer, images_train, images_val, pairs_train,
    pairs_val, classnames, templates. Returns at once when a completion marker with the same
    parameters exists; otherwise the generated sub-folders are replaced.
    """
    root = Path(out)
    params = {"format_version": FORMAT_VERSION, "num_train_captions": num_train_captions,
              "num_val_captions": num_val_captions, "images_per_class_train": images_per_class_train,
              "images_per_class_val": images_per_class_val, "num_train_pairs": num_train_pairs,
              "num_val_pairs": num_val_pairs, "img_size": img_size, "vocab_size": vocab_size, "seed": seed}
    paths = _paths(root)
    marker = root / MARKER
    if marker.is_file():
        try:
            if json.loads(marker.read_text(encoding="utf-8")) == params:
                return paths
        except json.JSONDecodeError:
            pass
    if img_size < 16:
        raise ValueError(f"img_size must be >= 16 to draw recognisable shapes, got {img_size}")
    root.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)  # an interrupted run must not look complete
    for name in _OWNED:  # stale images from other parameters would leak into the new folders
        shutil.rmtree(root / name, ignore_errors=True)

    _, train_captions = _write_captions(root, "train", num_train_captions, seed)
    _write_captions(root, "val", num_val_captions, seed)
    for split, per_class in (("train", images_per_class_train), ("val", images_per_class_val)):
        for k, shape in enumerate(SHAPES):
            for i in range(per_class):
                img = _class_image(_rng(seed, f"images_{split}", k * per_class + i), img_size, shape)
                _write_png(img, paths[f"images_{split}"] / shape / f"{shape}_{i:05d}.png")
    _, train_pair_captions = _write_pairs(root, "train", num_train_pairs, img_size, seed)
    _write_pairs(root, "val", num_val_pairs, img_size, seed)
    paths["classnames"].write_text("".join(f"{s}\t{s}\n" for s in SHAPES), encoding="utf-8")
    paths["templates"].write_text("".join(t + "\n" for t in TEMPLATES), encoding="utf-8")
    # Trained on all training-side text so pair captions and prompts tokenize without [UNK].
    prompts = [t.format(s) for t in TEMPLATES for s in SHAPES]
    train_wordpiece(train_captions + train_pair_captions + prompts, paths["tokenizer"], vocab_size=vocab_size)
    marker.write_text(json.dumps(params, indent=1), encoding="utf-8")
    return paths
