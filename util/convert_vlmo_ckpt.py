"""Convert a VLMo-layout checkpoint (unilm VLMo releases, and models written by codebases that follow VLMo's
layout, e.g. a merged CC3M text-MLM checkpoint) into this project's layout.

    python util/convert_vlmo_ckpt.py --src vlmo_base_patch16_224.pt --dst checkpoints/vlmo_base_converted.pth
    python util/convert_vlmo_ckpt.py --src checkpoint-reg1e0-cc3m-100ep-merged.pth --dst cc3m_text.pth \\
        --tokenizer checkpoints/vocab.txt

Source layout (unilm `vlmo/modules/multiway_transformer.py` and `vlmo_module.py`):
- backbone under `transformer.` (`transformer.blocks.i.attn.qkv.weight`, `q_bias`, `v_bias`, `norm2_imag`,
  `mlp_text`, optional `mlp_vl`, or one shared `mlp`/`norm2`; `gamma_1/2`, `patch_embed`, `cls_token`, `norm`);
  the names below the prefix are ours, so they map one to one;
- ONE relative position table for all layers, `relative_position_bias_table [image + 2 + 2*T, heads*layers]`
  (T = VLMo's `max_text_len_of_initckpt`, 196): rows 0 .. image-1 the image grid as in BEiT, then text->image and
  image->text, then the text offsets -(T-2)..T-2 (key - query, text positions from 1) and the 3 text CLS cells;
  layer i owns the columns [i*heads, (i+1)*heads). It becomes each block's `attn.relative_position_bias_table`
  (image rows) and `attn.text_relative_position_bias_table` (offsets, CLS cells, then the two cross rows);
- HF `BertEmbeddings` with `position_embedding_type="rel_pos"` (its position table is never used: dropped, the
  model gets `text_pos="relative"`), `LayerNorm` -> `norm`; a separate `token_type_embeddings [2, D]` (row 0 text,
  row 1 image) -> `token_type_embed=True`;
- heads: `mlm_score.{transform,decoder,bias}` -> `mlm_head`, `itc_image_proj.fc`/`itc_text_proj.fc` (VLMo) or
  `itc_head.fc_img`/`fc_txt` -> `itc_image_proj`/`itc_text_proj`, `mim_score` -> `mim_head`, `logit_scale`;
  VLMo's VL-expert contrastive heads, `pooler`, `itm_score` and task heads have no counterpart and are dropped;
- `lora_A`/`lora_B` left in a merged checkpoint (a known merge bug elsewhere: the deltas are already in the
  weights) are reported and dropped;
- text-only checkpoints have no `mlp_vl`: the model gets `vl_start = depth` unless --vl_start asks for fresh VL
  experts. `vlmo_base_plus` (absolute image positions, no relative table, no layer scale) is refused.

Output: `{"model": state_dict, "model_config": dict, "source": str[, "tokenizer": state]}`, loadable with
`torch.load(..., weights_only=True)` by `main_pretrain_cook.py --resume` and `main_finetune.py --finetune`.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from models.loading import grid_from_buckets  # noqa: E402
from models.registry import backbone_names, model_options  # noqa: E402
from models.registry import model_config as registry_model_config  # noqa: E402
from models.relative_position import NUM_CROSS_BUCKETS, text_table_from_parts  # noqa: E402
from util.checkpoint import extract_state_dict, save_atomic  # noqa: E402
from util.convert_beit_ckpt import (load_beit_checkpoint, print_filled_created_warnings,  # noqa: E402
                                    summarize_keys, target_shapes)
from util.errors import UserError, run_cli  # noqa: E402

VLMO_TEXT_TABLE_LEN = 196  # VLMo's max_text_len_of_initckpt: the text part of its table has 2 * 196 rows
_PREFIX = "transformer."
_TABLE = "relative_position_bias_table"
_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")
_INDEX_BUFFERS = ("relative_position_index", "text_relative_position_index", "text_imag_relative_position_index")
_HEADS = {  # source name -> ours (other source heads are dropped below)
    "mlm_score.transform.dense.weight": "mlm_head.transform.dense.weight",
    "mlm_score.transform.dense.bias": "mlm_head.transform.dense.bias",
    "mlm_score.transform.LayerNorm.weight": "mlm_head.transform.norm.weight",
    "mlm_score.transform.LayerNorm.bias": "mlm_head.transform.norm.bias",
    "mlm_score.decoder.weight": "mlm_head.decoder.weight",
    "mlm_score.bias": "mlm_head.decoder.bias",
    "itc_image_proj.fc.weight": "itc_image_proj.weight", "itc_text_proj.fc.weight": "itc_text_proj.weight",
    "itc_head.fc_img.weight": "itc_image_proj.weight", "itc_head.fc_txt.weight": "itc_text_proj.weight",
    "mim_score.weight": "mim_head.weight", "mim_score.bias": "mim_head.bias",
    "mim_score.fc.weight": "mim_head.weight", "mim_score.fc.bias": "mim_head.bias",
    "logit_scale": "logit_scale", "token_type_embeddings.weight": "token_type_embeddings.weight",
    "text_embeddings.word_embeddings.weight": "text_embeddings.word_embeddings.weight",
    "text_embeddings.token_type_embeddings.weight": "text_embeddings.token_type_embeddings.weight",
    "text_embeddings.LayerNorm.weight": "text_embeddings.norm.weight",
    "text_embeddings.LayerNorm.bias": "text_embeddings.norm.bias",
}
_DROPPED_HEADS = {  # source prefix -> why it has no counterpart
    "itc_vl_": "VLMo's contrastive heads of the VL expert: this model has no such head",
    "logit_vl_scale": "VLMo's temperature of the VL-expert contrastive heads",
    "pooler.": "ITM/VQA pooler: not part of this model",
    "itm_score.": "image-text matching head: not part of this model",
    "vqa_classifier.": "task head", "nlvr2_classifier.": "task head",
    "text_embeddings.position_embeddings.": "unused: VLMo's text has relative positions (rel_pos)",
    "text_embeddings.position_ids": "buffer", "text_embeddings.token_type_ids": "buffer",
}


def _infer_config(flat, where, model, vl_start, text_table_len):
    """The model_config of the converted model, read from the source's tensors."""
    if _PREFIX + "pos_embed" in flat or _TABLE not in flat:
        raise UserError(f"{where}absolute image positions without VLMo's relative position table (vlmo_base_plus "
                        "layout): not supported; convert a VLMo base or large checkpoint")
    blocks = {int(m.group(1)) for k in flat if k.startswith(_PREFIX) and (m := _BLOCK.match(k[len(_PREFIX):]))}
    depth = 1 + max(blocks)
    dim = flat[_PREFIX + "cls_token"].shape[-1]
    table = flat[_TABLE]
    if table.ndim != 2 or table.shape[1] % depth:
        raise UserError(f"{where}{_TABLE} has shape {tuple(table.shape)}: not [buckets, heads x {depth} layers]")
    image_buckets = table.shape[0] - NUM_CROSS_BUCKETS - 2 * text_table_len
    try:
        grid = grid_from_buckets(image_buckets)
    except ValueError:
        raise UserError(f"{where}{_TABLE} has {table.shape[0]} rows, which is not an image grid plus 2 + 2 x "
                        f"{text_table_len} text rows; pass the source's max_text_len_of_initckpt as "
                        "--table_text_len") from None
    ffn = "multiway" if any(".mlp_imag." in k for k in flat) else "shared"
    fc1 = flat[f"{_PREFIX}blocks.0.{'mlp_imag' if ffn == 'multiway' else 'mlp'}.fc1.weight"]
    vl_blocks = sorted({int(m.group(1)) for k in flat if (m := re.match(rf"^{_PREFIX}blocks\.(\d+)\.mlp_vl\.", k))})
    patch = flat[_PREFIX + "patch_embed.proj.weight"].shape[-1]
    if vl_start is not None and not 0 <= vl_start <= depth:
        raise UserError(f"--vl_start {vl_start} must be in [0, {depth}] (the source has {depth} layers)")
    overrides = dict(embed_dim=dim, depth=depth, num_heads=table.shape[1] // depth, mlp_ratio=fc1.shape[0] / dim,
                     patch_size=patch, img_size=grid[0] * patch, ffn_layout=ffn,
                     vl_start=vl_start if vl_start is not None else (vl_blocks[0] if vl_blocks else depth),
                     vocab_size=flat["text_embeddings.word_embeddings.weight"].shape[0],
                     max_text_len=text_table_len, text_pos="relative",
                     token_type_embed="token_type_embeddings.weight" in flat, itc_loss="clip", image_pos_embed=False)
    for key in ("mim_score.weight", "mim_score.fc.weight"):
        if key in flat:
            overrides["mim_vocab_size"] = flat[key].shape[0]
    if model is None:  # the registry size it is, else base with the source's dimensions
        model = next((n for n in backbone_names() if (model_options(n)["embed_dim"], model_options(n)["depth"])
                      == (dim, depth)), "vlmo_base_patch16")
    return registry_model_config(model, **overrides)


