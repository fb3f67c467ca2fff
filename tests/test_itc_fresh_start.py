"""image_text_itc from random initialisation: the pooled embeddings depend on the input at init, a fresh SigLIP
bias starts at the prior of the global batch, the training view and the evaluation view are the user's to set,
the console warns when the loss stays at chance, and checkpoints that predate the image position embedding
still load as they were trained."""
import argparse
import math

import numpy as np
import pytest
import torch
from PIL import Image

import util.itc_monitor as itc_monitor
from custom_datasets.image_dataset import ResizedCropView
from main_pretrain_cook import model_overrides, parse_args
from models.contrastive import embedding_spread, siglip_chance_loss, siglip_prior_bias
from models.loading import load_weights, model_for_resume
from models.registry import create_model, model_from_config, switches_of
from models.trainable import configure_trainable
from modes import get_mode
from modes.image_text_itc import ImageTextITC, fresh_image_pos_gain
from util.errors import UserError


def test_embedding_spread_is_one_minus_the_mean_offdiagonal_cosine():
    x = torch.nn.functional.normalize(torch.randn(9, 5), dim=-1)
    sim = x @ x.t()
    direct = 1 - (sim.sum() - sim.diagonal().sum()) / (9 * 8)
    torch.testing.assert_close(embedding_spread(x), direct)
    assert float(embedding_spread(x[:1].expand(6, -1))) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("pool", ["cls", "mean"])
@pytest.mark.parametrize("width,depth", [(64, 2), (128, 4)])
def test_fresh_pooled_embeddings_depend_on_the_input(pool, width, depth):
    """The old init (std 0.02, BEiT's rescale, layer scale 0.1) gave a spread of 0.0004 (image) and 0.0000
    (text) at width 128: a constant CLS embedding, the loss at ln(B) with zero gradient."""
    torch.manual_seed(0)
    m = create_model("vlmo_tiny_patch16", embed_dim=width, depth=depth, num_heads=2, img_size=64, patch_size=8,
                     vocab_size=100, vl_start=depth, itc_pool=pool).eval()
    images = torch.randn(32, 3, 64, 64)
    ids = torch.randint(3, 100, (32, 12))
    ids[:, 0] = 2  # every text starts with the same [CLS] id, as the tokenizer writes it
    with torch.no_grad():
        img, txt = m.encode_image(images), m.encode_text(ids, torch.ones_like(ids))
    assert float(embedding_spread(img)) > 0.05
    assert float(embedding_spread(txt)) > 0.003


def test_siglip_bias_starts_at_the_prior_unless_a_checkpoint_provides_it():
    mode = ImageTextITC(argparse.Namespace(siglip_bias_init="prior"))
    m = create_model("vlmo_tiny_patch16", itc_loss="siglip")
    mode.init_fresh(m, set(), 64)
    assert float(m.logit_bias.detach()) == pytest.approx(-math.log(63)) == pytest.approx(siglip_prior_bias(64))
    with torch.no_grad():
        m.logit_bias.fill_(-3.0)
    mode.init_fresh(m, {"logit_bias"}, 64)  # loaded (resume, a pretrained ITC checkpoint): kept
    assert float(m.logit_bias.detach()) == -3.0
    ImageTextITC(argparse.Namespace(siglip_bias_init=-10.0)).init_fresh(m, set(), 64)
    assert float(m.logit_bias.detach()) == -10.0
    clip = create_model("vlmo_tiny_patch16")
    mode.init_fresh(clip, set(), 64)  # nothing to do for CLIP
    assert not hasattr(clip, "logit_bias")


def test_siglip_prior_is_where_the_bias_gradient_vanishes():
    """At init the cosines are ~0, so every logit is ~b: the loss' gradient on b is zero at the prior, and the
    loss there is siglip_chance_loss."""
    for g in (16, 64, 1024):
        b = torch.tensor(siglip_prior_bias(g), dtype=torch.float64, requires_grad=True)
        signs = -torch.ones(g, dtype=torch.float64)
        signs[0] = 1
        loss = -torch.nn.functional.logsigmoid(signs * b).sum()
        loss.backward()
        assert abs(float(b.grad)) < 1e-9
        assert float(loss.detach()) == pytest.approx(siglip_chance_loss(g))


