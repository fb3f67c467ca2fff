"""image_mim: BEiT masked image modelling on an ImageNet-style folder (`train/<class>/<img>`).

Data: two views of one random crop per image (custom_datasets/image_dataset.py): 224 px bicubic,
normalised, for the model, and 112 px lanczos in [0, 1] for the dVAE; BEiT's blockwise mask on the patch
grid (`bool_masked_pos` [B, N]); every draw keyed by (seed, epoch, sample index).
Targets: `--mim_target dalle`: the DALL-E dVAE token of each patch, argmax of the frozen tokenizer's logits
on the 112 px view (map_pixels inside models/dvae.py), float32, no grad, computed on the device before the
forward; the tokenizer is never part of the checkpoint. `pixel`: per-patch normalised pixels (MAE's
norm_pix), no tokenizer weights needed.
Path: the shared attention stack, the patch embedding, CLS and relative position tables, the image experts,
`mask_token` (replaces the masked patch embeddings) and the MIM head (on masked positions only).
Loss: cross-entropy (or squared error) summed over masked patches, divided by the global masked count.
Evaluation: mim_loss and mim_acc per masked patch, masked patches and target diversity per image.
"""
import torch
import torch.nn.functional as F

from custom_datasets.image_dataset import ImageFolderDataset, build_two_view_transform, collate_image_batch
from custom_datasets.loaders import batches_per_epoch, eval_loader, train_loader
from custom_datasets.masking_generator import MaskingGenerator
from models.embeddings import patchify, unpatchify
from models.vlmo import MIM_TARGETS
from modes import register_mode
from modes.base import PretrainData, PretrainMode
from util.errors import UserError
from util.eval_visuals import SHOWN, cell_map, denormalize, side_by_side, token_colours
from util.evaluation import EvalSet
from util.flag_checks import Bounded, non_negative_float, positive_int
from util.logger import LOG, warn_once
from util.run_setup import dvae_file

DEFAULT_DVAE = "checkpoints/dall_e_tokenizer_weight/encoder.pkl"


def target_statistics(labels, vocab_size):
    """Distinct dVAE tokens in `labels` [..., N] (per leading row) and the entropy (nats) of their
    distribution. A wrong map_pixels or normalisation feeding the dVAE collapses both. Fixed-size scatter:
    no host sync."""
    flat = labels.reshape(-1, labels.shape[-1])
    counts = torch.zeros(flat.shape[0], vocab_size, device=flat.device).scatter_add_(
        1, flat, torch.ones_like(flat, dtype=torch.float))
    p = counts / counts.sum(1, keepdim=True)
    return (counts > 0).sum(1).float(), -(p * p.clamp(min=1e-12).log()).sum(1)


def masked_predictions(backbone, batch):
    """(the MIM head's output at the masked patches [M, D], the mask [B, N]); the patches are the collator's
    mim_positions (index_select of a known shape: no step waits for the device to count them)."""
    mask = batch["bool_masked_pos"].bool()
    feats = backbone.forward_image_features(batch["images"], mask)[:, 1:]
    selected = feats.flatten(0, 1).index_select(0, batch["mim_positions"])
    return backbone.mim_head(backbone.norm(selected)), mask


def masked_terms(backbone, batch):
    """(per-masked-patch loss [M], correct [M] or None, mask [B, N]) of the batch's masked patches."""
    pred, mask = masked_predictions(backbone, batch)
    pred, positions = pred.float(), batch["mim_positions"]
    if backbone.config["mim_target"] == "dalle":
        targets = batch["mim_labels"].flatten().index_select(0, positions)
        terms, correct = F.cross_entropy(pred, targets, reduction="none"), pred.argmax(-1) == targets
    else:
        patches = patchify(batch["images"].float(), backbone.patch_size).flatten(0, 1).index_select(0, positions)
        mean, var = patches.mean(-1, keepdim=True), patches.var(-1, keepdim=True)
        terms, correct = (pred - (patches - mean) / (var + 1e-6).sqrt()).pow(2).mean(-1), None
    return terms, correct, mask


