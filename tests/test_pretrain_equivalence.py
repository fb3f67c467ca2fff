"""Two ranks (gloo) equal one rank on the same global batch, with and without accumulation; the held-out
metrics are computed over exactly the held-out captions and agree across world sizes."""
import os

import pytest
import torch

from run_helpers import load_ckpt, make_caption_data, read_jsonl, run_entry

# fp32 on CPU; the only differences are summation order in all-reduce and batch splitting.
ATOL = 2e-5


@pytest.fixture(scope="module")
def captions(tmp_path_factory):
    return make_caption_data(str(tmp_path_factory.mktemp("captions")), n_train=64, n_val=11)


def _args(data, out, batch, accum=1, extra=()):
    return ["--exp_name", "text_mlm", "--model", "vlmo_tiny_patch16", "--data_path", data["train"],
            "--val_data_path", data["val"], "--tokenizer", data["tokenizer"], "--batch_size", str(batch),
            "--accum_iter", str(accum), "--epochs", "2", "--warmup_epochs", "0.5", "--lr", "2e-3",
            "--drop_path", "0", "--num_workers", "0", "--log_freq", "2", "--output_dir", out, *extra]


def test_two_ranks_with_accumulation_equal_one_rank(captions, tmp_path):
    runs = {"one_rank_b8": (1, 8, 1), "two_ranks_b2_accum2": (2, 2, 2)}  # (DDP at batch 4: tests/test_fsdp.py)
    finals, vals = {}, {}
    for name, (nproc, batch, accum) in runs.items():
        out = str(tmp_path / name)
        run_entry("main_pretrain_cook.py", _args(captions, out, batch, accum, ["--lora_rank", "0"]), nproc=nproc)
        ckpt = load_ckpt(os.path.join(out, "checkpoint-latest.pth"))
        assert ckpt["global_step"] == 16 and ckpt["args"]["effective_batch_size"] == 8
        finals[name] = ckpt["model"]
        vals[name] = read_jsonl(os.path.join(out, "log.jsonl"), "val")
    ref = finals["one_rank_b8"]
    for name in ("two_ranks_b2_accum2",):
        for k, v in ref.items():
            torch.testing.assert_close(finals[name][k], v, atol=ATOL, rtol=0, msg=f"{name}: {k}")
    # Training moved the weights (the decoder bias starts at zero), so equality above means something.
    assert ref["mlm_head.decoder.bias"].abs().max() > 100 * ATOL
    for name in ("two_ranks_b2_accum2",):
        for a, b in zip(vals["one_rank_b8"], vals[name]):
            assert a["mlm_loss"] == pytest.approx(b["mlm_loss"], abs=1e-4)
            assert a["mlm_acc"] == pytest.approx(b["mlm_acc"], abs=1e-4)
    assert len(vals["one_rank_b8"]) == 2
