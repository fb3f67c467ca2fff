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


def locality_prior(grid_hw, num_heads):
    """[buckets, heads] relative position table of a fresh model's image attention (config image_rel_pos_init
    "local"): head h adds -2^-h x the Euclidean distance in patches between query and key (head 0 attends mostly
    to its neighbours, the last ones nearly uniformly); the CLS buckets are 0. A soft convolutional prior from
    the first step, as ConViT's locality init; BEiT's tables (loaded weights) and "zero" start without one."""
    h, w = grid_hw
    dy = torch.arange(2 * h - 1, dtype=torch.float32) - (h - 1)
    dx = torch.arange(2 * w - 1, dtype=torch.float32) - (w - 1)
    dist = (dy[:, None] ** 2 + dx[None, :] ** 2).sqrt().flatten()  # bucket order of build_relative_position_index
    slopes = 2.0 ** -torch.arange(num_heads, dtype=torch.float32)
    table = torch.zeros(num_relative_buckets(grid_hw), num_heads)
    table[:dist.numel()] = -dist[:, None] * slopes[None, :]
    return table


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


# ---- text (text_pos="relative", VLMo's layout) ----
# One table per layer of 2 * max_len + 2 rows for text of at most max_len tokens (position 0 is [CLS]):
#   rows 0 .. 2*max_len-4   the offset (key - query) between two tokens after [CLS], -(max_len-2) .. max_len-2
#   rows 2*max_len-3 .. -1  [CLS]->token, token->[CLS], [CLS]->[CLS] (the same order as the image CLS buckets)
#   the last 2 rows         text->image and image->text, used by the fused (text first) sequence only
NUM_CROSS_BUCKETS = 2


def num_text_buckets(max_len):
    """2 * max_len: the offset and [CLS] buckets of text up to max_len tokens (392 at VLMo's 196)."""
    return 2 * max_len


def num_text_table_rows(max_len):
    return num_text_buckets(max_len) + NUM_CROSS_BUCKETS


def build_text_relative_position_index(max_len):
    """LongTensor[max_len, max_len] of text bucket ids; the index of a shorter text is its top-left corner."""
    pos = torch.arange(max_len - 1)
    total = num_text_buckets(max_len)
    index = torch.zeros(max_len, max_len, dtype=torch.long)
    index[1:, 1:] = pos[None, :] - pos[:, None] + (max_len - 2)
    index[0, :] = total - 3
    index[:, 0] = total - 2
    index[0, 0] = total - 1
    return index


def split_text_table(table):
    """[2M + 2, heads] -> (offsets [2M - 3, heads], cls [3, heads], cross [2, heads])."""
    cls_start = table.shape[0] - NUM_CROSS_BUCKETS - NUM_CLS_BUCKETS
    return table[:cls_start], table[cls_start:-NUM_CROSS_BUCKETS], table[-NUM_CROSS_BUCKETS:]


def text_table_from_parts(offsets, cls, cross, max_len):
    """Assemble a [2 * max_len + 2, heads] text table from `offsets` [2m - 3, heads] (any source length m: the
    central offsets are kept, offsets the source lacks start at zero), `cls` [3, heads] and `cross` [2, heads]."""
    want = 2 * max_len - 3
    have = offsets.shape[0]
    if have >= want:
        start = (have - want) // 2
        offsets = offsets[start:start + want]
    else:
        pad = offsets.new_zeros((want - have) // 2, offsets.shape[1])
        offsets = torch.cat([pad, offsets, pad], dim=0)
    return torch.cat([offsets, cls, cross], dim=0)


def resize_text_relative_position_table(table, max_len):
    """A text table for another maximum text length: offsets cropped or zero-padded about 0, CLS and cross kept."""
    return text_table_from_parts(*split_text_table(table), max_len).clone()