def predict_per_image(backbone, batch, prepared=None):
    terms, correct, mask = masked_terms(backbone, batch)
    row = batch["mim_positions"] // mask.shape[1]
    zeros = torch.zeros(mask.shape[0], device=terms.device)
    out = {"loss_sum": zeros.index_add(0, row, terms), "units": mask.sum(1).float()}
    if correct is not None:
        out["correct"] = zeros.index_add(0, row, correct.float())
        out["target_distinct"], out["target_entropy"] = target_statistics(batch["mim_labels"],
                                                                          backbone.mim_head.out_features)
    return out


def per_patch_metrics(outputs):
    units = max(float(outputs["units"].sum()), 1.0)
    stats = {"masked_per_image": float(outputs["units"].mean()), "mim_loss": float(outputs["loss_sum"].sum()) / units}
    if "correct" in outputs:
        stats["mim_acc"] = float(outputs["correct"].sum()) / units
        stats["target_distinct"] = float(outputs["target_distinct"].mean())
        stats["target_entropy"] = float(outputs["target_entropy"].mean())
    return stats


class MimTargets:
    """Adds `mim_labels` [B, N] (dVAE token ids of the 112 px view) to a batch, in float32, no grad."""

    def __init__(self, dvae):
        self.dvae = dvae

    def __call__(self, batch):
        batch["mim_labels"] = self.dvae(batch["images_for_vae"])


def held_out_set(loader, num_items, targets=None, image_state=None):
    """The image_mim evaluation of a loader of two-view batches (also used by util/forgetting_probe.py);
    `targets`: a MimTargets for dVAE targets; with `image_state` (its mean/std), TensorBoard panels of the
    first batch (util/eval_visuals.mim_panels)."""
    def predict(backbone, batch, prepared):
        if targets is not None:
            targets(batch)
        return predict_per_image(backbone, batch)

    def visualize(backbone, batch, merged):
        pred, mask = masked_predictions(backbone, batch)
        dalle = backbone.config["mim_target"] == "dalle"
        return {"images": mim_panels(batch["images"], mask, pred, backbone.patch_size, image_state["mean"],
                                     image_state["std"], batch["mim_labels"] if dalle else None,
                                     backbone.mim_head.out_features)}

    return EvalSet(loader=loader, num_items=num_items, predict=predict, metrics=per_patch_metrics,
                   visualize=visualize if image_state is not None else None)


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


BEIT_MASKING = (75, 16)  # masked patches per image and the smallest block, for BEiT's 14x14 grid


