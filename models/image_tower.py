"""The dual encoder's image tower: a timm model (random init, or a timm state dict file), LoRA-capable for
ViTs, with an init for training from scratch (init_fresh_vit)."""
import os
import sys

import torch
import torch.nn as nn

from models.lora import swap_in_lora_linears
from util.errors import UserError


def _create_timm(name, img_size, kwargs):
    import timm

    if not timm.is_model(name):
        raise UserError(f"--image_tower {name!r}: not a timm model name (see timm.list_models('vit_*'))")
    try:
        return timm.create_model(name, pretrained=False, num_classes=0, img_size=img_size, **kwargs)
    except TypeError as e:
        raise UserError(f"--image_tower {name}: cannot be built with img_size={img_size} and {kwargs} ({e}); "
                        "use a ViT-style timm model") from None


def _read_state_dict(path, flag):
    from util.checkpoint import extract_state_dict, load_file

    if path.endswith(".safetensors"):
        if not os.path.isfile(path):
            raise UserError(f"{flag}: file not found: {path}")
        from safetensors.torch import load_file as load_safetensors

        return load_safetensors(path)
    sd = extract_state_dict(load_file(path, flag))
    if sd is None:
        raise UserError(f"{flag} {path}: no state dict found (expected tensors, possibly under 'model')")
    return sd


def load_image_tower_weights(tower, path, flag="--image_tower_weights"):
    """Load a timm state dict (bare, {"model": sd} or .safetensors) into `tower`; returns the loaded names.

    The model module's own checkpoint_filter_fn adapts the file first (position embedding resampled to
    this img_size, other ViT layouts such as OpenAI CLIP converted). The classifier head is dropped."""
    sd = {k: v for k, v in _read_state_dict(path, flag).items() if not k.startswith("head.")}
    filter_fn = getattr(sys.modules[type(tower).__module__], "checkpoint_filter_fn", None)
    if filter_fn is not None:
        sd = filter_fn(sd, tower)
    sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
    own = tower.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    wrong = sorted(k for k in set(sd) & set(own) if sd[k].shape != own[k].shape)
    if missing or unexpected or wrong:
        raise UserError(f"{flag} {path}: does not fit --image_tower {type(tower).__name__} (missing "
                        f"{missing[:3]}, unexpected {unexpected[:3]}, other shape {wrong[:3]}; "
                        f"{len(missing)}/{len(unexpected)}/{len(wrong)} in all)")
    tower.load_state_dict(sd)
    return sorted(sd)


def image_tower(cfg, weights=None):
    """(timm tower of the config's name, img_size and kwargs; the names loaded from `weights`, if given)."""
    tower = _create_timm(cfg["name"], cfg["img_size"], cfg["kwargs"])
    from timm.models.vision_transformer import VisionTransformer

    if isinstance(tower, VisionTransformer):  # its Attention/Mlp call their Linear modules: LoRA-capable
        swap_in_lora_linears(tower.blocks)
        if not weights:
            init_fresh_vit(tower)
    loaded = load_image_tower_weights(tower, weights) if weights else []
    return tower, [f"image_tower.{k}" for k in loaded]


FRESH_POS_EMBED_STD = 0.5


def init_fresh_vit(tower):
    """A freshly created timm ViT trained from scratch: timm's "jax" init (xavier-uniform Linear layers, its
    documented init_weights mode) instead of its default std 0.02, and the position embedding at std
    FRESH_POS_EMBED_STD = 0.5 instead of 0.02. With timm's defaults a 2x64 tower's CLS feature barely depends on
    the image (embedding spread at init 0.001) and reached 0.85 zero-shot against open_clip's 0.96 in
    scripts/bench_itc_learning.py; with the jax init 0.96. The position std: the jax-initialised patch tokens have
    an rms of ~0.8 and vary across images by ~0.35 per element at any width, so CLIP's width^-0.5 (0.125 at 64,
    0.088 at 128) starts the positions well below the content, and Adam moves them ~lr per step; at 0.5 the
    position is as visible as the content from step 0 (dual encoder zero-shot over seeds 0-2: 2x64 0.960 ->
    0.977, SigLIP 0.938 -> 0.967; 4x128 patch 8 0.975 -> 0.988, open_clip 0.988; std 1.0: 0.976 on seed 0)."""
    tower.init_weights("jax")
    if isinstance(getattr(tower, "pos_embed", None), nn.Parameter):
        with torch.no_grad():
            tower.pos_embed.normal_(0.0, FRESH_POS_EMBED_STD)
