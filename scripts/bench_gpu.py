"""GPU benchmark of every pretraining mode (a benchmark, not a test; a few minutes on one GPU). Per mode: samples/s,
peak memory and MFU of one training step (forward, backward, AdamW) in bf16 autocast, next to timm's `Beit` (for
image_mim) and open_clip's CLIP (for image_text_itc) of the same width and depth in the same process; the bf16
matmul throughput it measures first (the MFU denominator); which SDPA kernels accept our attention inputs (a
float relative-position bias with padding folded in) and their speed; and one step of each mode under
`torch.cuda.set_sync_debug_mode("error")` (any host-device synchronisation in the step raises). With `--levers`,
each scale lever (activation checkpointing, per-block inductor compile, FSDP2) on its own, against the step without.

Model FLOPs are counted from the architecture (training = 3 x forward): per token and layer 24 D^2 for the
projections and MLP (mlp_ratio 4) plus 4 L D for attention, plus the heads (MLM decoder on the masked tokens,
MIM head on the masked patches, ITC projections); MFU = model FLOPs per second / measured matmul FLOPs per second.
Without CUDA it runs the same on the CPU in fp32 (MFU then against the CPU's fp32 matmul).

    python scripts/bench_gpu.py --model vlmo_base_patch16 --batch_size 64 [--levers]
"""
import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_pretrain_step import make_batch, measure, measure_timm_beit  # noqa: E402
from models.registry import create_model  # noqa: E402
from models.trainable import configure_trainable  # noqa: E402
from modes.base import pretrain_model  # noqa: E402

MODES = ("text_mlm", "image_mim", "image_text_itc")


def matmul_flops(device, dtype, n=8192, reps=10):
    """Measured dense matmul FLOP/s on `device` (the MFU denominator)."""
    n = n if device.type == "cuda" else 1024
    a, b = (torch.randn(n, n, device=device, dtype=dtype or torch.float32) for _ in range(2))
    for _ in range(2):
        a @ b
    _sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - start)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_flops(config, mode, batch):
    """Model FLOPs of one training step (3 x forward) from the architecture."""
    d, depth, vocab = config["embed_dim"], config["depth"], config["vocab_size"]
    b = (batch.get("images") if "images" in batch else batch["text_ids"]).shape[0]

    def tower(tokens):
        return b * depth * tokens * (24 * d * d + 4 * tokens * d)
    image_tokens = (config["img_size"] // config["patch_size"]) ** 2 + 1
    text_tokens = batch["text_ids"].shape[1] if "text_ids" in batch else 0
    if mode == "text_mlm":
        fwd = tower(text_tokens) + batch["mlm_positions"].numel() * 2 * (d * d + d * vocab)
    elif mode == "image_mim":
        fwd = tower(image_tokens) + batch["mim_positions"].numel() * 2 * d * config["mim_vocab_size"]
    else:
        fwd = tower(image_tokens) + tower(text_tokens) + 2 * b * 2 * d * d
    return 3 * fwd


def open_clip_step(model, batch, device):
    """open_clip's CLIP of the same width/depth/patch, trained with the same loss code on the same batch."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    from models.contrastive import clip_loss
    c = model.config
    ref = CLIP(c["embed_dim"], vision_cfg=CLIPVisionCfg(layers=c["depth"], width=c["embed_dim"], head_width=64,
                                                        patch_size=c["patch_size"], image_size=c["img_size"]),
               text_cfg=CLIPTextCfg(context_length=batch["text_ids"].shape[1], vocab_size=c["vocab_size"],
                                    width=c["embed_dim"], heads=c["embed_dim"] // 64, layers=c["depth"])).to(device)

    class Wrapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.ref = ref

        def forward(self, b):
            img = self.ref.encode_image(b["images"], normalize=True)
            txt = self.ref.encode_text(b["text_ids"], normalize=True)
            return clip_loss(img, txt, self.ref.logit_scale, gather=False)
    return Wrapped()


def sdpa_kernels(model, batch, device, dtype, reps=20):
    """{backend: ms per call or the reason it refused} for one attention call with our image-path inputs."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    c = model.config
    heads, d = c["num_heads"], c["embed_dim"] // c["num_heads"]
    n = model.grid_hw[0] * model.grid_hw[1] + 1
    q, k, v = (torch.randn(batch["images"].shape[0], heads, n, d, device=device, dtype=dtype or torch.float32)
               for _ in range(3))
    bias = model.blocks[0].attn.relative_position_bias().unsqueeze(0).to(q.dtype)
    out = {}
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                    SDPBackend.MATH):
        try:
            with sdpa_kernel([backend]):
                for _ in range(2):
                    torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)
                _sync(device)
                start = time.perf_counter()
                for _ in range(reps):
                    torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)
                _sync(device)
            out[backend.name] = f"{(time.perf_counter() - start) / reps * 1e3:.3f} ms"
        except RuntimeError as e:
            out[backend.name] = "refused: " + str(e).strip().splitlines()[0][:80]
    return out


