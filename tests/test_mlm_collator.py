import math

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from custom_datasets.mlm_collator import IGNORE_INDEX, MLMCollator, mask_tokens
from custom_datasets.text_dataset import CaptionDataset

PAD, UNK, CLS, SEP, MASK = 0, 1, 2, 3, 4
SPECIAL = frozenset({PAD, UNK, CLS, SEP, MASK})
VOCAB = 1000


def synthetic_batch(lengths, rng):
    """Padded [CLS] w... [SEP] rows of the given real lengths (incl. CLS/SEP); some [UNK] inside."""
    width = max(lengths)
    ids = np.full((len(lengths), width), PAD, dtype=np.int64)
    mask = np.zeros_like(ids)
    for row, n in enumerate(lengths):
        body = rng.integers(5, VOCAB, size=n - 2)
        body[rng.random(n - 2) < 0.05] = UNK
        ids[row, :n] = np.concatenate([[CLS], body, [SEP]])
        mask[row, :n] = 1
    return torch.from_numpy(ids), torch.from_numpy(mask)


def run(ids, mask, keys, seed=0, **kw):
    return mask_tokens(ids, mask, keys, seed=seed, special_ids=SPECIAL, mask_id=MASK, vocab_size=VOCAB, **kw)


@pytest.fixture(scope="module")
def large_sample():
    rng = np.random.default_rng(0)
    lengths = rng.integers(2, 62, size=20_000)  # includes rows with no candidate at all
    ids, mask = synthetic_batch(lengths, rng)
    keys = [(0, i) for i in range(len(lengths))]
    masked, labels = run(ids, mask, keys)
    return ids, mask, masked, labels


def test_rates(large_sample):
    ids, mask, masked, labels = large_sample
    candidate = (mask == 1) & ~torch.isin(ids, torch.tensor(sorted(SPECIAL)))
    selected = labels != IGNORE_INDEX
    n_cand = candidate.sum(1)
    long_rows = n_cand >= 10  # the at-least-one rule lifts the rate of very short rows on purpose
    rate = selected[long_rows].sum().item() / candidate[long_rows].sum().item()
    assert abs(rate - 0.15) < 0.005, rate
    sel_in, sel_out = masked[selected], labels[selected]
    frac_mask = (sel_in == MASK).float().mean().item()
    frac_random = ((sel_in != MASK) & (sel_in != sel_out)).float().mean().item()
    frac_kept = (sel_in == sel_out).float().mean().item()
    assert abs(frac_mask - 0.8) < 0.01, frac_mask
    # A random draw equals the original with probability ~1/VOCAB; that case counts as kept.
    assert abs(frac_random - 0.1) < 0.01 and abs(frac_kept - 0.1) < 0.01, (frac_random, frac_kept)


def test_counts_per_row(large_sample):
    ids, mask, _, labels = large_sample
    candidate = (mask == 1) & ~torch.isin(ids, torch.tensor(sorted(SPECIAL)))
    n_cand = candidate.sum(1).tolist()
    n_sel = (labels != IGNORE_INDEX).sum(1).tolist()
    for c, s in zip(n_cand, n_sel):
        lo, hi = math.floor(0.15 * c), math.ceil(0.15 * c)
        assert (s == 0) if c == 0 else (max(1, lo) <= s <= max(1, hi)), (c, s)
    assert 0 in n_cand and 1 in n_cand


def test_specials_and_padding_never_selected(large_sample):
    ids, mask, masked, labels = large_sample
    selected = labels != IGNORE_INDEX
    assert not torch.isin(ids[selected], torch.tensor(sorted(SPECIAL))).any()
    assert not selected[mask == 0].any()
    assert torch.equal(labels[selected], ids[selected])
    assert torch.equal(masked[~selected], ids[~selected])  # nothing else changes
    random_tokens = masked[selected & (masked != MASK)]
    assert not torch.isin(random_tokens, torch.tensor(sorted(SPECIAL))).any()
    assert masked.dtype == labels.dtype == torch.long


