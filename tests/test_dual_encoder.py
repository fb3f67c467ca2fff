"""The CLIP-family dual encoder: a timm ViT with our text tower or a local Hugging Face BERT, trained through
the image_text_itc objective (CLIP, SigLIP, LiT), its LoRA and checkpoint round trip, and HFTokenizer."""
import json
import math
import pickle
import sys

import pytest
import torch

from models.contrastive import clip_loss, siglip_loss
from modes.base import pretrain_model
from models.dual_encoder import build_dual_encoder, dual_encoder_from_config, same_architecture
from util.errors import UserError

MODE = "image_text_itc"
VIT = "vit_tiny_patch16_224"
IMG = dict(embed_dim=64, depth=2, num_heads=2)  # timm kwargs: a 2-layer ViT at 32 px (4 patches)
TEXT = dict(width=32, depth=2, heads=2)
CAPTIONS = ["a red circle", "a blue square above a green star", "the yellow triangle", "a green circle",
            "a red star below a blue circle", "the square is yellow"]


def make_model(tok, itc_loss="clip", text_tower="ours", **kw):
    kw.setdefault("image_tower_kwargs", IMG)
    if text_tower == "ours":
        kw.setdefault("text_tower_kwargs", TEXT)
    return build_dual_encoder(VIT, text_tower, embed_dim=16, itc_loss=itc_loss, img_size=32,
                              vocab_size=tok.vocab_size, max_text_len=32, **kw)


def make_batch(tok, seed=0, n=6):
    images = torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    ids, masks = tok.encode_batch(CAPTIONS[:n])
    return {"images": images, "text_ids": ids, "text_masks": masks}


def train_steps(model, tok, steps=3):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    losses = []
    for step in range(steps):
        out = pretrain_model(model, MODE)(make_batch(tok, seed=step + 1))
        out["loss"].backward()
        losses.append(out["loss"].item())
        yield losses
        opt.step()
        opt.zero_grad(set_to_none=True)


def grads_by_tower(model):
    norms = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"{name} trains but got no gradient (DDP would need find_unused_parameters)"
            tower = name.split(".")[0]
            norms[tower] = norms.get(tower, 0.0) + p.grad.norm().item()
    return norms


@pytest.mark.parametrize("itc_loss", ["clip", "siglip"])
def test_timm_and_our_text_tower_train_both_towers(tiny_tokenizer, itc_loss):
    torch.manual_seed(0)
    model = make_model(tiny_tokenizer, itc_loss)
    if itc_loss == "clip":
        assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    else:
        assert model.logit_scale.item() == pytest.approx(math.log(10)) and model.logit_bias.item() == -10
    groups = model.configure_trainable(MODE)
    assert set(groups) == {"image", "text", "head"}
    assert model.itc_image_proj.out_features == 16 and model.config["image"]["width"] == 64
    batch = make_batch(tiny_tokenizer)
    out = pretrain_model(model, MODE)(batch)
    assert torch.isfinite(out["loss"])
    img, txt = model.encode_image(batch["images"]), model.encode_text(batch["text_ids"], batch["text_masks"])
    assert img.shape == txt.shape == (6, 16) and torch.allclose(img.norm(dim=-1), torch.ones(6))
    direct = clip_loss(img, txt, model.logit_scale, gather=False) if itc_loss == "clip" else \
        siglip_loss(img, txt, model.logit_scale, model.logit_bias, gather=False)
    torch.testing.assert_close(out["loss"], direct["loss"])
    out["loss"].backward()
    norms = grads_by_tower(model)
    for tower in ("image_tower", "text_tower", "itc_image_proj", "itc_text_proj", "logit_scale"):
        assert norms[tower] > 0, tower
    with pytest.raises(ValueError):
        pretrain_model(model, "text_mlm")(batch)
    with pytest.raises(UserError):
        model.configure_trainable("text_mlm")


