"""BEiT blockwise masking: never above the limit, close to it on average, blocks within their bounds,
keyed determinism."""
import math

import numpy as np
import pytest

from custom_datasets.masking_generator import MaskingGenerator


def _rng(i, seed=0, epoch=0):
    return np.random.default_rng([seed, epoch, i])


def test_count_never_exceeds_limit_and_mean_is_close():
    gen = MaskingGenerator((14, 14), num_masking_patches=75, min_num_patches=16)
    counts = []
    for i in range(400):
        mask = gen(_rng(i))
        assert mask.shape == (14, 14) and mask.dtype == bool
        counts.append(int(mask.sum()))
    assert max(counts) <= 75
    assert np.mean(counts) > 72  # blockwise filling stops a little short of the target on average
    assert min(counts) >= 40


@pytest.mark.parametrize("size, target, min_patches, max_patches", [
    ((14, 14), 75, 16, None), ((14, 14), 75, 16, 30), ((4, 4), 6, 2, None), ((2, 2), 2, 1, None),
    ((6, 10), 25, 4, 12),
])
def test_blocks_within_bounds(size, target, min_patches, max_patches):
    gen = MaskingGenerator(size, target, min_patches, max_patches, min_aspect=0.3)
    cap = target if max_patches is None else max_patches
    for i in range(150):
        mask, blocks = gen.generate(_rng(i))
        assert mask.sum() <= target
        union = np.zeros(size, dtype=bool)
        for b in blocks:
            # area drawn between min_patches and what the block may still add (either may be larger)
            still = target - union.sum()
            assert min(min_patches, still) <= b.target_area <= max(min_patches, min(cap, still))
            assert 0.3 - 1e-9 <= b.aspect <= 1 / 0.3 + 1e-9
            # the block is the drawn area and aspect rounded to whole patches
            assert abs(b.height - math.sqrt(b.target_area * b.aspect)) <= 0.5 + 1e-9
            assert abs(b.width - math.sqrt(b.target_area / b.aspect)) <= 0.5 + 1e-9
            assert 0 <= b.top and b.top + b.height <= size[0]
            assert 0 <= b.left and b.left + b.width <= size[1]
            before = union.sum()
            union[b.top:b.top + b.height, b.left:b.left + b.width] = True
            assert union.sum() > before  # every accepted block masks something new
        assert np.array_equal(union, mask)


def test_aspect_is_log_uniform():
    gen = MaskingGenerator((14, 14), 75, 16)
    aspects = np.array([b.aspect for i in range(300) for b in gen.generate(_rng(i))[1]])
    logs = np.log(aspects) / math.log(1 / 0.3)  # uniform on [-1, 1] if log-uniform
    assert len(aspects) > 500
    assert abs(logs.mean()) < 0.1
    for q in (-0.5, 0.0, 0.5):  # quartiles of the uniform distribution
        assert abs((logs < q).mean() - (q + 1) / 2) < 0.06


def test_keyed_determinism():
    gen = MaskingGenerator((14, 14), 75, 16)
    a = gen(_rng(3, seed=1, epoch=2))
    assert np.array_equal(a, gen(_rng(3, seed=1, epoch=2)))
    others = [gen(_rng(3, seed=1, epoch=e)) for e in range(3, 8)]
    assert any(not np.array_equal(a, o) for o in others)


def test_zero_target_and_invalid_arguments():
    assert not MaskingGenerator((4, 4), 0, 2)(_rng(0)).any()
    with pytest.raises(ValueError):
        MaskingGenerator((4, 4), 17, 2)
    with pytest.raises(ValueError):
        MaskingGenerator((4, 4), 4, 2, min_aspect=0)
