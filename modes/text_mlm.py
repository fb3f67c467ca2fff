"""text_mlm: BERT masked language modelling on captions.

Data: a caption file (`[{"caption": ...}, ...]` JSON, JSONL or text; custom_datasets/text_dataset.py),
tokenized and masked in the data workers by custom_datasets.mlm_collator.MLMCollator: 15% of the
non-special, non-pad tokens (at least one per sequence), of those 80% [MASK], 10% random, 10% kept; labels
-100 elsewhere; every draw keyed by (seed, epoch, sample index).
Path: the shared attention stack, the text embeddings and text experts, and the MLM head.
Loss: cross-entropy summed over the masked tokens; the loop divides it by the masked count of the global
batch (all ranks and micro-steps), so 2 ranks or accumulation give the gradient of 1 rank on the whole batch.
Evaluation: mlm_loss and mlm_acc per masked token over the held-out captions (masks keyed by a fixed seed).
"""
import torch
import torch.nn.functional as F

from custom_datasets.loaders import batches_per_epoch, eval_loader, train_loader
from custom_datasets.mlm_collator import MLMCollator
from custom_datasets.text_dataset import CaptionDataset
from modes import register_mode
from modes.base import PretrainData, PretrainMode
from util.evaluation import EvalSet
from util.flag_checks import fraction
from util.logger import LOG


def masked_logits(backbone, batch):
    """(logits [M, vocab] float32, targets [M]) of the batch's M masked tokens (the collator's mlm_positions, so no
    step waits for the device to count them); the final norm and the decoder run on those only."""
    feats = backbone.forward_text_features(batch["text_ids"], batch["text_masks"])
    positions = batch["mlm_positions"]
    selected = backbone.norm(feats.flatten(0, 1).index_select(0, positions))
    return backbone.mlm_head(selected).float(), batch["text_labels"].flatten().index_select(0, positions)


def predict_per_caption(backbone, batch, prepared=None):
    """Per caption: summed masked-token loss, correct predictions, masked count (each [B])."""
    logits, targets = masked_logits(backbone, batch)
    b, length = batch["text_labels"].shape
    row = batch["mlm_positions"] // length
    zeros = torch.zeros(b, device=logits.device)
    return {"loss_sum": zeros.index_add(0, row, F.cross_entropy(logits, targets, reduction="none")),
            "correct": zeros.index_add(0, row, (logits.argmax(-1) == targets).float()),
            "units": (batch["text_labels"] != -100).sum(1).float()}


def per_token_metrics(outputs):
    units = max(float(outputs["units"].sum()), 1.0)
    return {"mlm_acc": float(outputs["correct"].sum()) / units, "mlm_loss": float(outputs["loss_sum"].sum()) / units}


def held_out_set(loader, num_items):
    """The text_mlm evaluation of a loader of MLMCollator batches (also used by util/forgetting_probe.py)."""
    return EvalSet(loader=loader, num_items=num_items, predict=predict_per_caption, metrics=per_token_metrics)


@register_mode
class TextMLM(PretrainMode):
    name = "text_mlm"
    towers = ("text",)
    heads = (r"mlm_head\.",)

    @staticmethod
    def add_args(group):
        group.add_argument("--mlm_prob", type=fraction(open_low=True), default=0.15, help="text_mlm: share of tokens masked")

    def build_data(self, tokenizer, image_state, rank, world_size, grid):
        a = self.args
        train_set = CaptionDataset(a.data_path, flag="--data_path")
        val_set = CaptionDataset(a.val_data_path, flag="--val_data_path") if a.val_data_path else None
        for flag, ds in (("--data_path", train_set), ("--val_data_path", val_set)):
            if ds is not None and ds.num_empty_skipped:
                LOG.warning(f"{flag} {ds.path}: skipped {ds.num_empty_skipped} empty caption(s) of "
                            f"{ds.num_empty_skipped + len(ds)}")
        collate = MLMCollator(tokenizer, seed=a.seed, mask_prob=a.mlm_prob)
        loader, sampler = train_loader(train_set, collate, a.batch_size, rank, world_size, a.seed, a.num_workers,
                                       a.pin_mem, "--data_path")
        val = None
        if val_set is not None:
            val = eval_loader(val_set, MLMCollator(tokenizer, seed=a.seed + 1, mask_prob=a.mlm_prob),
                              a.batch_size, rank, world_size, min(a.num_workers, 2), a.pin_mem)
        return PretrainData(loader, sampler, val, batches_per_epoch(sampler, a.batch_size), len(train_set),
                            len(val_set) if val_set is not None else 0, val_set)

    def loss_units(self, batch):
        return batch["mlm_count"]

    def loss(self, backbone, batch):
        logits, targets = masked_logits(backbone, batch)
        total = F.cross_entropy(logits, targets, reduction="sum")
        with torch.no_grad():
            denom = self.loss_units(batch).clamp(min=1)
            metrics = {"mlm_loss": total.detach() / denom,
                       "mlm_acc": (logits.argmax(-1) == targets).sum().float() / denom}
        return {"loss": total, **metrics}

    def eval_sets(self, data, tokenizer, image_state, rank, world_size):
        return [held_out_set(data.val_loader, data.num_val)] if data.val_loader is not None else []