def _itc_args(demo_data, *extra):
    return parse_args(["--exp_name", "image_text_itc", "--data_path", str(demo_data["pairs_train"]), *extra])


def test_itc_defaults_and_flag_checks(demo_data):
    args = _itc_args(demo_data)
    assert args.clip_grad == 1.0 and args.itc_flip_prob == 0.0 and args.siglip_bias_init == "prior"
    assert _itc_args(demo_data, "--clip_grad", "0").clip_grad == 0.0  # off, as asked
    assert _itc_args(demo_data, "--siglip_bias_init", "-10").siglip_bias_init == -10.0
    mlm = parse_args(["--exp_name", "text_mlm", "--data_path", str(demo_data["captions_train"])])
    assert mlm.clip_grad is None
    for flag, value in (("--itc_flip_prob", "1.5"), ("--itc_crop_min_scale", "0"), ("--siglip_bias_init", "x"),
                        ("--eval_crop_pct", "1.2")):
        with pytest.raises(UserError, match=flag):
            _itc_args(demo_data, flag, value)


def test_crop_view_flips_only_with_its_probability():
    pixels = np.zeros((16, 16, 3), dtype=np.uint8)
    pixels[:, :4] = 255  # bright left edge: a flip moves it right
    img, rng = Image.fromarray(pixels), np.random.default_rng(0)
    never = ResizedCropView(16, [0.5] * 3, [0.5] * 3, scale=(1.0, 1.0), hflip=0.0)
    always = ResizedCropView(16, [0.5] * 3, [0.5] * 3, scale=(1.0, 1.0), hflip=1.0)
    for _ in range(5):
        a, b = never(img, rng), always(img, rng)
        assert a[:, :, 0].mean() > a[:, :, -1].mean() and b[:, :, -1].mean() > b[:, :, 0].mean()
        torch.testing.assert_close(a.flip(-1), b)


def test_stuck_warning_once_per_stretch_with_the_spread(monkeypatch):
    lines = []
    monkeypatch.setattr(itc_monitor.LOG, "warning", lines.append)
    mon = itc_monitor.ContrastiveMonitor()
    chance = torch.tensor(math.log(64))
    stats = {"chance_loss": float(chance), "image_spread": 0.0002, "text_spread": 0.0}

    def steps(n, loss):
        for _ in range(n):
            mon.observe([{}], {"itc_loss": torch.tensor(loss), "chance_loss": chance})

    steps(99, float(chance) * 1.005)
    mon.report(dict(stats), 99)
    assert lines == []  # 99 steps: not yet
    steps(1, float(chance))
    mon.report(dict(stats), 100)
    assert len(lines) == 1 and "100 steps" in lines[0] and "image 0.0002" in lines[0] and "--itc_pool" in lines[0]
    steps(50, float(chance))
    mon.report(dict(stats), 150)
    assert len(lines) == 1  # one line per stuck stretch
    steps(1, float(chance) * 0.9)  # left chance
    mon.report(dict(stats), 151)
    steps(100, float(chance))
    mon.report(dict(stats), 251)
    assert len(lines) == 2


def test_duplicate_fraction_is_over_the_window_of_global_batches():
    mon = itc_monitor.ContrastiveMonitor()
    chance = torch.tensor(1.0)
    for hashes in ([1, 2, 3, 4], [5, 5, 5, 6]):  # 0 and 2/4 duplicates
        mon.observe([{"caption_hash": torch.tensor(hashes[:2])}, {"caption_hash": torch.tensor(hashes[2:])}],
                    {"itc_loss": chance, "chance_loss": chance})
    stats = {}
    mon.report(stats, 2)
    assert stats["duplicate_captions"] == pytest.approx(0.25)


