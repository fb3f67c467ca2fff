"""Layer-wise learning-rate decay (BEiT fine-tuning): lower layers move less than the top ones.

Layer ids run 0 (embeddings) .. depth + 1 (final norm and heads); the lr of layer i is scaled by
`decay ** (depth + 1 - i)`, so the heads train at the full lr and the embeddings at decay ** (depth + 1).
Names may carry a wrapper prefix (`backbone.blocks.3.attn.qkv.weight`).
"""
import re

_EMBEDDINGS = ("patch_embed", "cls_token", "mask_token", "text_embeddings", "pos_embed",
               "token_type_embeddings", "image_pre_norm")
_BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)\.")


def _strip_prefix(name):
    for prefix in ("module.", "backbone."):
        if name.startswith(prefix):
            name = name[len(prefix):]
    return name


def layer_id_for(name, depth):
    """0 for embeddings, i + 1 for `blocks.i.*`, depth + 1 for everything else (final norm, heads,
    ITC projections, temperature)."""
    name = _strip_prefix(name)
    if name.split(".")[0] in _EMBEDDINGS:
        return 0
    m = _BLOCK.match(name) if name.startswith("blocks.") else None
    if m:
        return int(m.group(1)) + 1
    return depth + 1


def layer_decay_scale(depth, decay):
    """lr_scale_of(name) for util.optim_factory.build_adamw / param_groups."""
    if not 0 < decay <= 1:
        raise ValueError(f"layer decay must be in (0, 1], got {decay}")

    def lr_scale_of(name):
        return decay ** (depth + 1 - layer_id_for(name, depth))

    return lr_scale_of
