"""The continual recipe end to end on tiny models, through the real entry points and documented flags:
random-init timm BEiT -> util/convert_beit_ckpt.py -> text_mlm (LoRA + self-regularization, --resume the
converted file) -> util/merge_lora.py -> image_text_itc (--resume the merged file)."""
import importlib.util
import json
import os

import torch

from run_helpers import REPO, load_ckpt, read_jsonl, run_entry
from util.convert_beit_ckpt import main as convert_main
from util.merge_lora import main as merge_main


def _make_tiny_beit(path):
    spec = importlib.util.spec_from_file_location("make_tiny_beit", os.path.join(REPO, "scripts", "make_tiny_beit.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--out", str(path), "--style", "ft", "--img_size", "32", "--seed", "1"])


def _common(out, resume):
    return ["--model", "vlmo_tiny_patch16", "--ffn_layout", "shared", "--drop_path", "0", "--num_workers", "0",
            "--epochs", "1", "--warmup_epochs", "0.2", "--log_freq", "4", "--output_dir", str(out),
            "--resume", str(resume)]


def _args_json(out):
    with open(os.path.join(out, "args.json")) as f:
        return json.load(f)


def test_convert_text_mlm_merge_itc(tmp_path, demo_data):
    beit, converted = tmp_path / "beit.pth", tmp_path / "beit_tiny_transfertovlmo.pth"
    _make_tiny_beit(beit)
    convert_main(["--src", str(beit), "--dst", str(converted), "--model", "vlmo_tiny_patch16",
                  "--ffn_layout", "shared", "--img_size", "32"])
    conv = load_ckpt(converted)["model"]

    # Stage 2: text through LoRA under self-regularization, initialised from the converted weights.
    mlm_out = tmp_path / "text_mlm"
    run_entry("main_pretrain_cook.py", ["--exp_name", "text_mlm", "--data_path", str(demo_data["captions_train"]),
                                        "--val_data_path", str(demo_data["captions_val"]),
                                        "--tokenizer", str(demo_data["tokenizer"]), "--batch_size", "16",
                                        "--lr", "5e-3", "--lora_rank", "4", "--self_regularization",
                                        "--reg_loss_weight", "10", *_common(mlm_out, converted)])
    record = _args_json(mlm_out)
    assert record["resume_kind"] == "weights" and record["resumed_from"] == str(converted)
    train = read_jsonl(mlm_out / "log.jsonl", "train")
    assert train[-1]["reg_loss"] > 0  # the adapters moved and the regulariser saw it
    assert "mlm_acc" in read_jsonl(mlm_out / "log.jsonl", "val")[-1]
    mlm = load_ckpt(mlm_out / "checkpoint-latest.pth")
    assert any(k.endswith(".lora_A") for k in mlm["model"])
    assert torch.equal(mlm["model"]["blocks.0.attn.qkv.weight"], conv["blocks.0.attn.qkv.weight"])  # W0 frozen

    # Stage 3: merge. The unmerged checkpoint is refused by the next stage with the way out.
    report = merge_main(["--src", str(mlm_out / "checkpoint-latest.pth")])
    merged_path = mlm_out / "checkpoint-latest_merged.pth"
    assert report["dst"] == str(merged_path)
    merged = load_ckpt(merged_path)
    assert not any(".lora_" in k for k in merged["model"])
    assert not torch.equal(merged["model"]["blocks.0.attn.qkv.weight"], conv["blocks.0.attn.qkv.weight"])

    itc_args = ["--exp_name", "image_text_itc", "--data_path", str(demo_data["pairs_train"]),
                "--val_data_path", str(demo_data["pairs_val"]), "--zeroshot_data_path", str(demo_data["images_val"]),
                "--zeroshot_templates", str(demo_data["templates"]), "--batch_size", "8", "--lr", "1e-3"]
    refused = run_entry("main_pretrain_cook.py", [*itc_args, *_common(tmp_path / "refused",
                                                                      mlm_out / "checkpoint-latest.pth")], check=False)
    assert refused.returncode == 2 and "merge_lora.py" in refused.stderr

    # Stage 4: image-text contrastive from the merged weights; tokenizer and preprocessing are inherited.
    itc_out = tmp_path / "itc"
    proc = run_entry("main_pretrain_cook.py", [*itc_args, *_common(itc_out, merged_path)])
    record = _args_json(itc_out)
    assert record["resume_kind"] == "weights" and record["resumed_from"] == str(merged_path)
    assert "tokenizer: inherited from" in proc.stdout + proc.stderr
    itc = load_ckpt(itc_out / "checkpoint-latest.pth")
    assert itc["mode"] == "image_text_itc" and not any(".lora_" in k for k in itc["model"])
    assert itc["tokenizer"] == mlm["tokenizer"]
    # the same pixels; only the evaluation view differs: ITC evaluates the whole image (crop 1.0)
    assert {**itc["image_preprocess"], "crop_pct": None} == {**mlm["image_preprocess"], "crop_pct": None}
    assert itc["image_preprocess"]["crop_pct"] == 1.0
    # What stage 2 learned arrived: its MLM head (off the ITC path, so untouched) is the merged file's.
    assert any(k.startswith("text_embeddings.") for k in itc["provided_keys"])
    for k in ("mlm_head.decoder.weight", "mlm_head.transform.dense.weight"):
        assert torch.equal(itc["model"][k], merged["model"][k])
    assert not torch.equal(itc["model"]["blocks.0.attn.qkv.weight"], merged["model"]["blocks.0.attn.qkv.weight"])
    val = read_jsonl(itc_out / "log.jsonl", "val")[-1]
    assert {"zeroshot_top1", "i2t_r1"} <= set(val)