def sync_free(step_model, batch, device, dtype):
    """One training step under set_sync_debug_mode("error"): 'ok' or the first synchronising call."""
    if device.type != "cuda":
        return "n/a (CPU; tests/test_no_host_sync.py counts the calls instead)"
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
            loss = step_model(batch)["loss"]
        loss.backward()
        return "ok"
    except RuntimeError as e:
        return "synchronises: " + str(e).strip().splitlines()[0][:120]
    finally:
        torch.cuda.set_sync_debug_mode(0)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="vlmo_base_patch16")
    p.add_argument("--model_kwargs", default="{}", help="JSON registry overrides (e.g. a smaller model on a CPU)")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--seq_len", type=int, default=40)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--no_reference", action="store_true", help="skip timm / open_clip")
    p.add_argument("--levers", nargs="*", default=[], choices=LEVERS,
                   help="also time each of these scale levers on its own (the flag alone: all)")
    a = p.parse_args(argv)
    if a.levers == [] and "--levers" in (argv if argv is not None else sys.argv[1:]):
        a.levers = list(LEVERS)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    peak = matmul_flops(device, dtype)
    print(f"{a.model} {a.model_kwargs} | batch {a.batch_size} | {'bf16' if dtype else 'fp32'} | {name} | measured "
          f"matmul {peak / 1e12:.3f} TFLOP/s")
    for mode in a.modes:
        model = fresh_model(a, mode, device)
        step_model = pretrain_model(model, mode)
        batch = make_batch(mode, model, a.batch_size, a.seq_len, device, torch.Generator().manual_seed(0))
        sps, mem = measure(step_model, batch, a.steps, a.warmup, device, dtype)
        mfu = step_flops(model.config, mode, batch) * sps / a.batch_size / peak
        print(f"{mode:15s} ours     {sps:9.1f} samples/s  peak {mem:6.2f} GiB  MFU {100 * mfu:5.1f}%  "
              f"sync-free step: {sync_free(step_model, batch, device, dtype)}")
        if not a.no_reference and mode == "image_mim":
            ref_sps, ref_mem = measure_timm_beit(model, batch, a.steps, a.warmup, device, dtype)
            print(f"{'':15s} timm Beit {ref_sps:8.1f} samples/s  peak {ref_mem:6.2f} GiB  ratio ours/timm "
                  f"{sps / ref_sps:.2f}x")
        if not a.no_reference and mode == "image_text_itc":
            ref_sps, ref_mem = measure(open_clip_step(model, batch, device), batch, a.steps, a.warmup, device, dtype)
            print(f"{'':15s} open_clip {ref_sps:8.1f} samples/s  peak {ref_mem:6.2f} GiB  ratio ours/open_clip "
                  f"{sps / ref_sps:.2f}x")
        if mode == "image_mim":
            print(f"{'':15s} SDPA kernels on our biased attention: {sdpa_kernels(model, batch, device, dtype)}")
        for lever in a.levers:
            lever_sps, lever_mem, first = measure_lever(lever, a, mode, batch, device, dtype)
            print(f"{'':15s} {lever:18s} {lever_sps:9.1f} samples/s ({lever_sps / sps:.2f}x without)  peak {lever_mem:6.2f} "
                  f"GiB ({lever_mem - mem:+.2f})  first step {first:.1f} s")
    return 0


LEVERS = ("grad_checkpointing", "compile", "fsdp")


def fresh_model(a, mode, device):
    """The benchmarked model, seeded, with what trains in `mode` marked."""
    torch.manual_seed(0)
    model = create_model(a.model, itc_loss="clip", **json.loads(a.model_kwargs)).to(device)
    configure_trainable(model, mode)
    return model


def measure_lever(lever, a, mode, batch, device, dtype):
    """(samples/s, peak GiB, seconds of the first step) of the mode's step with one scale lever on, a fresh model.
    fsdp runs in a one-rank process group: FSDP2's gathers and reduce-scatters on one chip, its overhead only (the
    memory it saves grows with the number of ranks)."""
    import tempfile

    import torch.distributed as dist

    from models.checkpointing import compile_blocks, set_grad_checkpointing
    from models.sharding import shard_model

    model = fresh_model(a, mode, device)
    if lever == "grad_checkpointing":
        set_grad_checkpointing(model, 1)
    if lever == "compile":
        compile_blocks(model, "inductor")
    step_model = pretrain_model(model, mode)
    if lever == "fsdp" and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1,
                                init_method=f"file://{tempfile.mktemp()}")
    if lever == "fsdp":
        shard_model(step_model, dtype)
    start = time.perf_counter()
    measure(step_model, batch, 1, 0, device, dtype)  # the first step: compiles, initialises FSDP
    first = time.perf_counter() - start
    sps, mem = measure(step_model, batch, a.steps, a.warmup, device, dtype)
    return sps, mem, first


if __name__ == "__main__":
    sys.exit(main())
