"""Merging LoRA adapters: same outputs before and after, no lora_* left, and a merged file resumed with a new
--lora_rank starts from exactly the merged model (fresh adapters, nothing applied twice)."""
import os

import pytest
import torch

from custom_datasets.image_dataset import image_preprocess_state
from models.lora import LoRALinear
from models.merge import has_lora, merge_lora_state_dict
from models.registry import create_model
from models.trainable import configure_trainable
from run_helpers import load_ckpt, run_entry
from util.errors import UserError
from util.merge_lora import main as merge_main

RANK, ALPHA = 3, 2.0


def _lora_model(vocab, layout, seed=0):
    """Tiny model whose every provided weight carries LoRA adapters with non-zero B (as after training)."""
    torch.manual_seed(seed)
    model = create_model("vlmo_tiny_patch16", vocab_size=vocab, ffn_layout=layout)
    heads = ("mlm_head.", "mim_head.", "itc_", "logit_")  # what a converted BEiT file does not provide
    provided = [k for k in model.state_dict() if not k.startswith(heads)]
    configure_trainable(model, "text_mlm", RANK, ALPHA, provided)
    for mod in model.modules():
        if isinstance(mod, LoRALinear) and mod.has_lora:
            torch.nn.init.normal_(mod.lora_B, std=0.5)
    return model.eval(), provided


def _outputs(model, vocab):
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(3, 3, 32, 32, generator=gen)
    ids = torch.randint(5, vocab, (3, 9), generator=gen)
    masks = torch.ones(3, 9, dtype=torch.long)
    with torch.no_grad():
        return model.forward_image_features(images), model.forward_text_features(ids, masks)


def _assert_same_outputs(a, b, vocab):
    for x, y in zip(_outputs(a, vocab), _outputs(b, vocab)):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


def _plain_model(sd, vocab, layout):
    model = create_model("vlmo_tiny_patch16", vocab_size=vocab, ffn_layout=layout).eval()
    model.load_state_dict(sd)  # strict: a merged state dict has exactly the plain model's tensors
    return model


@pytest.mark.parametrize("layout", ["shared", "multiway"])
def test_merged_state_dict_gives_the_same_outputs(layout):
    model, _ = _lora_model(200, layout)
    sd = model.state_dict()
    snapshot = {k: v.clone() for k, v in sd.items()}
    merged = merge_lora_state_dict(sd, ALPHA)
    assert has_lora(sd) and not has_lora(merged)
    assert all(torch.equal(sd[k], snapshot[k]) for k in sd)  # the input is not modified
    assert not torch.equal(merged["blocks.0.attn.qkv.weight"], sd["blocks.0.attn.qkv.weight"])
    _assert_same_outputs(model, _plain_model(merged, 200, layout), 200)
    with pytest.raises(ValueError, match="lora_B"):
        merge_lora_state_dict({k: v for k, v in sd.items() if k != "blocks.0.attn.qkv.lora_B"})


def _training_checkpoint(model, provided, tokenizer=None):
    """The fields main_pretrain_cook.py saves that merging reads."""
    return {"model": model.state_dict(), "model_config": model.config, "optimizer": {"state": {}}, "epoch": 1,
            "global_step": 10, "mode": "text_mlm", "provided_keys": provided,
            "args": {"lora_rank": RANK, "lora_alpha": ALPHA},
            "tokenizer": tokenizer.to_state() if tokenizer is not None else None,
            "image_preprocess": image_preprocess_state(img_size=32)}


