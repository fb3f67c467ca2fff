"""The embedding API and the zero-shot and retrieval commands: every input kind, embeddings equal to the
training evaluation's, pooled features (and refusal by the commands) for a checkpoint without trained
contrastive heads, fine-tuning and dual-encoder checkpoints."""
import csv
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import main_pretrain_cook
from custom_datasets.image_dataset import build_eval_transform
from custom_datasets.loaders import eval_loader
from custom_datasets.pair_collator import PairCollator
from custom_datasets.pair_dataset import build_pair_dataset
from inference import load_model
from models.registry import create_model
from run_helpers import run_entry
from util.itc_eval import _embed_pair


def _pretrain(demo_data, out, mode, data, extra=()):
    argv = ["--exp_name", mode, "--model", "vlmo_tiny_patch16", "--data_path", str(data), "--tokenizer",
            str(demo_data["tokenizer"]), "--batch_size", "8", "--epochs", "1", "--warmup_epochs", "0",
            "--num_workers", "0", "--output_dir", str(out), *extra]
    assert main_pretrain_cook.main(argv) == 0
    return str(out / "checkpoint-latest.pth")


@pytest.fixture(scope="module")
def itc_ckpt(demo_data, tmp_path_factory):
    return _pretrain(demo_data, tmp_path_factory.mktemp("itc"), "image_text_itc", demo_data["pairs_train"])


@pytest.fixture(scope="module")
def mlm_ckpt(demo_data, tmp_path_factory):
    return _pretrain(demo_data, tmp_path_factory.mktemp("mlm"), "text_mlm", demo_data["captions_train"])


def test_embeddings_equal_the_training_evaluation(demo_data, itc_ckpt):
    model = load_model(itc_ckpt, batch_size=5)
    assert model.contrastive
    val = build_pair_dataset(str(demo_data["pairs_val"]), build_eval_transform(model.image_state))
    loader = eval_loader(val, PairCollator(model.tokenizer), 8, 0, 1, 0, False)
    with torch.no_grad():
        ref = [_embed_pair(model.model, b) for b in loader]
    ref_img, ref_txt = torch.cat([r["image_emb"] for r in ref]), torch.cat([r["text_emb"] for r in ref])
    rows = list(csv.DictReader(open(demo_data["pairs_val"], encoding="utf-8")))
    paths = [os.path.join(os.path.dirname(demo_data["pairs_val"]), r["image_path"]) for r in rows]
    torch.testing.assert_close(model.encode_image(paths), ref_img, atol=1e-5, rtol=0)
    torch.testing.assert_close(model.encode_text([r["text"] for r in rows]), ref_txt, atol=1e-5, rtol=0)
    assert torch.allclose(model.encode_image(paths).norm(dim=1), torch.ones(len(paths)), atol=1e-5)


def test_every_input_kind_gives_the_same_embedding(demo_data, itc_ckpt, tmp_path):
    model = load_model(itc_ckpt)
    folder = tmp_path / "imgs"
    folder.mkdir()
    rgb = np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(folder / "a.png")
    Image.fromarray(rgb[::-1].copy()).save(folder / "b.png")
    by_path = model.encode_image(str(folder / "a.png"))
    kinds = [Image.fromarray(rgb), rgb, rgb.astype(np.float32) / 255, torch.from_numpy(rgb).permute(2, 0, 1),
             [str(folder / "a.png")], torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255]
    for kind in kinds:
        torch.testing.assert_close(model.encode_image(kind), by_path, atol=1e-6, rtol=0)
    both = model.encode_image(str(folder))  # a folder: its images, sorted
    torch.testing.assert_close(both[0:1], by_path, atol=1e-6, rtol=0)
    assert both.shape[0] == 2 and model.encode_image(np.stack([rgb, rgb])).shape[0] == 2
    assert model.encode_text("a red circle").shape == (1, both.shape[1])


