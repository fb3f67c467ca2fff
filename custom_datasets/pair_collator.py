"""Collate image-text pair items into a batch, tokenizing in the data workers."""
import torch


def duplicate_caption_fraction(text_ids: torch.Tensor) -> torch.Tensor:
    """Fraction of rows of text_ids [B, L] whose token sequence already appeared earlier in the
    batch (0 when all captions differ). Identical captions are false negatives for a contrastive
    loss: a high value explains a loss that cannot reach zero."""
    if text_ids.shape[0] == 0:
        return torch.zeros(())
    distinct = torch.unique(text_ids, dim=0).shape[0]
    return torch.tensor((text_ids.shape[0] - distinct) / text_ids.shape[0])


class PairCollator:
    """items (from pair_dataset / wds_pairs) -> {
        "images": FloatTensor[B, 3, H, W], "text_ids": LongTensor[B, L],
        "text_masks": LongTensor[B, L], "bad": [(path_or_id, reason), ...] over the batch,
        "epoch": LongTensor[B], "index": LongTensor[B],
        "duplicate_caption_fraction": 0-dim tensor (see duplicate_caption_fraction)}
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
            "duplicate_caption_fraction": duplicate_caption_fraction(ids),
        }
