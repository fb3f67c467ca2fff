"""LiT with --lit_cache against the online LiT run (a benchmark, not a test): steps/s at equal batch, the cache's
one-time build, and the final zero-shot metric of each.

Data: scikit-learn's digits as --img_size PNGs with English captions (scripts/bench_text_distill.py's files).
1. a teacher: image_text_itc from random init (its image tower becomes the locked one);
2. LiT online: --lock_image from the teacher, --itc_crop_min_scale 1 (whole images: the cache's condition);
3. LiT cached: the same with --lit_cache (the build is timed apart from training).
All through main_pretrain_cook.main; steps/s is the mean of the logged samples/s over the run divided by the batch.

  OMP_NUM_THREADS=2 .venv/bin/python scripts/bench_lit_cache.py
"""
import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_text_distill import build_files  # noqa: E402


def rows(out, split):
    with open(os.path.join(out, "log.jsonl"), encoding="utf-8") as f:
        return [r for r in map(json.loads, f) if r.get("split") == split]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default=None)
    p.add_argument("--img_size", type=int, default=224)
    p.add_argument("--model_kwargs", default='{"embed_dim": 128, "depth": 4, "num_heads": 4}')
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--teacher_epochs", type=int, default=3)
    p.add_argument("--lit_epochs", type=int, default=2)
    p.add_argument("--num_workers", type=int, default=2)
    a = p.parse_args(argv)
    import main_pretrain_cook

    root = a.workdir or tempfile.mkdtemp(prefix="bench_lit_")
    f = build_files(root, a.img_size, 1, 0)
    common = ["--model", "vlmo_tiny_patch16", "--model_kwargs", a.model_kwargs, "--img_size", str(a.img_size),
              "--batch_size", str(a.batch_size), "--lr", "1e-3", "--warmup_epochs", "0.5", "--drop_path", "0",
              "--num_workers", str(a.num_workers), "--log_freq", "5", "--data_path", f["pairs"],
              "--tokenizer", f["vocab_en"], "--zeroshot_data_path", f["heldout"], "--zeroshot_classnames",
              f["classnames_en"], "--zeroshot_templates", f["templates_en"], "--itc_crop_min_scale", "1"]
    teacher = os.path.join(root, "teacher")
    main_pretrain_cook.main(["--mode", "image_text_itc", "--epochs", str(a.teacher_epochs), "--output_dir", teacher,
                             *common])
    import torch
    ckpt = torch.load(os.path.join(teacher, "checkpoint-latest.pth"), weights_only=True)
    weights = os.path.join(root, "teacher_weights.pth")  # a new stage starts from the weights alone
    torch.save({k: ckpt[k] for k in ("model", "model_config", "tokenizer", "image_preprocess")}, weights)
    lit = ["--mode", "image_text_itc", "--lock_image", "--resume", weights,
           "--epochs", str(a.lit_epochs), *common]
    results = {}
    for name, extra in (("online", []), ("cached", ["--lit_cache", os.path.join(root, "cache")])):
        out = os.path.join(root, name)
        start = time.time()
        main_pretrain_cook.main(lit + extra + ["--output_dir", out])
        train = rows(out, "train")
        sps = sum(r["samples_per_s"] for r in train) / len(train) / a.batch_size
        results[name] = (sps, rows(out, "val")[-1]["zeroshot_top1"], time.time() - start)
    build = next((line for line in open(os.path.join(root, "cached", "console.log"), encoding="utf-8")
                  if "embeddings written" in line), "")
    print(f"data: digits at {a.img_size} px, batch {a.batch_size}, model {a.model_kwargs}, "
          f"{a.lit_epochs} LiT epochs, {a.num_workers} data workers")
    for name, (sps, top1, wall) in results.items():
        print(f"LiT {name}: {sps:.2f} steps/s, zero-shot top-1 {top1:.2f}, whole run {wall:.0f} s")
    print(f"speed-up (steps/s): {results['cached'][0] / results['online'][0]:.2f}x; cache build: {build.strip()}")
    print(f"files and runs in {root}")


if __name__ == "__main__":
    main()