@pytest.mark.parametrize("locked", ["image", "text"])
def test_lit_locked_tower_embeddings_bit_identical(tiny_tokenizer, locked):
    torch.manual_seed(0)
    model = make_model(tiny_tokenizer, drop_path_rate=0.1)  # drop path: a locked tower must still be deterministic
    groups = model.configure_trainable(MODE, lock_image=locked == "image", lock_text=locked == "text")
    other = "text" if locked == "image" else "image"
    assert model.locked_towers == {locked} and locked not in groups and other in groups
    model.train()
    held_out = make_batch(tiny_tokenizer, seed=99, n=4)

    def embed(tower):
        with torch.no_grad():
            return model.encode_image(held_out["images"]) if tower == "image" else \
                model.encode_text(held_out["text_ids"], held_out["text_masks"])

    before = {t: embed(t) for t in ("image", "text")}
    for losses in train_steps(model, tiny_tokenizer):
        assert math.isfinite(losses[-1])
        assert all(p.grad is None for n, p in model.named_parameters()
                   if n.startswith((f"{locked}_tower.", f"itc_{locked}_proj.")))
    assert torch.equal(embed(locked), before[locked])  # train mode: the locked tower stays in eval
    model.eval()
    assert torch.equal(embed(locked), before[locked])
    assert not torch.allclose(embed(other), before[other])
    with pytest.raises(UserError):
        model.configure_trainable(MODE, lock_image=True, lock_text=True)


def test_image_tower_weights_from_file(tiny_tokenizer, tmp_path):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(1)
    donor = timm.create_model(VIT, pretrained=False, num_classes=5, img_size=64, **IMG)  # other size, with head
    torch.save({"model": donor.state_dict()}, tmp_path / "vit.pth")
    model = make_model(tiny_tokenizer, image_tower_weights=str(tmp_path / "vit.pth"))
    own = model.image_tower.state_dict()
    torch.testing.assert_close(own["blocks.1.attn.qkv.weight"], donor.state_dict()["blocks.1.attn.qkv.weight"])
    assert own["pos_embed"].shape == (1, 1 + 4, 64)  # resampled from the 4x4 grid to 2x2
    assert "image_tower.blocks.0.mlp.fc1.weight" in model.pretrained_keys
    assert not any(k.startswith("head.") for k in own)

    same_size = timm.create_model(VIT, pretrained=False, num_classes=0, img_size=32, **IMG)
    save_file(same_size.state_dict(), str(tmp_path / "vit.safetensors"))
    model = make_model(tiny_tokenizer, image_tower_weights=str(tmp_path / "vit.safetensors"))
    for k, v in same_size.state_dict().items():
        assert torch.equal(model.image_tower.state_dict()[k], v), k

    torch.save({"model": {"blocks.0.foo": torch.zeros(2)}}, tmp_path / "bad.pth")
    for bad in (tmp_path / "bad.pth", tmp_path / "missing.pth"):
        with pytest.raises(UserError, match="--image_tower_weights"):
            make_model(tiny_tokenizer, image_tower_weights=str(bad))
    with pytest.raises(UserError, match="--image_tower"):
        build_dual_encoder("not_a_timm_model", "ours", vocab_size=10)


def test_lora_and_checkpoint_round_trip(tiny_tokenizer, tmp_path):
    import timm

    torch.save(timm.create_model(VIT, pretrained=False, num_classes=0, img_size=32, **IMG).state_dict(),
               tmp_path / "vit.pth")
    torch.manual_seed(2)
    model = make_model(tiny_tokenizer, "siglip", image_tower_weights=str(tmp_path / "vit.pth"))
    groups = model.configure_trainable(MODE, lora_rank=2, reg_loss_weight=1.0)
    # the pretrained image tower adapts through LoRA only; the text tower (from scratch) trains fully
    assert groups["lora"] and all(n.startswith("image_tower.blocks.") for n in groups["lora"])
    assert groups["image"] == ["itc_image_proj.weight"] and groups["text"]
    for losses in train_steps(model, tiny_tokenizer, steps=2):
        pass
    out = pretrain_model(model, MODE)(make_batch(tiny_tokenizer))
    assert out["reg_loss"] > 0 and torch.isfinite(out["loss"])
    out["loss"].backward()
    grads_by_tower(model)

    path = tmp_path / "ckpt.pth"
    torch.save({"model": model.state_dict(), "model_config": model.config,
                "provided_keys": model.pretrained_keys}, path)
    ckpt = torch.load(path, weights_only=True)
    rebuilt = dual_encoder_from_config(ckpt["model_config"])
    assert same_architecture(rebuilt.config, model.config)
    rebuilt.configure_trainable(MODE, lora_rank=2, provided_keys=ckpt["provided_keys"], reg_loss_weight=1.0)
    rebuilt.load_state_dict(ckpt["model"])
    model.eval(), rebuilt.eval()
    batch = make_batch(tiny_tokenizer, seed=5)
    with torch.no_grad():
        assert torch.equal(model.encode_image(batch["images"]), rebuilt.encode_image(batch["images"]))
        assert torch.equal(model.encode_text(batch["text_ids"], batch["text_masks"]),
                           rebuilt.encode_text(batch["text_ids"], batch["text_masks"]))