def test_cli_writes_a_weights_only_merged_file(tmp_path, capsys):
    model, provided = _lora_model(200, "shared")
    src = tmp_path / "run" / "checkpoint-latest.pth"
    src.parent.mkdir()
    torch.save(_training_checkpoint(model, provided), src)
    report = merge_main(["--src", str(src)])
    dst = tmp_path / "run" / "checkpoint-latest_merged.pth"
    assert report["dst"] == str(dst) and report["rank"] == RANK and report["alpha"] == ALPHA
    assert len(report["layers"]) == 8 and "merged 8 LoRA layers" in capsys.readouterr().out
    merged = torch.load(dst, map_location="cpu", weights_only=True)
    assert {"model", "model_config", "tokenizer", "image_preprocess", "source", "merged_from_lora_rank"} <= set(merged)
    assert merged["merged_from_lora_rank"] == RANK and merged["source"] == str(src)
    assert merged["image_preprocess"]["img_size"] == 32 and merged["trained_heads"] == ["mlm"]
    assert not any(".lora_" in k for k in merged["model"])
    _assert_same_outputs(model, _plain_model(merged["model"], 200, "shared"), 200)


def test_cli_refuses_what_it_cannot_merge(tmp_path):
    plain = create_model("vlmo_tiny_patch16", vocab_size=200)
    no_adapters = tmp_path / "plain.pth"
    torch.save({"model": plain.state_dict(), "model_config": plain.config}, no_adapters)
    with pytest.raises(UserError, match="no LoRA adapters"):
        merge_main(["--src", str(no_adapters)])
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint")
    with pytest.raises(UserError, match="notes.pth"):
        merge_main(["--src", str(text)])
    with pytest.raises(UserError, match="no model weights"):
        torch.save({"epoch": 3}, tmp_path / "empty.pth")
        merge_main(["--src", str(tmp_path / "empty.pth")])
    with pytest.raises(UserError, match="same file"):
        merge_main(["--src", str(no_adapters), "--dst", str(no_adapters)])
    assert not os.path.exists(tmp_path / "plain_merged.pth")


def test_merged_file_resumed_with_a_new_lora_rank_starts_from_the_merged_model(tmp_path, demo_data, tiny_tokenizer):
    vocab = tiny_tokenizer.vocab_size
    model, provided = _lora_model(vocab, "shared")
    src = tmp_path / "stage1.pth"
    torch.save(_training_checkpoint(model, provided, tiny_tokenizer), src)
    merged_path = tmp_path / "stage1_merged.pth"
    merge_main(["--src", str(src), "--dst", str(merged_path)])
    merged = load_ckpt(merged_path)["model"]

    # lr 0: the run's checkpoint holds exactly the model the real entry point built from the merged file.
    out = tmp_path / "stage2"
    run_entry("main_pretrain_cook.py", [
        "--exp_name", "text_mlm", "--model", "vlmo_tiny_patch16", "--ffn_layout", "shared",
        "--data_path", str(demo_data["captions_train"]), "--batch_size", "64", "--epochs", "1", "--lr", "0",
        "--min_lr", "0", "--warmup_epochs", "0", "--drop_path", "0", "--num_workers", "0", "--lora_rank", "2",
        "--resume", str(merged_path), "--output_dir", str(out), "--save_merged_lora_model"])
    ckpt = load_ckpt(out / "checkpoint-latest.pth")
    end_merged = load_ckpt(out / "checkpoint-merged.pth")  # --save_merged_lora_model at the end of the run
    assert not has_lora(end_merged["model"]) and end_merged["model_config"]["ffn_layout"] == "shared"
    for k, v in merge_lora_state_dict(ckpt["model"], 1.0).items():
        assert torch.equal(end_merged["model"][k], v), k
    sd = ckpt["model"]
    lora_b = [k for k in sd if k.endswith(".lora_B")]
    assert len(lora_b) == 8 and all(not sd[k].any() for k in lora_b)  # fresh adapters: B = 0
    assert all(sd[k[: -len("lora_B")] + "lora_A"].shape[0] == 2 for k in lora_b)  # the new rank
    for k, v in merged.items():  # the merged weights, once: not W0 + 2 * delta
        assert torch.equal(sd[k], v), k

    resumed = create_model("vlmo_tiny_patch16", vocab_size=vocab, ffn_layout="shared").eval()
    configure_trainable(resumed, "text_mlm", 2, 1.0, ckpt["provided_keys"])
    resumed.load_state_dict(sd)
    _assert_same_outputs(_plain_model(merged, vocab, "shared"), resumed, vocab)
