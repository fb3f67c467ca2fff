"""image_text_itc through the real entry point: LiT keeps image embeddings bit-identical, CLIP and SigLIP runs
log their diagnostics, and the standalone evaluation gives the same numbers on 1 and 2 ranks over exactly
the held-out items."""
import json
import math
import os

import pytest
import torch

from custom_datasets.image_dataset import build_eval_transform
from custom_datasets.pair_dataset import build_pair_dataset
from models.registry import create_model
from run_helpers import load_ckpt, read_jsonl, run_entry


@pytest.fixture(scope="module")
def weights(demo_data, tmp_path_factory):
    from custom_datasets.tokenizer import load_tokenizer
    torch.manual_seed(0)
    m = create_model("vlmo_tiny_patch16", vocab_size=load_tokenizer(demo_data["tokenizer"]).vocab_size)
    path = str(tmp_path_factory.mktemp("w") / "init.pth")
    torch.save({"model": m.state_dict(), "model_config": m.config}, path)
    return path


def _args(demo, out, loss, extra=()):
    return ["--exp_name", "image_text_itc", "--model", "vlmo_tiny_patch16", "--data_path", str(demo["pairs_train"]),
            "--val_data_path", str(demo["pairs_val"]), "--zeroshot_data_path", str(demo["images_val"]),
            "--zeroshot_classnames", str(demo["classnames"]), "--zeroshot_templates", str(demo["templates"]),
            "--tokenizer", str(demo["tokenizer"]), "--batch_size", "8", "--epochs", "2", "--warmup_epochs", "0.5",
            "--lr", "1e-3", "--drop_path", "0", "--num_workers", "0", "--log_freq", "2", "--itc_loss", loss,
            "--output_dir", out, *extra]


def _image_embeddings(state, demo):
    m = create_model("vlmo_tiny_patch16", vocab_size=state["text_embeddings.word_embeddings.weight"].shape[0],
                     itc_loss="siglip" if "logit_bias" in state else "clip")
    m.load_state_dict({k: v for k, v in state.items() if ".lora_" not in k}, strict=False)
    if any(".lora_" in k for k in state):  # adapters on shared layers must not touch the image path
        from models.trainable import configure_trainable
        configure_trainable(m, "image_text_itc", lora_rank=2, provided_keys=list(state), lock_image=True)
        m.load_state_dict(state)
    ds = build_pair_dataset(str(demo["pairs_val"]), build_eval_transform({"img_size": 32, "mean": [0.5] * 3,
                                                                            "std": [0.5] * 3,
                                                                            "interpolation": "bicubic"}))
    images = torch.stack([ds[i]["image"] for i in range(8)])
    with torch.no_grad():
        return m.eval().encode_image(images)


@pytest.mark.parametrize("lora", [0, 2])
def test_lock_image_keeps_image_embeddings_bit_identical(demo_data, weights, tmp_path, lora):
    out = str(tmp_path / "lit")
    run_entry("main_pretrain_cook.py", _args(demo_data, out, "siglip", ["--lock_image", "--resume", weights,
                                                                        "--lora_rank", str(lora)]))
    ckpt = load_ckpt(os.path.join(out, "checkpoint-latest.pth"))
    assert ckpt["model_config"]["image_pos_gain"] == 10.0  # loaded weights at lr 1e-3: the registry's gain
    assert ckpt["model_config"]["image_pre_norm"] is False  # and the architecture of the weights
    after = ckpt["model"]
    before = torch.load(weights, weights_only=True)["model"]
    assert torch.equal(_image_embeddings(before, demo_data), _image_embeddings(after, demo_data))
    changed = [k for k in after if k not in before or not torch.equal(before[k], after[k])]
    assert changed and all(not k.startswith(("patch_embed", "itc_image_proj", "cls_token")) and "_imag" not in k
                           for k in changed)
    if lora:  # base weights frozen; adapters (text tokens only) and the new SigLIP bias trained
        assert all(".lora_" in k or k == "logit_bias" for k in changed)
        assert any(".lora_B" in k and after[k].abs().sum() > 0 for k in changed)


