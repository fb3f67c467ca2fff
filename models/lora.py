"""LoRA for nn.Linear: frozen W0, trainable A [r, in] and B [out, r] (B starts at 0), delta = B A * alpha / r.

`LoRALinear` is an `nn.Linear`, so its base tensors keep the names `weight`/`bias` and BEiT/VLMo
checkpoints load one-to-one; adapters appear as `lora_A`/`lora_B` only once enabled.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class LoRALinear(nn.Linear):
    def __init__(self, in_features, out_features, bias=True):
        super().__init__(in_features, out_features, bias=bias)
        self.register_parameter("lora_A", None)
        self.register_parameter("lora_B", None)
        self.lora_scale = 0.0

    @property
    def has_lora(self):
        return self.lora_A is not None

    def enable_lora(self, rank, alpha=1.0):
        """Add fresh adapters (output unchanged since B = 0) and freeze the base weight and bias."""
        if self.has_lora:
            raise RuntimeError("LoRA adapters are already enabled on this layer")
        device, dtype = self.weight.device, self.weight.dtype
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_scale = alpha / rank
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)

    def lora_delta(self):
        """delta W = B A * scale, [out, in]."""
        return (self.lora_B @ self.lora_A) * self.lora_scale

    def self_regularization(self):
        """sum((W0 * delta)^2): importance-weighted L2 that keeps the adapted weight near W0 where W0 is large."""
        return (self.weight * self.lora_delta()).pow(2).sum()

    @torch.no_grad()
    def merge_lora(self):
        """Write W0 + delta into `weight` and remove the adapters (so nothing can apply them twice)."""
        self.weight.add_(self.lora_delta().to(self.weight.dtype))
        self.lora_A = None
        self.lora_B = None
        self.lora_scale = 0.0

    def forward(self, x, use_lora=True, bias=None):
        """bias: replaces `self.bias` for this call (BEiT's qkv bias is assembled from q_bias and v_bias)."""
        out = F.linear(x, self.weight, self.bias if bias is None else bias)
        if use_lora and self.lora_A is not None:
            out = out + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.lora_scale
        return out


def lora_layers(model):
    """(name, module) of every LoRALinear with adapters enabled."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear) and m.has_lora]


def self_regularization_loss(model, layers=None):
    """model.reg_loss_weight * sum over adapted layers of sum((W0 * delta)^2). Under FSDP the weights are sharded
    DTensors outside the blocks' forwards: each layer's term is then summed over the ranks' shards (full_tensor),
    so every rank has the whole term, as without sharding."""
    from torch.distributed.tensor import DTensor

    layers = [m for _, m in lora_layers(model)] if layers is None else layers
    terms = [m.self_regularization() for m in layers]
    terms = [t.full_tensor() if isinstance(t, DTensor) else t for t in terms]
    return model.reg_loss_weight * torch.stack(terms).sum()


def _add_sharded_gradient(term, layers):
    """FSDP: the gradient of `term` (built from sharded DTensor weights) put straight into the adapters' sharded
    .grad, where FSDP's reduce-scatter then adds the (rank-averaged) task gradient; every rank holds the whole term,
    so its gradient is not averaged, as under DDP. Autograd through the blocks would mix layouts."""
    from torch.distributed.tensor import DTensor

    params = [p for m in layers for p in (m.lora_A, m.lora_B) if p is not None and p.requires_grad]
    grads = torch.autograd.grad(term, params, allow_unused=True)
    for p, g in zip(params, grads):
        if g is not None:
            if isinstance(p, DTensor):  # the shard layout FSDP's reduce-scatter adds into
                g = g.redistribute(p.device_mesh, p.placements)
            p.grad = g if p.grad is None else p.grad + g


def add_self_regularization(model, out, reg_scale):
    """Add the self-regularization term (times reg_scale) to out["loss"] and log it as out["reg_loss"], when the
    model has a weight for it and adapters to regularise. reg_scale 0 skips it: the training loop adds the term
    once per optimizer step, on the last micro-batch (the weights, so the term and its gradient, are the same
    for every micro-batch of a step), so B @ A is built once per step. The adapted layers are found once."""
    if model.reg_loss_weight <= 0 or reg_scale == 0:
        return out
    layers = getattr(model, "_reg_layers", None)
    if layers is None:  # adapters exist before the first step and never change during a run
        layers = model._reg_layers = [m for _, m in lora_layers(model)]
    if layers:
        reg = self_regularization_loss(model, layers)
        if any(getattr(m.weight, "device_mesh", None) is not None for m in layers):  # sharded (FSDP)
            _add_sharded_gradient(reg * reg_scale, layers)
            reg = reg.detach()
        out["loss"] = out["loss"] + reg * reg_scale
        out["reg_loss"] = reg.detach()
    return out


def swap_in_lora_linears(module):
    """Replace every nn.Linear under `module` by a LoRALinear holding the same tensors (names unchanged)."""
    for name, child in module.named_children():
        if type(child) is nn.Linear:
            new = LoRALinear(child.in_features, child.out_features, bias=child.bias is not None)
            new.weight, new.bias = child.weight, child.bias
            setattr(module, name, new)
        else:
            swap_in_lora_linears(child)
