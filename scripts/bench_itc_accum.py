"""Benchmark exact contrastive accumulation (modes/image_text_itc.py: accumulate_exactly) on this device:
steps/s and peak memory of one optimizer step of k micro-batches of a fixed size, for k = 1 (plain step),
and k = 2, 4 with the exact method and with the per-micro-batch loss it replaces. Each measurement runs in
its own process, so the process peak RSS (CPU) or the allocator peak (CUDA) belongs to it alone. Not a test.

    python scripts/bench_itc_accum.py --micro_batch 32 --ks 1 2 4
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def one(args):
    from engine_pretrain import RunConfig, Trainer, accumulate_gradients
    from models.registry import create_model
    from models.trainable import configure_trainable
    from modes.base import pretrain_model
    from modes.image_text_itc import accumulate_exactly

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = create_model("vlmo_tiny_patch16", embed_dim=args.width, depth=args.depth, num_heads=args.width // 64,
                         patch_size=16, img_size=args.img_size, vocab_size=1000, max_text_len=32).to(device)
    configure_trainable(model, "image_text_itc")

    class _A:
        accum_iter = args.k
    wrapped = pretrain_model(model, "image_text_itc", _A())
    cfg = RunConfig(device=device, steps_per_epoch=1, epochs=1, samples_per_step=args.k * args.micro_batch, lr=0.0,
                    min_lr=0.0, warmup_steps=0, accum_iter=args.k)
    trainer = Trainer(model=wrapped, raw_model=wrapped, optimizer=None, scaler=None, cfg=cfg)
    g = torch.Generator().manual_seed(0)
    b = args.micro_batch
    micro = [{"images": torch.randn(b, 3, args.img_size, args.img_size, generator=g).to(device),
              "text_ids": torch.randint(5, 1000, (b, 32), generator=g).to(device),
              "text_masks": torch.ones(b, 32, dtype=torch.long).to(device)} for _ in range(args.k)]
    fn = accumulate_exactly if args.method == "exact" and args.k > 1 else accumulate_gradients
    flag = torch.zeros((), dtype=torch.bool, device=device)
    times = []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        fn(trainer, micro, flag)
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    print(json.dumps({"steps_per_s": len(times) / sum(times), "peak_gib": peak}))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--micro_batch", type=int, default=32)
    p.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--img_size", type=int, default=64)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--k", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--method", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.k is not None:
        return one(args)
    print(f"image_text_itc step, micro-batch {args.micro_batch}, width {args.width}, depth {args.depth}, "
          f"{args.img_size} px; {'cuda' if torch.cuda.is_available() else 'cpu'} (peak: process RSS on CPU)")
    rows = {}
    for k in args.ks:
        for method in (("plain",) if k == 1 else ("per_micro_loss", "exact")):
            cmd = [sys.executable, __file__, "--k", str(k), "--method", method, "--micro_batch", str(args.micro_batch),
                   "--width", str(args.width), "--depth", str(args.depth), "--img_size", str(args.img_size),
                   "--steps", str(args.steps), "--warmup", str(args.warmup)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            rows[(k, method)] = json.loads(out)
            r = rows[(k, method)]
            print(f"  k={k} {method:15s} {r['steps_per_s']:7.3f} steps/s "
                  f"({r['steps_per_s'] * k * args.micro_batch:7.1f} samples/s)  peak {r['peak_gib']:.3f} GiB")
    for k in args.ks:
        if k > 1:
            cost = rows[(k, "per_micro_loss")]["steps_per_s"] / rows[(k, "exact")]["steps_per_s"]
            print(f"  k={k}: exact accumulation takes {cost:.2f}x the time of the per-micro-batch loss")


if __name__ == "__main__":
    main()
