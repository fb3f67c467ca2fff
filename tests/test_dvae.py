"""DALL-E dVAE encoder: the original pickled layout loads without the dall_e package and gives the
reference tokens; safetensors round trip; any other class in a pickle is refused."""
import collections
import os
import sys

import pytest
import torch

from models.dvae import DVAEEncoder, DVAETokenizer, load_dvae_encoder, map_pixels, read_dvae_pickle
from util.convert_dvae import main as convert_main
from util.errors import UserError

SMALL = dict(n_hid=64, n_blk_per_group=1, vocab_size=512)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A random-init dall_e Encoder pickled whole (zip and legacy torch formats, like encoder.pkl)
    plus its logits and tokens on random images."""
    dall_e_encoder = pytest.importorskip("dall_e.encoder", reason="test-only dependency DALL-E not installed")
    from dall_e.utils import map_pixels as dall_e_map_pixels

    torch.manual_seed(0)
    enc = dall_e_encoder.Encoder(**SMALL)
    with torch.no_grad():  # the original inits biases to zero: make them matter for the comparison
        for name, p in enc.named_parameters():
            if name.endswith(".b"):
                p.normal_(0.0, 0.01)
    root = tmp_path_factory.mktemp("dvae")
    torch.save(enc, root / "encoder.pkl")
    torch.save(enc, root / "encoder_legacy.pkl", _use_new_zipfile_serialization=False)
    # Blocky images: white noise through a random net gives nearly the same token everywhere.
    images = torch.nn.functional.interpolate(torch.rand(4, 3, 4, 4), size=32, mode="nearest")
    with torch.no_grad():
        logits = enc(dall_e_map_pixels(images))
    return {"root": root, "images": images, "logits": logits, "tokens": logits.argmax(1).flatten(1)}


@pytest.fixture
def no_dall_e(monkeypatch):
    """Make any import of the dall_e package fail, to show loading does not need it."""
    for name in ("dall_e", "dall_e.encoder", "dall_e.utils", "dall_e.decoder"):
        monkeypatch.setitem(sys.modules, name, None)


@pytest.mark.parametrize("name", ["encoder.pkl", "encoder_legacy.pkl"])
def test_original_pickle_gives_reference_tokens(reference, no_dall_e, name):
    assert reference["tokens"].unique().numel() >= 8  # a test that compares near-constant ids could not fail
    encoder = load_dvae_encoder(str(reference["root"] / name))
    assert encoder.config == {**SMALL, "group_count": 4, "input_channels": 3}
    with torch.no_grad():
        torch.testing.assert_close(encoder(map_pixels(reference["images"])), reference["logits"],
                                   rtol=0, atol=1e-6)
    tokens = DVAETokenizer(encoder)(reference["images"])
    assert tokens.dtype == torch.long and tokens.shape == (4, 16)
    assert torch.equal(tokens, reference["tokens"])


def test_safetensors_round_trip(reference, no_dall_e, tmp_path, capsys):
    dst = tmp_path / "out" / "encoder.safetensors"
    assert convert_main(["--src", str(reference["root"] / "encoder.pkl"), "--dst", str(dst)]) == 0
    assert "wrote" in capsys.readouterr().out
    from_pkl = load_dvae_encoder(str(reference["root"] / "encoder.pkl"))
    from_st = load_dvae_encoder(str(dst))
    assert from_st.config == from_pkl.config
    a, b = from_pkl.state_dict(), from_st.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(DVAETokenizer(from_st)(reference["images"]), reference["tokens"])


class _RunsShell:
    def __reduce__(self):
        return (os.system, ("touch dvae_pwned",))


@pytest.mark.parametrize("payload, named", [
    (lambda: {"w": torch.zeros(1), "evil": _RunsShell()}, "system"),
    (lambda: collections.Counter(a=1), "collections.Counter"),
    (lambda: torch.nn.Linear(2, 2), "torch.nn.modules.linear.Linear"),
])
def test_other_classes_are_refused(tmp_path, monkeypatch, payload, named):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "bad.pkl"
    torch.save(payload(), path)
    with pytest.raises(UserError) as err:
        read_dvae_pickle(str(path))
    assert str(path) in str(err.value) and named in str(err.value)
    assert not (tmp_path / "dvae_pwned").exists()


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(UserError, match="not found.*--mim_target pixel"):
        load_dvae_encoder(str(tmp_path / "encoder.pkl"))
    junk = tmp_path / "junk.pkl"
    junk.write_text("not a pickle")
    with pytest.raises(UserError, match="junk.pkl"):
        load_dvae_encoder(str(junk))
    partial = tmp_path / "partial.pkl"  # a state dict that is not a dVAE encoder
    torch.save({"blocks.input.w": torch.zeros(8, 3, 7, 7)}, partial)
    with pytest.raises(UserError, match="partial.pkl"):
        load_dvae_encoder(str(partial))


def test_published_architecture_on_meta():
    with torch.device("meta"):
        enc = DVAEEncoder()
        logits = enc(torch.empty(2, 3, 112, 112))
    assert logits.shape == (2, 8192, 14, 14)
    shapes = {k: tuple(v.shape) for k, v in enc.state_dict().items()}
    assert shapes["blocks.input.w"] == (256, 3, 7, 7)
    assert "blocks.group_1.block_1.id_path.w" not in shapes  # same width: identity path
    assert shapes["blocks.group_2.block_1.id_path.w"] == (512, 256, 1, 1)
    assert shapes["blocks.group_4.block_2.res_path.conv_1.w"] == (512, 2048, 3, 3)
    assert shapes["blocks.output.conv.w"] == (8192, 2048, 1, 1)
    assert 53e6 < sum(v.numel() for v in enc.state_dict().values()) < 55e6
    assert enc.blocks.group_1.block_1.post_gain == 1 / 64


def test_tokenizer_is_frozen_float32_and_ignores_autocast():
    torch.manual_seed(0)
    tok = DVAETokenizer(DVAEEncoder(**SMALL))
    tok.train()
    assert not tok.training and not any(p.requires_grad for p in tok.parameters())
    images = torch.rand(2, 3, 32, 32)
    plain = tok(images)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(tok(images), plain)
    assert plain.shape == (2, 16) and plain.dtype == torch.long and tok.vocab_size == 512
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        DVAETokenizer(DVAEEncoder(**SMALL))(images * 2 - 1)  # normalised images: wrong input
