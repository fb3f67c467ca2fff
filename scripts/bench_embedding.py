"""Embedding API throughput on this machine: images/s and texts/s of `inference.load_model(...)` for a small
model, and the largest difference from the training evaluation's embeddings on the same pairs.

    python scripts/bench_embedding.py [--model vlmo_small_patch16] [--n 256] [--batch_size 64]
"""
import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import main_pretrain_cook  # noqa: E402
from custom_datasets.demo_data import make_demo_data  # noqa: E402
from custom_datasets.image_dataset import build_eval_transform  # noqa: E402
from custom_datasets.loaders import eval_loader  # noqa: E402
from custom_datasets.pair_collator import PairCollator  # noqa: E402
from custom_datasets.pair_dataset import build_pair_dataset  # noqa: E402
from inference import load_model  # noqa: E402
from util.itc_eval import _embed_pair  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vlmo_small_patch16")
    p.add_argument("--n", type=int, default=256, help="held-out pairs embedded")
    p.add_argument("--batch_size", type=int, default=64)
    args = p.parse_args()
    torch.set_num_threads(os.cpu_count())
    with tempfile.TemporaryDirectory() as tmp:
        d = make_demo_data(os.path.join(tmp, "demo"), num_train_captions=64, num_val_captions=8,
                           images_per_class_train=2, images_per_class_val=1, num_train_pairs=64,
                           num_val_pairs=args.n, img_size=224)
        out = os.path.join(tmp, "run")
        main_pretrain_cook.main(["--exp_name", "image_text_itc", "--model", args.model, "--data_path",
                                 str(d["pairs_train"]), "--tokenizer", str(d["tokenizer"]), "--batch_size", "32",
                                 "--epochs", "1", "--num_workers", "0", "--output_dir", out, "--log_freq", "100"])
        model = load_model(os.path.join(out, "checkpoint-latest.pth"), batch_size=args.batch_size)
        import csv
        rows = list(csv.DictReader(open(d["pairs_val"], encoding="utf-8")))
        paths = [os.path.join(os.path.dirname(d["pairs_val"]), r["image_path"]) for r in rows]
        texts = [r["text"] for r in rows]
        model.encode_image(paths[:8]), model.encode_text(texts[:8])  # warm up
        t0 = time.perf_counter()
        img = model.encode_image(paths)
        t1 = time.perf_counter()
        txt = model.encode_text(texts)
        t2 = time.perf_counter()
        val = build_pair_dataset(str(d["pairs_val"]), build_eval_transform(model.image_state))
        with torch.no_grad():
            ref = [_embed_pair(model.model, b) for b in eval_loader(val, PairCollator(model.tokenizer), 32, 0, 1, 0,
                                                                     False)]
        d_img = (img - torch.cat([r["image_emb"] for r in ref])).abs().max().item()
        d_txt = (txt - torch.cat([r["text_emb"] for r in ref])).abs().max().item()
    print(f"{args.model}, {os.cpu_count()} CPU threads, batch {args.batch_size}, {len(paths)} 224px images from files")
    print(f"encode_image: {len(paths) / (t1 - t0):.1f} images/s (decode + preprocess + forward)")
    print(f"encode_text:  {len(texts) / (t2 - t1):.1f} texts/s")
    print(f"max |difference| from the training evaluation: images {d_img:.2e}, texts {d_txt:.2e}")


if __name__ == "__main__":
    main()
