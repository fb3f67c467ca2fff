"""ImageNet-style folder dataset with the BEiT two-view transform: format, keyed determinism,
corrupt files replaced and counted, normalisation choice."""
import io

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from custom_datasets.image_dataset import (IMAGE_NORMS, BeitTwoViewTransform, ImageFolderDataset,
                                           build_eval_transform, build_two_view_transform,
                                           collate_image_batch, image_preprocess_state)
from custom_datasets.masking_generator import MaskingGenerator
from util.errors import UserError


def _smooth_image(rng, w=56, h=44):
    """A smooth colour image (gradients + a random tint) so resized views are comparable."""
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x / w, y / h, (x + y) / (w + h)], axis=-1)
    return Image.fromarray((255 * (0.2 + 0.6 * base * rng.uniform(0.5, 1, 3))).astype(np.uint8))


def _jpeg_bytes(img):
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture
def folder(tmp_path):
    """root/{cat,dog}/ with 3 good images each (.JPEG, .jpg, .png) and, in dog/, a truncated JPEG, a
    zero-byte .jpg and a text file named .jpg; a .txt file that is not listed at all."""
    rng = np.random.default_rng(0)
    root = tmp_path / "train"
    for cls in ("dog", "cat"):
        (root / cls).mkdir(parents=True)
        _smooth_image(rng).save(root / cls / "a.JPEG", format="JPEG")
        _smooth_image(rng).save(root / cls / "b.jpg", format="JPEG")
        _smooth_image(rng).save(root / cls / "c.png")
    full = _jpeg_bytes(_smooth_image(rng, 200, 160))
    (root / "dog" / "d_truncated.jpg").write_bytes(full[:len(full) // 2])  # header intact, data cut
    (root / "dog" / "e_empty.jpg").write_bytes(b"")
    (root / "dog" / "f_text.jpg").write_text("this is not an image")
    (root / "dog" / "notes.txt").write_text("ignored")
    return root


def _transform(img_size=32, norm="beit", color_jitter=0.4):
    masking = MaskingGenerator((img_size // 16,) * 2, num_masking_patches=2, min_num_patches=1)
    return build_two_view_transform(image_preprocess_state(img_size, norm), masking=masking,
                                    color_jitter=color_jitter)


def test_layout_and_user_format(folder):
    ds = ImageFolderDataset(str(folder), _transform())
    assert ds.classes == ["cat", "dog"] and len(ds) == 9
    assert list(ds.targets) == [0, 0, 0, 1, 1, 1, 1, 1, 1]
    sample, target = ds[(0, 1)]
    assert target == 0 and sample["bad"] == []
    assert sample["images"].shape == (3, 32, 32) and sample["images"].dtype == torch.float32
    assert sample["images_for_vae"].shape == (3, 16, 16) and sample["images_for_vae"].dtype == torch.float32
    assert 0 <= sample["images_for_vae"].min() and sample["images_for_vae"].max() <= 1  # map_pixels: tokenizer
    assert sample["bool_masked_pos"].shape == (4,) and sample["bool_masked_pos"].dtype == torch.bool
    assert sample["bool_masked_pos"].sum() <= 2
    batch, targets = collate_image_batch([ds[(0, i)] for i in range(4)])
    assert batch["images"].shape == (4, 3, 32, 32) and batch["images_for_vae"].shape == (4, 3, 16, 16)
    assert batch["bool_masked_pos"].shape == (4, 4) and targets.dtype == torch.long


def test_keyed_determinism(folder):
    ds = ImageFolderDataset(str(folder), _transform(), seed=7)
    a, _ = ds[(2, 4)]
    b, _ = ImageFolderDataset(str(folder), _transform(), seed=7)[(2, 4)]  # a fresh worker's copy
    for k in ("images", "images_for_vae", "bool_masked_pos"):
        assert torch.equal(a[k], b[k])
    assert torch.equal(ds[4][0]["images"], ds[(0, 4)][0]["images"])  # int key = epoch 0
    assert not torch.equal(ds[(3, 4)][0]["images"], a["images"])
    assert not torch.equal(ImageFolderDataset(str(folder), _transform(), seed=8)[(2, 4)][0]["images"],
                           a["images"])


def test_worker_count_does_not_change_batches(folder):
    ds = ImageFolderDataset(str(folder), _transform())
    keys = [(1, i) for i in range(len(ds))]
    runs = [list(DataLoader(ds, batch_size=3, sampler=keys, num_workers=n, collate_fn=collate_image_batch))
            for n in (0, 2)]
    for (a, ta), (b, tb) in zip(*runs):
        assert torch.equal(a["images"], b["images"]) and torch.equal(ta, tb)
        assert a["bad"] == b["bad"]


def test_two_views_come_from_one_crop_and_flip(folder):
    t = BeitTwoViewTransform(32, 16, mean=(0.5,) * 3, std=(0.5,) * 3, color_jitter=0.4)
    img = _smooth_image(np.random.default_rng(1), 120, 90)
    for i in range(10):
        out = t(img, np.random.default_rng([0, 0, i]))
        big = out["images"] * 0.5 + 0.5  # undo the 0.5/0.5 normalisation
        small_from_big = torch.nn.functional.avg_pool2d(big[None], 2)[0]
        assert (small_from_big - out["images_for_vae"]).abs().mean() < 0.02


def test_corrupt_files_are_replaced_and_recorded(folder):
    ds = ImageFolderDataset(str(folder), _transform())
    bad_names = {"dog/d_truncated.jpg": "truncated", "dog/e_empty.jpg": "zero-byte",
                 "dog/f_text.jpg": "not an image"}
    seen = []
    for index in range(6, 9):
        sample, target = ds[(0, index)]
        assert sample["images"].shape == (3, 32, 32) and 0 <= target <= 1
        path, reason = sample["bad"][0]
        assert bad_names[path] in reason.lower()
        seen.append(path)
        again, target_again = ds[(0, index)]  # the replacement is keyed too
        assert torch.equal(again["images"], sample["images"]) and target_again == target
    assert sorted(seen) == sorted(bad_names)
    assert len(ds.bad) >= 6  # this process's record (twice each, plus any bad replacement picks)
    batch, _ = collate_image_batch([ds[(1, i)] for i in range(len(ds))])
    assert {p for p, _ in batch["bad"]} == set(bad_names) and batch["images"].shape[0] == 9
    assert ds.check(0) is None and ds.check(6)[0] == "dog/d_truncated.jpg"


def test_all_unreadable_is_a_user_error(tmp_path):
    (tmp_path / "x").mkdir()
    for i in range(3):
        (tmp_path / "x" / f"{i}.jpg").write_bytes(b"")
    with pytest.raises(UserError, match="in a row failed"):
        ImageFolderDataset(str(tmp_path), _transform())[0]
    with pytest.raises(UserError, match="not a folder"):
        ImageFolderDataset(str(tmp_path / "missing"))
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(UserError, match="no images"):
        ImageFolderDataset(str(tmp_path / "empty"))


def test_normalisation_choice(tmp_path):
    gray = Image.new("RGB", (40, 40), (128, 64, 200))
    x = torch.tensor([128, 64, 200], dtype=torch.float32).view(3, 1, 1) / 255
    for norm, (mean, std) in IMAGE_NORMS.items():
        state = image_preprocess_state(32, norm)
        assert state == {"img_size": 32, "norm": norm, "mean": list(mean), "std": list(std),
                         "interpolation": "bicubic", "crop_pct": 0.875}
        expected = (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
        train = build_two_view_transform(state, color_jitter=0.0)(gray, np.random.default_rng(0))
        torch.testing.assert_close(train["images"], expected.expand(3, 32, 32), atol=1e-5, rtol=0)
        torch.testing.assert_close(train["images_for_vae"], x.expand(3, 16, 16), atol=1e-6, rtol=0)
        evaluated = build_eval_transform(state)(gray)
        torch.testing.assert_close(evaluated, expected.expand(3, 32, 32), atol=1e-5, rtol=0)
    assert IMAGE_NORMS["beit"] == ((0.5,) * 3, (0.5,) * 3)
    with pytest.raises(UserError, match="--image_norm"):
        image_preprocess_state(224, "imagenet21k")
    torch.save(image_preprocess_state(), tmp_path / "s.pt")  # plain types: weights_only loads it
    assert torch.load(tmp_path / "s.pt", weights_only=True)["norm"] == "beit"


def test_eval_transform_in_dataset(folder):
    ds = ImageFolderDataset(str(folder), build_eval_transform(image_preprocess_state(32, "imagenet")))
    sample, target = ds[2]
    assert set(sample) == {"images", "bad"} and sample["images"].shape == (3, 32, 32)
    assert torch.equal(sample["images"], ds[(5, 2)][0]["images"])  # no randomness at evaluation


def test_jpeg_draft_crop_decodes_reduced_and_keeps_the_view(tmp_path):
    """A crop at least twice the output decodes the JPEG at 1/2..1/8 scale (the box scaled), and the view is
    the full decode's up to resampling differences; a smaller crop, or a non-JPEG, decodes in full."""
    from custom_datasets.pair_dataset import decode_image, draft_region, open_image

    yy, xx = np.mgrid[0:1500, 0:1200]
    pixels = np.stack([xx % 256, yy % 256, (xx // 6 + yy // 6) % 256], -1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=95)
    data = buf.getvalue()
    box = (100, 200, 1100, 1300)  # 1000 x 1100: 1/4 still leaves 250 >= 224
    lazy = open_image(data)
    region = draft_region(lazy, box, 224)
    assert lazy.size == (300, 375)  # decoded at 1/4
    full = decode_image(data).crop(box)
    a = np.asarray(region.resize((224, 224), Image.BICUBIC), dtype=np.float32)
    b = np.asarray(full.resize((224, 224), Image.BICUBIC), dtype=np.float32)
    assert np.abs(a - b).mean() < 6.0  # of 255: the same view, resampled differently
    small = open_image(data)
    draft_region(small, (0, 0, 300, 300), 224)  # under twice the output: full decode
    assert small.size == (1200, 1500)
    png = io.BytesIO()
    Image.fromarray(pixels).save(png, "PNG")
    assert draft_region(open_image(png.getvalue()), box, 224).size == (1000, 1100)


def test_truncated_jpeg_found_by_the_transform_is_replaced(tmp_path):
    """With a transform that decodes (draft_region), a file whose header reads but whose pixels do not is
    still a bad sample: replaced and listed, not a crash."""
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        for i in range(2):
            buf = io.BytesIO()
            Image.fromarray(np.random.default_rng(i).integers(0, 255, (600, 600, 3), dtype=np.uint8)).save(buf, "JPEG")
            data = buf.getvalue()
            (tmp_path / cls / f"{i}.jpg").write_bytes(data[: len(data) // 3] if (cls, i) == ("a", 0) else data)
    ds = ImageFolderDataset(str(tmp_path), build_two_view_transform(image_preprocess_state(64), scale=(0.9, 1.0)))
    sample, _ = ds[(0, 0)]
    assert sample["images"].shape == (3, 64, 64)
    assert {p for p, _ in sample["bad"]} == {"a/0.jpg"} and "truncated" in sample["bad"][0][1]
