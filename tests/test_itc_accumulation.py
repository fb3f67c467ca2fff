"""Exact contrastive accumulation: k micro-batches (on 1 or 2 ranks) give the gradient of one batch of all
their pairs, for CLIP and SigLIP, with the temperature's gradient counted once and drop path replayed."""
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from engine_pretrain import RunConfig, Trainer, accumulate_gradients
from models.registry import create_model
from models.trainable import configure_trainable
from modes.base import pretrain_model
from modes.image_text_itc import accumulate_exactly
from run_helpers import free_port, load_ckpt, read_jsonl, run_entry

GRAD_RTOL = 1e-5   # fp32; only summation order differs
WEIGHT_RTOL = 1e-2  # after an epoch of Adam, which amplifies rounding in near-zero gradients


class _Args:
    def __init__(self, accum):
        self.accum_iter = accum


def _model(tok, loss, drop_path=0.0):
    torch.manual_seed(0)
    m = create_model("vlmo_tiny_patch16", vocab_size=tok.vocab_size, itc_loss=loss, drop_path_rate=drop_path)
    configure_trainable(m, "image_text_itc")
    # The plain-math attention oracle: CPU SDPA picks another kernel with and without autograd (features
    # differ by ~6e-8, which moves these near-chance gradients by ~5e-5 relative); the math path is the
    # same in both, so what remains is summation order alone.
    m.math_attention = True
    return m


