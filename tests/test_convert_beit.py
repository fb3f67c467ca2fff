"""BEiT -> VLMo converter against timm's Beit as the reference model (DESIGN.md section 8)."""
import pytest
import torch
from timm.models.beit import Beit

from models.registry import create_model, model_config
from util.convert_beit_ckpt import convert_beit_state_dict, main, summarize_keys
from util.errors import UserError

TINY = dict(img_size=32, patch_size=16, embed_dim=64, depth=2, num_heads=2, num_classes=10)
REL_LAYOUTS = {"per_layer": dict(use_rel_pos_bias=True), "shared": dict(use_shared_rel_pos_bias=True),
               "per_layer+shared": dict(use_rel_pos_bias=True, use_shared_rel_pos_bias=True)}


def _random_beit(seed=0, init_values=0.1, use_abs_pos_emb=False, **layout):
    """timm Beit with every tensor randomised (q/v biases and the zero-init tables included)."""
    torch.manual_seed(seed)
    model = Beit(use_abs_pos_emb=use_abs_pos_emb, init_values=init_values, **TINY, **layout).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_scale = name.endswith("norm1.weight") or name.endswith("norm2.weight") or name.endswith("norm.weight")
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if is_scale else 0.0))
    return model


def _beit_features(model, images):
    """timm's last block output, before any final norm, run through its own modules."""
    x = model.patch_embed(images)
    x = torch.cat([model.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
    if model.pos_embed is not None:
        x = x + model.pos_embed
    shared = model.rel_pos_bias() if model.rel_pos_bias is not None else None
    for block in model.blocks:
        x = block(x, shared_rel_pos_bias=shared)
    return x


def _convert(tmp_path, beit, *args, obj=None):
    src, dst = tmp_path / "beit.pth", tmp_path / "out" / "vlmo.pth"
    torch.save({"model": beit.state_dict()} if obj is None else obj, src)
    report = main(["--src", str(src), "--dst", str(dst), "--model", "vlmo_tiny_patch16", *args])
    return torch.load(dst, map_location="cpu", weights_only=True), report


@pytest.mark.parametrize("ffn_layout", ["multiway", "shared"])
@pytest.mark.parametrize("rel", list(REL_LAYOUTS))
def test_converted_model_matches_timm(tmp_path, capsys, rel, ffn_layout):
    beit = _random_beit(**REL_LAYOUTS[rel])
    ckpt, report = _convert(tmp_path, beit, "--ffn_layout", ffn_layout)
    assert ckpt["model_config"]["ffn_layout"] == ffn_layout and ckpt["source"].endswith("beit.pth")
    assert report["rel_pos"] == rel and report["resized"] is None
    out = capsys.readouterr().out
    assert "head.{bias,weight}" in out and "newly created" in out and "text_embeddings" in out

    model = create_model("vlmo_tiny_patch16", ffn_layout=ffn_layout).eval()
    result = model.load_state_dict(ckpt["model"], strict=False)
    assert result.unexpected_keys == []
    assert sorted(result.missing_keys) == report["created"]
    image_expert = "mlp_imag" if ffn_layout == "multiway" else "mlp"
    assert f"blocks.0.{image_expert}.fc1.weight" in ckpt["model"]
    assert not any(k.endswith("relative_position_index") for k in ckpt["model"])

    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_image_features(images), _beit_features(beit, images),
                                   rtol=0, atol=1e-5)


def test_no_layer_scale_and_copy_to_text(tmp_path):
    beit = _random_beit(init_values=None, use_rel_pos_bias=True)
    ckpt, report = _convert(tmp_path, beit, "--copy_mlp_to_text")
    assert [k for k, _ in report["filled"]] == [f"blocks.{i}.gamma_{j}" for i in range(2) for j in (1, 2)]
    sd = ckpt["model"]
    assert torch.equal(sd["blocks.1.mlp_text.fc2.weight"], sd["blocks.1.mlp_imag.fc2.weight"])
    assert torch.equal(sd["blocks.0.norm2_text.bias"], beit.state_dict()["blocks.0.norm2.bias"])
    model = create_model("vlmo_tiny_patch16").eval()
    model.load_state_dict(sd, strict=False)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_image_features(images), _beit_features(beit, images),
                                   rtol=0, atol=1e-5)


