"""One function per pretraining mode: (model, samples, loss_normalizer) -> dict of losses and metrics.

Every objective is a sum over its loss units (masked tokens, masked patches, or image-text rows)
divided by `loss_normalizer`; `loss_units` counts those units in a batch so the training loop can
agree on the global count across ranks and accumulation steps before the first backward.
"""
import contextlib

import torch
import torch.nn.functional as F

from models.contrastive import contrastive_loss


def loss_units(samples, mode):
    """Number of loss terms in a batch (a 0-dim long tensor on the batch's device)."""
    if mode == "text_mlm":
        return (samples["text_labels"] != -100).sum()
    if mode == "image_mim":
        return samples["bool_masked_pos"].sum()
    if mode == "image_text_itc":
        return torch.tensor(samples["images"].shape[0], device=samples["images"].device)
    raise ValueError(f"unknown mode {mode!r}")


def _normalize(total, units, loss_normalizer):
    denom = units.clamp(min=1).to(total.dtype) if loss_normalizer is None else loss_normalizer
    return total / denom


def text_mlm(model, samples, loss_normalizer=None):
    labels = samples["text_labels"]
    feats = model.norm(model.forward_text_features(samples["text_ids"], samples["text_masks"]))
    selected = labels != -100
    logits = model.mlm_head(feats[selected]).float()  # decoder only on masked positions
    targets = labels[selected]
    total = F.cross_entropy(logits, targets, reduction="sum")
    units = selected.sum()
    with torch.no_grad():
        correct = (logits.argmax(-1) == targets).sum()
        denom = units.clamp(min=1)
        return_metrics = {"mlm_loss": total.detach() / denom, "mlm_acc": correct.float() / denom}
    return {"loss": _normalize(total, units, loss_normalizer), **return_metrics}


def patchify(images, patch_size):
    """[B, 3, H, W] -> [B, N, p*p*3] in the patch order of the patch embedding."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // patch_size, patch_size, w // patch_size, patch_size)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // patch_size) * (w // patch_size), patch_size ** 2 * c)


def target_statistics(labels, vocab_size):
    """Distinct dVAE tokens in the batch and the entropy (nats) of their distribution. A wrong map_pixels or
    normalisation feeding the dVAE collapses both. Fixed-size scatter: no host sync."""
    flat = labels.reshape(-1)
    counts = torch.zeros(vocab_size, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.float))
    p = counts / counts.sum()
    return {"target_distinct": (counts > 0).sum().float(), "target_entropy": -(p * p.clamp(min=1e-12).log()).sum()}


def image_mim(model, samples, loss_normalizer=None):
    mask = samples["bool_masked_pos"].bool()
    feats = model.norm(model.forward_image_features(samples["images"], mask))[:, 1:]
    pred = model.mim_head(feats[mask]).float()
    units = mask.sum()
    denom = units.clamp(min=1)
    if model.config["mim_target"] == "dalle":
        targets = samples["mim_labels"][mask]
        total = F.cross_entropy(pred, targets, reduction="sum")
        with torch.no_grad():
            metrics = {"mim_loss": total.detach() / denom,
                       "mim_acc": (pred.argmax(-1) == targets).sum().float() / denom,
                       **target_statistics(samples["mim_labels"], pred.shape[-1])}
    else:
        # Normalised-pixel regression (MAE's norm_pix target): per-patch mean/std removed.
        patches = patchify(samples["images"].float(), model.patch_size)[mask]
        mean, var = patches.mean(-1, keepdim=True), patches.var(-1, keepdim=True)
        target = (patches - mean) / (var + 1e-6).sqrt()
        total = (pred - target).pow(2).mean(-1).sum()
        metrics = {"mim_loss": total.detach() / denom}
    metrics["masked_per_image"] = units.detach().float() / mask.shape[0]
    return {"loss": _normalize(total, units, loss_normalizer), **metrics}


def image_text_itc(model, samples, loss_normalizer=None):
    # A locked tower (LiT) runs without building a graph: its embeddings cannot change anyway.
    with torch.no_grad() if "image" in model.locked_towers else contextlib.nullcontext():
        img = model.encode_image(samples["images"])
    with torch.no_grad() if "text" in model.locked_towers else contextlib.nullcontext():
        txt = model.encode_text(samples["text_ids"], samples["text_masks"])
    out = contrastive_loss(model, img, txt)
    rows = torch.tensor(img.shape[0], device=img.device)
    total = out.pop("loss") * rows  # per-row mean -> sum over this rank's rows
    metrics = {k: v.detach() for k, v in out.items()}
    metrics["itc_loss"] = total.detach() / rows
    if "duplicate_caption_fraction" in samples:
        metrics["duplicate_captions"] = samples["duplicate_caption_fraction"].float()
    return {"loss": _normalize(total, rows, loss_normalizer), **metrics}
