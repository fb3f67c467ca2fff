"""BEiT blockwise masking over a patch grid.

Rectangular blocks are masked one at a time until the target number of patches is reached: each
block has an area drawn uniformly in [min_num_patches, min(max_num_patches, patches still wanted)],
an aspect ratio (height / width) drawn log-uniformly in [min_aspect, max_aspect] and a uniformly
random position. A block is accepted only if it masks at least one new patch and does not overshoot
the target; after ``max_tries`` rejected proposals for one block the generator stops, so the count
never exceeds the target and is usually a little below it.

All randomness comes from the ``numpy.random.Generator`` the caller passes (keyed by seed, epoch and
sample index in the datasets), never from global state.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch


class Block(NamedTuple):
    """One accepted block: position, size, and the area and aspect it was drawn with."""

    top: int
    left: int
    height: int
    width: int
    target_area: float
    aspect: float


class MaskingGenerator:
    """``__call__(rng) -> bool ndarray [h, w]`` (True = masked), at most ``num_masking_patches`` True.

    Defaults are BEiT's for a 14x14 grid (75 patches, blocks of at least 16, aspect in [0.3, 1/0.3]).
    ``max_num_patches=None`` means no per-block cap beyond the target; ``max_aspect=None`` means
    ``1 / min_aspect``.
    """

    def __init__(self, input_size=(14, 14), num_masking_patches: int = 75, min_num_patches: int = 16,
                 max_num_patches: int | None = None, min_aspect: float = 0.3,
                 max_aspect: float | None = None, max_tries: int = 10):
        if isinstance(input_size, int):
            input_size = (input_size, input_size)
        self.height, self.width = (int(s) for s in input_size)
        if not 0 <= num_masking_patches <= self.height * self.width:
            raise ValueError(f"num_masking_patches={num_masking_patches} must lie in "
                             f"[0, {self.height * self.width}] for a {self.height}x{self.width} grid")
        if min_aspect <= 0:
            raise ValueError(f"min_aspect must be > 0, got {min_aspect}")
        if max_aspect is None:
            max_aspect = 1.0 / min_aspect
        if min_num_patches < 1 or min_aspect > max_aspect or max_tries < 1:
            raise ValueError("need min_num_patches >= 1, min_aspect <= max_aspect, max_tries >= 1")
        self.num_masking_patches = int(num_masking_patches)
        self.min_num_patches = int(min_num_patches)
        self.max_num_patches = int(num_masking_patches if max_num_patches is None else max_num_patches)
        self.log_aspect_range = (math.log(min_aspect), math.log(max_aspect))
        self.max_tries = int(max_tries)

    @property
    def num_patches(self) -> int:
        return self.height * self.width

    def __repr__(self) -> str:
        lo, hi = (math.exp(a) for a in self.log_aspect_range)
        return (f"MaskingGenerator({self.height}x{self.width}, target {self.num_masking_patches}, "
                f"block area [{self.min_num_patches}, {self.max_num_patches}], aspect [{lo:.3g}, "
                f"{hi:.3g}], tries {self.max_tries})")

    def _add_block(self, mask: np.ndarray, rng: np.random.Generator, max_new: int) -> Block | None:
        """Propose up to max_tries blocks; mark and return the first that adds 1..max_new patches."""
        lo, hi = sorted((self.min_num_patches, min(self.max_num_patches, max_new)))
        for _ in range(self.max_tries):
            area = rng.uniform(lo, hi)
            aspect = math.exp(rng.uniform(*self.log_aspect_range))
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if not (1 <= h <= self.height and 1 <= w <= self.width):
                continue
            top = int(rng.integers(0, self.height - h + 1))
            left = int(rng.integers(0, self.width - w + 1))
            window = mask[top:top + h, left:left + w]
            new = h * w - int(window.sum())
            if 0 < new <= max_new:
                window[...] = True
                return Block(top, left, h, w, area, aspect)
        return None

    def generate(self, rng: np.random.Generator) -> tuple[np.ndarray, list[Block]]:
        """(mask [h, w] bool, the accepted blocks in order). The union of the blocks is the mask."""
        mask = np.zeros((self.height, self.width), dtype=bool)
        blocks: list[Block] = []
        count = 0
        while count < self.num_masking_patches:
            block = self._add_block(mask, rng, self.num_masking_patches - count)
            if block is None:  # no proposal fitted: stop below the target rather than overshoot
                break
            blocks.append(block)
            count = int(mask.sum())
        return mask, blocks

    def __call__(self, rng: np.random.Generator) -> np.ndarray:
        return self.generate(rng)[0]


def masked_positions(mask):
    """(flat positions LongTensor[M] of the True entries of a [B, L] bool mask, their count LongTensor[]):
    computed in the data workers so the step selects masked tokens with index_select (a known shape) instead
    of boolean indexing, which waits for the device to count them."""
    positions = mask.reshape(-1).nonzero().squeeze(1)
    return positions, torch.tensor(positions.numel(), dtype=torch.long)
