"""Write a random-init BEiT checkpoint with the tiny model's dimensions, in BEiT's own format.

    python scripts/make_tiny_beit.py --out checkpoints/tiny_beit_random.pth [--style ft|pt] [--img_size 32]

It stands in for a downloaded BEiT release in the demo and the tests: timm's `Beit` uses the
release's tensor names (DESIGN.md section 8), so `util/convert_beit_ckpt.py --model vlmo_tiny_patch16`
converts it exactly as it converts the real file. Saved as {"model": state_dict}.

--style ft (default) mirrors the fine-tuned releases the recipe starts from (`*_pt22k_ft22kto1k`):
per-layer relative position tables, `fc_norm` + classification `head`, no final `norm` (so a continual
run creates and trains that norm). --style pt mirrors the MIM-only releases (`*_pt22k`): one shared
relative position table and a final `norm` (timm builds no `lm_head`).

--std S (default 0.1) redraws every tensor from N(0, S) (norm scales from N(1, S)), the q/v biases and
relative position tables included, which timm initialises to zero: a checkpoint whose every tensor
matters, like a trained one. --std 0 keeps timm's own initialisation.
"""
import argparse
import os
import sys

import torch
from timm.models.beit import Beit

TINY = dict(patch_size=16, embed_dim=64, depth=2, num_heads=2)
STYLES = {
    "ft": dict(use_rel_pos_bias=True, use_fc_norm=True, num_classes=10),
    "pt": dict(use_shared_rel_pos_bias=True, use_fc_norm=False, num_classes=0),
}


def make_tiny_beit(img_size=32, seed=0, std=0.1, style="ft"):
    """timm Beit (layer scale 0.1, no absolute position embedding) in the tensor layout of `style`."""
    torch.manual_seed(seed)
    model = Beit(img_size=img_size, use_abs_pos_emb=False, init_values=0.1, **TINY, **STYLES[style])
    if std > 0:
        with torch.no_grad():
            for name, p in model.named_parameters():
                is_scale = name.endswith(("norm1.weight", "norm2.weight", "norm.weight", "fc_norm.weight"))
                p.copy_(torch.randn_like(p) * std + (1.0 if is_scale else 0.0))
    return model


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--img_size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--style", default="ft", choices=sorted(STYLES),
                   help="ft: like the fine-tuned releases (fc_norm, head); pt: like the MIM-only ones (norm)")
    p.add_argument("--std", type=float, default=0.1, help="redraw every tensor with this std (0: timm's init)")
    args = p.parse_args(argv)
    model = make_tiny_beit(args.img_size, args.seed, args.std, args.style)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    torch.save({"model": model.state_dict()}, args.out)
    print(f"random-init tiny BEiT ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
          f"img_size {args.img_size}, {args.style} layout) -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
