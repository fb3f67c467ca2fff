"""Benchmark one pretraining training step (forward, backward, AdamW) for a named model and batch on the
current device: samples/s and peak memory, with a reference row to compare against (the plain-math
attention oracle) printed as a ratio. Not a test: numbers depend on the machine.

    python scripts/bench_pretrain_step.py --model vlmo_base_patch16 --batch_size 8 --mode text_mlm
"""
import argparse
import os
import resource
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from custom_datasets.masking_generator import masked_positions  # noqa: E402
from models.checkpointing import COMPILE_BACKENDS, apply_block_options  # noqa: E402
from models.registry import create_model  # noqa: E402
from models.trainable import configure_trainable  # noqa: E402
from modes.base import pretrain_model  # noqa: E402
from util.optim_factory import build_adamw  # noqa: E402


def text_batch(b, length, vocab, device, g):
    ids = torch.randint(5, vocab, (b, length), generator=g)
    labels = torch.full_like(ids, -100)
    sel = torch.rand(b, length, generator=g) < 0.15
    sel[:, 1] = True
    labels[sel] = ids[sel]
    ids[sel] = 4
    positions, count = masked_positions(sel)  # what MLMCollator adds
    return {"text_ids": ids.to(device), "text_masks": torch.ones_like(ids).to(device), "text_labels": labels.to(device),
            "mlm_positions": positions.to(device), "mlm_count": count.to(device)}


def make_batch(mode, model, b, length, device, g):
    if mode == "text_mlm":
        return text_batch(b, length, model.config["vocab_size"], device, g)
    size = model.config["img_size"]
    n = model.grid_hw[0] * model.grid_hw[1]
    images = torch.randn(b, 3, size, size, generator=g).to(device)
    if mode == "image_mim":
        mask = torch.zeros(b, n, dtype=torch.bool)
        mask[:, : int(n * 0.4)] = True
        positions, count = masked_positions(mask)  # what collate_image_batch adds
        return {"images": images, "bool_masked_pos": mask.to(device), "mim_positions": positions.to(device),
                "mim_count": count.to(device),
                "mim_labels": torch.randint(0, model.config["mim_vocab_size"], (b, n), generator=g).to(device)}
    batch = text_batch(b, length, model.config["vocab_size"], device, g)
    return {"images": images, "text_ids": batch["text_ids"], "text_masks": batch["text_masks"]}


def measure(model, batch, steps, warmup, device, autocast_dtype):
    """model(batch)["loss"] is one training step's loss (modes.base.PretrainModel, or a reference)."""
    opt = build_adamw(model, 1e-4, 0.05)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for i in range(warmup + steps):
        if i == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss = model(batch)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) / 2 ** 30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # process peak RSS (KiB -> GiB)
        peak = max(peak, rss_before / 2 ** 20)
    elapsed = time.perf_counter() - start
    return steps * batch[next(iter(batch))].shape[0] / elapsed, peak


def measure_timm_beit(model, batch, steps, warmup, device, dtype):
    """timm's Beit of the same width and depth, relative position bias per layer, trained on the same images
    with a linear head on the masked tokens (what our image_mim step computes)."""
    from timm.models.beit import Beit

    c = model.config
    ref = Beit(img_size=c["img_size"], patch_size=c["patch_size"], embed_dim=c["embed_dim"], depth=c["depth"],
               num_heads=c["num_heads"], mlp_ratio=c["mlp_ratio"], use_abs_pos_emb=False, use_rel_pos_bias=True,
               init_values=c["layer_scale_init"], num_classes=0).to(device)
    head = torch.nn.Linear(c["embed_dim"], c["mim_vocab_size"]).to(device)

    class Wrapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.ref, self.head = ref, head

        def forward(self, b):
            tokens = self.ref.forward_features(b["images"])[:, 1:]
            mask = b["bool_masked_pos"]
            logits = self.head(tokens[mask]).float()
            return {"loss": torch.nn.functional.cross_entropy(logits, b["mim_labels"][mask])}

    return measure(Wrapped(), batch, steps, warmup, device, dtype)


def measure_dvae(n_hid, images, steps, device):
    from models.dvae import DVAEEncoder, DVAETokenizer

    dvae = DVAETokenizer(DVAEEncoder(n_hid=n_hid)).to(device)
    small = torch.nn.functional.interpolate(images, scale_factor=0.5).clamp(0, 1)
    for _ in range(2):
        dvae(small)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        dvae(small)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / steps


