"""Pictures and text for TensorBoard from one evaluation, where a person would rather look than read a number:

- image_mim's panels (modes/image_mim.py: mim_panels, built from the helpers here). Per image: the view
  the model saw, the same view with the masked patches greyed, then (pixel target) the view with the masked patches replaced by the predicted pixels, or (dVAE target)
  the dVAE token map of the targets and the token map with the predictions in the masked cells. A token map
  colours each of the 8192 visual tokens with its own fixed colour.
- `retrieval_examples`: image_text_itc. The first few held-out images as a grid, and for each the true
  caption and the top-3 retrieved captions (a check mark on the true one).

Rank 0 builds them from what the evaluation already has (its first batch, the gathered embeddings); nothing
here is a collective. All images are float [N, 3, H, W] in [0, 1]."""
import torch

SHOWN = 4  # images per panel


def denormalize(images, mean, std):
    """A normalised batch back to [0, 1] pixels."""
    mean = torch.as_tensor(mean, device=images.device).view(1, -1, 1, 1)
    std = torch.as_tensor(std, device=images.device).view(1, -1, 1, 1)
    return (images.float() * std + mean).clamp(0, 1)


def token_colours(ids, vocab_size):
    """A fixed colour per token id: [..., 3] in [0, 1] (the same colours on every run)."""
    palette = torch.rand(vocab_size, 3, generator=torch.Generator().manual_seed(0)).to(ids.device)
    return palette[ids]


def cell_map(values, grid, size):
    """Per-patch values [B, N, 3] -> an image [B, 3, size, size] of cells (nearest-neighbour upsampling)."""
    b = values.shape[0]
    cells = values.reshape(b, grid[0], grid[1], 3).permute(0, 3, 1, 2)
    return torch.nn.functional.interpolate(cells.float(), size=(size, size), mode="nearest")


def side_by_side(*columns):
    """[B, 3, H, W] each -> [B, 3, H, W * len(columns)] with a 2-pixel white gap."""
    gap = torch.ones_like(columns[0][..., :2])
    parts = []
    for c in columns:
        parts += [c, gap]
    return torch.cat(parts[:-1], dim=-1)


def retrieval_examples(image_emb, text_emb, first_caption_of_image, caption, image_of, k=3):
    """(markdown, image indices) for the first SHOWN images: their true caption and the top-k captions.
    `first_caption_of_image[j]`: a pair index of image j; `caption(i)`: the text of pair i; `image_of[i]`: the
    image index of pair i."""
    shown = list(range(min(SHOWN, len(first_caption_of_image))))
    sims = image_emb[first_caption_of_image[shown]] @ text_emb.T
    lines = []
    for row, j in enumerate(shown):
        top = sims[row].topk(min(k, sims.shape[1])).indices.tolist()
        pair = int(first_caption_of_image[j])
        lines.append(f"**image {j + 1}** (true: _{caption(pair)}_)  ")
        lines += [f"{n + 1}. {caption(i)}{' ✓' if int(image_of[i]) == j else ''}  " for n, i in enumerate(top)]
        lines.append("")
    return "\n".join(lines), [int(first_caption_of_image[j]) for j in shown]
