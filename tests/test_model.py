"""Backbone: shapes, SDPA vs plain attention, which parameters train per mode, LoRA and self-regularization."""
import math

import pytest
import torch

from custom_datasets.masking_generator import masked_positions

from models.lora import LoRALinear
from models.registry import create_model
from models.relative_position import build_relative_position_index, num_relative_buckets
from modes.base import pretrain_model
from models.trainable import configure_trainable, on_mode_path

VOCAB = 50


def tiny(**kw):
    torch.manual_seed(0)
    return create_model("vlmo_tiny_patch16", vocab_size=VOCAB, **kw)


def batch(mode, b=3, length=7, img=32):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, VOCAB, (b, length), generator=g)
    masks = torch.ones(b, length, dtype=torch.long)
    masks[1, 4:] = 0
    if mode == "text_mlm":
        labels = torch.full((b, length), -100)
        labels[:, 1] = ids[:, 1]
        labels[0, 3] = ids[0, 3]
        positions, count = masked_positions(labels != -100)  # what MLMCollator adds
        return {"text_ids": ids, "text_masks": masks, "text_labels": labels, "mlm_positions": positions,
                "mlm_count": count}
    images = torch.randn(b, 3, img, img, generator=g)
    if mode == "image_mim":
        n = (img // 16) ** 2
        mask = torch.zeros(b, n, dtype=torch.bool)
        mask[:, :2] = True
        positions, count = masked_positions(mask)  # what collate_image_batch adds
        return {"images": images, "bool_masked_pos": mask, "mim_labels": torch.randint(0, 8192, (b, n), generator=g),
                "mim_positions": positions, "mim_count": count}
    return {"images": images, "text_ids": ids, "text_masks": masks}


def test_shapes_and_relative_position_buckets():
    assert num_relative_buckets((14, 14)) == 732
    idx = build_relative_position_index((14, 14))
    assert idx.shape == (197, 197) and idx.max() == 731 and idx[0, 0] == 731
    m = tiny()
    assert m.forward_image_features(torch.randn(2, 3, 32, 32)).shape == (2, 5, 64)
    ids, masks = torch.randint(5, VOCAB, (2, 9)), torch.ones(2, 9, dtype=torch.long)
    assert m.forward_text_features(ids, masks).shape == (2, 9, 64)
    assert m.encode_image(torch.randn(2, 3, 32, 32)).norm(dim=-1).allclose(torch.ones(2))
    assert m.encode_text(ids, masks).shape == (2, 64)


@pytest.mark.parametrize("name,dim,depth,heads,vl_start", [
    ("vlmo_small_patch16", 384, 12, 6, 10), ("vlmo_base_patch16", 768, 12, 12, 10),
    ("vlmo_large_patch16", 1024, 24, 16, 21)])
def test_published_sizes_on_meta(name, dim, depth, heads, vl_start):
    with torch.device("meta"):
        m = create_model(name)
    assert len(m.blocks) == depth and m.blocks[0].attn.num_heads == heads
    assert m.patch_embed.proj.weight.shape == (dim, 3, 16, 16)
    assert m.text_embeddings.word_embeddings.weight.shape == (30522, dim)
    assert m.blocks[0].attn.relative_position_bias_table.shape == (732, heads)
    has_vl = [hasattr(b, "mlp_vl") for b in m.blocks]
    assert has_vl == [i >= vl_start for i in range(depth)]
    gamma = m.blocks[0].gamma_1
    assert gamma.shape == (dim,)
    backbone = sum(p.numel() for n, p in m.named_parameters() if not n.startswith(("mlm_head", "mim_head", "itc_")))
    # VLMo paper: base 175M, large 562M parameters (multiway backbone with embeddings).
    expected = {"vlmo_base_patch16": 175e6, "vlmo_large_patch16": 562e6}.get(name)
    if expected:
        assert abs(backbone - expected) / expected < 0.02


@pytest.mark.parametrize("layout,text_pos", [("multiway", "absolute"), ("shared", "absolute"),
                                             ("multiway", "relative")])
def test_sdpa_equals_plain_attention(layout, text_pos):
    """The SDPA path (float relative bias with padding folded in as -inf, or a boolean padding mask) equals the
    plain softmax(QK^T + bias)V oracle for image, text and fused sequences."""
    m = tiny(ffn_layout=layout, text_pos=text_pos, token_type_embed=text_pos == "relative").eval()
    for blk in m.blocks:  # non-zero relative position biases and q/v biases so the test can fail
        for name in ("relative_position_bias_table", "text_relative_position_bias_table", "q_bias", "v_bias"):
            if hasattr(blk.attn, name):
                torch.nn.init.normal_(getattr(blk.attn, name), std=0.5)
    img = torch.randn(2, 3, 32, 32)
    ids, masks = torch.randint(5, VOCAB, (2, 8)), torch.ones(2, 8, dtype=torch.long)
    masks[0, 5:] = 0

    def outputs():
        return (m.forward_image_features(img), m.forward_text_features(ids, masks),
                m.forward_fused_features(ids, masks, img))
    sdpa = outputs()
    m.math_attention = True
    for got, ref in zip(sdpa, outputs()):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_padding_does_not_change_real_tokens():
    m = tiny().eval()
    ids = torch.randint(5, VOCAB, (1, 6))
    short = m.forward_text_features(ids, torch.ones(1, 6, dtype=torch.long))
    padded_ids = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], 1)
    padded_mask = torch.cat([torch.ones(1, 6, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long)], 1)
    padded = m.forward_text_features(padded_ids, padded_mask)
    torch.testing.assert_close(padded[:, :6], short, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", ["multiway", "shared"])
@pytest.mark.parametrize("mode", ["text_mlm", "image_mim", "image_text_itc"])
def test_mode_path_gets_gradients_and_the_rest_is_frozen(layout, mode):
    m = tiny(ffn_layout=layout)
    configure_trainable(m, mode)
    out = pretrain_model(m, mode)(batch(mode))
    out["loss"].backward()
    for name, p in m.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"{name} is trainable in {mode} but got no gradient"
        else:
            assert p.grad is None
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in m.named_parameters() if on_mode_path(n, mode)}
    assert not any("mlp_vl" in n or "norm2_vl" in n for n in trainable)  # VL experts wait for fused objectives
    if layout == "multiway":
        other = "mlp_imag" if mode == "text_mlm" else "mlp_text" if mode == "image_mim" else None
        if other:
            assert not any(other in n for n in trainable)


