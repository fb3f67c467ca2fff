"""BEiT-style relative position bias: bucket index for a patch grid plus a CLS token, and table resizing.

The index is always rebuilt from the grid (never loaded from a checkpoint), so checkpoints that lack it
(timm's) or carry one for another size load the same way.
"""
import torch
import torch.nn.functional as F

NUM_CLS_BUCKETS = 3  # cls->token, token->cls, cls->cls


def num_relative_buckets(grid_hw):
    """(2h-1)*(2w-1) patch-to-patch buckets plus the 3 CLS buckets (732 for a 14x14 grid)."""
    h, w = grid_hw
    return (2 * h - 1) * (2 * w - 1) + NUM_CLS_BUCKETS


def build_relative_position_index(grid_hw):
    """LongTensor[N+1, N+1] of bucket ids for a (h, w) grid with CLS at position 0."""
    h, w = grid_hw
    coords = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")).flatten(1)  # [2, N]
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)  # [N, N, 2]
    rel[:, :, 0] += h - 1
    rel[:, :, 1] += w - 1
    rel[:, :, 0] *= 2 * w - 1
    n = h * w
    total = num_relative_buckets(grid_hw)
    index = torch.zeros(n + 1, n + 1, dtype=torch.long)
    index[1:, 1:] = rel.sum(-1)
    index[0, :] = total - 3
    index[:, 0] = total - 2
    index[0, 0] = total - 1
    return index


def resize_relative_position_table(table, src_grid_hw, dst_grid_hw):
    """Resize a [buckets, heads] table from one grid to another (bicubic on the patch part, CLS kept)."""
    if tuple(src_grid_hw) == tuple(dst_grid_hw):
        return table.clone()
    sh, sw = src_grid_hw
    dh, dw = dst_grid_hw
    heads = table.shape[1]
    patch_part, cls_part = table[:-NUM_CLS_BUCKETS], table[-NUM_CLS_BUCKETS:]
    grid = patch_part.float().reshape(2 * sh - 1, 2 * sw - 1, heads).permute(2, 0, 1).unsqueeze(0)
    grid = F.interpolate(grid, size=(2 * dh - 1, 2 * dw - 1), mode="bicubic", align_corners=False)
    patch_part = grid.squeeze(0).permute(1, 2, 0).reshape(-1, heads).to(table.dtype)
    return torch.cat([patch_part, cls_part], dim=0)
