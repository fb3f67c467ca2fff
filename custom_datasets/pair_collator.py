"""Collate image-text pair items into a batch, tokenizing in the data workers."""
import torch


def caption_hashes(text_ids: torch.Tensor, text_masks: torch.Tensor) -> torch.Tensor:
    """LongTensor[B]: one 64-bit hash per caption of its token ids (padding excluded, so a caption hashes
    alike in every batch and on every rank; Python's tuple-of-int hash is the same in every process)."""
    lengths = text_masks.sum(1).tolist()
    return torch.tensor([hash(tuple(row[:n])) for row, n in zip(text_ids.tolist(), lengths)], dtype=torch.long)


class PairCollator:
    """items (from pair_dataset / wds_pairs) -> {
        "images": FloatTensor[B, 3, H, W], "text_ids": LongTensor[B, L],
        "text_masks": LongTensor[B, L], "bad": [(path_or_id, reason), ...] over the batch,
        "epoch": LongTensor[B], "index": LongTensor[B],
        "caption_hash": LongTensor[B] (see caption_hashes; the duplicate-caption fraction of a global batch
        is computed from them at log steps, util/itc_monitor.py)}
    `tokenizer.encode_batch(texts) -> (input_ids, attention_mask)` (custom_datasets/tokenizer.py,
    or any object with that method, e.g. a wrapper around a Hugging Face tokenizer).
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, items: list) -> dict:
        ids, masks = self.tokenizer.encode_batch([it["raw_text"] for it in items])
        return {
            "images": torch.stack([it["image"] for it in items]),
            "text_ids": ids,
            "text_masks": masks,
            "bad": [b for it in items for b in it["bad"]],
            "epoch": torch.tensor([it["epoch"] for it in items], dtype=torch.long),
            "index": torch.tensor([it["index"] for it in items], dtype=torch.long),
            "caption_hash": caption_hashes(ids, masks),
        }
