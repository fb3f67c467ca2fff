"""Pre-LayerNorm transformer block with shared attention and a feed-forward part routed by modality.

`ffn_layout="multiway"` (VLMo experts): `mlp_imag`/`norm2_imag` for image tokens, `mlp_text`/`norm2_text`
for text tokens, and in the top layers `mlp_vl`/`norm2_vl` for fused sequences.
`ffn_layout="shared"`: one `mlp`/`norm2` for every modality (new modalities learn through LoRA).
"""
from functools import partial

import torch
import torch.nn as nn

from models.attention import Attention
from models.checkpointing import maybe_checkpoint
from models.layers import DropPath
from models.lora import LoRALinear

LayerNorm = partial(nn.LayerNorm, eps=1e-6)
FFN_LAYOUTS = ("multiway", "shared")
MODALITIES = ("image", "text", "vl")


class Mlp(nn.Module):
    def __init__(self, dim, hidden, drop=0.0):
        super().__init__()
        self.fc1 = LoRALinear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = LoRALinear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x, use_lora=True):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x, use_lora=use_lora))), use_lora=use_lora))


class MultiwayBlock(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio=4.0, ffn_layout="multiway", has_vl_expert=False, grid_hw=None,
                 drop=0.0, attn_drop=0.0, drop_path=0.0, layer_scale_init=0.1, text_max_len=None):
        super().__init__()
        if ffn_layout not in FFN_LAYOUTS:
            raise ValueError(f"ffn_layout must be one of {FFN_LAYOUTS}, got {ffn_layout!r}")
        self.ffn_layout = ffn_layout
        self.has_vl_expert = has_vl_expert
        hidden = int(dim * mlp_ratio)
        self.norm1 = LayerNorm(dim)
        self.attn = Attention(dim, num_heads, grid_hw=grid_hw, attn_drop=attn_drop, proj_drop=drop,
                              text_max_len=text_max_len)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        if ffn_layout == "shared":
            self.norm2, self.mlp = LayerNorm(dim), Mlp(dim, hidden, drop)
        else:
            self.norm2_imag, self.mlp_imag = LayerNorm(dim), Mlp(dim, hidden, drop)
            self.norm2_text, self.mlp_text = LayerNorm(dim), Mlp(dim, hidden, drop)
            if has_vl_expert:
                self.norm2_vl, self.mlp_vl = LayerNorm(dim), Mlp(dim, hidden, drop)
        if layer_scale_init > 0:
            self.gamma_1 = nn.Parameter(layer_scale_init * torch.ones(dim))
            self.gamma_2 = nn.Parameter(layer_scale_init * torch.ones(dim))
        else:
            self.gamma_1 = self.gamma_2 = None

    def expert(self, modality):
        """(norm, mlp) serving one modality."""
        if self.ffn_layout == "shared":
            return self.norm2, self.mlp
        suffix = {"image": "imag", "text": "text", "vl": "vl"}[modality]
        return getattr(self, f"norm2_{suffix}"), getattr(self, f"mlp_{suffix}")

    def ffn(self, x, modality, text_len, use_lora):
        if modality != "vl" or self.ffn_layout == "shared" or self.has_vl_expert:
            norm, mlp = self.expert(modality)
            return mlp(norm(x), use_lora=use_lora)
        # Lower layers of a fused (text first) sequence: split by position between the two experts.
        text_part, image_part = x[:, :text_len], x[:, text_len:]
        return torch.cat([self.mlp_text(self.norm2_text(text_part), use_lora=use_lora),
                          self.mlp_imag(self.norm2_imag(image_part), use_lora=use_lora)], dim=1)

    def forward(self, x, modality, attn_mask=None, use_lora=True, text_len=None, math_attention=False):
        """x [B, L, D] of one modality ("image", "text") or fused ("vl": the first text_len tokens are text);
        recomputed in the backward when marked by models.checkpointing.set_grad_checkpointing."""
        return maybe_checkpoint(self, self._forward, x, modality, attn_mask, use_lora, text_len, math_attention)

    def _forward(self, x, modality, attn_mask, use_lora, text_len, math_attention):
        a = self.attn(self.norm1(x), attn_mask=attn_mask, modality=modality, use_lora=use_lora, text_len=text_len,
                      math_attention=math_attention)
        x = x + self.drop_path(a if self.gamma_1 is None else self.gamma_1 * a)
        f = self.ffn(x, modality, text_len, use_lora)
        return x + self.drop_path(f if self.gamma_2 is None else self.gamma_2 * f)