def _median(results):
    """Median (samples/s, peak) of a list of measure() results, by samples/s."""
    return sorted(results)[len(results) // 2]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vlmo_base_patch16")
    p.add_argument("--mode", default="text_mlm", choices=["text_mlm", "image_mim", "image_text_itc"])
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--seq_len", type=int, default=64, help="text tokens per caption")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    p.add_argument("--itc_loss", default="clip", choices=["clip", "siglip"])
    p.add_argument("--rounds", type=int, default=3, help="image_mim: alternating rounds against timm (median)")
    p.add_argument("--no_reference", action="store_true", help="skip the reference rows")
    p.add_argument("--grad_checkpointing", type=int, default=0, metavar="K",
                   help="ours: activation checkpointing of every K-th block (0: off)")
    p.add_argument("--compile", default=None, choices=COMPILE_BACKENDS, help="ours: torch.compile each block")
    p.add_argument("--dvae_n_hid", type=int, default=256, help="image_mim: dVAE width for its share of step time "
                   "(256 = the published DALL-E encoder, random weights)")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = args.precision if args.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    dtype = torch.bfloat16 if precision == "bf16" else None
    torch.manual_seed(0)
    model = create_model(args.model, mim_target="dalle", itc_loss=args.itc_loss).to(device)
    configure_trainable(model, args.mode)
    apply_block_options(model, args.grad_checkpointing, args.compile)
    step_model = pretrain_model(model, args.mode)
    batch = make_batch(args.mode, model, args.batch_size, args.seq_len, device, torch.Generator().manual_seed(0))
    if args.compile:  # the first step compiles: timed apart
        start = time.perf_counter()
        step_model(batch)["loss"].backward()
        print(f"  first step (compiles every block with {args.compile}): {time.perf_counter() - start:.1f} s")
    loss_note = f" ({args.itc_loss})" if args.mode == "image_text_itc" else ""
    print(f"{args.mode}{loss_note} step | {args.model} | batch {args.batch_size} | {precision} | grad checkpointing "
          f"{args.grad_checkpointing or 'off'} | compile {args.compile or 'off'} | {device} "
          f"({torch.cuda.get_device_name(device) if device.type == 'cuda' else f'{torch.get_num_threads()} threads'})")
    if not args.no_reference and args.mode == "image_mim":
        # Alternate rounds of ours and timm's and take medians: machine noise hits both alike.
        ours, ref = [], []
        for _ in range(args.rounds):
            ours.append(measure(step_model, batch, args.steps, args.warmup, device, dtype))
            ref.append(measure_timm_beit(model, batch, args.steps, args.warmup, device, dtype))
        (sps, peak), (timm_sps, timm_peak) = _median(ours), _median(ref)
        print(f"  ours (SDPA attention):     {sps:8.2f} samples/s   peak memory {peak:6.2f} GiB")
        print(f"  reference (timm Beit, same width/depth, fwd+bwd+AdamW): {timm_sps:7.2f} samples/s   "
              f"peak memory {timm_peak:6.2f} GiB")
        print(f"  speed ratio ours/timm (median of {args.rounds} alternating rounds): {sps / timm_sps:.2f}x")
    else:
        sps, peak = measure(step_model, batch, args.steps, args.warmup, device, dtype)
        print(f"  ours (SDPA attention):     {sps:8.2f} samples/s   peak memory {peak:6.2f} GiB")
    if not args.no_reference and args.mode == "image_mim":
        dvae_s = measure_dvae(args.dvae_n_hid, batch["images"], args.steps, device)
        step_s = args.batch_size / sps
        print(f"  dVAE tokenizer (n_hid {args.dvae_n_hid}) on the 112 px views: {dvae_s * 1e3:.1f} ms per batch = "
              f"{100 * dvae_s / (dvae_s + step_s):.1f}% of a training step with targets")
    if not args.no_reference and args.mode != "image_mim":
        model.math_attention = True
        ref_sps, ref_peak = measure(step_model, batch, args.steps, args.warmup, device, dtype)
        print(f"  reference (math attention): {ref_sps:7.2f} samples/s   peak memory {ref_peak:6.2f} GiB")
        print(f"  speed ratio ours/reference: {sps / ref_sps:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
