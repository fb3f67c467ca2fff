"""Model registry: `create_model(name, **overrides)` for every model, the multiway VLMo backbones and the
CLIP-family `dual_encoder`; every architecture is a plain config dict saved with its checkpoints.

Overrides are the registry's keys (`model_options(name)`): for a VLMo backbone its config entries
(embed_dim, depth, num_heads, patch_size, img_size, ffn_layout, ...), for the dual encoder the arguments of
models.dual_encoder.build_dual_encoder. An unknown key is a KeyError naming the known ones, so a
command-line `--model_kwargs` JSON is checked before anything is built.
"""
import inspect

from models.vlmo import VLMo

DUAL_ENCODER = "dual_encoder"

_DEFAULTS = dict(img_size=224, patch_size=16, mlp_ratio=4.0, vocab_size=30522, max_text_len=196,
                 ffn_layout="multiway", drop_rate=0.0, drop_path_rate=0.0, mim_vocab_size=8192,
                 mim_target="dalle", itc_loss="clip", itc_pool="cls", image_pos_embed=True, image_pos_gain=10.0,
                 image_pre_norm=False, image_rel_pos_init="zero", text_pos="absolute",
                 token_type_embed=False)
# Config keys added after checkpoints were written, with the value a checkpoint's model_config without the key
# means (the architecture it was trained with).
LEGACY_DEFAULTS = {"image_pos_embed": False, "image_pos_gain": 10.0, "image_pre_norm": False,
                   "text_pos": "absolute", "token_type_embed": False}
# image_pre_norm (a LayerNorm over the image tokens before block 0) and image_rel_pos_init ("zero" or "local", the
# image relative position tables' init) are off here, as in BEiT; a fresh image_text_itc model turns both on
# (modes/image_text_itc.py:FRESH_IMAGE_PATH).
# text_pos: "absolute" (BERT position embeddings) or "relative" (VLMo: a 1-D text relative position bias per layer,
# no position table); token_type_embed: VLMo's modality embedding. Both come from converted VLMo checkpoints
# (util/convert_vlmo_ckpt.py); a weights file's model_config decides them unless --model_kwargs does.

# Published VLMo/BEiT dimensions; vl_start = first layer (0-based) holding the vision-language expert.
# layer_scale_init: the gammas of a FRESH model (1.0: see models/vlmo.py _init_weights); BEiT weights load theirs.
_ARCHS = {
    "vlmo_tiny_patch16": dict(embed_dim=64, depth=2, num_heads=2, vl_start=1, layer_scale_init=1.0, img_size=32),
    "vlmo_small_patch16": dict(embed_dim=384, depth=12, num_heads=6, vl_start=10, layer_scale_init=1.0),
    "vlmo_base_patch16": dict(embed_dim=768, depth=12, num_heads=12, vl_start=10, layer_scale_init=1.0),
    "vlmo_large_patch16": dict(embed_dim=1024, depth=24, num_heads=16, vl_start=21, layer_scale_init=1.0),
}

# Switches a weights file's model_config decides when the run's --model_kwargs does not set them (a converted VLMo
# checkpoint has relative text positions, a token-type embedding and, text-only, no VL experts).
WEIGHTS_DEFINED = ("text_pos", "token_type_embed", "vl_start", "image_pre_norm")


def switches_of(ckpt_config, explicit=()):
    """{key: value} of WEIGHTS_DEFINED that a checkpoint's model_config records and `explicit` does not set."""
    return {k: ckpt_config[k] for k in WEIGHTS_DEFINED if k in (ckpt_config or {}) and k not in explicit}


# Keys that define which tensors exist and their shapes: checkpoints must agree on these.
ARCHITECTURE_KEYS = ("embed_dim", "depth", "num_heads", "mlp_ratio", "patch_size", "ffn_layout", "vl_start",
                     "text_pos", "token_type_embed")


def _dual_encoder_options():
    from models.dual_encoder import build_dual_encoder

    params = inspect.signature(build_dual_encoder).parameters
    return {k: (None if p.default is inspect.Parameter.empty else p.default) for k, p in params.items()}


def backbone_names():
    """The multiway (VLMo) backbones: what fine-tuning and the BEiT converter build."""
    return sorted(_ARCHS)


def model_names():
    return backbone_names() + [DUAL_ENCODER]


def model_options(name):
    """{option: default} that `create_model(name, **overrides)` accepts."""
    if name == DUAL_ENCODER:
        return _dual_encoder_options()
    if name not in _ARCHS:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(model_names())}")
    return {**_DEFAULTS, **_ARCHS[name]}


def check_overrides(name, overrides):
    unknown = set(overrides) - set(model_options(name))
    if unknown:
        raise KeyError(f"unknown option(s) {sorted(unknown)} for model {name}; known: "
                       f"{', '.join(sorted(model_options(name)))}")


def model_config(name, **overrides):
    """The config `create_model(name, **overrides)` builds from (for the dual encoder: its options; the full
    config, with tower widths, exists only once the towers are built)."""
    check_overrides(name, overrides)
    return {"name": name, **model_options(name), **overrides}


def patch_grid(name, img_size=None, overrides=None):
    """(rows, cols) of `name`'s patch grid at `img_size` (default: the model's), or None for a model without
    one (the dual encoder's timm tower checks its own); a size the patch does not divide raises ValueError."""
    options = model_options(name)
    if "patch_size" not in options:
        return None
    cfg = {**options, **({"img_size": img_size} if img_size else {}), **(overrides or {})}
    size, patch = cfg["img_size"], cfg["patch_size"]
    if size % patch:
        raise ValueError(f"{size} is not a multiple of the patch size {patch} of {name}; use "
                         f"{max(patch, size // patch * patch)} or {(size // patch + 1) * patch}")
    return size // patch, size // patch


def create_model(name, **overrides):
    """Build a model by registered name; overrides replace config entries (img_size, ffn_layout, ...)."""
    if name == DUAL_ENCODER:
        from models.dual_encoder import build_dual_encoder

        check_overrides(name, overrides)
        return build_dual_encoder(**overrides)
    return VLMo(model_config(name, **overrides))


def recorded_config(ckpt_config):
    """A multiway checkpoint's model_config with LEGACY_DEFAULTS filled in for the keys it predates ({} or None
    stays as is: no record)."""
    if not ckpt_config:
        return ckpt_config
    return {**LEGACY_DEFAULTS, **ckpt_config}


def model_from_config(config):
    """Rebuild (random weights) the architecture a checkpoint's `model_config` records."""
    from models.dual_encoder import dual_encoder_from_config, is_dual_encoder_config

    if is_dual_encoder_config(config):
        return dual_encoder_from_config(config)
    return create_model(config["name"], **{k: v for k, v in recorded_config(config).items() if k != "name"})