def test_clip_diagnostics_and_evaluation_equal_on_one_and_two_ranks(demo_data, tmp_path):
    out = str(tmp_path / "clip")
    run_entry("main_pretrain_cook.py", _args(demo_data, out, "clip"))
    train = read_jsonl(os.path.join(out, "log.jsonl"), "train")
    for r in train:
        assert r["chance_loss"] == pytest.approx(math.log(8)) and 0 <= r["i2t_acc"] <= 1
        assert {"t2i_acc", "temperature", "duplicate_captions", "itc_loss", "image_spread", "text_spread"} <= set(r)
        assert r["temperature"] <= 100 + 1e-3
    val = read_jsonl(os.path.join(out, "log.jsonl"), "val")
    assert {"i2t_r1", "t2i_r10", "zeroshot_top1"} <= set(val[-1])
    ckpt = os.path.join(out, "checkpoint-latest.pth")
    # evaluated on the whole image training sees (crop 1.0), recorded for the standalone evaluation below
    assert load_ckpt(ckpt)["image_preprocess"]["crop_pct"] == 1.0
    assert load_ckpt(ckpt)["model_config"]["image_pos_gain"] == pytest.approx(30.0)  # fresh at lr 1e-3
    assert load_ckpt(ckpt)["model_config"]["image_pre_norm"] is True  # fresh: the image tokens' LayerNorm
    assert load_ckpt(ckpt)["model_config"]["image_rel_pos_init"] == "local"  # and the locality prior
    results = []
    for nproc in (1, 2):
        dst = str(tmp_path / f"eval{nproc}.json")
        run_entry("util/eval_itc.py", ["--checkpoint", ckpt, "--val_data_path", str(demo_data["pairs_val"]),
                                       "--zeroshot_data_path", str(demo_data["images_val"]),
                                       "--zeroshot_classnames", str(demo_data["classnames"]),
                                       "--zeroshot_templates", str(demo_data["templates"]), "--num_workers", "0",
                                       "--batch_size", "5", "--out", dst], nproc=nproc)
        results.append(json.load(open(dst)))
    assert results[0] == results[1]
    assert results[0]["num_pairs"] == len(build_pair_dataset(str(demo_data["pairs_val"])))
    # The training run's last held-out numbers are the standalone command's on the same checkpoint.
    assert results[0]["i2t_r1"] == pytest.approx(val[-1]["i2t_r1"]) and \
        results[0]["zeroshot_top1"] == pytest.approx(val[-1]["zeroshot_top1"])


def test_dual_encoder_of_a_timm_vit_trains_through_the_same_mode(demo_data, tmp_path):
    out = str(tmp_path / "dual")
    args = _args(demo_data, out, "clip", ["--model", "dual_encoder", "--image_tower", "vit_tiny_patch16_224",
                                          "--image_tower_kwargs", '{"embed_dim": 64, "depth": 2, "num_heads": 2}',
                                          "--text_tower_kwargs", '{"width": 64, "depth": 2, "heads": 2}',
                                          "--img_size", "32", "--itc_embed_dim", "32", "--epochs", "1"])
    run_entry("main_pretrain_cook.py", args)
    ckpt = load_ckpt(os.path.join(out, "checkpoint-latest.pth"))
    assert ckpt["model_config"]["image"]["name"] == "vit_tiny_patch16_224"
    assert read_jsonl(os.path.join(out, "log.jsonl"), "val")[-1]["zeroshot_top1"] >= 0


def test_lit_with_lora_is_evaluated_as_trained_and_never_merged(demo_data, weights, tmp_path):
    """LiT + LoRA on the multiway model: the adapters on the shared attention serve text tokens only, so the
    standalone evaluation (which loads them where they were) reports the in-training numbers, and merging
    them, which would change the locked image tower, is refused with one line."""
    out = str(tmp_path / "lit_lora")
    run_entry("main_pretrain_cook.py", _args(demo_data, out, "clip", ["--lock_image", "--resume", weights,
                                                                      "--lora_rank", "2", "--lr", "5e-3"]))
    val = read_jsonl(os.path.join(out, "log.jsonl"), "val")[-1]
    ckpt = os.path.join(out, "checkpoint-latest.pth")
    dst = str(tmp_path / "eval.json")
    run_entry("util/eval_itc.py", ["--checkpoint", ckpt, "--val_data_path", str(demo_data["pairs_val"]),
                                   "--zeroshot_data_path", str(demo_data["images_val"]), "--num_workers", "0",
                                   "--out", dst])
    got = json.load(open(dst))
    for key in ("i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5", "zeroshot_top1"):
        assert got[key] == pytest.approx(val[key], abs=1e-9), key
    proc = run_entry("util/merge_lora.py", ["--src", ckpt], check=False)
    assert proc.returncode == 2 and not os.path.exists(ckpt.replace(".pth", "_merged.pth"))
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--lock_image" in lines[0] and "unmerged" not in lines[0]
    proc = run_entry("main_pretrain_cook.py", _args(demo_data, str(tmp_path / "refused"), "clip", [
        "--lock_image", "--resume", weights, "--lora_rank", "2", "--save_merged_lora_model"]), check=False)
    assert proc.returncode == 2 and "--save_merged_lora_model" in proc.stderr.strip().splitlines()[-1]
    assert not os.path.exists(tmp_path / "refused")
