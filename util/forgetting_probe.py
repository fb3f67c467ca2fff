"""Forgetting probe: how much a later stage changed the image path, and how each checkpoint does on text.

    python util/forgetting_probe.py --before checkpoints/beit_tiny_vlmo.pth \\
        --after outputs/text_mlm/checkpoint-latest.pth --images data/demo/images/val \\
        --captions data/demo/captions_val.json [--mim_data DIR] [--dvae_path encoder.pkl] [--out probe.json]

Reports
- image-feature drift: mean (and max) over the folder's images of 1 - cos(f_before, f_after), f = the
  final-norm'd CLS of `forward_image_features` on the evaluation transform, each checkpoint fed with its
  own recorded image preprocessing; 0 = the image path is unchanged, 1 = orthogonal features;
- MIM loss/accuracy on blockwise-masked patches of --mim_data (default --images), when both checkpoints
  hold a trained MIM head (dVAE targets need --dvae_path; a pixel head reports mim_loss only);
- MLM loss/accuracy on --captions for each checkpoint holding a trained MLM head, with its own tokenizer.
Either file may be a training checkpoint with unmerged LoRA adapters (merged in memory first), a merged
file, or a converted weights file. `main` returns the result dict; --out writes it as JSON.
"""
import argparse
import json
import math
import os
import sys

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from custom_datasets.image_dataset import (ImageFolderDataset, build_eval_transform,  # noqa: E402
                                           build_two_view_transform, collate_image_batch, image_preprocess_state)
from custom_datasets.loaders import eval_loader  # noqa: E402
from custom_datasets.masking_generator import MaskingGenerator  # noqa: E402
from custom_datasets.mlm_collator import MLMCollator  # noqa: E402
from custom_datasets.text_dataset import CaptionDataset  # noqa: E402
from custom_datasets.tokenizer import tokenizer_from_state  # noqa: E402
from engine_pretrain import evaluate  # noqa: E402
from models.loading import load_pretrained_weights  # noqa: E402
from models.merge import has_lora, merge_lora_state_dict  # noqa: E402
from models.registry import model_config, recorded_config  # noqa: E402
from models.vlmo import VLMo  # noqa: E402
from modes import image_mim, text_mlm  # noqa: E402
from util.checkpoint import extract_state_dict, load_file  # noqa: E402
from util.errors import UserError, run_cli  # noqa: E402
from util.merge_lora import lora_alpha_of, trained_heads  # noqa: E402


class Probed:
    """One checkpoint ready to probe: model (eval, on device), image preprocessing, tokenizer, trained heads."""

    def __init__(self, path, flag, device, fallback_model=None):
        ckpt = load_file(path, flag)
        sd = extract_state_dict(ckpt)
        if sd is None:
            raise UserError(f"{flag} {path}: no model weights found (expected a state dict under 'model')")
        self.merged_lora = has_lora(sd)
        if self.merged_lora:  # adapters folded in, exactly as util/merge_lora.py writes them
            sd = merge_lora_state_dict(sd, lora_alpha_of(ckpt))
        config = ckpt.get("model_config") if isinstance(ckpt, dict) else None
        if not config:
            if not fallback_model:
                raise UserError(f"{flag} {path}: records no model_config; name the architecture with --model")
            config = model_config(fallback_model)
        self.path, self.config = path, dict(recorded_config(config), drop_path_rate=0.0)
        self.model = VLMo(self.config)
        load_pretrained_weights(self.model, sd, path, flag, config)
        self.model.to(device).eval()
        self.image_state = ckpt.get("image_preprocess") or image_preprocess_state(img_size=self.config["img_size"])
        self.tokenizer = tokenizer_from_state(ckpt["tokenizer"]) if ckpt.get("tokenizer") else None
        self.heads = trained_heads(ckpt)


@torch.no_grad()
def image_features(probed, folder, batch_size, device):
    """([N, D] final-norm'd, [N, D] raw) image CLS features of every image in `folder` (sorted order).
    The raw CLS (last block, before the final norm) separates backbone changes from those of the final
    norm, which a continual run may train from scratch (BEiT fine-tuned releases have no `norm`)."""
    dataset = ImageFolderDataset(folder, build_eval_transform(probed.image_state))
    loader = eval_loader(dataset, collate_image_batch, batch_size, 0, 1, 0, False)
    model, normed, raw = probed.model, [], []
    for batch, _ in loader:
        cls = model.forward_image_features(batch["images"].to(device))[:, :1]
        raw.append(cls[:, 0].float())
        normed.append(model.norm(cls)[:, 0].float())
    return torch.cat(normed), torch.cat(raw)


def feature_drift(before, after):
    """(mean, max) of 1 - cos over rows of two [N, D] feature matrices."""
    dist = 1 - F.cosine_similarity(before, after, dim=-1)
    return float(dist.mean()), float(dist.max())


def mlm_metrics(probed, captions, batch_size, seed, device):
    """{"mlm_loss", "mlm_acc"} on `captions` (BERT masking keyed by `seed`, the checkpoint's tokenizer)."""
    dataset = CaptionDataset(captions, flag="--captions")
    loader = eval_loader(dataset, MLMCollator(probed.tokenizer, seed=seed), batch_size, 0, 1, 0, False)
    return evaluate(text_mlm.held_out_set(loader, len(dataset)), probed.model, device)


def default_masking(grid, num=None, min_block=None):
    """BEiT's 75-of-196 masked share (min 16 per block), scaled to `grid`."""
    n = grid[0] * grid[1]
    num = num if num is not None else max(1, round(n * 75 / 196))
    min_block = min_block if min_block is not None else max(1, min(16, round(n * 16 / 196)))
    return MaskingGenerator(grid, num_masking_patches=num, min_num_patches=min(min_block, num))


