"""Which parameters train in a run: the mode's path, LoRA on weights a checkpoint provided, locked towers.

Called once, after weights are loaded and before the optimizer and DDP are built, so DDP never needs
`find_unused_parameters` and the optimizer never holds frozen tensors.
"""
import re

from models.lora import LoRALinear

_SHARED = [r"blocks\.\d+\.norm1\.", r"blocks\.\d+\.attn\.(qkv|proj)\.", r"blocks\.\d+\.attn\.[qv]_bias$",
           r"blocks\.\d+\.gamma_[12]$", r"blocks\.\d+\.(norm2|mlp)\.", r"norm\.", r"token_type_embeddings\."]
_IMAGE = [r"patch_embed\.", r"cls_token$", r"image_pos_embed$", r"image_pre_norm\.",
          r"blocks\.\d+\.attn\.relative_position_bias_table$", r"blocks\.\d+\.(norm2|mlp)_imag\."]
_TEXT = [r"text_embeddings\.", r"blocks\.\d+\.(norm2|mlp)_text\.",
         r"blocks\.\d+\.attn\.text_relative_position_bias_table$"]
_TOWERS = {"image": _IMAGE, "text": _TEXT}
# mode name -> parameter-name patterns on its path; each pretraining mode file registers its own.
_MODE_PATHS = {}


def register_mode_path(mode, towers, heads):
    """Declare which parameters `mode`'s forward pass uses: the shared attention stack, the experts and
    embeddings of `towers` ("image", "text") and the head parameters matching the regexes `heads`."""
    _MODE_PATHS[mode] = tuple(_SHARED + [p for t in towers for p in _TOWERS[t]] + list(heads))


def _mode_path(mode):
    if mode not in _MODE_PATHS:
        # The mode files register their paths when the `modes` package is first used; a script that calls
        # configure_trainable directly gets them discovered here (by name: models never import modes).
        import importlib
        importlib.import_module("modes").mode_names()
    if mode not in _MODE_PATHS:
        raise ValueError(f"unknown mode {mode!r}; known: {', '.join(sorted(_MODE_PATHS))}")
    return _MODE_PATHS[mode]


def _matches(name, patterns):
    return any(re.match(p, name) for p in patterns)


def tower_of(name):
    """'image', 'text', 'shared' (attention, final norm) or 'head' for a parameter name."""
    if _matches(name, _SHARED):
        return "shared"
    if _matches(name, _IMAGE) or name.startswith("itc_image_proj."):
        return "image"
    if _matches(name, _TEXT) or name.startswith("itc_text_proj."):
        return "text"
    return "head"


def on_mode_path(name, mode):
    """True if the parameter takes part in `mode`'s forward pass."""
    base = name.replace(".lora_A", ".weight").replace(".lora_B", ".weight")
    return _matches(base, _mode_path(mode))


def configure_trainable(model, mode, lora_rank=0, lora_alpha=1.0, provided_keys=(), lock_image=False,
                        lock_text=False, reg_loss_weight=0.0):
    """Freeze/adapt parameters for a run and return {group: [names]} of what trains.

    lora_rank > 0: every on-path weight the loaded checkpoint provided is frozen; LoRA adapters are added
    to provided qkv/proj/fc1/fc2 layers; anything the checkpoint did not provide trains fully.
    lock_image / lock_text (LiT): the tower is frozen; LoRA adapters act on the other modality only.
    """
    if hasattr(model, "configure_trainable"):  # models with their own towers (models/dual_encoder.py)
        return model.configure_trainable(mode, lora_rank, lora_alpha, provided_keys, lock_image, lock_text,
                                         reg_loss_weight)
    provided = set(provided_keys)
    locked = {t for t, on in (("image", lock_image), ("text", lock_text)) if on}
    model.locked_towers = locked
    if locked:
        model.lora_modalities = {"image", "text", "vl"} - locked - {"vl"}

    def trains(name):
        if not on_mode_path(name, mode):
            return False
        tower = tower_of(name)
        if tower in locked:
            return False
        if tower == "shared" and locked:
            return False  # shared attention serves the locked tower too; it may only adapt through LoRA
        return True

    for name, p in model.named_parameters():
        p.requires_grad_(trains(name))
    if lora_rank > 0:
        for mod_name, module in model.named_modules():
            if not isinstance(module, LoRALinear) or module.has_lora:
                continue
            key = f"{mod_name}.weight"
            if key in provided and on_mode_path(key, mode) and tower_of(key) not in locked:
                module.enable_lora(lora_rank, lora_alpha)
        for name, p in model.named_parameters():
            if name in provided:
                p.requires_grad_(False)
    model.reg_loss_weight = reg_loss_weight
    groups = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            group = "lora" if ".lora_" in name else tower_of(name)
            groups.setdefault(group, []).append(name)
    return groups


def on_image_path(model, name):
    """True if the state-dict entry `name` takes part in `model.encode_image` (LoRA adapters excluded: on a locked
    image tower they act on the text only)."""
    if ".lora_" in name:
        return False
    if hasattr(model, "configure_trainable"):  # the dual encoder names its towers
        from models.dual_encoder import tower_of as dual_tower_of
        return dual_tower_of(name) == "image"
    return tower_of(name) in ("image", "shared")
