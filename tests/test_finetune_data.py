"""Fine-tuning data helpers: keyed timm augmentations leave global RNG streams alone and survive RandAugment's
0-bit posterize; inherited image preprocessing and tokenizer resolution."""
import random

import numpy as np
import pytest
import torch
from PIL import Image

from custom_datasets.finetune_data import resolve_image_preprocess, resolve_tokenizer, timm_train_transform
from custom_datasets.image_dataset import IMAGE_NORMS, image_preprocess_state


def _image(seed=0, size=16):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8))


def test_keyed_timm_transform_is_a_function_of_the_key_only():
    tf = timm_train_transform(image_preprocess_state(16), auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.5)
    torch.manual_seed(123)
    random.seed(4)
    np.random.seed(5)
    before = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    a = tf(_image(), np.random.default_rng([0, 3, 7]))
    b = tf(_image(), np.random.default_rng([0, 3, 7]))
    c = tf(_image(), np.random.default_rng([0, 4, 7]))
    assert a.shape == (3, 16, 16) and torch.equal(a, b) and not torch.equal(a, c)
    after = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1])
    assert torch.equal(before[0], after[0]) and before[1] == after[1] and np.array_equal(before[2], after[2])


def test_randaugment_at_magnitude_ten_never_asks_pillow_for_zero_bits():
    # m10 without noise: every PosterizeIncreasing draw would be 0 bits, which current Pillow refuses.
    tf = timm_train_transform(image_preprocess_state(16), auto_augment="rand-m10-n1-inc1")
    for i in range(300):
        tf(_image(), np.random.default_rng([0, 0, i]))


def test_preprocess_inherited_unless_flags_say_otherwise(caplog):
    record = image_preprocess_state(64, norm="clip", interpolation="bilinear", crop_pct=0.9)
    assert resolve_image_preprocess(record, "ckpt.pth", 224) == record
    assert resolve_image_preprocess(None, None, 224) == image_preprocess_state(224)  # BEiT defaults
    higher = resolve_image_preprocess(record, "ckpt.pth", 224, img_size=96)
    assert higher == {**record, "img_size": 96}
    changed = resolve_image_preprocess(record, "ckpt.pth", 224, image_norm="imagenet")
    assert changed["mean"] == list(IMAGE_NORMS["imagenet"][0]) and changed["norm"] == "imagenet"
    same = resolve_image_preprocess(record, "ckpt.pth", 224, image_norm="clip", interpolation="bilinear")
    assert same == record


def test_tokenizer_inherited_and_default_only_when_needed(tiny_tokenizer, demo_data):
    state = tiny_tokenizer.to_state()
    assert resolve_tokenizer(None, None, state, "ckpt.pth", required=False).to_state() == state
    assert resolve_tokenizer(None, None, None, None, required=False) is None
    assert resolve_tokenizer(None, None, None, None, required=True,
                             default_path=str(demo_data["tokenizer"])).to_state() == state
    with pytest.raises(Exception, match="--tokenizer is required"):
        resolve_tokenizer(None, None, None, None, required=True)
