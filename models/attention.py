"""BEiT-compatible self-attention: `qkv` without bias plus `q_bias`/`v_bias`, per-layer relative position bias
(the image grid's and, with text_pos="relative", VLMo's 1-D text table with the two text<->image buckets), SDPA
kernels. The plain-math path exists only as a test oracle."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from models.lora import LoRALinear
from models.relative_position import (build_relative_position_index, build_text_relative_position_index,
                                     num_relative_buckets, num_text_table_rows)


class Attention(nn.Module):
    def __init__(self, dim, num_heads, grid_hw=None, attn_drop=0.0, proj_drop=0.0, text_max_len=None):
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
        if text_max_len is not None:  # text_pos="relative"
            self.text_relative_position_bias_table = nn.Parameter(torch.zeros(num_text_table_rows(text_max_len),
                                                                              num_heads))
            self.register_buffer("text_relative_position_index", build_text_relative_position_index(text_max_len),
                                 persistent=False)

    def relative_position_bias(self):
        """[heads, N+1, N+1] additive bias for the image grid."""
        n = self.relative_position_index.shape[0]
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return bias.view(n, n, self.num_heads).permute(2, 0, 1).contiguous()

    def text_relative_position_bias(self, length):
        """[heads, L, L] additive bias of a text of `length` tokens ([CLS] first), or None (absolute positions)."""
        if not hasattr(self, "text_relative_position_bias_table"):
            return None
        index = self.text_relative_position_index[:length, :length].reshape(-1)
        return self.text_relative_position_bias_table[index].view(length, length, -1).permute(2, 0, 1)

    def fused_relative_position_bias(self, text_len, length):
        """[heads, L, L] bias of a fused sequence (text_len text tokens, then the image's CLS and patches): the
        two tables on their diagonal blocks, the text->image and image->text buckets off it (zero where the
        model has no text table)."""
        image = self.relative_position_bias()
        text = self.text_relative_position_bias(text_len)
        h, n_img = self.num_heads, length - text_len
        if text is None:
            text, t2i, i2t = image.new_zeros(h, text_len, text_len), image.new_zeros(h), image.new_zeros(h)
        else:
            t2i, i2t = self.text_relative_position_bias_table[-2], self.text_relative_position_bias_table[-1]
        top = torch.cat([text, t2i[:, None, None].expand(h, text_len, n_img)], dim=2)
        bottom = torch.cat([i2t[:, None, None].expand(h, n_img, text_len), image], dim=2)
        return torch.cat([top, bottom], dim=1)

    def position_bias(self, modality, length, text_len=None):
        """[heads, L, L] relative position bias of a `modality` ("image", "text", "vl") sequence, or None."""
        if modality == "image":
            return self.relative_position_bias() if self.grid_hw is not None else None
        if modality == "text":
            return self.text_relative_position_bias(length)
        return self.fused_relative_position_bias(text_len, length)

    def forward(self, x, attn_mask=None, modality="image", use_lora=True, text_len=None, math_attention=False):
        """x [B, L, D]; attn_mask: bool [B, 1, 1, L] (True = attend) or None; modality picks the relative
        position bias ("vl": a fused sequence whose first text_len tokens are text). Returns [B, L, D]."""
        b, length, dim = x.shape
        qkv_bias = torch.cat([self.q_bias, torch.zeros_like(self.v_bias), self.v_bias])
        qkv = self.qkv(x, use_lora=use_lora, bias=qkv_bias)
        q, k, v = qkv.view(b, length, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        mask = attn_mask
        bias = self.position_bias(modality, length, text_len)
        if bias is not None:
            bias = bias.unsqueeze(0).to(q.dtype)
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
