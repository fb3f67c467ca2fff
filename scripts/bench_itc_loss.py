"""Peak memory of the contrastive loss (forward + backward) at a large simulated global batch: this project's
local-rows loss (each rank: its B rows against the G gathered columns) next to the full G x G matrix that
codebases computing the whole matrix on every rank pay, as a ratio. Each measurement runs in a fresh
subprocess (CPU: peak RSS; CUDA: max allocated). Not a test: numbers depend on the machine.

    python scripts/bench_itc_loss.py --global_batch 16384 --local_batch 256 --dim 512 --loss clip
"""
import argparse
import json
import os
import resource
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child(args):
    import torch

    sys.path.insert(0, REPO)
    import models.contrastive as contrastive

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    g, b = args.global_batch, args.local_batch if args.variant == "local_rows" else args.global_batch
    world = g // b
    torch.manual_seed(0)
    others_img = torch.nn.functional.normalize(torch.randn(g - b, args.dim, device=device), dim=-1)
    others_txt = torch.nn.functional.normalize(torch.randn(g - b, args.dim, device=device), dim=-1)
    img = torch.nn.functional.normalize(torch.randn(b, args.dim, device=device), dim=-1).requires_grad_()
    txt = torch.nn.functional.normalize(torch.randn(b, args.dim, device=device), dim=-1).requires_grad_()
    # Simulate rank 0 of `world` ranks: the gather returns local rows followed by the other ranks' rows.
    contrastive._rank_world = lambda gather: (0, world)
    contrastive._gathered = lambda x, w: torch.cat([x, others_img if x is img else others_txt])
    scale = torch.tensor(2.659, device=device, requires_grad=True)
    bias = torch.tensor(-10.0, device=device, requires_grad=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if args.loss == "clip":
        out = contrastive.clip_loss(img, txt, scale)
    else:
        out = contrastive.siglip_loss(img, txt, scale, bias)
    out["loss"].backward()
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2 ** 20
    else:
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 2 ** 10
    print(json.dumps({"peak_mib": peak, "device": device.type}))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--global_batch", type=int, default=16384)
    p.add_argument("--local_batch", type=int, default=256)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--loss", default="clip", choices=["clip", "siglip"])
    p.add_argument("--variant", default=None, choices=["local_rows", "full_matrix"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.variant:
        return child(args)
    results = {}
    for variant in ("local_rows", "full_matrix"):
        cmd = [sys.executable, __file__, "--variant", variant] + [f"--{k}={v}" for k, v in vars(args).items()
                                                                 if k != "variant"]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        results[variant] = json.loads(out)
    local, full = results["local_rows"]["peak_mib"], results["full_matrix"]["peak_mib"]
    print(f"{args.loss} loss fwd+bwd, global batch {args.global_batch}, dim {args.dim}, "
          f"{results['local_rows']['device']}:")
    print(f"  local rows ({args.local_batch} x {args.global_batch}, this project): {local:9.1f} MiB peak")
    print(f"  full matrix ({args.global_batch} x {args.global_batch}, reference): {full:9.1f} MiB peak")
    print(f"  memory ratio ours/reference: {local / max(full, 1e-9):.4f}")


if __name__ == "__main__":
    main()
