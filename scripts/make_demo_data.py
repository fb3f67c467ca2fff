"""Generate the demo dataset (coloured shapes with captions) in the real on-disk formats.

    python scripts/make_demo_data.py --out data/demo [--num_train N] [--num_val M] [--seed S] [--img_size 64]

Re-running with the same parameters returns at once (a completion marker records them).
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from custom_datasets.demo_data import make_demo_data  # noqa: E402


def build_parser():
    parser = argparse.ArgumentParser(description="Generate the shapes demo dataset.")
    parser.add_argument("--out", default="data/demo", help="output folder")
    parser.add_argument("--num_train", type=int, default=4000, help="training captions (text MLM)")
    parser.add_argument("--num_val", type=int, default=200, help="validation captions")
    parser.add_argument("--images_per_class", type=int, default=100, help="training images per shape class")
    parser.add_argument("--val_images_per_class", type=int, default=20, help="validation images per class")
    parser.add_argument("--num_train_pairs", type=int, default=2000, help="training image-text pairs")
    parser.add_argument("--num_val_pairs", type=int, default=200, help="validation image-text pairs")
    parser.add_argument("--img_size", type=int, default=64, help="image side in pixels (>= 16)")
    parser.add_argument("--vocab_size", type=int, default=1000, help="tokenizer vocabulary size cap")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    counts = {k: getattr(args, k) for k in ("num_train", "num_val", "images_per_class", "val_images_per_class",
                                            "num_train_pairs", "num_val_pairs", "vocab_size")}
    bad = [f"--{k}" for k, v in counts.items() if v < (1 if k != "vocab_size" else 16)]
    if bad or args.img_size < 16:
        print(f"error: {', '.join(bad) or '--img_size'} too small (counts >= 1, --img_size >= 16)",
              file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    paths = make_demo_data(
        args.out, num_train_captions=args.num_train, num_val_captions=args.num_val,
        images_per_class_train=args.images_per_class, images_per_class_val=args.val_images_per_class,
        num_train_pairs=args.num_train_pairs, num_val_pairs=args.num_val_pairs, img_size=args.img_size,
        vocab_size=args.vocab_size, seed=args.seed)
    print(f"demo data ready in {paths['root']} ({time.perf_counter() - t0:.1f}s)")
    for key, path in paths.items():
        if key != "root":
            print(f"  {key:15s} {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