def _pairs(tok, n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    words = ["red", "blue", "green", "circle", "square", "star", "big", "small"]
    caps = [" ".join(words[int(i)] for i in torch.randint(0, len(words), (4,), generator=g)) for _ in range(n)]
    ids, masks = tok.encode_batch(caps)
    return {"images": torch.randn(n, 3, 32, 32, generator=g), "text_ids": ids, "text_masks": masks}


def _split(batch, k):
    n = batch["images"].shape[0] // k
    return [{key: v[i * n:(i + 1) * n] for key, v in batch.items()} for i in range(k)]


def _grads(model, batch, k, exact=True, accum_fn=None):
    wrapped = pretrain_model(model, "image_text_itc", _Args(k))
    cfg = RunConfig(device=torch.device("cpu"), steps_per_epoch=1, epochs=1, samples_per_step=16, lr=0.0, min_lr=0.0,
                    warmup_steps=0, accum_iter=k)
    trainer = Trainer(model=wrapped, raw_model=wrapped, optimizer=None, scaler=None, cfg=cfg)
    fn = accum_fn or (accumulate_exactly if exact else accumulate_gradients)
    fn(trainer, _split(batch, k), torch.zeros((), dtype=torch.bool))
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def _global_rel(a, b):
    """||a - b|| / ||b|| over all gradients as one vector."""
    return float(sum((a[k] - b[k]).pow(2).sum() for k in b).sqrt() / sum(b[k].pow(2).sum() for k in b).sqrt())


def _max_rel(a, b):
    return max(float((a[k] - b[k]).norm() / b[k].norm().clamp(min=1e-12)) for k in b)


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_accumulated_gradient_equals_the_whole_batch_gradient(tiny_tokenizer, loss):
    model, batch = _model(tiny_tokenizer, loss), _pairs(tiny_tokenizer)
    ref = _grads(model, batch, 1, exact=False)
    assert "logit_scale" in ref and set(ref) == {n for n, p in model.named_parameters() if p.requires_grad}
    for k in (2, 4):
        got = _grads(model, batch, k)
        assert set(got) == set(ref)
        for name, g in ref.items():  # the temperature (and bias) once, not k times
            # atol scales with the tensor: an embedding row's gradient sums every token's, so fp32 reordering
            # moves its small entries by ~1e-7 of the tensor's largest (seen: 4.8e-7 at a largest entry of 2.5)
            torch.testing.assert_close(got[name], g, rtol=GRAD_RTOL, atol=1e-7 + 1e-6 * float(g.abs().max()),
                                       msg=f"k={k} {name}")
    # The per-micro-batch loss (what accumulation did before) is another objective.
    assert _max_rel(_grads(model, batch, 2, exact=False), ref) > 10 * GRAD_RTOL


def test_drop_path_is_replayed_in_each_recompute(tiny_tokenizer):
    """With drop path on, the gradient is the whole-batch gradient at the cached features: the same as
    embedding the micro-batches in order with a graph and backpropagating the whole loss once."""
    from models.contrastive import contrastive_loss
    from modes.image_text_itc import encode_pair

    model, batch = _model(tiny_tokenizer, "clip", drop_path=0.5), _pairs(tiny_tokenizer)
    torch.manual_seed(7)
    got = _grads(model, batch, 2)
    torch.manual_seed(7)
    feats = [encode_pair(model, b) for b in _split(batch, 2)]
    contrastive_loss(model, torch.cat([f[0] for f in feats]), torch.cat([f[1] for f in feats]))["loss"].backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    for name, g in ref.items():
        torch.testing.assert_close(got[name], g, rtol=GRAD_RTOL, atol=1e-7, msg=name)


def _two_rank_worker(rank, port, loss, out, tok_path):
    from custom_datasets.tokenizer import load_tokenizer
    from torch.nn.parallel import DistributedDataParallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    tok = load_tokenizer(tok_path)
    model = _model(tok, loss)
    wrapped = pretrain_model(model, "image_text_itc", _Args(2))
    ddp = DistributedDataParallel(wrapped)
    cfg = RunConfig(device=torch.device("cpu"), steps_per_epoch=1, epochs=1, samples_per_step=16, lr=0.0, min_lr=0.0,
                    warmup_steps=0, accum_iter=2)
    trainer = Trainer(model=ddp, raw_model=wrapped, optimizer=None, scaler=None, cfg=cfg)
    shard = {k: v[rank * 8:(rank + 1) * 8] for k, v in _pairs(tok).items()}  # rank r: pairs 8r .. 8r+7
    accumulate_exactly(trainer, _split(shard, 2), torch.zeros((), dtype=torch.bool))
    if rank == 0:
        torch.save({n: p.grad for n, p in model.named_parameters() if p.grad is not None}, out)
    dist.destroy_process_group()


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_two_ranks_with_accumulation_equal_one_batch(tiny_tokenizer, demo_data, tmp_path, loss):
    out = str(tmp_path / "grads.pt")
    mp.spawn(_two_rank_worker, args=(free_port(), loss, out, str(demo_data["tokenizer"])), nprocs=2)
    ref = _grads(_model(tiny_tokenizer, loss), _pairs(tiny_tokenizer), 1, exact=False)
    got = torch.load(out, weights_only=True)
    assert set(got) == set(ref)
    # The all-reduces sum in another order than one process: near chance these small, cancelling fp32
    # gradients then differ per tensor by up to ~2e-5 relative and as one vector by ~1e-5 (measured).
    assert _global_rel(got, ref) < 2 * GRAD_RTOL
    assert _max_rel(got, ref) < 10 * GRAD_RTOL


def test_one_epoch_of_accumulation_matches_the_big_batch(demo_data, tmp_path):
    """SigLIP weights after one epoch: batch 16, batch 8 x accum 2, and 2 ranks x 4 x accum 2 (CLIP's
    accumulation: test_two_ranks_with_accumulation_equal_one_batch); the logged duplicate-caption fraction is
    that of the global batch (the same in all three), and a fresh SigLIP bias starts at the prior of the global
    batch of 16 in all three."""
    runs = {"b16": (1, 16, 1), "b8_accum2": (1, 8, 2), "two_ranks_b4_accum2": (2, 4, 2)}
    finals, logs, loss = {}, {}, "siglip"
    for name, (nproc, batch, accum) in runs.items():
        out = str(tmp_path / name)
        run_entry("main_pretrain_cook.py", [
            "--exp_name", "image_text_itc", "--model", "vlmo_tiny_patch16", "--data_path",
            str(demo_data["pairs_train"]), "--tokenizer", str(demo_data["tokenizer"]), "--batch_size", str(batch),
            "--accum_iter", str(accum), "--epochs", "1", "--warmup_epochs", "0", "--lr", "1e-3", "--drop_path", "0",
            "--num_workers", "0", "--log_freq", "1", "--itc_loss", loss, "--output_dir", out], nproc=nproc)
        ckpt = load_ckpt(os.path.join(out, "checkpoint-latest.pth"))
        assert ckpt["global_step"] == 3 and ckpt["args"]["effective_batch_size"] == 16
        finals[name] = ckpt["model"]
        logs[name] = read_jsonl(os.path.join(out, "log.jsonl"), "train")
    ref = finals["b16"]
    moved = {k for k, v in ref.items() if v.is_floating_point()}
    for name in ("b8_accum2", "two_ranks_b4_accum2"):
        assert _max_rel({k: finals[name][k] for k in moved}, {k: ref[k] for k in moved}) < WEIGHT_RTOL, name
    dups = {name: [r["duplicate_captions"] for r in log] for name, log in logs.items()}
    assert len(set(map(tuple, dups.values()))) == 1 and max(dups["b16"]) > 0, dups  # the demo repeats captions
    if loss == "siglip":  # the bias the first step used: the prior -ln(16 - 1)
        for log in logs.values():
            assert log[0]["logit_bias"] == pytest.approx(-math.log(15), abs=1e-5)
