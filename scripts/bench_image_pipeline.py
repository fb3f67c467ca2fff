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


class FullDecode:
    """Our two-view transform on fully decoded images (the pipeline without the JPEG draft crop)."""

    def __init__(self, tf):
        self.tf = tf

    def __call__(self, img, rng):
        return self.tf(img, rng)


def torchvision_pipeline(root):
    """The reference: torchvision ImageFolder + PIL with the same views (RandomResizedCrop 0.08-1, flip, colour
    jitter 0.4, 224 bicubic normalised + 112 lanczos), no mask."""
    from torchvision import datasets, transforms as T

    crop = T.Compose([T.RandomResizedCrop(224, scale=(0.08, 1.0)), T.RandomHorizontalFlip(),
                      T.ColorJitter(0.4, 0.4, 0.4)])
    big = T.Compose([T.Resize((224, 224), T.InterpolationMode.BICUBIC), T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)])
    small = T.Compose([T.Resize((112, 112), T.InterpolationMode.LANCZOS), T.ToTensor()])

    def two(img):
        region = crop(img)
        return big(region), small(region)
    return datasets.ImageFolder(root, transform=two)


def images_per_s(ds, keys):
    ds[keys[0]]
    start = time.perf_counter()
    for k in keys:
        ds[k]
    return len(keys) / (time.perf_counter() - start)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num", type=int, default=200)
    p.add_argument("--size", type=int, nargs=2, default=[500, 375])
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds (medians reported)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as root:
        write_jpegs(root, args.num, args.size)
        tf = build_two_view_transform(image_preprocess_state(224, "beit"), masking=MaskingGenerator((14, 14), 75))
        rows = {"ours (JPEG draft crop)": (ImageFolderDataset(root, tf), [(0, i) for i in range(args.num)]),
                "ours, full decode": (ImageFolderDataset(root, FullDecode(tf)), [(0, i) for i in range(args.num)]),
                "torchvision ImageFolder + PIL": (torchvision_pipeline(root), list(range(args.num)))}
        runs = {name: [] for name in rows}
        for _ in range(args.rounds):
            for name, (ds, keys) in rows.items():
                runs[name].append(images_per_s(ds, keys))
    med = {name: sorted(v)[len(v) // 2] for name, v in runs.items()}
    ref = med["torchvision ImageFolder + PIL"]
    print(f"two-view pipeline, 1 process, 1 thread, {args.size[0]}x{args.size[1]} JPEGs, median of {args.rounds} "
          "alternating rounds:")
    for name, v in med.items():
        print(f"  {name:32s} {v:7.1f} images/s  ({v / ref:.2f}x torchvision)")


if __name__ == "__main__":
    main()