def mim_metrics(probed, folder, batch_size, seed, device, dvae=None, num_mask=None, min_mask=None):
    """{"mim_loss"[, "mim_acc"]} on masked patches of `folder` (full-image views, masks keyed by seed)."""
    masking = default_masking(tuple(probed.model.grid_hw), num_mask, min_mask)
    transform = build_two_view_transform(probed.image_state, masking=masking, color_jitter=0.0, scale=(1.0, 1.0))
    dataset = ImageFolderDataset(folder, transform, seed=seed)
    loader = eval_loader(dataset, collate_image_batch, batch_size, 0, 1, 0, False)
    targets = image_mim.MimTargets(dvae) if probed.config["mim_target"] == "dalle" else None
    stats = evaluate(image_mim.held_out_set(loader, len(dataset), targets), probed.model, device)
    return {k: v for k, v in stats.items() if k in ("mim_loss", "mim_acc")}


def mim_skip_reason(probed, dvae_path):
    """Why MIM cannot be compared between the two checkpoints, or None."""
    if not all("mim" in p.heads for p in probed.values()):
        return "a trained MIM head is not in both checkpoints"
    targets = {p.config["mim_target"] for p in probed.values()}
    if len(targets) > 1:
        return "the two MIM heads predict different targets (dalle vs pixel)"
    if targets == {"dalle"} and not dvae_path:
        return "both heads predict dVAE tokens: pass --dvae_path (the DALL-E encoder) to measure them"
    return None


def _parser():
    p = argparse.ArgumentParser(description="Measure how much a stage changed the image path and how the text "
                                            "side does, between two checkpoints.")
    p.add_argument("--before", required=True, help="earlier checkpoint (e.g. the converted BEiT file)")
    p.add_argument("--after", required=True, help="later checkpoint (training checkpoint, merged or weights file)")
    p.add_argument("--images", required=True, help="image folder (root/<class>/<img>) for feature drift")
    p.add_argument("--captions", default=None, help="held-out captions for MLM loss/accuracy")
    p.add_argument("--mim_data", default=None, help="image folder for MIM accuracy (default: --images)")
    p.add_argument("--dvae_path", default=None, help="DALL-E encoder (.pkl or .safetensors) for dVAE MIM heads")
    p.add_argument("--num_mask_patches", type=int, default=None, help="default: 75/196 of the grid")
    p.add_argument("--min_mask_patches", type=int, default=None, help="default: 16/196 of the grid, >= 1")
    p.add_argument("--model", default=None, help="architecture of a file that records no model_config")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0, help="keys the MLM and MIM masks (the same for both)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--out", default=None, help="write the result as JSON here")
    return p


def main(argv=None):
    args = _parser().parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available")
    if args.captions and not os.path.isfile(args.captions):
        raise UserError(f"--captions: file not found: {args.captions}")
    device = torch.device(args.device)
    probed = {"before": Probed(args.before, "--before", device, args.model),
              "after": Probed(args.after, "--after", device, args.model)}
    (fa, ra), (fb, rb) = (image_features(probed[k], args.images, args.batch_size, device) for k in ("before", "after"))
    drift, drift_max = feature_drift(fa, fb)
    result = {"before": args.before, "after": args.after, "images": args.images, "num_images": int(fa.shape[0]),
              "image_feature_drift": drift, "image_feature_drift_max": drift_max,
              "image_feature_drift_prenorm": feature_drift(ra, rb)[0],
              "metrics": {"before": {}, "after": {}}, "notes": []}
    for key, p in probed.items():
        if p.merged_lora:
            result["notes"].append(f"{key}: LoRA adapters merged in memory")
        if args.captions and "mlm" in p.heads and p.tokenizer is not None:
            result["metrics"][key].update(mlm_metrics(p, args.captions, args.batch_size, args.seed, device))
        elif args.captions:
            result["notes"].append(f"{key}: no trained MLM head" + ("" if p.tokenizer else " or tokenizer")
                                   + ": MLM skipped")
    skip_mim = mim_skip_reason(probed, args.dvae_path)
    if skip_mim:
        result["notes"].append(f"MIM skipped: {skip_mim}")
    else:
        dvae = None
        if probed["before"].config["mim_target"] == "dalle":
            from models.dvae import DVAETokenizer
            from util.run_setup import dvae_file

            dvae = DVAETokenizer.from_path(dvae_file(args.dvae_path)).to(device)
        for key, p in probed.items():
            result["metrics"][key].update(mim_metrics(p, args.mim_data or args.images, args.batch_size, args.seed,
                                                      device, dvae, args.num_mask_patches, args.min_mask_patches))
    print_table(result)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return result


def print_table(result):
    rows = [("image CLS drift, mean 1-cos", "", f"{result['image_feature_drift']:.5f}"),
            ("image CLS drift, max 1-cos", "", f"{result['image_feature_drift_max']:.5f}"),
            ("  before final norm, mean", "", f"{result['image_feature_drift_prenorm']:.5f}")]
    names = sorted(set(result["metrics"]["before"]) | set(result["metrics"]["after"]))
    for name in names:
        cells = [result["metrics"][k].get(name) for k in ("before", "after")]
        rows.append((name, *("n/a" if v is None or not math.isfinite(v) else f"{v:.4f}" for v in cells)))
    print(f"forgetting probe: {result['before']} -> {result['after']} ({result['num_images']} images)")
    print(f"  {'':30s} {'before':>10s} {'after':>10s}")
    for name, b, a in rows:
        print(f"  {name:30s} {b:>10s} {a:>10s}")
    for note in result["notes"]:
        print(f"  note: {note}")


if __name__ == "__main__":
    run_cli(main)
