"""Data helpers shared by the fine-tuning tasks: keyed timm augmentations, sample keys, batch collation,
and inheriting the tokenizer and image preprocessing recorded in the checkpoint a run starts from.

timm's (and torchvision's) random transforms draw from Python's, NumPy's and torch's global generators.
To keep randomness keyed by (seed, epoch, sample index), `KeyedTransform` seeds those three generators
from the sample's key for the duration of one call and restores them afterwards, so the caller's own
streams (the model's drop path, another sample's draws) are untouched.
"""
import contextlib
import random

import numpy as np
import torch
from torch.utils.data import Dataset

from custom_datasets.image_dataset import IMAGE_NORMS, INTERPOLATIONS, image_preprocess_state
from custom_datasets.pair_dataset import parse_key
from custom_datasets.tokenizer import load_tokenizer, tokenizer_from_state
from util.errors import UserError
from util.logger import LOG


@contextlib.contextmanager
def seeded_global_rngs(seed):
    """Seed Python's, NumPy's and torch's CPU generators with `seed` inside the block; restore them after."""
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        np.random.seed(seed % 2 ** 32)
        torch.default_generator.manual_seed(seed)  # not torch.manual_seed: that would reseed CUDA too
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


class KeyedTransform:
    """Adapts a PIL -> tensor transform drawing from global RNGs (timm's) to the datasets' keyed
    `transform(pil_rgb, rng)` interface: the draw is a function of `rng`, i.e. of the sample key."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, img, rng):
        with seeded_global_rngs(int(rng.integers(2 ** 63))):
            return self.transform(img)


def timm_train_transform(preprocess, scale=(0.08, 1.0), auto_augment=None, re_prob=0.0, color_jitter=0.4,
                         hflip=0.5):
    """timm's training transform (random resized crop, flip, RandAugment / colour jitter, random erasing)
    with the size, mean/std and interpolation of a preprocessing record, wrapped as a KeyedTransform."""
    from timm.data import create_transform

    tf = create_transform(input_size=preprocess["img_size"], is_training=True, scale=tuple(scale),
                          hflip=hflip, color_jitter=color_jitter, auto_augment=auto_augment or None,
                          interpolation=preprocess["interpolation"], mean=tuple(preprocess["mean"]),
                          std=tuple(preprocess["std"]), re_prob=re_prob, re_mode="pixel", re_count=1)
    return KeyedTransform(_no_zero_bit_posterize(tf))


def _no_zero_bit_posterize(transform):
    """timm's RandAugment maps magnitude 10 (reached by BEiT's rand-m9-mstd0.5-inc1 in ~2% of draws) to
    PosterizeIncreasing with 0 bits, an all-black image that current Pillow refuses with a ValueError. Capping
    that op's magnitude just below 10 keeps 1 bit and leaves every other op as the policy says."""
    from timm.data.auto_augment import RandAugment

    for t in getattr(transform, "transforms", []):
        if isinstance(t, RandAugment):
            for op in t.ops:
                if op.name == "PosterizeIncreasing":
                    op.magnitude_max = 9.99
    return transform


class WithKey(Dataset):
    """Adds the sample's (epoch, index) key as "key" to the sample dict of an ImageFolderDataset-style item
    `(sample, target)`: evaluation needs the index to put gathered results back in dataset order, and
    keyed batch augmentations (mixup) need both."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        sample, target = self.dataset[key]
        sample["key"] = parse_key(key)
        return sample, target


def batch_seed(seed, keys):
    """One 63-bit seed from the run seed and a batch's (epoch, index) keys (for batch-level draws)."""
    flat = [int(seed)] + [int(v) for k in keys for v in k]
    return int(np.random.default_rng(flat).integers(2 ** 63))


# --------------------------------------------------------------------------------------------------
# What the next stage inherits from the checkpoint it starts from.


def warn_loudly(title, lines):
    """A multi-line banner on the console: a mismatch that silently costs accuracy must not scroll by."""
    bar = "!" * 100
    LOG.warning("\n".join([bar, f"!!! WARNING: {title}", *[f"!!!   {x}" for x in lines], bar]))


