"""AdamW parameter groups: no weight decay on biases, norms, tokens, embedding tables and position tables.

The input embeddings (the word-embedding table and the patch-embedding projection) are not decayed either: each is
followed by a LayerNorm (the text embeddings' own, the first block's norm1), so decay only shrinks their scale,
which raises their effective learning rate; and AdamW's decoupled decay shrinks every row of the word table at
every step while a rare token's row is updated only when it occurs. On the ITC benchmark (4x128, patch 8, 330
steps, scripts/bench_itc_learning.py, seeds 0-4) it lifted the dual encoder's zero-shot top-1 from 0.983 to 0.988
(open_clip 0.990) and left the multiway model's within noise (CLS 0.987 -> 0.984, mean 0.986 -> 0.985); text_mlm's
held-out loss after 300 steps is unchanged (6.2088 -> 6.2087, scripts/bench_mlm_learning.py, seed 0). open_clip
decays both; the MLM decoder here is a separate Linear, untied, and keeps its decay. A checkpoint whose optimizer
grouped its parameters under the earlier rule resumes by parameter name (util.sharded_checkpoint.regrouped)."""
import torch

_NO_DECAY_NAMES = ("cls_token", "pos_embed", "mask_token", "relative_position_bias_table", "position_embeddings",
                   "token_type_embeddings", "gamma_1", "gamma_2", "logit_scale", "logit_bias", "q_bias", "v_bias",
                   "word_embeddings", "patch_embed.proj.weight")


def skips_weight_decay(name, param):
    return param.ndim <= 1 or name.endswith(".bias") or any(k in name for k in _NO_DECAY_NAMES)


def param_groups(model, weight_decay, lr_scale_of=None):
    """Groups of trainable parameters keyed by (decay, lr_scale); `lr_scale_of(name)` gives layer decay."""
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = 0.0 if skips_weight_decay(name, p) else weight_decay
        scale = lr_scale_of(name) if lr_scale_of else 1.0
        g = groups.setdefault((decay, scale), {"params": [], "param_names": [], "weight_decay": decay,
                                               "lr_scale": scale})
        g["params"].append(p)
        g["param_names"].append(name)
    return list(groups.values())


def build_adamw(model, lr, weight_decay, betas=(0.9, 0.95), lr_scale_of=None):
    """AdamW over `model`'s trainable parameters; the groups keep their `param_names` (saved in the optimizer's
    state dict, so a checkpoint's optimizer state can be matched by name: util.sharded_checkpoint)."""
    groups = param_groups(model, weight_decay, lr_scale_of)
    fused = next(model.parameters()).is_cuda
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused)