def test_same_key_same_mask_regardless_of_batch():
    rng = np.random.default_rng(1)
    lengths = rng.integers(5, 40, size=64)
    ids, mask = synthetic_batch(lengths, rng)
    keys = [(3, 1000 + i) for i in range(64)]
    masked, labels = run(ids, mask, keys)
    # Reversed order, a sub-batch, and a wider padding must not change any row's outcome.
    order = list(range(63, -1, -1))
    m2, l2 = run(ids[order], mask[order], [keys[i] for i in order])
    assert torch.equal(m2, masked[order]) and torch.equal(l2, labels[order])
    sub = [5, 17, 40]
    wide_ids = torch.cat([ids[sub], torch.full((3, 20), PAD)], 1)
    wide_mask = torch.cat([mask[sub], torch.zeros(3, 20, dtype=torch.long)], 1)
    m3, l3 = run(wide_ids, wide_mask, [keys[i] for i in sub])
    width = ids.shape[1]
    assert torch.equal(m3[:, :width], masked[sub]) and torch.equal(l3[:, :width], labels[sub])
    assert (l3[:, width:] == IGNORE_INDEX).all()


def test_epoch_index_and_seed_change_the_mask():
    rng = np.random.default_rng(2)
    ids, mask = synthetic_batch([40] * 256, rng)
    base = run(ids, mask, [(0, i) for i in range(256)])[1]
    for keys, seed in (([(1, i) for i in range(256)], 0), ([(0, i + 256) for i in range(256)], 0),
                       ([(0, i) for i in range(256)], 1)):
        other = run(ids, mask, keys, seed=seed)[1]
        differing_rows = ((other != IGNORE_INDEX) != (base != IGNORE_INDEX)).any(1).float().mean()
        assert differing_rows > 0.9


def test_collator_on_captions_with_workers(demo_data, tiny_tokenizer):
    ds = CaptionDataset(demo_data["captions_train"])
    collate = MLMCollator(tiny_tokenizer, seed=5)
    keys = [(2, i) for i in range(48)]
    batch = collate([ds[k] for k in keys[:16]])
    assert set(batch) == {"text_ids", "text_masks", "text_labels", "mlm_positions", "mlm_count"}
    grids = ("text_ids", "text_masks", "text_labels")
    assert all(batch[k].dtype == torch.long and batch[k].shape == batch["text_ids"].shape for k in grids)
    # the masked tokens' flat positions, found in the worker (the step then needs no device-side count)
    selected = (batch["text_labels"] != IGNORE_INDEX).flatten()
    assert torch.equal(batch["mlm_positions"], selected.nonzero().squeeze(1))
    assert batch["mlm_count"].item() == selected.sum().item() and batch["mlm_count"].ndim == 0
    assert ((batch["text_labels"] != IGNORE_INDEX).sum(1) >= 1).all()
    assert (batch["text_ids"][batch["text_masks"] == 0] == tiny_tokenizer.pad_id).all()
    # Two fork workers and a different batch split give the same rows as the single process.
    loader = DataLoader(ds, sampler=keys, batch_size=8, num_workers=2, collate_fn=collate,
                        multiprocessing_context="fork")
    rows = [{k: b[k][r] for k in grids} for b in loader for r in range(len(b["text_ids"]))]
    for r in range(16):
        n = int(batch["text_masks"][r].sum())
        for k in grids:
            assert torch.equal(rows[r][k][:n], batch[k][r][:n]), (r, k)
    assert tiny_tokenizer.decode(batch["text_labels"][0].clamp(min=0)) != ""


def test_invalid_fractions(tiny_tokenizer):
    with pytest.raises(ValueError):
        MLMCollator(tiny_tokenizer, seed=0, mask_prob=0)
    with pytest.raises(ValueError):
        MLMCollator(tiny_tokenizer, seed=0, mask_token_frac=0.95, random_token_frac=0.1)
