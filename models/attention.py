"""BEiT-compatible self-attention: `qkv` without bias plus `q_bias`/`v_bias`, optional per-layer relative
position bias, SDPA kernels. The plain-math path exists only as a test oracle."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from models.lora import LoRALinear
from models.relative_position import build_relative_position_index, num_relative_buckets


class Attention(nn.Module):
    def __init__(self, dim, num_heads, grid_hw=None, attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed dim {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = LoRALinear(dim, dim * 3, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.attn_drop = attn_drop
        self.proj = LoRALinear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.grid_hw = tuple(grid_hw) if grid_hw is not None else None
        if grid_hw is not None:
            self.relative_position_bias_table = nn.Parameter(torch.zeros(num_relative_buckets(grid_hw), num_heads))
            self.register_buffer("relative_position_index", build_relative_position_index(grid_hw), persistent=False)

    def relative_position_bias(self):
        """[heads, N+1, N+1] additive bias for the image grid."""
        n = self.relative_position_index.shape[0]
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return bias.view(n, n, self.num_heads).permute(2, 0, 1).contiguous()

    def forward(self, x, attn_mask=None, use_rel_pos=False, use_lora=True, math_attention=False):
        """x [B, L, D]; attn_mask: bool [B, 1, 1, L] (True = attend) or None. Returns [B, L, D]."""
        b, length, dim = x.shape
        qkv_bias = torch.cat([self.q_bias, torch.zeros_like(self.v_bias), self.v_bias])
        qkv = self.qkv(x, use_lora=use_lora, bias=qkv_bias)
        q, k, v = qkv.view(b, length, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        mask = attn_mask
        if use_rel_pos:
            bias = self.relative_position_bias().unsqueeze(0).to(q.dtype)
            if attn_mask is not None:
                bias = bias.masked_fill(~attn_mask, float("-inf"))
            mask = bias
        drop = self.attn_drop if self.training else 0.0
        if math_attention:
            out = _math_attention(q, k, v, mask, drop)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop)
        out = out.transpose(1, 2).reshape(b, length, dim)
        return self.proj_drop(self.proj(out, use_lora=use_lora))


def _math_attention(q, k, v, mask, drop):
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    return F.dropout(scores.softmax(-1), drop) @ v