@register_mode
class ImageMIM(PretrainMode):
    name = "image_mim"
    towers = ("image",)
    heads = (r"mask_token$", r"mim_head\.")

    def __init__(self, args):
        super().__init__(args)
        self.targets = None

    @staticmethod
    def add_args(group):
        group.add_argument("--mim_target", default="dalle", choices=MIM_TARGETS,
                           help="image_mim: dalle = dVAE tokens of the masked patches; pixel = normalised-pixel "
                                "regression")
        group.add_argument("--dvae_path", default=DEFAULT_DVAE,
                           help="DALL-E encoder.pkl or its safetensors conversion (util/convert_dvae.py); an "
                                "encoder.safetensors beside the .pkl is preferred")
        group.add_argument("--num_mask_patches", type=positive_int(), default=None,
                           help=f"image_mim: masked patches per image (default: {BEIT_MASKING[0]} of 196 for a 14x14 "
                                "grid, the same share of another)")
        group.add_argument("--min_mask_patches", type=positive_int(), default=None,
                           help=f"image_mim: smallest masked block (default: {BEIT_MASKING[1]} of 196, scaled alike)")
        group.add_argument("--max_mask_aspect", type=Bounded(float, 1), default=1 / 0.3, help="image_mim: block aspect bound")
        group.add_argument("--color_jitter", type=non_negative_float(), default=0.4, help="image_mim: colour jitter strength")

    @staticmethod
    def check_inputs(args, grid):
        """Masking sizes fit the grid: not given, BEiT's (75 and 16, for 14x14) are scaled to its area and the
        change printed; given, one that cannot fit is an error naming the flag."""
        if args.mim_target == "dalle":
            dvae_file(args.dvae_path)
        patches = grid[0] * grid[1]
        scaled = {"num_mask_patches": max(1, round(BEIT_MASKING[0] * patches / 196))}
        scaled["min_mask_patches"] = max(1, min(args.num_mask_patches or scaled["num_mask_patches"],
                                                round(BEIT_MASKING[1] * patches / 196)))
        filled = [flag for flag in scaled if getattr(args, flag) is None]
        for flag in filled:
            setattr(args, flag, scaled[flag])
        if filled and patches != 196:
            warn_once("image_mim: " + " and ".join(f"--{f} {BEIT_MASKING[k]} -> {getattr(args, f)}"
                                                   for k, f in enumerate(scaled) if f in filled)
                      + f" for the {grid[0]}x{grid[1]} patch grid (BEiT's shares of its 14x14 grid); pass them to "
                        "choose")
        if args.num_mask_patches >= patches:
            raise UserError(f"--num_mask_patches {args.num_mask_patches}: the {grid[0]}x{grid[1]} patch grid has "
                            f"{patches} patches; mask fewer than all of them")
        if args.min_mask_patches > args.num_mask_patches:
            raise UserError(f"--min_mask_patches {args.min_mask_patches} is more than --num_mask_patches "
                            f"{args.num_mask_patches}")

    def setup(self, device):
        if self.args.mim_target != "dalle":
            return
        from models.dvae import DVAETokenizer

        path = dvae_file(self.args.dvae_path)
        dvae = DVAETokenizer.from_path(path).to(device)
        LOG.info(f"dVAE tokenizer: {path} ({dvae.vocab_size} visual tokens); kept outside the model checkpoint")
        self.targets = MimTargets(dvae)

    def model_overrides(self):
        out = {"mim_target": self.args.mim_target}
        if self.targets is not None:
            out["mim_vocab_size"] = self.targets.dvae.vocab_size
        return out

    def masking(self, grid):
        a = self.args
        return MaskingGenerator(grid, num_masking_patches=a.num_mask_patches, min_num_patches=a.min_mask_patches,
                                min_aspect=1 / a.max_mask_aspect, max_aspect=a.max_mask_aspect)

    def build_data(self, tokenizer, image_state, rank, world_size, grid):
        a = self.args
        masking = self.masking(grid)
        transform = build_two_view_transform(image_state, masking=masking, color_jitter=a.color_jitter)
        train_set = ImageFolderDataset(a.data_path, transform, seed=a.seed)
        loader, sampler = train_loader(train_set, collate_image_batch, a.batch_size, rank, world_size, a.seed,
                                       a.num_workers, a.pin_mem, "--data_path")
        val, val_set = None, None
        if a.val_data_path:
            # Held-out views: no colour jitter, full-image crop, masks keyed by a fixed epoch.
            val_tf = build_two_view_transform(image_state, masking=masking, color_jitter=0.0, scale=(1.0, 1.0))
            val_set = ImageFolderDataset(a.val_data_path, val_tf, seed=a.seed + 1)
            val = eval_loader(val_set, collate_image_batch, a.batch_size, rank, world_size,
                              min(a.num_workers, 2), a.pin_mem)
        return PretrainData(loader, sampler, val, batches_per_epoch(sampler, a.batch_size), len(train_set),
                            len(val_set) if val_set is not None else 0, val_set)

    def prepare_batch(self, batch):
        if self.targets is not None:
            self.targets(batch)

    def loss_units(self, batch):
        return batch["mim_count"]

    def loss(self, backbone, batch):
        terms, correct, mask = masked_terms(backbone, batch)
        total = terms.sum()
        with torch.no_grad():
            denom = mask.sum().clamp(min=1)
            metrics = {"mim_loss": total.detach() / denom, "masked_per_image": mask.sum().float() / mask.shape[0]}
            if correct is not None:
                distinct, entropy = target_statistics(batch["mim_labels"].reshape(1, -1),
                                                      backbone.mim_head.out_features)
                metrics.update(mim_acc=correct.sum().float() / denom, target_distinct=distinct[0],
                               target_entropy=entropy[0])
        return {"loss": total, **metrics}

    def eval_sets(self, data, tokenizer, image_state, rank, world_size):
        if data.val_loader is None:
            return []
        return [held_out_set(data.val_loader, data.num_val, self.targets, image_state)]