def _split_table(table, config, text_table_len):
    """VLMo's [image + 2 + 2T, heads*layers] table -> {our per-block table key: tensor}."""
    heads, depth = config["num_heads"], config["depth"]
    image_rows = table.shape[0] - NUM_CROSS_BUCKETS - 2 * text_table_len
    out = {}
    for i in range(depth):
        t = table[:, i * heads:(i + 1) * heads]
        image, cross, text = t[:image_rows], t[image_rows:image_rows + 2], t[image_rows + 2:]
        offsets, cls = text[:2 * text_table_len - 3], text[2 * text_table_len - 3:]
        out[f"blocks.{i}.attn.{_TABLE}"] = image.clone()
        out[f"blocks.{i}.attn.text_{_TABLE}"] = text_table_from_parts(offsets, cls, cross, config["max_text_len"])
    return out


def convert_vlmo_state_dict(sd, *, model=None, vl_start=None, text_table_len=VLMO_TEXT_TABLE_LEN, source=""):
    """VLMo-layout state dict -> (our state dict, model_config, report).

    report: {"copied": [our keys filled from the source], "dropped": [(source key, why)], "created": [our keys
    left to the model's init], "filled": [(our key, why)], "lora": [source LoRA keys dropped], "warnings": [str]}.
    Raises UserError when `sd` is not a VLMo-layout checkpoint.
    """
    where = f"{source}: " if source else ""
    flat = extract_state_dict(sd)
    if flat is None:
        raise UserError(f"{where}no tensor dictionary found (looked at the top level and under "
                        "model/module/state_dict); expected a VLMo checkpoint")
    if _PREFIX + "cls_token" not in flat or "text_embeddings.word_embeddings.weight" not in flat:
        some = ", ".join(sorted(flat)[:4])
        raise UserError(f"{where}not a VLMo-layout checkpoint: it lacks {_PREFIX}cls_token / "
                        f"text_embeddings.word_embeddings.weight (first keys: {some})")
    config = _infer_config(flat, where, model, vl_start, text_table_len)
    shapes, _ = target_shapes(config)
    out, report = {}, {"copied": [], "dropped": [], "created": [], "filled": [], "lora": [], "warnings": []}

    def put(name, tensor, src_key):
        if tuple(tensor.shape) != shapes[name]:
            raise UserError(f"{where}{src_key} has shape {tuple(tensor.shape)} but the converted model expects "
                            f"{shapes[name]} for {name}")
        out[name] = tensor.clone()

    for key, tensor in flat.items():
        name = key[len(_PREFIX):] if key.startswith(_PREFIX) else _HEADS.get(key)
        if ".lora_" in key or key.startswith("lora_"):
            report["lora"].append(key)
            report["dropped"].append((key, "LoRA adapter left in a merged checkpoint: its delta is in the weights"))
        elif key == _TABLE:
            for k, t in _split_table(tensor, config, text_table_len).items():
                put(k, t, key)
        elif key in _INDEX_BUFFERS:
            report["dropped"].append((key, "rebuilt by the model"))
        elif name in shapes:
            put(name, tensor, key)
        elif key.startswith(("itc_image_proj.fc.", "itc_text_proj.fc.", "itc_head.")):
            report["dropped"].append((key, "contrastive projection bias: this model's projections have none"))
            report["warnings"].append(f"{key} dropped: the contrastive embeddings differ from the source's")
        else:
            why = next((w for p, w in _DROPPED_HEADS.items() if key.startswith(p)), "not part of the model")
            report["dropped"].append((key, why))
    if report["lora"]:
        report["warnings"].append(f"{len(report['lora'])} LoRA tensors ({report['lora'][0]}, ...) were left in the "
                                  "source; dropped as already merged. If the source was NOT merged, merge it in "
                                  "the codebase that wrote it first")
    dtype = flat[_PREFIX + "cls_token"].dtype
    for i in range(config["depth"]):  # no layer scale in the source is the same function as a layer scale of one
        for g in ("gamma_1", "gamma_2"):
            name = f"blocks.{i}.{g}"
            if name in shapes and name not in out:
                out[name] = torch.ones(shapes[name], dtype=dtype)
                report["filled"].append((name, "set to 1: the source has no layer scale"))
    report["copied"] = sorted(k for k in out if k not in dict(report["filled"]))
    report["created"] = sorted(k for k in shapes if k not in out)
    return out, config, report


