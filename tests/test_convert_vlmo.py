"""util/convert_vlmo_ckpt.py against an independent reference forward of VLMo's layout.

The reference below is written from VLMo's published layout (unilm `vlmo/modules/multiway_transformer.py`,
`vlmo_module.py`): one relative position table for all layers split by chunking the head dimension, the image
grid's BEiT buckets, text->image / image->text buckets, 1-D text offsets (key - query) from text position 1 and
three text CLS cells, BERT embeddings without absolute positions, a separate token-type embedding (0 text, 1
image), fused sequences text first with the lower layers split by position. Every tensor of the source is
random (tables and biases included). `python tests/test_convert_vlmo.py` prints the max differences per layout.
"""
import csv
import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from models.loading import load_pretrained_weights  # noqa: E402
from models.registry import model_from_config  # noqa: E402
from util.convert_vlmo_ckpt import convert_vlmo_state_dict  # noqa: E402
from util.convert_vlmo_ckpt import main as convert_main  # noqa: E402

DIM, DEPTH, HEADS, PATCH, IMG, VOCAB, T = 64, 2, 2, 16, 48, 60, 196  # T: VLMo's max_text_len_of_initckpt
GRID = IMG // PATCH
IMAGE_ROWS = (2 * GRID - 1) ** 2 + 3
TABLE_ROWS = IMAGE_ROWS + 2 + 2 * T
# layout name -> (FFN layout, first layer with mlp_vl (DEPTH: none), head names, LoRA leftovers)
LAYOUTS = {
    "vlmo multiway + mlp_vl": ("multiway", 1, "vlmo", False),
    "vlmo multiway, text-only (no mlp_vl)": ("multiway", DEPTH, "vlmo", False),
    "users' shared FFN, merged with LoRA left in": ("shared", DEPTH, "users", True),
}


