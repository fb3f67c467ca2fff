"""Write WebDataset tar shards from a CSV/TSV or MUGE pair dataset.

    python util/make_pair_shards.py --src pairs.csv --out_dir shards/ --samples_per_shard 10000

Each sample becomes `<key>.<jpg|png|webp>` (the original image bytes; other formats are
re-encoded as PNG) plus `<key>.txt`; keys are 9-digit sample numbers. Entries that do not load
are left out and listed. `sizes.json` (samples per shard) is written next to the shards so the
loader knows the epoch length without scanning them. --shuffle writes the samples in a seeded
random order, so that a shard does not hold one stretch of a sorted source file.
"""
import argparse
import io
import json
import os
import sys

import numpy as np
import webdataset as wds
from PIL import Image

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from custom_datasets.pair_dataset import (  # noqa: E402
    DEFAULT_MAX_IMAGE_PIXELS, BadSample, build_pair_dataset, decode_image, is_shard_path, set_max_image_pixels)
from util.errors import UserError, run_cli  # noqa: E402

KEPT_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--src", required=True, help="CSV/TSV or parquet file, MUGE folder or *_texts.jsonl")
    p.add_argument("--out_dir", required=True)
    p.add_argument("--samples_per_shard", type=int, default=10000)
    p.add_argument("--split", default="train", help="MUGE split inside a folder")
    p.add_argument("--prefix", default="shard")
    p.add_argument("--shuffle", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max_image_pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS,
                   help="as in training: larger JPEGs are checked at reduced size, other larger images left out")
    return p.parse_args(argv)


def _image_member(data: bytes):
    """(extension, bytes) to store; the image is fully decoded first so bad ones are left out."""
    img = decode_image(data)
    ext = KEPT_FORMATS.get(Image.open(io.BytesIO(data)).format)
    if ext is not None:
        return ext, data
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "png", buf.getvalue()


def main(argv=None) -> int:
    """Returns the number of entries left out."""
    args = parse_args(argv)
    set_max_image_pixels(args.max_image_pixels)
    if is_shard_path(args.src):
        raise UserError(f"--src {args.src}: already shards; expected a CSV/TSV or MUGE dataset")
    if args.samples_per_shard < 1:
        raise UserError("--samples_per_shard must be at least 1")
    ds = build_pair_dataset(args.src, split=args.split, flag="--src")
    order = np.arange(len(ds))
    if args.shuffle:
        order = np.random.default_rng(args.seed).permutation(len(ds))
    os.makedirs(args.out_dir, exist_ok=True)
    sizes, bad, writer, written = {}, [], None, 0

    def finish(writer, name):  # a shard appears under its name only once complete
        writer.close()
        path = os.path.join(args.out_dir, name)
        os.replace(path + ".tmp", path)

    name = None
    for i in order:
        try:
            data, text, _ = ds.raw(int(i))
            ext, data = _image_member(data)
        except BadSample as e:
            bad.append((ds.ident(int(i)), e.args[0]))
            continue
        if writer is None or sizes[name] == args.samples_per_shard:
            if writer is not None:
                finish(writer, name)
            name = f"{args.prefix}-{len(sizes):06d}.tar"
            writer, sizes[name] = wds.TarWriter(
                os.path.join(args.out_dir, name + ".tmp"), encoder=False, mtime=0.0), 0
        writer.write({"__key__": f"{written:09d}", ext: data, "txt": text.encode("utf-8")})
        sizes[name] += 1
        written += 1
    if writer is None:
        raise UserError(f"--src {args.src}: none of the {len(ds)} entries could be loaded")
    finish(writer, name)
    with open(os.path.join(args.out_dir, "sizes.json"), "w", encoding="utf-8") as f:
        json.dump(sizes, f, indent=1)
    print(f"wrote {written} samples in {len(sizes)} shards to {args.out_dir}; "
          f"left out {len(bad)} bad entries")
    for ident, reason in bad:
        print(f"  bad: {ident}\t{reason}")
    return len(bad)


if __name__ == "__main__":
    run_cli(main)
