"""AdamW parameter groups: no weight decay on biases, norms, tokens, embeddings tables and position tables."""
import torch

_NO_DECAY_NAMES = ("cls_token", "pos_embed", "mask_token", "relative_position_bias_table", "position_embeddings",
                   "token_type_embeddings", "gamma_1", "gamma_2", "logit_scale", "logit_bias", "q_bias", "v_bias")


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
