"""BERT masked-language-model collation with keyed randomness.

Every random number is a hash of (seed, epoch, sample index, token position, stream), computed
vectorised in numpy. So a sample's mask depends only on its own key: not on batch composition,
padding width, worker count, rank or prefetching, and a resumed run replays it exactly.
"""
import numpy as np
import torch

from custom_datasets.masking_generator import masked_positions

IGNORE_INDEX = -100

# Stream ids keep the independent draws of one token apart.
_STREAM_SELECT, _STREAM_ACTION, _STREAM_RANDOM_TOKEN, _STREAM_COUNT = 1, 2, 3, 4
_MASK64 = (1 << 64) - 1


def _mix(x):
    """splitmix64 finaliser on a uint64 array: a bijection whose outputs look independent."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _row_keys(seed, keys):
    """keys: int array [B, 2] of (epoch, index) -> uint64 [B] hashes that also fold in the seed."""
    keys = np.asarray(keys, dtype=np.int64).reshape(-1, 2).astype(np.uint64)
    h = _mix(np.full(len(keys), seed & _MASK64, dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15))
    h = _mix(h ^ keys[:, 0])
    return _mix(h ^ _mix(keys[:, 1] + np.uint64(0x632BE59BD9B4E019)))


def _uniform(row_keys, width, stream):
    """Keyed uniforms in [0, 1): float64 [B, width]; entry (b, j) depends on (row_keys[b], j, stream)."""
    pos = np.arange(width, dtype=np.uint64)[None, :]
    salt = np.uint64((stream * 0xD1B54A32D192ED03) & _MASK64)
    h = _mix(row_keys[:, None] ^ _mix(pos * np.uint64(0x9E3779B97F4A7C15) + salt))
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def mask_tokens(input_ids, attention_mask, keys, *, seed, special_ids, mask_id, vocab_size,
                mask_prob=0.15, mask_token_frac=0.8, random_token_frac=0.1):
    """BERT masking of a padded batch.

    input_ids, attention_mask: LongTensor[B, L]; keys: (epoch, index) per row, shape [B, 2].
    Candidates are real (mask 1), non-special tokens. Each row selects floor(mask_prob * n + u)
    of its n candidates (u keyed uniform, so the expected rate is exactly mask_prob), at least one
    when n > 0. Selected tokens become [MASK] (mask_token_frac), a random non-special token
    (random_token_frac) or stay. Returns (masked_ids LongTensor[B, L], labels LongTensor[B, L]
    with the original id at selected positions and -100 elsewhere).
    """
    ids = input_ids.numpy() if isinstance(input_ids, torch.Tensor) else np.asarray(input_ids)
    am = attention_mask.numpy() if isinstance(attention_mask, torch.Tensor) else np.asarray(attention_mask)
    batch, width = ids.shape
    special = np.fromiter(special_ids, dtype=np.int64)
    candidate = (am == 1) & ~np.isin(ids, special)
    rows = _row_keys(seed, keys)

    # Rank candidates by a keyed uniform; the lowest `count` of each row are selected.
    score = np.where(candidate, _uniform(rows, width, _STREAM_SELECT), np.inf)
    rank = np.argsort(np.argsort(score, axis=1, kind="stable"), axis=1, kind="stable")
    n_cand = candidate.sum(axis=1)
    count = np.floor(mask_prob * n_cand + _uniform(rows, 1, _STREAM_COUNT)[:, 0]).astype(np.int64)
    count = np.minimum(np.maximum(count, (n_cand > 0).astype(np.int64)), n_cand)
    selected = candidate & (rank < count[:, None])

    action = _uniform(rows, width, _STREAM_ACTION)
    to_mask = selected & (action < mask_token_frac)
    to_random = selected & (action >= mask_token_frac) & (action < mask_token_frac + random_token_frac)
    pool = np.setdiff1d(np.arange(vocab_size, dtype=np.int64), special)
    picks = pool[(_uniform(rows, width, _STREAM_RANDOM_TOKEN) * len(pool)).astype(np.int64)]

    masked = np.where(to_mask, mask_id, np.where(to_random, picks, ids))
    labels = np.where(selected, ids, IGNORE_INDEX)
    return torch.from_numpy(masked.astype(np.int64)), torch.from_numpy(labels.astype(np.int64))


class MLMCollator:
    """CaptionDataset items -> {"text_ids", "text_masks", "text_labels"}: LongTensor[B, L] each.

    Tokenizes the batch's raw_text and masks it with randomness keyed by (seed, epoch, index)
    of each item (items from an int key count as epoch 0).
    """

    def __init__(self, tokenizer, seed, mask_prob=0.15, mask_token_frac=0.8, random_token_frac=0.1):
        if not 0.0 < mask_prob <= 1.0:
            raise ValueError(f"mask_prob must be in (0, 1], got {mask_prob}")
        if mask_token_frac < 0 or random_token_frac < 0 or mask_token_frac + random_token_frac > 1:
            raise ValueError("mask_token_frac and random_token_frac must be >= 0 and sum to <= 1")
        self.tokenizer = tokenizer
        self.seed = int(seed)
        self.mask_prob = mask_prob
        self.mask_token_frac = mask_token_frac
        self.random_token_frac = random_token_frac

    def __call__(self, items):
        ids, attention = self.tokenizer.encode_batch([it["raw_text"] for it in items])
        keys = [(it.get("epoch", 0), it["index"]) for it in items]
        masked, labels = mask_tokens(
            ids, attention, keys, seed=self.seed, special_ids=self.tokenizer.special_ids,
            mask_id=self.tokenizer.mask_id, vocab_size=self.tokenizer.vocab_size,
            mask_prob=self.mask_prob, mask_token_frac=self.mask_token_frac,
            random_token_frac=self.random_token_frac)
        positions, count = masked_positions(labels != -100)
        return {"text_ids": masked, "text_masks": attention, "text_labels": labels, "mlm_positions": positions,
                "mlm_count": count}

