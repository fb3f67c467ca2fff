"""The forgetting probe: measured direction of self-regularization on a shared-FFN model, in-memory LoRA merge,
and the MLM / MIM parts of the report."""
import importlib.util
import json
import os
import subprocess

import pytest
import torch

from models.dvae import DVAEEncoder, save_dvae_safetensors
from models.registry import create_model
from run_helpers import REPO, child_env, command, load_ckpt
from util.convert_beit_ckpt import main as convert_main
from util.errors import UserError
from util.forgetting_probe import main as probe
from util.merge_lora import main as merge_main

STEPS_PER_EPOCH, EPOCHS = 32, 2  # 256 demo captions / batch 8; 64 optimizer steps in all
STRONG = "1e4"  # B starts at 0, so the penalty acts from the second step on; 1e4 then dominates the MLM gradient


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """One tiny shared-FFN 'pretrained' model: a random-init timm BEiT (MIM-release layout, so the final norm is
    provided and frozen like every other pretrained weight) converted to this project's layout."""
    root = tmp_path_factory.mktemp("probe")
    spec = importlib.util.spec_from_file_location("make_tiny_beit", os.path.join(REPO, "scripts", "make_tiny_beit.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--out", str(root / "beit.pth"), "--style", "pt", "--img_size", "32"])
    convert_main(["--src", str(root / "beit.pth"), "--dst", str(root / "converted.pth"), "--model", "vlmo_tiny_patch16",
                  "--ffn_layout", "shared", "--img_size", "32"])
    return root / "converted.pth"


@pytest.fixture(scope="module")
def text_runs(pretrained, demo_data, tmp_path_factory):
    """{reg weight: output folder} of the same text_mlm run with reg weight 0 and STRONG (run side by side)."""
    root = tmp_path_factory.mktemp("text_runs")
    outs, procs = {}, []
    for weight in ("0", STRONG):
        outs[weight] = root / f"reg_{weight}"
        args = ["--exp_name", "text_mlm", "--model", "vlmo_tiny_patch16", "--ffn_layout", "shared",
                "--data_path", str(demo_data["captions_train"]), "--tokenizer", str(demo_data["tokenizer"]),
                "--batch_size", "8", "--epochs", str(EPOCHS), "--warmup_epochs", "0.1", "--lr", "1e-2",
                "--drop_path", "0", "--num_workers", "0", "--log_freq", "16", "--lora_rank", "4",
                "--self_regularization", "--reg_loss_weight", weight, "--resume", str(pretrained),
                "--output_dir", str(outs[weight])]
        procs.append(subprocess.Popen(command("main_pretrain_cook.py", args), cwd=REPO, env=child_env(),
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for p in procs:
        log, _ = p.communicate(timeout=300)
        assert p.returncode == 0, log[-4000:]
    return outs


def _probe(before, after, demo_data, *extra):
    return probe(["--before", str(before), "--after", str(after), "--images", str(demo_data["images_val"]),
                  "--captions", str(demo_data["captions_val"]), "--batch_size", "16", *extra])


def test_strong_self_regularization_at_least_halves_image_drift(pretrained, text_runs, demo_data):
    results = {}
    for weight, out in text_runs.items():
        ckpt = load_ckpt(out / "checkpoint-latest.pth")
        assert ckpt["global_step"] == STEPS_PER_EPOCH * EPOCHS >= 50
        results[weight] = _probe(pretrained, out / "checkpoint-latest.pth", demo_data)
    free, held = results["0"]["image_feature_drift"], results[STRONG]["image_feature_drift"]
    assert free > 1e-4, f"the unregularised run barely moved the image path ({free}); the comparison says nothing"
    assert held <= 0.5 * free, f"drift with reg {STRONG}: {held}, without: {free}"
    for r in results.values():  # the text side was learned in both runs and measured on held-out captions
        assert "mlm_acc" in r["metrics"]["after"] and "mlm_acc" not in r["metrics"]["before"]
        assert r["metrics"]["after"]["mlm_acc"] > 0.15


def test_lora_checkpoint_is_merged_in_memory_like_the_merged_file(pretrained, text_runs, demo_data, tmp_path, capsys):
    lora_ckpt = text_runs["0"] / "checkpoint-latest.pth"
    merged = tmp_path / "merged.pth"
    merge_main(["--src", str(lora_ckpt), "--dst", str(merged)])
    out = tmp_path / "probe.json"
    from_lora = _probe(pretrained, lora_ckpt, demo_data, "--out", str(out))
    from_merged = _probe(pretrained, merged, demo_data)
    assert from_lora["image_feature_drift"] == pytest.approx(from_merged["image_feature_drift"], abs=1e-6)
    assert from_lora["metrics"]["after"]["mlm_acc"] == pytest.approx(from_merged["metrics"]["after"]["mlm_acc"])
    assert any("merged in memory" in n for n in from_lora["notes"])
    assert json.loads(out.read_text())["image_feature_drift"] == pytest.approx(from_lora["image_feature_drift"])
    assert "image CLS drift" in capsys.readouterr().out
    same = _probe(merged, merged, demo_data)
    assert same["image_feature_drift"] == pytest.approx(0.0, abs=1e-6)
    assert same["metrics"]["before"]["mlm_acc"] == same["metrics"]["after"]["mlm_acc"]


def _mim_file(path, seed, target):
    torch.manual_seed(seed)
    model = create_model("vlmo_tiny_patch16", mim_target=target, mim_vocab_size=64)
    torch.save({"model": model.state_dict(), "model_config": model.config, "mode": "image_mim"}, path)


def test_mim_part_of_the_report(tmp_path, demo_data):
    a, b = tmp_path / "a.pth", tmp_path / "b.pth"
    _mim_file(a, 0, "pixel")
    _mim_file(b, 1, "pixel")
    result = probe(["--before", str(a), "--after", str(b), "--images", str(demo_data["images_val"])])
    assert result["image_feature_drift"] > 0
    for side in ("before", "after"):
        assert set(result["metrics"][side]) == {"mim_loss"}  # pixel heads: no accuracy to report
    assert result["metrics"]["before"]["mim_loss"] != result["metrics"]["after"]["mim_loss"]
    _mim_file(a, 0, "dalle")
    _mim_file(b, 1, "dalle")
    result = probe(["--before", str(a), "--after", str(b), "--images", str(demo_data["images_val"])])
    assert result["metrics"] == {"before": {}, "after": {}} and any("--dvae_path" in n for n in result["notes"])
    dvae = tmp_path / "encoder.safetensors"
    with pytest.raises(UserError, match="--dvae_path"):  # named but missing: the run's own error message
        probe(["--before", str(a), "--after", str(b), "--images", str(demo_data["images_val"]),
               "--dvae_path", str(dvae)])
    torch.manual_seed(2)
    save_dvae_safetensors(DVAEEncoder(n_hid=16, n_blk_per_group=1, vocab_size=64), str(dvae))
    result = probe(["--before", str(a), "--after", str(b), "--images", str(demo_data["images_val"]),
                    "--dvae_path", str(dvae)])
    for side in ("before", "after"):
        assert set(result["metrics"][side]) == {"mim_loss", "mim_acc"}
        assert 0 <= result["metrics"][side]["mim_acc"] <= 1