def test_resize_to_another_image_size(tmp_path):
    beit = _random_beit(use_shared_rel_pos_bias=True)
    ckpt, report = _convert(tmp_path, beit, "--img_size", "64")
    assert report["resized"] == [[2, 2], [4, 4]] and ckpt["model_config"]["img_size"] == 64
    table = ckpt["model"]["blocks.1.attn.relative_position_bias_table"]
    assert table.shape == ((2 * 4 - 1) ** 2 + 3, 2)
    shared = beit.state_dict()["rel_pos_bias.relative_position_bias_table"]
    assert torch.equal(table[-3:], shared[-3:])  # the CLS buckets are kept, not interpolated
    model = create_model("vlmo_tiny_patch16", img_size=64).eval()
    assert model.load_state_dict(ckpt["model"], strict=False).unexpected_keys == []
    assert model.forward_image_features(torch.randn(1, 3, 64, 64)).shape == (1, 17, 64)


@pytest.mark.parametrize("wrap", [
    lambda sd: {"module": sd},
    lambda sd: {"state_dict": {f"module.{k}": v for k, v in sd.items()}},
    lambda sd: {"model": sd, "epoch": 3, "args": None},
])
def test_nested_checkpoints(tmp_path, wrap):
    beit = _random_beit(use_rel_pos_bias=True)
    sd = beit.state_dict()
    config = create_model("vlmo_tiny_patch16").config
    plain, _ = convert_beit_state_dict({"model": sd}, config)
    nested, _ = convert_beit_state_dict(wrap(sd), config)
    assert plain.keys() == nested.keys() and all(torch.equal(plain[k], nested[k]) for k in plain)


def test_refuses_what_is_not_a_fitting_beit_checkpoint(tmp_path, monkeypatch):
    config = create_model("vlmo_tiny_patch16").config
    with pytest.raises(UserError, match="not a BEiT checkpoint"):
        convert_beit_state_dict({"model": {"encoder.weight": torch.zeros(2)}}, config, source="x.pth")
    with pytest.raises(UserError, match="no tensor dictionary"):
        convert_beit_state_dict({"model": "nothing"}, config)
    converted, _ = convert_beit_state_dict({"model": _random_beit(use_rel_pos_bias=True).state_dict()}, config)
    full = {**create_model("vlmo_tiny_patch16").state_dict(), **converted}
    with pytest.raises(UserError, match="already in this project's VLMo layout"):
        convert_beit_state_dict(full, config)
    deeper = Beit(use_abs_pos_emb=False, use_rel_pos_bias=True, **{**TINY, "depth": 3}).state_dict()
    with pytest.raises(UserError, match="3 blocks"):
        convert_beit_state_dict(deeper, config)
    wider = Beit(use_abs_pos_emb=False, use_rel_pos_bias=True, **{**TINY, "embed_dim": 32}).state_dict()
    with pytest.raises(UserError, match="--model"):
        convert_beit_state_dict(wider, config)

    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint")
    with pytest.raises(UserError, match="notes.pth"):
        main(["--src", str(text), "--dst", str(tmp_path / "o.pth"), "--model", "vlmo_tiny_patch16"])
    monkeypatch.chdir(tmp_path)  # the no-argument defaults name the seed's paths
    with pytest.raises(UserError, match="checkpoints/beit_base_patch16_224_pt22k_ft22kto1k.pth"):
        main([])
    with pytest.raises(UserError, match="--model"):
        main(["--src", str(text), "--model", "vlmo_huge"])


def test_absolute_position_embedding_converts_exactly(tmp_path):
    """BEiT's pos_embed: the CLS entry folds into cls_token, the patches' into image_pos_embed (stored / the gain);
    a model without image_pos_embed drops it with a warning."""
    beit = _random_beit(use_abs_pos_emb=True, use_rel_pos_bias=True)
    ckpt, report = _convert(tmp_path, beit)
    assert "image_pos_embed" in report["copied"] and not report["warnings"]
    model = create_model("vlmo_tiny_patch16").eval()
    model.load_state_dict(ckpt["model"], strict=False)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_image_features(images), _beit_features(beit, images),
                                   rtol=0, atol=1e-5)
    _, report = convert_beit_state_dict(beit.state_dict(), model_config("vlmo_tiny_patch16", image_pos_embed=False))
    assert ("pos_embed", "absolute position embedding: the model has none") in report["dropped"]
    assert any("absolute position" in w for w in report["warnings"])


def test_summarize_keys():
    keys = [f"blocks.{i}.mlp_text.fc1.{leaf}" for i in range(12) for leaf in ("weight", "bias")]
    assert summarize_keys(keys + ["logit_scale", "blocks.3.gamma_1"]) == [
        "blocks.3.gamma_1", "blocks.{0..11}.mlp_text.fc1.{bias,weight}", "logit_scale"]
