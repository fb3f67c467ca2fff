"""Load weights from a checkpoint of this architecture into a model, checking that it is one.

Backbone shape mismatches and the other FFN layout are refused with a message naming the file; the
relative position tables are resized for another image size; pretraining heads of another shape (e.g. a
pixel MIM head into a dVAE-target run) are dropped with a report.
"""
import math

from models.registry import ARCHITECTURE_KEYS
from models.relative_position import resize_relative_position_table
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
        elif k.endswith("relative_position_bias_table") and src.shape[1] == dst.shape[1]:
            to_load[k] = resize_relative_position_table(src, grid_from_buckets(src.shape[0]), model.grid_hw)
            report["resized"].append(k)
        elif k.startswith(RESETTABLE_HEADS):
            report["dropped"].append(k)
        else:
            what = "vocabulary size (--tokenizer)" if "word_embeddings" in k else "architecture (--model)"
            raise UserError(f"{flag} {path}: tensor {k} has shape {tuple(src.shape)} but the model expects "
                            f"{tuple(dst.shape)}: a different {what}")
    model.load_state_dict(to_load, strict=False)
    report["loaded"] = sorted(to_load)
    report["unused"] = sorted(k for k in state_dict if k not in own)
    report["missing"] = sorted(k for k in own if k not in to_load)
    return report