def test_missing_transformers_is_a_user_error(tmp_path, monkeypatch):
    from custom_datasets.hf_tokenizer import HFTokenizer

    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    with pytest.raises(UserError, match="pip install transformers"):
        HFTokenizer(tmp_path)
    with pytest.raises(UserError, match="pip install transformers"):
        build_dual_encoder(VIT, str(tmp_path), img_size=32, image_tower_kwargs=IMG)


def _tiny_bert_folder(folder, tokens):
    transformers = pytest.importorskip("transformers")
    folder.mkdir()
    (folder / "vocab.txt").write_text("".join(t + "\n" for t in tokens), encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "BertTokenizer", "do_lower_case": True, "model_max_length": 64}))
    config = transformers.BertConfig(vocab_size=len(tokens), hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(3)
    bert = transformers.BertModel(config)
    bert.save_pretrained(folder)
    return transformers, bert


def test_hf_text_tower_and_tokenizer(tiny_tokenizer, tmp_path):
    from custom_datasets.hf_tokenizer import HFTokenizer, tokenizer_from_any_state

    folder = tmp_path / "tiny-bert"
    transformers, bert = _tiny_bert_folder(folder, tiny_tokenizer.tokens)
    tok = HFTokenizer(folder, max_len=32)
    ids, masks = tok.encode_batch(CAPTIONS)
    reference = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)(
        CAPTIONS, padding=True, truncation=True, max_length=32, pad_to_multiple_of=8, return_tensors="pt")
    assert torch.equal(ids, reference["input_ids"]) and torch.equal(masks, reference["attention_mask"])
    ours = tiny_tokenizer.encode_batch(CAPTIONS)  # same vocabulary: the same BERT WordPiece ids
    assert torch.equal(ids, ours[0]) and torch.equal(masks, ours[1])
    assert (tok.vocab_size, tok.pad_id, tok.cls_id, tok.mask_id) == \
           (tiny_tokenizer.vocab_size, tiny_tokenizer.pad_id, tiny_tokenizer.cls_id, tiny_tokenizer.mask_id)
    assert tok.special_ids == tiny_tokenizer.special_ids

    model = make_model(tok, text_tower=str(folder))
    assert torch.equal(model.text_tower.model.embeddings.word_embeddings.weight,
                       bert.embeddings.word_embeddings.weight)
    assert not any("pooler" in n for n, _ in model.named_parameters())
    groups = model.configure_trainable(MODE, lock_image=True, lora_rank=2)  # SigLiT-style: BERT through LoRA
    assert "image" not in groups and any(".attention.self.query.lora_B" in n for n in groups["lora"])
    held_out = make_batch(tok, seed=99, n=4)
    with torch.no_grad():
        img_before = model.encode_image(held_out["images"])
    for losses in train_steps(model, tok):
        grads_by_tower(model)
    assert all(math.isfinite(x) for x in losses)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model.encode_image(held_out["images"]), img_before)

    # the checkpoint alone (config, state, tokenizer state) rebuilds both, without the folder
    ckpt_path = tmp_path / "ckpt.pth"
    torch.save({"model": model.state_dict(), "model_config": model.config, "tokenizer": tok.to_state(),
                "provided_keys": model.pretrained_keys}, ckpt_path)
    folder.rename(tmp_path / "moved")
    ckpt = torch.load(ckpt_path, weights_only=True)
    tok2 = tokenizer_from_any_state(ckpt["tokenizer"])
    assert torch.equal(tok2.encode_batch(CAPTIONS)[0], ids)
    assert torch.equal(pickle.loads(pickle.dumps(tok)).encode_batch(CAPTIONS)[0], ids)  # data-loader workers
    assert tokenizer_from_any_state(tiny_tokenizer.to_state()).vocab_size == tiny_tokenizer.vocab_size
    rebuilt = dual_encoder_from_config(ckpt["model_config"])
    rebuilt.configure_trainable(MODE, lock_image=True, lora_rank=2, provided_keys=ckpt["provided_keys"])
    rebuilt.load_state_dict(ckpt["model"])
    rebuilt.eval()
    with torch.no_grad():
        assert torch.equal(rebuilt.encode_text(held_out["text_ids"], held_out["text_masks"]),
                           model.encode_text(held_out["text_ids"], held_out["text_masks"]))
    with pytest.raises(UserError, match="--text_tower"):
        make_model(tok, text_tower=str(folder))  # the folder is gone