def test_image_position_embedding_is_zero_at_init_resized_and_absent_from_older_checkpoints(tmp_path):
    m = create_model("vlmo_tiny_patch16")
    assert m.image_pos_embed.shape == (1, 4, 64) and not m.image_pos_embed.any()
    with torch.no_grad():
        m.image_pos_embed.normal_()
    bigger = create_model("vlmo_tiny_patch16", img_size=64)
    report = load_weights(bigger, m.state_dict(), "ckpt.pth", ckpt_config=m.config)
    assert "image_pos_embed" in report["resized"] and bigger.image_pos_embed.shape == (1, 16, 64)
    old = create_model("vlmo_tiny_patch16", image_pos_embed=False)
    legacy = {k: v for k, v in old.config.items() if k != "image_pos_embed"}  # written before the key existed
    rebuilt = model_from_config(legacy)
    assert rebuilt.image_pos_embed is None
    rebuilt.load_state_dict(old.state_dict())  # strict
    resumed = model_for_resume(legacy, "vlmo_tiny_patch16", {}, "old.pth")
    resumed.load_state_dict(old.state_dict())


def test_a_checkpoint_made_at_another_position_gain_computes_what_it_was_trained_to():
    """image_pos_embed is stored divided by the model's image_pos_gain (10 in configs that predate the key):
    resuming keeps the checkpoint's gain, weights loaded into a model of another gain are rescaled."""
    old = create_model("vlmo_tiny_patch16").eval()
    with torch.no_grad():
        old.image_pos_embed.normal_()
    legacy = {k: v for k, v in old.config.items() if k != "image_pos_gain"}  # written before the key existed
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = old.forward_image_features(images)
        resumed = model_for_resume(legacy, "vlmo_tiny_patch16", {}, "old.pth").eval()
        assert resumed.config["image_pos_gain"] == old.config["image_pos_gain"] == 10.0
        resumed.load_state_dict(old.state_dict())
        torch.testing.assert_close(resumed.forward_image_features(images), want)
        fresh = create_model("vlmo_tiny_patch16", image_pos_gain=30.0).eval()
        load_weights(fresh, old.state_dict(), "old.pth", ckpt_config=legacy)
        torch.testing.assert_close(fresh.forward_image_features(images), want)
        assert not torch.equal(fresh.image_pos_embed, old.image_pos_embed)
    assert model_for_resume(fresh.config, "vlmo_tiny_patch16", {}, "new.pth").config["image_pos_gain"] == 30.0


def test_a_fresh_model_takes_the_position_gain_of_its_lr_and_a_loaded_one_the_registrys(demo_data):
    """image_text_itc: gain = 0.03 / peak lr within [10, 30] for a fresh model; --model_kwargs wins; weights
    loaded (BEiT, an earlier stage) keep the registry's 10, their stored positions rescaled to it by the loader,
    and so does every other mode."""
    assert [fresh_image_pos_gain(lr) for lr in (1e-3, 2e-3, 3e-3, 1e-2, 1e-4, 0.0)] == pytest.approx(
        [30, 15, 10, 10, 30, 30])
    logged = []
    fresh_image_pos_gain(1e-3, logged.append)
    assert len(logged) == 1 and "image_pos_gain 30" in logged[0] and "--model_kwargs" in logged[0]

    def gain(fresh, *extra, mode="image_text_itc", data="pairs_train"):
        args = parse_args(["--exp_name", mode, "--data_path", str(demo_data[data]), "--model", "vlmo_tiny_patch16",
                           *extra])
        tokenizer = argparse.Namespace(vocab_size=100)
        return model_overrides(args, tokenizer, get_mode(args.mode)(args), fresh).get("image_pos_gain")

    assert gain(True, "--lr", "1e-3") == pytest.approx(30.0)
    assert gain(True, "--lr", "1.5e-3") == pytest.approx(20.0)
    assert gain(False, "--lr", "1e-3") is None  # the registry's default
    assert gain(True, "--lr", "1e-3", "--model_kwargs", '{"image_pos_gain": 7}') == 7
    assert gain(True, "--lr", "1e-3", "--mim_target", "pixel", mode="image_mim", data="images_train") is None
    assert gain(True, "--lr", "1e-3", mode="text_mlm", data="captions_train") is None


