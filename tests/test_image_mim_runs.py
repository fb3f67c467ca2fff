"""image_mim through the real entry point: 2 ranks equal 1 rank (multiway, dVAE targets), the dVAE stays out of
checkpoints, target diagnostics are logged, missing dVAE weights are a clear error, and the pixel-target loss
falls on demo images."""
import os

import pytest
import torch

from models.dvae import DVAEEncoder, save_dvae_safetensors
from run_helpers import load_ckpt, read_jsonl, run_entry

ATOL = 2e-5


@pytest.fixture(scope="module")
def dvae_file(tmp_path_factory):
    torch.manual_seed(0)
    enc = DVAEEncoder(n_hid=64, n_blk_per_group=1, vocab_size=512)
    path = str(tmp_path_factory.mktemp("dvae") / "encoder.safetensors")
    save_dvae_safetensors(enc, path)
    return path


def _args(demo, out, batch, dvae, extra=()):
    return ["--exp_name", "image_mim", "--model", "vlmo_tiny_patch16", "--data_path", str(demo["images_train"]),
            "--val_data_path", str(demo["images_val"]), "--tokenizer", str(demo["tokenizer"]), "--batch_size",
            str(batch), "--epochs", "2", "--warmup_epochs", "0.5", "--lr", "2e-3", "--drop_path", "0",
            "--num_workers", "0", "--log_freq", "1", "--num_mask_patches", "2", "--min_mask_patches", "1",
            "--dvae_path", dvae, "--output_dir", out, *extra]


def test_two_ranks_equal_one_rank_with_dvae_targets(demo_data, dvae_file, tmp_path):
    finals = {}
    for name, nproc, batch in (("one", 1, 8), ("two", 2, 4)):
        out = str(tmp_path / name)
        run_entry("main_pretrain_cook.py", _args(demo_data, out, batch, dvae_file), nproc=nproc)
        ckpt = load_ckpt(os.path.join(out, "checkpoint-latest.pth"))
        assert not any("encoder" in k or k.startswith("blocks.group") for k in ckpt["model"])  # no dVAE inside
        assert ckpt["model"]["mim_head.weight"].shape[0] == 512 and ckpt["image_preprocess"]["norm"] == "beit"
        finals[name] = ckpt
        train = read_jsonl(os.path.join(out, "log.jsonl"), "train")
        assert all(r["target_distinct"] >= 1 and r["target_entropy"] >= 0 and "mim_acc" in r for r in train)
        assert all(r["masked_per_image"] == 2 for r in train)
    assert finals["one"]["global_step"] == finals["two"]["global_step"] > 2
    for k, v in finals["one"]["model"].items():
        torch.testing.assert_close(finals["two"]["model"][k], v, atol=ATOL, rtol=0, msg=k)
    assert finals["one"]["model"]["mim_head.bias"].abs().max() > 100 * ATOL


def test_missing_dvae_weights_is_one_clear_line(demo_data, tmp_path):
    missing = str(tmp_path / "nowhere" / "encoder.pkl")
    proc = run_entry("main_pretrain_cook.py", _args(demo_data, str(tmp_path / "o"), 4, missing), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert missing in proc.stderr and "--mim_target pixel" in proc.stderr


def test_pixel_target_loss_falls_on_demo_images(tmp_path):
    from custom_datasets.demo_data import make_demo_data

    demo = make_demo_data(tmp_path / "demo", num_train_captions=64, num_val_captions=8, images_per_class_train=24,
                          images_per_class_val=4, num_train_pairs=8, num_val_pairs=4, img_size=32, seed=1)
    out = str(tmp_path / "pixel")
    args = _args(demo, out, 16, "unused", ["--mim_target", "pixel", "--epochs", "4", "--lr", "3e-3",
                                           "--log_freq", "4"])
    run_entry("main_pretrain_cook.py", args)
    val = read_jsonl(os.path.join(out, "log.jsonl"), "val")
    train = read_jsonl(os.path.join(out, "log.jsonl"), "train")
    assert len(val) == 4 and val[-1]["mim_loss"] < val[0]["mim_loss"]
    assert train[-1]["mim_loss"] < 0.95 * train[0]["mim_loss"]
