"""Weight-decay groups (util/optim_factory.py) and resuming an optimizer state saved with other groups."""
import torch

from models.dual_encoder import build_dual_encoder
from models.registry import create_model
from models.trainable import configure_trainable
from util.optim_factory import build_adamw, param_groups
from util.sharded_checkpoint import load_optimizer_state


def _decay_of(model):
    return {n: g["weight_decay"] for g in param_groups(model, 0.1) for n in g["param_names"]}


def test_multiway_decay_groups():
    model = create_model("vlmo_tiny_patch16", vocab_size=50, depth=2)
    configure_trainable(model, "text_mlm")
    decay = _decay_of(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(decay) == trainable
    for name in ("text_embeddings.word_embeddings.weight", "text_embeddings.position_embeddings.weight",
                 "blocks.0.attn.q_bias", "blocks.1.gamma_2", "blocks.0.norm1.weight", "blocks.0.mlp_text.fc1.bias"):
        assert decay[name] == 0.0, name
    decayed = [n for n in trainable if n.endswith(("attn.qkv.weight", "attn.proj.weight", "fc1.weight", "fc2.weight"))]
    assert decayed and all(decay[n] == 0.1 for n in decayed)
    assert any(decay[n] == 0.1 for n in trainable if n.startswith("mlm_head") and n.endswith("weight"))
    configure_trainable(model, "image_mim")
    decay = _decay_of(model)
    assert decay["patch_embed.proj.weight"] == 0.0 and decay["cls_token"] == 0.0
    assert decay["blocks.0.mlp_imag.fc1.weight"] == 0.1


def test_dual_encoder_decay_groups(tiny_tokenizer):
    model = build_dual_encoder("vit_tiny_patch16_224", "ours", embed_dim=16, img_size=32,
                               vocab_size=tiny_tokenizer.vocab_size, max_text_len=32,
                               image_tower_kwargs=dict(embed_dim=64, depth=2, num_heads=2),
                               text_tower_kwargs=dict(width=32, depth=2, heads=2))
    decay = _decay_of(model)
    assert decay["image_tower.patch_embed.proj.weight"] == 0.0
    assert decay["text_tower.embeddings.word_embeddings.weight"] == 0.0
    assert decay["logit_scale"] == 0.0
    assert decay["image_tower.blocks.0.attn.qkv.weight"] == 0.1
    assert any(v == 0.1 for n, v in decay.items() if n.startswith("text_tower.") and "fc1.weight" in n)


def test_resume_optimizer_state_saved_with_other_groups():
    """A checkpoint whose optimizer grouped the same parameters differently (an earlier release's decay rule) is
    matched by parameter name: every moment lands on its own parameter, the groups stay this run's."""
    torch.manual_seed(0)
    model = create_model("vlmo_tiny_patch16", vocab_size=50, depth=2)
    configure_trainable(model, "text_mlm")
    old = build_adamw(model, 1e-3, 0.1)
    word = "text_embeddings.word_embeddings.weight"
    g_from = next(g for g in old.param_groups if word in g["param_names"])
    g_to = next(g for g in old.param_groups if g is not g_from)
    i = g_from["param_names"].index(word)
    g_to["params"].append(g_from["params"].pop(i))
    g_to["param_names"].append(g_from["param_names"].pop(i))  # the word table in the other group, as before
    sum(p.pow(2).sum() for p in model.parameters() if p.requires_grad).backward()  # a gradient on every one
    old.step()
    saved = old.state_dict()
    expected = {n: old.state[p]["exp_avg"].clone()
                for g in old.param_groups for n, p in zip(g["param_names"], g["params"])}
    new = build_adamw(model, 1e-3, 0.1)
    load_optimizer_state({"optimizer": saved}, model, new)
    by_name = {n: p for n, p in model.named_parameters()}
    for name, moment in expected.items():
        assert torch.equal(new.state[by_name[name]]["exp_avg"], moment), name
    assert {n: g["weight_decay"] for g in new.param_groups for n in g["param_names"]}[word] == 0.0