def print_report(src, dst, config, report):
    print(f"converted {src} -> {dst} ({config['name']}: {config['depth']} x {config['embed_dim']}, "
          f"{config['num_heads']} heads, ffn_layout={config['ffn_layout']}, vl_start={config['vl_start']}, "
          f"img_size={config['img_size']}, text_pos=relative)")
    print(f"  copied {len(report['copied'])} tensors")
    by_reason = {}
    for key, why in report["dropped"]:
        by_reason.setdefault(why, []).append(key)
    print(f"  dropped ({len(report['dropped'])}):")
    for why, keys in by_reason.items():
        print(f"    {why}: {', '.join(summarize_keys(keys))}")
    print_filled_created_warnings(report)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description="Convert a VLMo-layout checkpoint to this project's layout.")
    parser.add_argument("--src", required=True, help="VLMo-layout checkpoint (.pt/.pth/.ckpt)")
    parser.add_argument("--dst", required=True, help="converted checkpoint to write")
    parser.add_argument("--model", default=None, choices=backbone_names(),
                        help="registry name recorded in the config (default: the one of the source's width and "
                             "depth, else vlmo_base_patch16 with the source's dimensions)")
    parser.add_argument("--vl_start", type=int, default=None,
                        help="first layer with a VL expert (default: the source's; depth when it has none). A "
                             "lower value creates fresh VL experts there")
    parser.add_argument("--table_text_len", type=int, default=VLMO_TEXT_TABLE_LEN,
                        help="the source's max_text_len_of_initckpt: its table holds 2 x this many text rows")
    parser.add_argument("--tokenizer", default=None,
                        help="vocab.txt / tokenizer.json the source was trained with: saved in the converted file "
                             "so later stages inherit it")
    args = parser.parse_args(argv)
    tokenizer = None
    if args.tokenizer:
        from custom_datasets.tokenizer import load_tokenizer
        try:
            tokenizer = load_tokenizer(args.tokenizer, max_len=args.table_text_len)
        except UserError as e:
            raise UserError(f"--tokenizer {args.tokenizer}: {e}") from None
    obj = load_beit_checkpoint(args.src, "VLMo")
    sd, config, report = convert_vlmo_state_dict(obj, model=args.model, vl_start=args.vl_start,
                                                 text_table_len=args.table_text_len, source=f"--src {args.src}")
    if tokenizer is not None and tokenizer.vocab_size != config["vocab_size"]:
        raise UserError(f"--tokenizer {args.tokenizer}: {tokenizer.vocab_size} tokens, but the source's word "
                        f"embeddings have {config['vocab_size']}")
    out = {"model": sd, "model_config": config, "source": args.src}
    if tokenizer is not None:
        out["tokenizer"] = tokenizer.to_state()
    os.makedirs(os.path.dirname(os.path.abspath(args.dst)), exist_ok=True)
    save_atomic(out, args.dst)
    print_report(args.src, args.dst, config, report)
    return report


if __name__ == "__main__":
    run_cli(main)