def resolve_tokenizer(flag_path, do_lower_case, inherited_state, source, required, default_path=None):
    """The run's tokenizer: --tokenizer if given (warning loudly when it differs from the one saved with
    the checkpoint), else the checkpoint's, else `default_path` when the task needs one; None otherwise."""
    inherited = tokenizer_from_state(inherited_state) if inherited_state else None
    if flag_path:
        tok = load_tokenizer(flag_path, do_lower_case=do_lower_case,
                             max_len=inherited.max_len if inherited else 196)
        if inherited is not None and (tok.tokens != inherited.tokens or tok.do_lower_case != inherited.do_lower_case):
            warn_loudly("--tokenizer differs from the tokenizer saved with the checkpoint", [
                f"checkpoint {source}: {inherited.vocab_size} tokens, lower case {inherited.do_lower_case}",
                f"--tokenizer {flag_path}: {tok.vocab_size} tokens, lower case {tok.do_lower_case}",
                "the text embeddings were trained with the checkpoint's ids; using --tokenizer as asked.",
                "drop --tokenizer to inherit the checkpoint's."])
        LOG.info(f"tokenizer: {flag_path} ({tok.vocab_size} tokens, lower case {tok.do_lower_case})")
        return tok
    if inherited is not None:
        LOG.info(f"tokenizer: inherited from {source} ({inherited.vocab_size} tokens)")
        return inherited
    if not required:
        return None
    if default_path is None:
        raise UserError("--tokenizer is required: the checkpoint carries no tokenizer")
    LOG.info(f"tokenizer: {default_path} (no --tokenizer and none saved with the checkpoint)")
    return load_tokenizer(default_path, do_lower_case=do_lower_case)


def resolve_image_preprocess(inherited, source, default_img_size, img_size=None, image_norm=None,
                             interpolation=None, crop_pct=None):
    """The run's image preprocessing record (see image_dataset.image_preprocess_state).

    Starts from the checkpoint's record (or BEiT's defaults at the model's size when it has none);
    flags given on the command line win. A normalisation or interpolation that differs from the
    checkpoint's warns loudly (the weights were trained with the checkpoint's); another --img_size is
    the usual fine-tuning at a higher resolution and only noted.
    """
    if inherited:
        missing = [k for k in ("img_size", "mean", "std", "interpolation") if k not in inherited]
        if missing:
            raise UserError(f"{source}: its image_preprocess record lacks {missing}")
        state = {"norm": None, "crop_pct": 0.875, **inherited}
        state["mean"], state["std"] = [float(x) for x in state["mean"]], [float(x) for x in state["std"]]
    else:
        state = image_preprocess_state(default_img_size)
    mismatches = []
    if image_norm is not None:
        if image_norm not in IMAGE_NORMS:
            raise UserError(f"--image_norm {image_norm!r}: unknown; choose one of {', '.join(IMAGE_NORMS)}")
        mean, std = (list(v) for v in IMAGE_NORMS[image_norm])
        if inherited and not (np.allclose(mean, state["mean"]) and np.allclose(std, state["std"])):
            mismatches.append(f"normalisation: checkpoint mean {_fmt(state['mean'])} std {_fmt(state['std'])}"
                              f" ({state.get('norm')}); --image_norm {image_norm}: mean {_fmt(mean)} std {_fmt(std)}")
        state.update(norm=image_norm, mean=mean, std=std)
    if interpolation is not None:
        if interpolation not in INTERPOLATIONS:
            raise UserError(f"--interpolation {interpolation!r}: unknown; choose one of {', '.join(INTERPOLATIONS)}")
        if inherited and interpolation != state["interpolation"]:
            mismatches.append(f"interpolation: checkpoint {state['interpolation']}; --interpolation {interpolation}")
        state["interpolation"] = interpolation
    if mismatches:
        warn_loudly(f"image preprocessing differs from the one saved with {source}", mismatches + [
            "the weights were trained on the checkpoint's preprocessing; using the command line's as asked.",
            "drop these flags to inherit the checkpoint's."])
    if img_size is not None and int(img_size) != int(state["img_size"]):
        LOG.info(f"image size {img_size} instead of the checkpoint's {state['img_size']}: relative position "
                 "tables are resized")
    if img_size is not None:
        state["img_size"] = int(img_size)
    if crop_pct is not None:
        state["crop_pct"] = float(crop_pct)
    state["img_size"] = int(state["img_size"])
    return state


def _fmt(values):
    return "(" + ", ".join(f"{v:.3f}" for v in values) + ")"