def test_lora_only_on_provided_weights_and_fresh_adapters_change_nothing():
    m = tiny(ffn_layout="shared").eval()
    ids, masks = torch.randint(5, VOCAB, (2, 8)), torch.ones(2, 8, dtype=torch.long)
    before = m.forward_text_features(ids, masks)
    provided = [n for n in m.state_dict() if not n.startswith(("text_embeddings", "mlm_head"))]
    groups = configure_trainable(m, "text_mlm", lora_rank=4, provided_keys=provided)
    after = m.forward_text_features(ids, masks)
    assert torch.equal(before, after)
    adapted = {n for n, mod in m.named_modules() if isinstance(mod, LoRALinear) and mod.has_lora}
    assert adapted == {f"blocks.{i}.{x}" for i in range(2) for x in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")}
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert all(n not in provided for n in trainable)  # provided weights are frozen
    assert any(n.startswith("text_embeddings") for n in trainable) and any(".lora_A" in n for n in trainable)
    assert set(groups) >= {"lora", "text", "head"}
    assert m.blocks[0].mlp.fc1.lora_scale == pytest.approx(1 / 4)


def test_lora_forward_matches_merged_weight():
    torch.manual_seed(0)
    layer = LoRALinear(6, 5)
    layer.enable_lora(3, alpha=2.0)
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(4, 6)
    expected = x @ (layer.weight + layer.lora_B @ layer.lora_A * (2.0 / 3)).T + layer.bias
    torch.testing.assert_close(layer(x), expected)
    layer.merge_lora()
    assert not layer.has_lora and "lora_A" not in layer.state_dict()
    torch.testing.assert_close(layer(x), expected)


def test_self_regularization_equals_hand_computation():
    m = tiny(ffn_layout="shared")
    provided = list(m.state_dict())
    configure_trainable(m, "text_mlm", lora_rank=2, provided_keys=provided, reg_loss_weight=10.0)
    layers = [mod for mod in m.modules() if isinstance(mod, LoRALinear) and mod.has_lora]
    for mod in layers:
        torch.nn.init.normal_(mod.lora_B, std=0.1)
    hand = 0.0
    for mod in layers:
        w0, a, b = mod.weight.detach().double(), mod.lora_A.detach().double(), mod.lora_B.detach().double()
        delta = (b @ a) * (1.0 / 2)
        hand += sum((w0[i, j] * delta[i, j]) ** 2 for i in range(w0.shape[0]) for j in range(w0.shape[1]))
    torch.testing.assert_close(m.self_regularization_loss().double().detach(), (10.0 * hand).clone(), rtol=1e-5, atol=0)
    out = pretrain_model(m, "text_mlm")(batch("text_mlm"))
    assert "reg_loss" in out and math.isclose(out["reg_loss"].item(), 10.0 * hand, rel_tol=1e-5)


def test_lock_image_keeps_image_path_fixed():
    m = tiny()
    provided = list(m.state_dict())
    configure_trainable(m, "image_text_itc", lora_rank=2, provided_keys=provided, lock_image=True)
    for mod in m.modules():
        if isinstance(mod, LoRALinear) and mod.has_lora:
            torch.nn.init.normal_(mod.lora_B)
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    assert trainable and not any(n.startswith(("patch_embed", "itc_image_proj", "cls_token")) or "_imag" in n
                                 for n in trainable)
    fresh = tiny()
    img = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(m.encode_image(img), fresh.encode_image(img))


def test_off_path_weights_are_parked_and_saved_whole():
    """image_mim: the text experts, text embeddings, VL experts and other heads leave the model (DDP and the
    device never see them) and come back, unchanged, for the checkpoint's state dict."""
    from models.parking import park_off_path

    m = tiny()
    configure_trainable(m, "image_mim")
    full = {k: v.clone() for k, v in m.state_dict().items()}
    parked = park_off_path(m, "image_mim")
    assert {"text_embeddings", "mlm_head", "itc_text_proj", "blocks.0.mlp_text", "blocks.1.mlp_vl"} <= \
        set(parked.names)
    assert not any(n.startswith(("text_embeddings", "mlm_head")) or "mlp_text" in n for n, _ in m.named_parameters())
    assert "blocks.0.mlp_imag.fc1.weight" in dict(m.named_parameters()) and parked.num_parameters() > 0
    step = pretrain_model(m, "image_mim")
    step(batch("image_mim"))["loss"].backward()  # the mode's step runs without them
    with parked.attached():
        inside = m.state_dict()
    assert set(inside) == set(full) and all(torch.equal(inside[k], full[k]) for k in full if "mim_head" not in k)
    assert set(m.state_dict()) < set(full)


@pytest.mark.parametrize("every", [1, 2])
@pytest.mark.parametrize("mode", ["image_mim", "text_mlm", "image_text_itc"])
def test_grad_checkpointing_gives_the_same_gradients(mode, every, monkeypatch):
    """Every (or every 2nd) block recomputed in the backward, drop path on (the RNG replays): the same loss and
    gradients as without checkpointing."""
    import models.checkpointing as ac

    calls, checkpoint = [], ac.cp.checkpoint
    monkeypatch.setattr(ac.cp, "checkpoint", lambda *a, **k: calls.append(1) or checkpoint(*a, **k))
    set_grad_checkpointing = ac.set_grad_checkpointing
    grads = []
    for on in (0, every):
        torch.manual_seed(0)
        m = tiny(drop_path_rate=0.2, depth=4, vl_start=4).train()
        set_grad_checkpointing(m, on)
        step = pretrain_model(m, mode)
        torch.manual_seed(1)
        step(batch(mode))["loss"].backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    towers = 2 if mode == "image_text_itc" else 1
    assert len(calls) == towers * 4 // every  # 4 blocks per tower, every `every`-th checkpointed
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-6, rtol=1e-5, msg=n)


def test_our_init_and_drop_path_draw_what_timms_draw():
    """models/layers.py replaces timm's trunc_normal_ and DropPath (importing timm.layers costs ~4 s per process):
    the same random stream gives the same tensors."""
    import timm.layers

    from models.layers import DropPath, trunc_normal_
    for std, a, b in ((0.02, -2.0, 2.0), (0.05, -0.1, 0.1)):
        ours, theirs = torch.empty(64, 48), torch.empty(64, 48)
        torch.manual_seed(1)
        timm.layers.trunc_normal_(theirs, std=std, a=a, b=b)
        torch.manual_seed(1)
        trunc_normal_(ours, std=std, a=a, b=b)
        assert torch.equal(ours, theirs)
    x = torch.randn(16, 5, 8)
    torch.manual_seed(2)
    theirs = timm.layers.DropPath(0.3)(x)
    torch.manual_seed(2)
    ours = DropPath(0.3)(x)
    assert torch.equal(ours, theirs) and not torch.equal(ours, x)
    assert torch.equal(DropPath(0.3).eval()(x), x)
