"""Images/s of the image_mim two-view data pipeline (decode JPEG, colour jitter, one random resized crop to a
224 bicubic view and a 112 lanczos view, blockwise mask) in ONE process on one core, from full-size JPEGs
(ImageNet-like 500x375, generated here). Not a test: the number depends on the machine.

    python scripts/bench_image_pipeline.py [--num 200] [--size 500 375]
"""
import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from custom_datasets.image_dataset import ImageFolderDataset, build_two_view_transform, image_preprocess_state  # noqa
from custom_datasets.masking_generator import MaskingGenerator  # noqa: E402


def write_jpegs(root, num, size):
    rng = np.random.default_rng(0)
    os.makedirs(os.path.join(root, "class0"), exist_ok=True)
    w, h = size
    for i in range(num):
        # smooth gradients plus noise: JPEG sizes like photos' (not pure noise, not flat)
        base = np.linspace(0, 255, w)[None, :, None] * rng.uniform(0.3, 1, 3) + rng.normal(0, 20, (h, w, 3))
        Image.fromarray(base.clip(0, 255).astype(np.uint8)).save(os.path.join(root, "class0", f"{i:05d}.jpg"),
                                                                 quality=90)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num", type=int, default=200)
    p.add_argument("--size", type=int, nargs=2, default=[500, 375])
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as root:
        write_jpegs(root, args.num, args.size)
        tf = build_two_view_transform(image_preprocess_state(224, "beit"), masking=MaskingGenerator((14, 14), 75))
        ds = ImageFolderDataset(root, tf)
        ds[0]
        start = time.perf_counter()
        for i in range(len(ds)):
            ds[(0, i)]
        elapsed = time.perf_counter() - start
    print(f"two-view pipeline, 1 process, 1 thread, {args.size[0]}x{args.size[1]} JPEGs: "
          f"{args.num / elapsed:.1f} images/s ({1e3 * elapsed / args.num:.1f} ms per image)")


if __name__ == "__main__":
    main()
