"""ImageNet-style image folders and the BEiT two-view transform for masked image modelling.

Layout: ``root/<class>/.../<image>.{jpg,jpeg,png}`` (any case); classes are the sorted sub-folder
names, target = class position. Items: ``dataset[key]``, key an int (epoch 0) or ``(epoch, index)`` ->

    ({"images": FloatTensor[3, H, W], "images_for_vae": FloatTensor[3, H/2, W/2],
      "bool_masked_pos": BoolTensor[N], "bad": [(path, reason), ...]}, target)

with the two-view transform (the eval transform gives only "images"). ``images`` is normalised with
the selected mean/std; ``images_for_vae`` is in [0, 1]: ``map_pixels`` is applied by the dVAE
tokenizer (models/dvae.py), nowhere else. ``collate_image_batch`` stacks items into the user's batch
format ``({"images": [B,3,H,W], "images_for_vae": [B,3,H/2,W/2], "bool_masked_pos": [B,N], "bad":
[...]}, targets [B])``.

Randomness is keyed: every draw (crop, flip, colour jitter, mask) comes from
``np.random.default_rng([seed, epoch, index])``, so the same key gives the same views in any worker,
after a resume, with any worker count. An unreadable image (truncated, zero-byte, not an image) is
replaced by another sample picked from a generator keyed by the same key; it is listed in the item's
"bad" (for the loop to count and log) and in the worker's ``dataset.bad``; never fatal unless
``MAX_REPLACEMENTS`` picks in a row fail.
"""

from __future__ import annotations

import math
import os
from array import array

import numpy as np
import torch
from PIL import Image, ImageEnhance
from torch.utils.data import Dataset

from custom_datasets.pair_dataset import (BadSample, decode_image, draft_region, load_view, open_image, parse_key,
                                          read_file_bytes)
from custom_datasets.masking_generator import masked_positions
from custom_datasets.text_dataset import PackedStrings
from util.errors import UserError
from util.logger import LOG

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")  # compared lower-cased, so .JPEG counts

# Normalisations by name (--image_norm). BEiT weights were trained with 0.5/0.5: feeding them
# ImageNet-normalised pixels silently costs accuracy.
IMAGE_NORMS = {
    "beit": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
}

INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS,
}


# --------------------------------------------------------------------------------------------------
# Preprocessing state: what a checkpoint records so the next stage feeds the model the same way.


def image_preprocess_state(img_size: int = 224, norm: str = "beit", interpolation: str = "bicubic",
                           crop_pct: float = 0.875) -> dict:
    """Plain dict (str/int/float/list only, safe for ``weights_only`` checkpoints):
    {"img_size", "norm", "mean", "std", "interpolation", "crop_pct"}; crop_pct is the evaluation
    centre crop's share of the resized shorter side (224 / 256)."""
    if norm not in IMAGE_NORMS:
        raise UserError(f"--image_norm {norm!r}: unknown; choose one of {', '.join(IMAGE_NORMS)}")
    if interpolation not in INTERPOLATIONS:
        raise UserError(f"image interpolation {interpolation!r}: unknown; choose one of "
                        f"{', '.join(INTERPOLATIONS)}")
    mean, std = IMAGE_NORMS[norm]
    return {"img_size": int(img_size), "norm": norm, "mean": list(mean), "std": list(std),
            "interpolation": interpolation, "crop_pct": float(crop_pct)}


def inherit_image_state(norm_flag, ckpt, source, img_size, crop_pct=0.875):
    """Image preprocessing of a pretraining run: --image_norm, else the resumed checkpoint's record (`ckpt`
    read from `source`), else BEiT's 0.5/0.5. A flag that contradicts the record wins, with a loud warning.
    `crop_pct`: the evaluation centre crop's fraction (the caller's choice; see main_pretrain_cook)."""
    inherited = (ckpt or {}).get("image_preprocess")
    norm = norm_flag or (inherited or {}).get("norm") or "beit"
    if inherited and norm_flag and inherited.get("norm") != norm_flag:
        LOG.warning("!" * 100 + f"\n!! --image_norm {norm_flag} differs from the '{inherited.get('norm')}' "
                    f"normalisation recorded in {source}.\n!! The weights were trained on differently normalised "
                    "pixels; continuing with the flag's value.\n" + "!" * 100)
    return image_preprocess_state(img_size=img_size, norm=norm, crop_pct=crop_pct)