def test_image_pre_norm_is_on_for_a_fresh_itc_model_only(demo_data):
    """image_text_itc turns the image tokens' LayerNorm on for a fresh model; a loaded one, --model_kwargs and
    every other mode keep the registry's (off: BEiT and VLMo weights have none)."""
    def pre_norm(fresh, *extra, mode="image_text_itc", data="pairs_train"):
        args = parse_args(["--exp_name", mode, "--data_path", str(demo_data[data]), "--model", "vlmo_tiny_patch16",
                           "--lr", "1e-3", *extra])
        overrides = model_overrides(args, argparse.Namespace(vocab_size=100), get_mode(args.mode)(args), fresh)
        m = create_model("vlmo_tiny_patch16", **overrides)
        local = m.config["image_rel_pos_init"] == "local"
        assert local == bool(m.blocks[0].attn.relative_position_bias_table.any())
        return m.image_pre_norm is not None, local

    assert pre_norm(True) == (True, True) and pre_norm(False) == (False, False)
    assert pre_norm(True, "--model_kwargs", '{"image_pre_norm": false, "image_rel_pos_init": "zero"}') == (
        False, False)
    assert pre_norm(True, mode="text_mlm", data="captions_train") == (False, False)
    assert pre_norm(True, "--mim_target", "pixel", mode="image_mim", data="images_train") == (False, False)
    assert create_model("vlmo_tiny_patch16").image_pre_norm is None


def test_locality_prior_is_minus_the_patch_distance_scaled_per_head():
    """image_rel_pos_init "local": the bias of head h between two patches is -2^-h x their Euclidean distance
    in patches (checked from the patches' coordinates, through the model's own bucket index); CLS rows and
    columns are 0. "zero" (the registry's, BEiT's) starts every table at 0; other values are refused."""
    m = create_model("vlmo_tiny_patch16", img_size=48, patch_size=16, num_heads=4, image_rel_pos_init="local")
    bias = m.blocks[1].attn.relative_position_bias().detach()  # [heads, 1 + 9, 1 + 9]
    rows, cols = torch.meshgrid(torch.arange(3.0), torch.arange(3.0), indexing="ij")
    xy = torch.stack([rows.flatten(), cols.flatten()], -1)
    dist = torch.cdist(xy, xy)
    for h in range(4):
        torch.testing.assert_close(bias[h, 1:, 1:], -dist / 2 ** h)
    assert not bias[:, 0].any() and not bias[:, :, 0].any()
    assert not create_model("vlmo_tiny_patch16").blocks[0].attn.relative_position_bias_table.any()
    with pytest.raises(ValueError, match="image_rel_pos_init"):
        create_model("vlmo_tiny_patch16", image_rel_pos_init="random")


def test_image_pre_norm_normalises_the_tokens_and_follows_the_checkpoint():
    """With the norm, every image token entering block 0 (CLS, masked and plain patches, positions added) has
    zero mean and unit variance; a checkpoint rebuilds with it or without it as it was trained, and a config
    written before the key means without."""
    torch.manual_seed(0)
    m = create_model("vlmo_tiny_patch16", image_pre_norm=True).eval()
    with torch.no_grad():
        m.image_pos_embed.normal_()
        m.cls_token.mul_(50)
        tokens = m.embed_image(torch.randn(3, 3, 32, 32), torch.tensor([[1, 0, 0, 1]] * 3))
    torch.testing.assert_close(tokens.mean(-1), torch.zeros(3, 5), atol=1e-5, rtol=0)
    torch.testing.assert_close(tokens.var(-1, unbiased=False), torch.ones(3, 5), atol=1e-3, rtol=0)
    for config, has in ((m.config, True), ({k: v for k, v in m.config.items() if k != "image_pre_norm"}, False)):
        assert (model_from_config(config).image_pre_norm is not None) == has
        resumed = model_for_resume(config, "vlmo_tiny_patch16", {}, "ckpt.pth")
        assert (resumed.image_pre_norm is not None) == has
    resumed = model_for_resume(m.config, "vlmo_tiny_patch16", {}, "ckpt.pth")
    resumed.load_state_dict(m.state_dict())  # strict
    assert switches_of(m.config)["image_pre_norm"] is True  # a weights file's own architecture decides
    configure_trainable(m, "text_mlm")
    assert not any(p.requires_grad for p in m.image_pre_norm.parameters())
    configure_trainable(m, "image_text_itc", lock_image=True)
    assert not any(p.requires_grad for p in m.image_pre_norm.parameters())
    configure_trainable(m, "image_text_itc")
    assert all(p.requires_grad for p in m.image_pre_norm.parameters())
