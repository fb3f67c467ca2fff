"""Merging LoRA adapters into their base weights, on a state dict (no model needed).

A `LoRALinear` with adapters saves `<layer>.weight` (W0, frozen), `<layer>.bias`, `<layer>.lora_A`
[r, in] and `<layer>.lora_B` [out, r]; its output is x W0^T + x (B A)^T * alpha / r. Merging writes
W0 + B A * alpha / r into `<layer>.weight` and drops both adapter tensors, so the result loads into a
model without adapters and gives the same outputs. Leaving `lora_*` in a "merged" file is the known
defect this avoids: a later `--lora_rank` run would apply the old delta a second time.
"""

LORA_SUFFIXES = (".lora_A", ".lora_B")


def lora_layers_in(state_dict):
    """Sorted layer prefixes (e.g. 'blocks.0.attn.qkv') that carry LoRA adapters in `state_dict`."""
    return sorted({k[: -len(s)] for k in state_dict for s in LORA_SUFFIXES if k.endswith(s)})


def has_lora(state_dict):
    return any(k.endswith(LORA_SUFFIXES) for k in state_dict)


def lora_ranks(state_dict):
    """{layer prefix: rank} read from the shapes of the lora_A tensors ([r, in])."""
    return {k[: -len(".lora_A")]: int(v.shape[0]) for k, v in state_dict.items() if k.endswith(".lora_A")}


def merge_lora_state_dict(state_dict, lora_alpha=1.0):
    """Return a new state dict with every adapter folded into its layer's weight and no `lora_*` tensors.

    state_dict: {name: tensor}, as saved from a model with LoRA enabled (unchanged by this call).
    lora_alpha: a float used for every layer (scale = alpha / rank, rank from lora_A's shape), or a dict
        {layer prefix: alpha} for checkpoints whose layers differ.
    The delta is computed in float32 and cast back to the weight's dtype. Raises ValueError when an
    adapter lacks its partner, its base weight, or has shapes that do not fit the weight.
    """
    out = {k: v for k, v in state_dict.items() if not k.endswith(LORA_SUFFIXES)}
    for layer in lora_layers_in(state_dict):
        a_key, b_key, w_key = f"{layer}.lora_A", f"{layer}.lora_B", f"{layer}.weight"
        missing = [k for k in (a_key, b_key, w_key) if k not in state_dict]
        if missing:
            raise ValueError(f"LoRA layer {layer}: missing {', '.join(missing)}")
        a, b, w = state_dict[a_key], state_dict[b_key], state_dict[w_key]
        rank = a.shape[0]
        if a.dim() != 2 or b.dim() != 2 or b.shape[1] != rank or (b.shape[0], a.shape[1]) != tuple(w.shape):
            raise ValueError(f"LoRA layer {layer}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not "
                             f"fit weight {tuple(w.shape)}")
        alpha = lora_alpha[layer] if isinstance(lora_alpha, dict) else lora_alpha
        delta = (b.float() @ a.float()) * (float(alpha) / rank)
        out[w_key] = (w.float() + delta).to(w.dtype)
    return out
