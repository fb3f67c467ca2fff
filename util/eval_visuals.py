"""Pictures and text for TensorBoard from one evaluation, where a person would rather look than read a number:

- `mim_panels`: image_mim. Per image: the view the model saw, the same view with the masked patches greyed,
  then (pixel target) the view with the masked patches replaced by the predicted pixels, or (dVAE target)
  the dVAE token map of the targets and the token map with the predictions in the masked cells. A token map
  colours each of the 8192 visual tokens with its own fixed colour.
- `retrieval_examples`: image_text_itc. The first few held-out images as a grid, and for each the true
  caption and the top-3 retrieved captions (a check mark on the true one).

Rank 0 builds them from what the evaluation already has (its first batch, the gathered embeddings); nothing
here is a collective. All images are float [N, 3, H, W] in [0, 1]."""
import torch

from models.embeddings import patchify, unpatchify

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


def mim_panels(images, mask, pred, patch_size, mean, std, targets=None, vocab_size=None):
    """{tag: panel} for image_mim. `images` normalised [B, 3, H, W], `mask` [B, N] bool, `pred` the head's
    output at the masked positions [M, D] (pixel: normalised patch pixels; dVAE: logits), `targets` the dVAE
    ids [B, N] (None for the pixel target)."""
    images, mask = images[:SHOWN].float(), mask[:SHOWN].bool()
    pred = pred[:int(mask.sum())].float()
    size, grid = images.shape[-1], (images.shape[-2] // patch_size, images.shape[-1] // patch_size)
    patches = patchify(images, patch_size)
    seen = denormalize(images, mean, std)
    grey = patches.clone()
    grey[mask] = 0.0  # 0 in normalised space: the mean colour
    masked = denormalize(unpatchify(grey, patch_size, grid), mean, std)
    if targets is None:
        mu, var = patches[mask].mean(-1, keepdim=True), patches[mask].var(-1, keepdim=True)
        filled = patches.clone()
        filled[mask] = pred * (var + 1e-6).sqrt() + mu  # the head predicts each patch's normalised pixels
        recon = denormalize(unpatchify(filled, patch_size, grid), mean, std)
        return {"mim/input_masked_reconstruction": side_by_side(seen, masked, recon)}
    targets = targets[:SHOWN]
    predicted = targets.clone()
    predicted[mask] = pred.argmax(-1)
    target_map = cell_map(token_colours(targets, vocab_size), grid, size)
    predicted_map = cell_map(token_colours(predicted, vocab_size), grid, size)
    return {"mim/input_masked_target-tokens_predicted-tokens": side_by_side(seen, masked, target_map, predicted_map)}


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
