"""A run whose loss becomes non-finite stops with a clear message and never writes a checkpoint after it."""
import os

import torch

from run_helpers import load_ckpt, make_caption_data, run_entry


def test_nonfinite_loss_stops_without_overwriting_the_last_good_checkpoint(tmp_path):
    data = make_caption_data(str(tmp_path / "data"), n_train=48, n_val=4)
    out = str(tmp_path / "out")
    args = ["--exp_name", "text_mlm", "--model", "vlmo_tiny_patch16", "--data_path", data["train"], "--tokenizer",
            data["tokenizer"], "--batch_size", "4", "--epochs", "3", "--warmup_epochs", "0", "--lr", "1e12",
            "--opt_betas", "0.0", "0.0", "--num_workers", "0", "--log_freq", "1000", "--save_every_steps", "1",
            "--output_dir", out]
    proc = run_entry("main_pretrain_cook.py", args, check=False)
    assert proc.returncode == 3, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "non-finite" in proc.stdout + proc.stderr and "Traceback" not in proc.stderr
    latest = os.path.join(out, "checkpoint-latest.pth")
    if os.path.exists(latest):  # whatever was saved came from finite steps only
        ckpt = load_ckpt(latest)
        assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
        assert ckpt["global_step"] < 36
    assert not any(f.endswith(".tmp") for f in os.listdir(out))