def _checked_state(state: dict) -> dict:
    need = ("img_size", "mean", "std", "interpolation")
    missing = [k for k in need if k not in state]
    if missing:
        raise UserError(f"image preprocessing record lacks {missing}; expected keys {list(need)}")
    if state["interpolation"] not in INTERPOLATIONS:
        raise UserError(f"image preprocessing record: unknown interpolation {state['interpolation']!r}")
    return state


def _to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> FloatTensor [3, H, W] in [0, 1]."""
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).float().div_(255.0)


class _Normalize:
    """(x - mean) / std per channel, in place on a fresh [3, H, W] tensor."""

    def __init__(self, mean, std):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x.sub_(self.mean).div_(self.std)


def sample_resized_crop(rng: np.random.Generator, width: int, height: int, scale=(0.08, 1.0),
                        ratio=(3 / 4, 4 / 3), tries: int = 10) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random crop covering ``scale`` of the area with aspect (w/h) log-uniform
    in ``ratio`` (the RandomResizedCrop rule); after ``tries`` misses, the largest centred crop whose
    aspect lies in ``ratio``."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(tries):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class BeitTwoViewTransform:
    """BEiT's pretraining views of one image: ``__call__(pil_rgb, rng) -> dict``

        {"images": FloatTensor[3, img_size, img_size]  (bicubic, normalised with mean/std),
         "images_for_vae": FloatTensor[3, second_size, second_size]  (lanczos, in [0, 1]),
         "bool_masked_pos": BoolTensor[N]  (only when ``masking`` is given; N = its grid size)}

    Both views come from ONE random resized crop, one horizontal flip and one colour jitter
    (brightness, contrast, saturation each by a factor in [1 - j, 1 + j], in random order, no hue).
    The jitter (the same factors and order) is applied to each resized view (cheaper than on the whole image
    or the crop; the contrast reference is each view's mean grey, i.e. the crop's, not the full image's).
    """

    def __init__(self, img_size: int = 224, second_size: int | None = None,
                 mean=IMAGE_NORMS["beit"][0], std=IMAGE_NORMS["beit"][1], color_jitter: float = 0.4,
                 masking=None, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), hflip: float = 0.5,
                 interpolation: str = "bicubic", second_interpolation: str = "lanczos"):
        self.img_size = int(img_size)
        self.second_size = int(second_size if second_size is not None else img_size // 2)
        self.mean, self.std = tuple(mean), tuple(std)
        self.normalize = _Normalize(mean, std)
        self.color_jitter, self.masking = float(color_jitter), masking
        self.scale, self.ratio, self.hflip = tuple(scale), tuple(ratio), float(hflip)
        self.interpolation = INTERPOLATIONS[interpolation]
        self.second_interpolation = INTERPOLATIONS[second_interpolation]

    def _jitter(self, views, rng: np.random.Generator):
        """The same colour jitter (factors and order drawn once) on each of `views`."""
        if self.color_jitter <= 0:
            return views
        lo, hi = max(0.0, 1 - self.color_jitter), 1 + self.color_jitter
        factors = rng.uniform(lo, hi, size=3)
        enhancers = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)
        for i in rng.permutation(3):
            views = [enhancers[i](v).enhance(float(factors[i])) for v in views]
        return views

    decodes_itself = True  # takes open_image's undecoded images: the crop decides the JPEG draft scale

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> dict:
        top, left, h, w = sample_resized_crop(rng, img.width, img.height, self.scale, self.ratio)
        flip = rng.random() < self.hflip
        region = draft_region(img, (left, top, left + w, top + h), max(self.img_size, self.second_size))
        if flip:
            region = region.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        size, second = (self.img_size,) * 2, (self.second_size,) * 2
        view, small = self._jitter([region.resize(size, self.interpolation),
                                    region.resize(second, self.second_interpolation)], rng)
        out = {"images": self.normalize(_to_tensor(view)), "images_for_vae": _to_tensor(small)}
        if self.masking is not None:
            out["bool_masked_pos"] = torch.from_numpy(self.masking(rng).reshape(-1))
        return out


class ResizedCropView:
    """One random resized crop (the RandomResizedCrop rule, ``scale`` of the area), flipped horizontally with
    probability ``hflip``, resized to img_size and normalised: ``__call__(pil_rgb, rng) -> FloatTensor[3, S, S]``.
    The contrastive (image_text_itc) training view; ``scale=(1, 1)`` is the whole image, with no random draw."""

    def __init__(self, img_size: int, mean, std, scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3), hflip: float = 0.0,
                 interpolation: str = "bicubic"):
        self.img_size, self.scale, self.ratio, self.hflip = int(img_size), tuple(scale), tuple(ratio), float(hflip)
        self.normalize = _Normalize(mean, std)
        self.interpolation = INTERPOLATIONS[interpolation]

    decodes_itself = True  # takes open_image's undecoded images: the crop decides the JPEG draft scale

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> torch.Tensor:
        # scale (1, 1), the whole image: no draw (the largest centred crop of an allowed aspect), so the view is
        # deterministic (what the LiT embedding cache stores)
        tries = 0 if self.scale == (1.0, 1.0) else 10
        top, left, h, w = sample_resized_crop(rng, img.width, img.height, self.scale, self.ratio, tries)
        region = draft_region(img, (left, top, left + w, top + h), self.img_size)
        if self.hflip > 0 and rng.random() < self.hflip:
            region = region.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return self.normalize(_to_tensor(region.resize((self.img_size,) * 2, self.interpolation)))


class EvalTransform:
    """Resize the shorter side to img_size / crop_pct, centre-crop img_size, normalise:
    ``__call__(pil_rgb, rng=None) -> FloatTensor[3, img_size, img_size]`` (rng unused; deterministic)."""

    def __init__(self, img_size: int = 224, mean=IMAGE_NORMS["beit"][0], std=IMAGE_NORMS["beit"][1],
                 crop_pct: float = 0.875, interpolation: str = "bicubic"):
        self.img_size, self.crop_pct = int(img_size), float(crop_pct)
        self.mean, self.std = tuple(mean), tuple(std)
        self.normalize = _Normalize(mean, std)
        self.interpolation = INTERPOLATIONS[interpolation]

    def __call__(self, img: Image.Image, rng=None) -> torch.Tensor:
        short = max(self.img_size, int(math.floor(self.img_size / self.crop_pct)))
        scale = short / min(img.width, img.height)
        w, h = max(short, round(img.width * scale)), max(short, round(img.height * scale))
        img = img.resize((w, h), self.interpolation)
        left, top = (w - self.img_size) // 2, (h - self.img_size) // 2
        img = img.crop((left, top, left + self.img_size, top + self.img_size))
        return self.normalize(_to_tensor(img))


def build_two_view_transform(state: dict, masking=None, second_size: int | None = None,
                             color_jitter: float = 0.4, scale=(0.08, 1.0)) -> BeitTwoViewTransform:
    """The MIM training transform for a preprocessing record from ``image_preprocess_state``."""
    state = _checked_state(state)
    return BeitTwoViewTransform(state["img_size"], second_size, state["mean"], state["std"],
                                color_jitter=color_jitter, masking=masking, scale=scale,
                                interpolation=state["interpolation"])


def build_crop_view(state: dict, scale=(0.5, 1.0), hflip: float = 0.0) -> ResizedCropView:
    """The contrastive training view (ResizedCropView) for a preprocessing record."""
    state = _checked_state(state)
    return ResizedCropView(state["img_size"], state["mean"], state["std"], scale=scale, hflip=hflip,
                           interpolation=state["interpolation"])


def build_eval_transform(state: dict) -> EvalTransform:
    """The evaluation transform (zero-shot, fine-tune validation) for a preprocessing record."""
    state = _checked_state(state)
    return EvalTransform(state["img_size"], state["mean"], state["std"], state.get("crop_pct", 0.875),
                         state["interpolation"])


# --------------------------------------------------------------------------------------------------
# The dataset.


def scan_image_folder(root: str) -> tuple[list[str], PackedStrings, np.ndarray]:
    """(classes, relative image paths, int32 targets), classes and files in sorted order."""
    if not os.path.isdir(root):
        raise UserError(f"--data_path {root}: not a folder; expected an ImageNet-style folder "
                        "with one sub-folder of images per class")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    if not classes:
        raise UserError(f"--data_path {root}: no class sub-folders; expected root/<class>/<image>.jpg")
    paths, targets = PackedStrings(), array("i")
    for target, name in enumerate(classes):
        class_dir = os.path.join(root, name)
        for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
            dirnames.sort()  # os.walk descends in this list's order: keeps the scan deterministic
            rel_dir = os.path.relpath(dirpath, root)
            for f in sorted(filenames):
                if f.lower().endswith(IMAGE_EXTENSIONS):
                    paths.append(os.path.normpath(os.path.join(rel_dir, f)))
                    targets.append(target)
    if not len(paths):
        raise UserError(f"--data_path {root}: no images ({', '.join(IMAGE_EXTENSIONS)}) "
                        f"in its {len(classes)} class folders")
    return classes, paths.finish(), np.frombuffer(targets, dtype=np.int32).copy()


class ImageFolderDataset(Dataset):
    """Map-style dataset over an ImageNet-style folder; see the module docstring for the item format.

    ``transform(pil_rgb, rng)`` returns a dict of tensors (``BeitTwoViewTransform``) or one tensor
    (``EvalTransform``, stored as "images"). Paths are kept as one byte buffer plus offsets and the
    targets as one int32 array, so 1.3M images cost tens of MB per worker, not a list of objects.
    """

    def __init__(self, root: str, transform=None, seed: int = 0):
        self.root, self.transform, self.seed = root, transform, int(seed)
        self.classes, self.paths, self.targets = scan_image_folder(root)
        self.bad: list[tuple[str, str]] = []  # this process's replaced samples (per worker)

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, i: int, lazy: bool = False) -> Image.Image:
        """Decoded RGB image of entry i, or BadSample naming why not; `lazy`: from open_image (decoded by the
        transform, see draft_region)."""
        data = read_file_bytes(os.path.join(self.root, self.paths.get(i)))
        return open_image(data) if lazy else decode_image(data)

    def check(self, i: int):
        """None if entry i decodes, else (relative path, reason); for offline validation."""
        try:
            self.load(i)
            return None
        except BadSample as e:
            return self.paths.get(i), e.args[0]

    def __getitem__(self, key):
        epoch, index = parse_key(key)
        if not 0 <= index < len(self):
            raise IndexError(index)
        out, source, bad = load_view(self.load, self.transform, self.paths.get, len(self), self.seed, epoch, index,
                                     f"--data_path {self.root}")
        self.bad.extend(bad)
        sample = dict(out) if isinstance(out, dict) else {"images": out}
        sample["bad"] = bad
        return sample, int(self.targets[source])


def collate_image_batch(items: list) -> tuple[dict, torch.Tensor]:
    """[(sample dict, target), ...] -> ({key: stacked tensors, "bad": [(path, reason), ...] over the
    batch}, LongTensor[B] targets). Use it as the DataLoader's collate_fn: the per-item "bad" lists
    differ in length, which the default collate cannot stack."""
    samples = [s for s, _ in items]
    batch = {k: torch.stack([s[k] for s in samples]) for k in samples[0] if k != "bad"}
    batch["bad"] = [b for s in samples for b in s["bad"]]
    if "bool_masked_pos" in batch:  # image_mim: the masked patches' positions, found here rather than in the step
        batch["mim_positions"], batch["mim_count"] = masked_positions(batch["bool_masked_pos"].bool())
    return batch, torch.tensor([t for _, t in items], dtype=torch.long)