def test_a_checkpoint_without_trained_heads_gives_pooled_features_and_the_commands_refuse(demo_data, mlm_ckpt):
    model = load_model(mlm_ckpt)
    assert not model.contrastive and model.mode == "text_mlm"
    feats = model.encode_text(["a red circle", "a blue star"])
    assert feats.shape == (2, 64) and torch.allclose(feats.norm(dim=1), torch.ones(2), atol=1e-5)
    proc = run_entry("util/zero_shot.py", ["--checkpoint", mlm_ckpt, "--images", str(demo_data["images_val"])],
                     check=False)
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error: --checkpoint") and "never trained" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_zero_shot_command_reports_accuracy_and_writes_predictions(demo_data, itc_ckpt, tmp_path):
    out = tmp_path / "pred.csv"
    proc = run_entry("util/zero_shot.py", ["--checkpoint", itc_ckpt, "--images", str(demo_data["images_val"]),
                                           "--topk", "3", "--out", str(out)])
    assert "accuracy over" in proc.stdout and "encoding images: [" in proc.stderr and "eta" in proc.stderr
    rows = list(csv.DictReader(open(out)))
    assert rows and {"image", "label", "top1", "score1", "top3"} <= set(rows[0])


def test_retrieval_command_writes_both_directions(demo_data, itc_ckpt, tmp_path):
    texts = tmp_path / "texts.txt"
    texts.write_text("a red circle\na blue square\na green star\n", encoding="utf-8")
    out = tmp_path / "res.json"
    run_entry("util/retrieve.py", ["--checkpoint", itc_ckpt, "--images", str(demo_data["images_val"]), "--texts",
                                   str(texts), "--topk", "2", "--out", str(out), "--quiet"])
    rows = json.load(open(out))
    assert {r["direction"] for r in rows} == {"image2text", "text2image"}
    assert len([r for r in rows if r["direction"] == "text2image"]) == 3 * 2


def test_a_merged_file_keeps_its_trained_heads(itc_ckpt, tmp_path):
    ckpt = torch.load(itc_ckpt, weights_only=True)
    merged = {"model": ckpt["model"], "model_config": ckpt["model_config"], "tokenizer": ckpt["tokenizer"],
              "image_preprocess": ckpt["image_preprocess"], "merged_from_mode": "image_text_itc",
              "trained_heads": ["itc"]}
    torch.save(merged, tmp_path / "merged.pth")
    model, original = load_model(str(tmp_path / "merged.pth")), load_model(itc_ckpt)
    assert model.contrastive and model.mode == "image_text_itc"
    torch.testing.assert_close(model.encode_text("a red circle"), original.encode_text("a red circle"))


def test_fine_tuned_and_dual_encoder_checkpoints_load(demo_data, tiny_tokenizer, tmp_path, itc_ckpt):
    dual = create_model("dual_encoder", image_tower="vit_tiny_patch16_224", text_tower="ours", embed_dim=16,
                        img_size=32, vocab_size=tiny_tokenizer.vocab_size,
                        image_tower_kwargs={"depth": 1, "embed_dim": 32, "num_heads": 2},
                        text_tower_kwargs={"width": 32, "depth": 1, "heads": 2})
    path = tmp_path / "dual.pth"
    torch.save({"model": dual.state_dict(), "model_config": dual.config, "tokenizer": tiny_tokenizer.to_state(),
                "mode": "image_text_itc"}, path)
    model = load_model(str(path))
    assert model.contrastive and model.encode_image(np.zeros((32, 32, 3), np.uint8)).shape == (1, 16)
    with torch.no_grad():
        ids, masks = tiny_tokenizer.encode_batch(["a red circle"])
        torch.testing.assert_close(model.encode_text("a red circle"), dual.eval().encode_text(ids, masks))
    import main_finetune

    out = tmp_path / "ft"
    assert main_finetune.main(["--task", "image_classification", "--finetune", itc_ckpt, "--lora_rank", "2",
                               "--data_path", str(demo_data["images_train"].parent), "--batch_size", "8",
                               "--epochs", "1", "--num_workers", "0", "--output_dir", str(out)]) == 0
    assert any(".lora_A" in k for k in torch.load(out / "checkpoint-latest.pth", weights_only=True)["model"])
    tuned = load_model(str(out / "checkpoint-latest.pth"))  # adapters restored where the file has them
    assert not tuned.contrastive and tuned.mode == "finetune:image_classification"
    assert tuned.encode_image(np.zeros((32, 32, 3), np.uint8)).shape == (1, 64)