def vlmo_state_dict(ffn, vl_start, heads, lora, seed=0):
    """A random-init VLMo-layout checkpoint's tensors: {name: tensor}."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"transformer.cls_token": (1, 1, DIM), "transformer.patch_embed.proj.weight": (DIM, 3, PATCH, PATCH),
              "transformer.patch_embed.proj.bias": (DIM,), "transformer.norm.weight": (DIM,),
              "transformer.norm.bias": (DIM,), "relative_position_bias_table": (TABLE_ROWS, HEADS * DEPTH),
              "text_embeddings.word_embeddings.weight": (VOCAB, DIM),
              "text_embeddings.position_embeddings.weight": (40, DIM),
              "text_embeddings.token_type_embeddings.weight": (2, DIM),
              "text_embeddings.LayerNorm.weight": (DIM,), "text_embeddings.LayerNorm.bias": (DIM,),
              "token_type_embeddings.weight": (2, DIM), "logit_scale": (),
              "mlm_score.transform.dense.weight": (DIM, DIM), "mlm_score.transform.dense.bias": (DIM,),
              "mlm_score.transform.LayerNorm.weight": (DIM,), "mlm_score.transform.LayerNorm.bias": (DIM,),
              "mlm_score.decoder.weight": (VOCAB, DIM), "mlm_score.bias": (VOCAB,)}
    if heads == "vlmo":
        shapes.update({"itc_image_proj.fc.weight": (DIM, DIM), "itc_text_proj.fc.weight": (DIM, DIM),
                       "itc_vl_image_proj.fc.weight": (DIM, DIM), "itc_vl_text_proj.fc.weight": (DIM, DIM),
                       "logit_vl_scale": (), "pooler.dense.weight": (DIM, DIM), "pooler.dense.bias": (DIM,),
                       "itm_score.fc.weight": (2, DIM), "itm_score.fc.bias": (2,)})
    else:
        shapes.update({"itc_head.fc_img.weight": (DIM, DIM), "itc_head.fc_txt.weight": (DIM, DIM)})
    for i in range(DEPTH):
        b = f"transformer.blocks.{i}."
        shapes.update({b + "norm1.weight": (DIM,), b + "norm1.bias": (DIM,), b + "attn.qkv.weight": (3 * DIM, DIM),
                       b + "attn.q_bias": (DIM,), b + "attn.v_bias": (DIM,), b + "attn.proj.weight": (DIM, DIM),
                       b + "attn.proj.bias": (DIM,), b + "gamma_1": (DIM,), b + "gamma_2": (DIM,)})
        experts = ["mlp"] if ffn == "shared" else ["mlp_imag", "mlp_text"] + (["mlp_vl"] if i >= vl_start else [])
        for e in experts:
            norm = "norm2" + e[3:]
            shapes.update({f"{b}{norm}.weight": (DIM,), f"{b}{norm}.bias": (DIM,), f"{b}{e}.fc1.weight": (4 * DIM, DIM),
                           f"{b}{e}.fc1.bias": (4 * DIM,), f"{b}{e}.fc2.weight": (DIM, 4 * DIM),
                           f"{b}{e}.fc2.bias": (DIM,)})
            if lora:
                shapes.update({f"{b}{e}.fc1.lora_A": (4, DIM), f"{b}{e}.fc1.lora_B": (4 * DIM, 4)})
    sd = {}
    for name, shape in shapes.items():
        t = torch.randn(shape, generator=g)
        if name.endswith(("norm1.weight", "norm.weight", "LayerNorm.weight")) or ".norm2" in name and "weight" in name:
            t = 1 + 0.2 * t
        elif name.endswith(("gamma_1", "gamma_2")):
            t = 0.5 + 0.2 * t
        elif name == "relative_position_bias_table":
            t = 0.5 * t
        elif t.ndim >= 2:
            t = t * t[0].numel() ** -0.5
        else:
            t = 0.1 * t
        sd[name] = t
    if heads == "vlmo":  # index buffers some VLMo checkpoints carry
        sd["relative_position_index"] = torch.zeros(GRID * GRID + 1, GRID * GRID + 1, dtype=torch.long)
        sd["text_embeddings.position_ids"] = torch.arange(40)[None]
    return sd


# ---- the reference forward, from the facts of VLMo's layout ----
def ref_index(n, table_end, pair):
    """[n, n] bucket ids with [CLS] at 0: its three cells are the last three rows before `table_end`
    ([CLS]->token, token->[CLS], [CLS]->[CLS]); `pair(q, k)` gives the bucket of two tokens after [CLS]."""
    index = torch.empty(n, n, dtype=torch.long)
    for q in range(n):
        for k in range(n):
            if q == 0 and k == 0:
                index[q, k] = table_end - 1
            elif q == 0:
                index[q, k] = table_end - 3
            elif k == 0:
                index[q, k] = table_end - 2
            else:
                index[q, k] = pair(q, k)
    return index


def ref_image_index():
    side = 2 * GRID - 1

    def pair(q, k):
        (qy, qx), (ky, kx) = divmod(q - 1, GRID), divmod(k - 1, GRID)
        return (qy - ky + GRID - 1) * side + (qx - kx + GRID - 1)
    return ref_index(GRID * GRID + 1, IMAGE_ROWS, pair)


def ref_text_index(length):
    start = IMAGE_ROWS + 2  # text rows after the image grid and the two cross-modal rows
    return ref_index(length, TABLE_ROWS, lambda q, k: start + (k - q) + (T - 2))  # offset k - q in -(T-2)..T-2


def ref_fused_index(text_len):
    n_img = GRID * GRID + 1
    top = torch.cat([ref_text_index(text_len), torch.full((text_len, n_img), IMAGE_ROWS)], 1)
    bottom = torch.cat([torch.full((n_img, text_len), IMAGE_ROWS + 1), ref_image_index()], 1)
    return torch.cat([top, bottom], 0)


def ref_bias(sd, index, layer):
    return sd["relative_position_bias_table"][index][:, :, layer * HEADS:(layer + 1) * HEADS].permute(2, 0, 1)


def ref_blocks(sd, x, mask, index, modality, text_len=None):
    ffn_shared = "transformer.blocks.0.mlp.fc1.weight" in sd
    for i in range(DEPTH):
        b = f"transformer.blocks.{i}."
        h = F.layer_norm(x, (DIM,), sd[b + "norm1.weight"], sd[b + "norm1.bias"], 1e-6)
        qkv = F.linear(h, sd[b + "attn.qkv.weight"],
                       torch.cat([sd[b + "attn.q_bias"], torch.zeros(DIM), sd[b + "attn.v_bias"]]))
        q, k, v = qkv.reshape(x.shape[0], x.shape[1], 3, HEADS, -1).permute(2, 0, 3, 1, 4)
        attn = (q * (DIM // HEADS) ** -0.5) @ k.transpose(-2, -1) + ref_bias(sd, index, i)[None]
        attn = attn.masked_fill(~mask[:, None, None, :], float("-inf")).softmax(-1)
        a = F.linear((attn @ v).transpose(1, 2).reshape(x.shape), sd[b + "attn.proj.weight"], sd[b + "attn.proj.bias"])
        x = x + sd[b + "gamma_1"] * a

        def mlp(t, name):
            norm = "norm2" + name[3:]
            t = F.layer_norm(t, (DIM,), sd[f"{b}{norm}.weight"], sd[f"{b}{norm}.bias"], 1e-6)
            t = F.gelu(F.linear(t, sd[f"{b}{name}.fc1.weight"], sd[f"{b}{name}.fc1.bias"]))
            return F.linear(t, sd[f"{b}{name}.fc2.weight"], sd[f"{b}{name}.fc2.bias"])

        if ffn_shared:
            f = mlp(x, "mlp")
        elif modality != "vl":
            f = mlp(x, {"image": "mlp_imag", "text": "mlp_text"}[modality])
        elif b + "mlp_vl.fc1.weight" in sd:
            f = mlp(x, "mlp_vl")
        else:
            f = torch.cat([mlp(x[:, :text_len], "mlp_text"), mlp(x[:, text_len:], "mlp_imag")], 1)
        x = x + sd[b + "gamma_2"] * f
    return F.layer_norm(x, (DIM,), sd["transformer.norm.weight"], sd["transformer.norm.bias"], 1e-6)


def ref_embed_text(sd, ids):
    x = sd["text_embeddings.word_embeddings.weight"][ids] + sd["text_embeddings.token_type_embeddings.weight"][0]
    x = F.layer_norm(x, (DIM,), sd["text_embeddings.LayerNorm.weight"], sd["text_embeddings.LayerNorm.bias"], 1e-12)
    return x + sd["token_type_embeddings.weight"][0]


def ref_embed_image(sd, images):
    x = F.conv2d(images, sd["transformer.patch_embed.proj.weight"], sd["transformer.patch_embed.proj.bias"],
                 stride=PATCH).flatten(2).transpose(1, 2)
    x = torch.cat([sd["transformer.cls_token"].expand(x.shape[0], -1, -1), x], 1)
    return x + sd["token_type_embeddings.weight"][1]


def ref_features(sd, ids, masks, images):
    """{"image", "text", "fused"}: final-norm hidden states; "image_emb", "text_emb": the normalised CLS
    projections; "mlm": MLM logits of the text tokens."""
    img_proj = sd.get("itc_image_proj.fc.weight", sd.get("itc_head.fc_img.weight"))
    txt_proj = sd.get("itc_text_proj.fc.weight", sd.get("itc_head.fc_txt.weight"))
    image = ref_blocks(sd, ref_embed_image(sd, images), torch.ones(images.shape[0], GRID * GRID + 1, dtype=torch.bool),
                       ref_image_index(), "image")
    text = ref_blocks(sd, ref_embed_text(sd, ids), masks.bool(), ref_text_index(ids.shape[1]), "text")
    fused_mask = torch.cat([masks.bool(), torch.ones(images.shape[0], GRID * GRID + 1, dtype=torch.bool)], 1)
    fused = ref_blocks(sd, torch.cat([ref_embed_text(sd, ids), ref_embed_image(sd, images)], 1), fused_mask,
                       ref_fused_index(ids.shape[1]), "vl", text_len=ids.shape[1])
    h = F.gelu(F.linear(text, sd["mlm_score.transform.dense.weight"], sd["mlm_score.transform.dense.bias"]))
    h = F.layer_norm(h, (DIM,), sd["mlm_score.transform.LayerNorm.weight"], sd["mlm_score.transform.LayerNorm.bias"],
                     1e-12)
    return {"image": image, "text": text, "fused": fused,
            "image_emb": F.normalize(image[:, 0] @ img_proj.T, dim=-1),
            "text_emb": F.normalize(text[:, 0] @ txt_proj.T, dim=-1),
            "mlm": h @ sd["mlm_score.decoder.weight"].T + sd["mlm_score.bias"]}


def our_features(model, ids, masks, images):
    model.eval()
    with torch.no_grad():
        return {"image": model.norm(model.forward_image_features(images)),
                "text": model.norm(model.forward_text_features(ids, masks)),
                "fused": model.norm(model.forward_fused_features(ids, masks, images)),
                "image_emb": model.encode_image(images), "text_emb": model.encode_text(ids, masks),
                "mlm": model.mlm_head(model.norm(model.forward_text_features(ids, masks)))}


def _inputs(seed=1, text_len=12):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (3, text_len), generator=g)
    masks = torch.ones(3, text_len, dtype=torch.long)
    masks[1, 7:] = 0  # padded rows: the reference masks the same keys
    masks[2, 4:] = 0
    return ids, masks, torch.randn(3, 3, IMG, IMG, generator=g)


def converted_model(sd, **kw):
    new_sd, config, report = convert_vlmo_state_dict({"state_dict": sd}, **kw)
    model = model_from_config(config)
    load_pretrained_weights(model, new_sd, "converted", ckpt_config=config)
    return model, config, report


def max_differences(layout):
    ffn, vl_start, heads, lora = LAYOUTS[layout]
    sd = vlmo_state_dict(ffn, vl_start, heads, lora)
    model, _, report = converted_model(sd)
    ids, masks, images = _inputs()
    ref, ours = ref_features(sd, ids, masks, images), our_features(model, ids, masks, images)
    return {k: (ours[k] - ref[k]).abs().max().item() for k in ref}, report


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_converted_weights_reproduce_the_reference_forward(layout):
    diffs, report = max_differences(layout)
    assert max(diffs.values()) < 1e-5, diffs
    ffn, vl_start, heads, lora = LAYOUTS[layout]
    dropped = dict(report["dropped"])
    assert "text_embeddings.position_embeddings.weight" in dropped
    assert bool(report["lora"]) == lora and all(".lora_" in k for k in report["lora"])
    if heads == "vlmo":
        assert {"itc_vl_image_proj.fc.weight", "pooler.dense.weight", "itm_score.fc.bias", "logit_vl_scale",
                "relative_position_index"} <= set(dropped)
    assert "mask_token" in report["created"] and not any(".lora_" in k for k in report["copied"])
    # nothing of the backbone, text embeddings or used heads is left to initialisation
    assert not [k for k in report["created"] if k.startswith(("blocks.", "text_embeddings.", "itc_", "mlm_head."))]


def test_config_follows_the_source_and_vl_experts_can_be_added():
    sd = vlmo_state_dict("multiway", DEPTH, "vlmo", False)
    _, config, _ = converted_model(sd)
    assert (config["vl_start"], config["text_pos"], config["token_type_embed"], config["img_size"]) == \
        (DEPTH, "relative", True, IMG)
    assert config["name"] == "vlmo_tiny_patch16" and config["ffn_layout"] == "multiway"
    model, config, report = converted_model(sd, vl_start=1)
    assert config["vl_start"] == 1 and "blocks.1.mlp_vl.fc1.weight" in report["created"]
    ids, masks, images = _inputs()
    ref, ours = ref_features(sd, ids, masks, images), our_features(model, ids, masks, images)
    for k in ("image", "text"):  # the single-modality paths never touch the new experts
        torch.testing.assert_close(ours[k], ref[k], atol=1e-5, rtol=0)


def test_text_table_survives_another_max_text_len():
    """A model with shorter texts keeps the central offsets: identical features on texts that fit."""
    sd = vlmo_state_dict("multiway", 1, "vlmo", False)
    new_sd, config, _ = convert_vlmo_state_dict(sd)
    short = model_from_config({**config, "max_text_len": 16})
    report = load_pretrained_weights(short, new_sd, "converted", ckpt_config=config)
    assert "blocks.0.attn.text_relative_position_bias_table" in report["resized"]
    ids, masks, images = _inputs()
    ref, ours = ref_features(sd, ids, masks, images), our_features(short, ids, masks, images)
    torch.testing.assert_close(ours["fused"], ref["fused"], atol=1e-5, rtol=0)


def test_refusals_name_the_file(tmp_path):
    from util.errors import UserError

    sd = vlmo_state_dict("multiway", 1, "vlmo", False)
    plus = {**sd, "transformer.pos_embed": torch.zeros(1, GRID * GRID + 1, DIM)}
    with pytest.raises(UserError, match="vlmo_base_plus"):
        convert_vlmo_state_dict(plus, source="--src plus.pt")
    with pytest.raises(UserError, match="not a VLMo-layout checkpoint"):
        convert_vlmo_state_dict({"blocks.0.attn.qkv.weight": torch.zeros(3, 1)}, source="--src beit.pth")
    with pytest.raises(UserError, match="--table_text_len"):
        convert_vlmo_state_dict(sd, text_table_len=40)
    with pytest.raises(UserError, match="--vl_start 5"):
        convert_vlmo_state_dict(sd, vl_start=5)


def test_converted_file_fine_tunes_and_resumes_pretraining(tmp_path, demo_data, tiny_tokenizer, capsys):
    """The command line writes a file that main_finetune --finetune (text classification, end to end) and
    main_pretrain_cook --resume (text_mlm) accept, with the source's text positions and token types."""
    import main_finetune
    import main_pretrain_cook
    from custom_datasets.demo_data import SHAPES
    from run_helpers import load_ckpt

    global VOCAB
    saved, VOCAB = VOCAB, tiny_tokenizer.vocab_size
    try:
        sd = vlmo_state_dict("shared", DEPTH, "users", True)
    finally:
        VOCAB = saved
    src, dst = tmp_path / "cc3m-merged.pth", tmp_path / "converted.pth"
    torch.save({"model": sd}, src)
    report = convert_main(["--src", str(src), "--dst", str(dst), "--tokenizer", str(demo_data["tokenizer"])])
    out = capsys.readouterr().out
    assert "LoRA" in out and "newly created" in out and report["lora"]
    rows = list(csv.DictReader(open(demo_data["pairs_train"], encoding="utf-8")))
    for split, part in (("train", rows[:32]), ("val", rows[32:48])):
        with open(tmp_path / f"{split}.csv", "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["text", "label"])
            w.writerows((r["text"], next(s for s in SHAPES if s in r["text"])) for r in part)
    common = ["--batch_size", "8", "--num_workers", "0", "--log_freq", "2", "--epochs", "1", "--drop_path", "0"]
    ft_out = tmp_path / "ft"
    assert main_finetune.main(["--task", "text_classification", "--finetune", str(dst), "--data_path",
                               str(tmp_path / "train.csv"), "--val_data_path", str(tmp_path / "val.csv"),
                               "--output_dir", str(ft_out), "--ffn_layout", "shared", *common]) == 0
    ckpt = load_ckpt(ft_out / "checkpoint-1.pth")
    assert ckpt["model_config"]["text_pos"] == "relative" and ckpt["model_config"]["token_type_embed"]
    assert "backbone.blocks.0.attn.text_relative_position_bias_table" in ckpt["model"]
    converted = torch.load(dst, weights_only=True)["model"]
    assert not torch.equal(ckpt["model"]["backbone.blocks.0.attn.qkv.weight"], converted["blocks.0.attn.qkv.weight"])
    pt_out = tmp_path / "pt"
    assert main_pretrain_cook.main(["--mode", "text_mlm", "--model", "vlmo_tiny_patch16", "--resume", str(dst),
                                    "--data_path", str(demo_data["captions_train"]), "--tokenizer",
                                    str(demo_data["tokenizer"]), "--output_dir", str(pt_out),
                                    "--ffn_layout", "shared", *common, "--batch_size", "64"]) == 0
    pt = load_ckpt(pt_out / "checkpoint-1.pth")
    assert pt["model_config"]["text_pos"] == "relative"
    assert "blocks.1.attn.text_relative_position_bias_table" in pt["provided_keys"]


if __name__ == "__main__":
    print("| source layout | image | text | fused | image emb | text emb | MLM logits |")
    print("|---|---|---|---|---|---|---|")
    for name in LAYOUTS:
        d, _ = max_differences(name)
        print(f"| {name} | " + " | ".join(f"{d[k]:.1e}" for k in ("image", "text", "fused", "image_emb", "text_emb",
                                                                     "mlm")) + " |")
