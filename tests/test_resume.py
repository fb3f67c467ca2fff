"""Resume: N steps straight equal k steps, SIGKILL, resume, N-k steps -- bitwise, at an epoch boundary and
mid-epoch; a training checkpoint in the output folder wins over a weights-only --resume (requeue)."""
import os

import pytest
import torch

from models.registry import create_model
from run_helpers import kill_when, load_ckpt, make_caption_data, run_entry, start_entry

# 96 captions / batch 6 = 16 steps per epoch, 2 epochs.
STEPS_PER_EPOCH = 16


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    data = make_caption_data(str(root / "data"), n_train=96, n_val=4)
    from custom_datasets.tokenizer import load_tokenizer
    vocab = load_tokenizer(data["tokenizer"]).vocab_size
    torch.manual_seed(3)
    weights = create_model("vlmo_tiny_patch16", vocab_size=vocab).state_dict()
    data["weights"] = str(root / "pretrained.pth")
    torch.save({"model": {k: v for k, v in weights.items() if not k.startswith("mlm_head")}}, data["weights"])
    return data


def _args(data, out, resume, extra=()):
    return ["--exp_name", "text_mlm", "--model", "vlmo_tiny_patch16", "--data_path", data["train"],
            "--tokenizer", data["tokenizer"], "--batch_size", "6", "--epochs", "2", "--warmup_epochs", "0.5",
            "--lr", "1e-3", "--drop_path", "0.1", "--num_workers", "1", "--log_freq", "4", "--lora_rank", "4",
            "--self_regularization", "--reg_loss_weight", "10", "--output_dir", out, "--resume", resume, *extra]


def _assert_same_state(a, b):
    assert a["global_step"] == b["global_step"] == 2 * STEPS_PER_EPOCH
    assert set(a["model"]) == set(b["model"])
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        for k in sa:
            assert torch.equal(sa[k], sb[k])


@pytest.fixture(scope="module")
def straight(setup, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("straight"))
    run_entry("main_pretrain_cook.py", _args(setup, out, setup["weights"]))
    return load_ckpt(os.path.join(out, "checkpoint-latest.pth"))


@pytest.mark.parametrize("where", ["epoch_boundary", "mid_epoch"])
def test_killed_and_resumed_run_is_bitwise_identical(setup, straight, tmp_path, where):
    out = str(tmp_path / where)
    latest = os.path.join(out, "checkpoint-latest.pth")
    extra = ["--save_every_steps", "5"] if where == "mid_epoch" else []
    proc = start_entry("main_pretrain_cook.py", _args(setup, out, setup["weights"], extra))
    assert kill_when(proc, lambda: os.path.exists(latest)), "the run finished before it could be killed"
    killed_at = load_ckpt(latest)
    assert killed_at["global_step"] < 2 * STEPS_PER_EPOCH
    if where == "mid_epoch":
        assert killed_at["step_in_epoch"] == 5 and killed_at["epoch"] == 0
        resume = "auto"
    else:
        assert killed_at["step_in_epoch"] == 0 and killed_at["epoch"] == 1
        resume = setup["weights"]  # the same command again (a requeue): the run's own checkpoint must win
    proc = run_entry("main_pretrain_cook.py", _args(setup, out, resume, extra))
    assert "resuming this run from" in proc.stdout
    _assert_same_state(load_ckpt(latest), straight)
    assert "lora_A" in " ".join(straight["model"]) and straight["provided_keys"]
