"""Input embeddings: image patches (16x16 conv, BEiT names) and BERT-style text embeddings."""
import torch
import torch.nn as nn


def patchify(images, patch_size):
    """[B, 3, H, W] -> [B, N, p*p*3] in the patch order of the patch embedding (row-major patches; inside a
    patch row, column, then channel)."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // patch_size, patch_size, w // patch_size, patch_size)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // patch_size) * (w // patch_size), patch_size ** 2 * c)


def unpatchify(patches, patch_size, grid):
    """patchify's inverse: [B, N, p*p*3] -> [B, 3, H, W] for a (rows, cols) `grid`."""
    b, (h, w), p = patches.shape[0], grid, patch_size
    return patches.reshape(b, h, w, p, p, 3).permute(0, 5, 1, 3, 2, 4).reshape(b, 3, h * p, w * p)


class PatchEmbed(nn.Module):
    def __init__(self, img_size=224, patch_size=16, in_chans=3, dim=768):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        self.grid_hw = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_hw[0] * self.grid_hw[1]
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, images):
        """images [B, 3, H, W] -> [B, N, D]."""
        return self.proj(images).flatten(2).transpose(1, 2)


TEXT_POSITIONS = ("absolute", "relative")


class TextEmbeddings(nn.Module):
    """word + absolute position + token type, then LayerNorm (BERT layout). positions="relative" (VLMo's text,
    HF BertEmbeddings with position_embedding_type="rel_pos"): no position table; the attention's relative
    text bias carries the positions."""

    def __init__(self, vocab_size, dim, max_len=196, type_vocab_size=2, drop=0.0, positions="absolute"):
        super().__init__()
        if positions not in TEXT_POSITIONS:
            raise ValueError(f"text_pos must be one of {TEXT_POSITIONS}, got {positions!r}")
        self.word_embeddings = nn.Embedding(vocab_size, dim)
        self.position_embeddings = nn.Embedding(max_len, dim) if positions == "absolute" else None
        self.token_type_embeddings = nn.Embedding(type_vocab_size, dim)
        self.norm = nn.LayerNorm(dim, eps=1e-12)
        self.drop = nn.Dropout(drop)
        self.register_buffer("position_ids", torch.arange(max_len), persistent=False)

    def forward(self, ids):
        """ids [B, L] -> [B, L, D]."""
        length = ids.shape[1]
        if length > self.position_ids.numel():
            raise ValueError(f"text of {length} tokens exceeds the model's {self.position_ids.numel()} positions")
        x = self.word_embeddings(ids)
        if self.position_embeddings is not None:
            x = x + self.position_embeddings(self.position_ids[:length])
        x = x + self.token_type_embeddings.weight[0]
        return self.drop(self.norm(x))
