"""Model registry: `create_model(name, **overrides)`; every architecture is a plain config dict."""
from models.vlmo import VLMo

_DEFAULTS = dict(img_size=224, patch_size=16, mlp_ratio=4.0, vocab_size=30522, max_text_len=196,
                 ffn_layout="multiway", drop_rate=0.0, drop_path_rate=0.0, mim_vocab_size=8192,
                 mim_target="dalle", itc_loss="clip", itc_pool="cls")

# Published VLMo/BEiT dimensions; vl_start = first layer (0-based) holding the vision-language expert.
_ARCHS = {
    "vlmo_tiny_patch16": dict(embed_dim=64, depth=2, num_heads=2, vl_start=1, layer_scale_init=0.1, img_size=32),
    "vlmo_small_patch16": dict(embed_dim=384, depth=12, num_heads=6, vl_start=10, layer_scale_init=0.1),
    "vlmo_base_patch16": dict(embed_dim=768, depth=12, num_heads=12, vl_start=10, layer_scale_init=0.1),
    "vlmo_large_patch16": dict(embed_dim=1024, depth=24, num_heads=16, vl_start=21, layer_scale_init=1e-5),
}

# Keys that define which tensors exist and their shapes: checkpoints must agree on these.
ARCHITECTURE_KEYS = ("embed_dim", "depth", "num_heads", "mlp_ratio", "patch_size", "ffn_layout", "vl_start")


def model_names():
    return sorted(_ARCHS)


def model_config(name, **overrides):
    if name not in _ARCHS:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(model_names())}")
    unknown = set(overrides) - set(_DEFAULTS) - set(_ARCHS[name])
    if unknown:
        raise KeyError(f"unknown model option(s) {sorted(unknown)}")
    return {"name": name, **_DEFAULTS, **_ARCHS[name], **overrides}


def create_model(name, **overrides):
    """Build a model by registered name; overrides replace config entries (img_size, ffn_layout, ...)."""
    return VLMo(model_config(name, **overrides))
