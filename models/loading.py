"""Load weights from a checkpoint of this architecture into a model, checking that it is one.

Backbone shape mismatches and the other FFN layout are refused with a message naming the file; the
relative position tables and the absolute patch positions are resized for another image size (the text tables
for another max_text_len); pretraining heads of another shape (e.g. a
pixel MIM head into a dVAE-target run) are dropped with a report.
"""
import math

import torch

from models.registry import ARCHITECTURE_KEYS, LEGACY_DEFAULTS, recorded_config
from models.relative_position import resize_relative_position_table, resize_text_relative_position_table
from util.errors import UserError

RESETTABLE_HEADS = ("mim_head.", "mlm_head.", "itc_image_proj.", "itc_text_proj.")


def grid_from_buckets(num_buckets):
    side = int(round((math.sqrt(num_buckets - 3) + 1) / 2))
    if (2 * side - 1) ** 2 + 3 != num_buckets:
        raise ValueError(f"relative position table of {num_buckets} buckets is not a square grid")
    return side, side


def check_architecture(ckpt_config, model_config, path, flag):
    if not ckpt_config:
        return
    for key in ARCHITECTURE_KEYS:
        if key in ckpt_config and ckpt_config[key] != model_config[key]:
            hint = " (--ffn_layout)" if key == "ffn_layout" else " (--model)"
            raise UserError(f"{flag} {path}: checkpoint has {key}={ckpt_config[key]!r} but this run's model has "
                            f"{key}={model_config[key]!r}{hint}")


def _layout_of_keys(keys):
    if any(".mlp_imag." in k or ".mlp_text." in k for k in keys):
        return "multiway"
    if any(".mlp.fc1." in k for k in keys):
        return "shared"
    return None


def load_pretrained_weights(model, state_dict, path, flag="--resume", ckpt_config=None):
    """Copy matching tensors into `model`; returns a report dict of loaded/resized/dropped/missing names."""
    check_architecture(ckpt_config, model.config, path, flag)
    lora = sorted(k for k in state_dict if ".lora_" in k)
    if lora:
        raise UserError(f"{flag} {path}: holds unmerged LoRA adapters ({lora[0]}, ...); merge them first with "
                        "`python util/merge_lora.py`, or resume the run that made it from its output folder")
    layout = _layout_of_keys(state_dict)
    if layout and layout != model.config["ffn_layout"]:
        raise UserError(f"{flag} {path}: checkpoint has the {layout} FFN layout but this run uses "
                        f"{model.config['ffn_layout']} (--ffn_layout)")
    own = model.state_dict()
    matched = [k for k in state_dict if k in own]
    if not matched:
        raise UserError(f"{flag} {path}: none of its {len(state_dict)} tensors belong to {model.config['name']}; "
                        "convert BEiT weights with util/convert_beit_ckpt.py first")
    to_load, report = {}, {"loaded": [], "resized": [], "dropped": [], "unused": [], "missing": []}
    for k in matched:
        src, dst = state_dict[k], own[k]
        if src.shape == dst.shape:
            to_load[k] = src
        elif k.endswith("text_relative_position_bias_table") and src.shape[1] == dst.shape[1]:
            to_load[k] = resize_text_relative_position_table(src, model.config["max_text_len"])
            report["resized"].append(k)
        elif k.endswith("relative_position_bias_table") and src.shape[1] == dst.shape[1]:
            to_load[k] = resize_relative_position_table(src, grid_from_buckets(src.shape[0]), model.grid_hw)
            report["resized"].append(k)
        elif k == "image_pos_embed" and src.shape[-1] == dst.shape[-1]:
            to_load[k] = resize_patch_position_embedding(src, model.grid_hw)
            report["resized"].append(k)
        elif k.startswith(RESETTABLE_HEADS):
            report["dropped"].append(k)
        else:
            what = "vocabulary size (--tokenizer)" if "word_embeddings" in k else "architecture (--model)"
            raise UserError(f"{flag} {path}: tensor {k} has shape {tuple(src.shape)} but the model expects "
                            f"{tuple(dst.shape)}: a different {what}")
    if "image_pos_embed" in to_load and ckpt_config:  # stored divided by the gain the checkpoint was made with
        src_gain, gain = recorded_config(ckpt_config)["image_pos_gain"], model.config["image_pos_gain"]
        if src_gain != gain:
            to_load["image_pos_embed"] = to_load["image_pos_embed"] * (src_gain / gain)
    model.load_state_dict(to_load, strict=False)
    report["loaded"] = sorted(to_load)
    report["unused"] = sorted(k for k in state_dict if k not in own)
    report["missing"] = sorted(k for k in own if k not in to_load)
    return report


def resize_patch_position_embedding(table, grid_hw):
    """[1, h*w, D] absolute patch positions (a square grid) -> [1, H*W, D] for the model's grid (bicubic)."""
    side = int(round(table.shape[1] ** 0.5))
    if side * side != table.shape[1]:
        raise ValueError(f"image_pos_embed of {table.shape[1]} positions is not a square grid")
    grid = table.reshape(1, side, side, -1).permute(0, 3, 1, 2).float()
    grid = torch.nn.functional.interpolate(grid, size=tuple(grid_hw), mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(1, grid_hw[0] * grid_hw[1], -1).to(table.dtype)


def load_weights(model, state_dict, path, flag="--resume", ckpt_config=None):
    """Weights-only initialisation of any registry model (multiway backbone or dual encoder); the report
    keys are those of load_pretrained_weights."""
    from models.dual_encoder import is_dual_encoder_config, load_dual_encoder_weights

    if is_dual_encoder_config(model.config):
        return load_dual_encoder_weights(model, state_dict, path, flag, ckpt_config)
    return load_pretrained_weights(model, state_dict, path, flag, ckpt_config)


def model_for_resume(ckpt_config, name, overrides, path, flag="--resume"):
    """The model a training checkpoint continues, checked against the run's `--model` and overrides. A
    multiway backbone is built from the run's settings (which must describe the checkpoint's tensors); a
    dual encoder is rebuilt from the checkpoint's own config, so no image weights file or Hugging Face
    folder is read again."""
    from models.dual_encoder import OURS, dual_encoder_from_config, is_dual_encoder_config
    from models.registry import create_model

    ckpt_config = ckpt_config or {}
    if ckpt_config.get("name", name) != name:
        raise UserError(f"{flag} {path}: holds a {ckpt_config['name']} model, not --model {name}")
    if not is_dual_encoder_config(ckpt_config):
        recorded = recorded_config(ckpt_config)
        # tensors that exist or not by a config switch follow the checkpoint (which must load strictly)
        model = create_model(name, **{**overrides, **{k: recorded[k] for k in LEGACY_DEFAULTS if k in recorded}})
        check_architecture(ckpt_config, model.config, path, flag)
        return model
    image, text = ckpt_config["image"]["name"], ckpt_config["text"]
    want_image, want_text = overrides.get("image_tower", image), overrides.get("text_tower", OURS)
    if image != want_image or (text["kind"] == OURS) != (want_text == OURS):
        raise UserError(f"{flag} {path}: holds a dual encoder of {image} + {text.get('path', OURS)}, not "
                        f"--image_tower {want_image} + --text_tower {want_text}")
    return dual_encoder_from_config(ckpt_config)
