"""Use a trained model: `load_model(checkpoint)` -> an Embedder with `encode_image(x)` and `encode_text(x)`.

    from inference import load_model
    model = load_model("outputs/itc/checkpoint-latest.pth", device="cuda")
    image_emb = model.encode_image(["a.jpg", "photos/"])      # [N, D], L2-normalised
    text_emb = model.encode_text(["a photo of a dog", "a cat"])
    scores = image_emb @ text_emb.T

Any checkpoint of this project loads: pretraining or fine-tuning, merged or with LoRA adapters, multiway or
dual encoder. The tokenizer and the evaluation preprocessing saved in the checkpoint are used, so the
embeddings equal what the training evaluation computes. A checkpoint whose contrastive heads were never
trained (text_mlm, image_mim, a classification fine-tune) gives the pooled backbone features instead
(L2-normalised too; `contrastive` is False), which the zero-shot and retrieval commands refuse.

Images may be a path, a folder (its images, sorted, recursively), a list of those, a PIL image, a numpy array
(H x W x 3 or H x W, uint8 0-255 or float 0-1; or a stack of them) or a tensor (3 x H x W, or N x 3 x H x W, of
pixels 0-255 or 0-1); every kind goes through the same decoding and preprocessing. Texts: a string or a list.
"""
import io
import os

import numpy as np
import torch
from PIL import Image

from custom_datasets.hf_tokenizer import tokenizer_from_any_state
from custom_datasets.image_dataset import IMAGE_EXTENSIONS, build_eval_transform, image_preprocess_state
from custom_datasets.pair_dataset import BadSample, decode_image, read_file_bytes, to_rgb
from models.registry import model_from_config
from models.lora import LoRALinear
from tasks.base import PRETRAINING_HEADS, discard_pretraining_heads, split_finetune_state
from util.checkpoint import extract_state_dict, load_file
from util.errors import UserError
from util.progress import Progress

CONTRASTIVE_MODES = ("image_text_itc", "finetune:image_text_retrieval")


class Embedder:
    """A model in eval mode with its tokenizer and evaluation transform; see the module docstring."""

    def __init__(self, model, tokenizer, image_state, device, contrastive, batch_size=64, source=None, mode=None):
        self.model, self.tokenizer, self.image_state = model, tokenizer, dict(image_state)
        self.transform = build_eval_transform(image_state)
        self.device, self.contrastive, self.batch_size, self.source = device, contrastive, batch_size, source
        self.mode = mode  # the checkpoint's mode (image_text_itc, text_mlm, finetune:<task>, ...)

    @torch.no_grad()
    def encode_image(self, images, batch_size=None, progress=False):
        """Images of any kind in the module docstring -> [N, D] float32 on the device, L2-normalised. Decoded
        and preprocessed a batch at a time; `progress`: a bar with the rate and ETA on stderr."""
        sources = list(image_sources(images))
        if not sources:
            raise UserError("encode_image: no images given")

        def run(chunk):
            pixels = torch.stack([self.transform(img) for src in chunk for img in iter_images(src)])
            return self._image(pixels.to(self.device))
        return self._batched(sources, batch_size, run, "images" if progress else None)

    @torch.no_grad()
    def encode_text(self, texts, batch_size=None, progress=False):
        """A string or a list of strings -> [N, D] float32 on the device, L2-normalised."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise UserError("encode_text: expected a string or a non-empty list of strings")

        def run(chunk):
            ids, masks = self.tokenizer.encode_batch(chunk)
            return self._text(ids.to(self.device), masks.to(self.device))
        return self._batched(texts, batch_size, run, "texts" if progress else None)

    def _image(self, x):
        if self.contrastive:
            return self.model.encode_image(x).float()
        return torch.nn.functional.normalize(self.model.pooled_image(x).float(), dim=-1)

    @torch.no_grad()
    def encode_token_ids(self, ids, masks):
        """Tokenized texts ([N, L] ids and mask, on the device) -> [N, D]: encode_text without the tokenizer."""
        return self._text(ids, masks)

    def _text(self, ids, masks):
        if self.contrastive:
            return self.model.encode_text(ids, masks).float()
        return torch.nn.functional.normalize(self.model.pooled_text(ids, masks).float(), dim=-1)

    def _batched(self, items, batch_size, run, what=None):
        size, parts = batch_size or self.batch_size, []
        bar = Progress(len(items), f"encoding {what}") if what else None
        for i in range(0, len(items), size):
            parts.append(run(items[i:i + size]))
            if bar is not None:
                bar.update(len(items[i:i + size]))
        return torch.cat(parts)


def image_sources(images):
    """One entry per image, in order: file paths (folders listed), PIL images, single arrays or tensors."""
    if isinstance(images, (str, os.PathLike)):
        path = os.fspath(images)
        if os.path.isdir(path):
            files = image_files(path)
            if not files:
                raise UserError(f"{path}: no images ({', '.join(IMAGE_EXTENSIONS)}) in this folder")
            yield from files
        else:
            yield path
    elif isinstance(images, np.ndarray) and images.ndim == 4:
        yield from images
    elif isinstance(images, torch.Tensor) and images.ndim == 4:
        yield from images
    elif isinstance(images, (list, tuple)):
        for item in images:
            yield from image_sources(item)
    else:
        yield images


def iter_images(images):
    """RGB PIL images from any input kind in the module docstring, in order."""
    if isinstance(images, (str, os.PathLike)):
        yield from _images_at(os.fspath(images))
    elif isinstance(images, Image.Image):
        yield to_rgb(images)
    elif isinstance(images, np.ndarray):
        yield from (_from_array(a) for a in (images if images.ndim == 4 else [images]))
    elif isinstance(images, torch.Tensor):
        arrays = images.detach().cpu()
        arrays = arrays if arrays.ndim == 4 else arrays[None]
        yield from (_from_array(a.permute(1, 2, 0).numpy()) for a in arrays)
    elif isinstance(images, (list, tuple)):
        for item in images:
            yield from iter_images(item)
    else:
        raise UserError(f"encode_image: cannot read a {type(images).__name__}; give paths, a folder, PIL images, "
                        "numpy arrays or tensors")


def image_files(folder):
    """The image files under `folder`, sorted, recursively."""
    found = []
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs.sort()
        found += [os.path.join(root, f) for f in sorted(files) if f.lower().endswith(IMAGE_EXTENSIONS)]
    return found


def _images_at(path):
    if os.path.isdir(path):
        for f in image_sources(path):
            yield from _images_at(f)
        return
    if not os.path.exists(path):
        raise UserError(f"{path}: no such image file or folder")
    try:
        yield decode_image(read_file_bytes(path))
    except BadSample as e:
        raise UserError(f"{path}: {e.args[0]}") from None


def _from_array(a):
    a = np.asarray(a)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (3, 4)):
        raise UserError(f"encode_image: an array of shape {a.shape} is not an image (H x W x 3, or 3 x H x W "
                        "for a tensor)")
    if a.dtype != np.uint8:
        a = a.astype(np.float64)
        a = np.clip(np.rint(a * 255 if a.max() <= 1.0 else a), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "PNG")  # the same decoding as files: modes, alpha on white
    return decode_image(buf.getvalue())


def load_model(checkpoint, device="cpu", batch_size=64):
    """An Embedder for `checkpoint` (see the module docstring) on `device`."""
    model, ckpt = load_network(checkpoint, device)
    state = ckpt.get("tokenizer")
    if not state:
        raise UserError(f"{checkpoint}: holds no tokenizer (written by an older version?); it cannot encode text")
    image_state = ckpt.get("image_preprocess") or image_preprocess_state(model.config["img_size"], crop_pct=1.0)
    from util.merge_lora import trained_heads

    mode = ckpt.get("mode") or ckpt.get("merged_from_mode")
    contrastive = (mode in CONTRASTIVE_MODES or "itc" in trained_heads(ckpt)) and \
        getattr(model, "itc_image_proj", None) is not None
    return Embedder(model, tokenizer_from_any_state(state), image_state, torch.device(device), contrastive,
                    batch_size, source=checkpoint, mode=mode)


def add_command_args(parser, items):
    """The flags the zero-shot and retrieval commands share (`items`: what one forward pass holds)."""
    from util.flag_checks import positive_int

    parser.add_argument("--checkpoint", required=True, help="a checkpoint with trained contrastive heads")
    parser.add_argument("--batch_size", type=positive_int(), default=64, help=f"{items} per forward pass")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where the model runs")
    parser.add_argument("--out", default=None, help="write the results: .csv or .json")
    parser.add_argument("--quiet", action="store_true", help="do not print a line per result")


def load_contrastive_model(args, task):
    """load_model for a command that needs trained contrastive heads (`task` names it), else one error line."""
    model = load_model(args.checkpoint, args.device, args.batch_size)
    if not model.contrastive:
        raise UserError(f"--checkpoint {args.checkpoint}: its contrastive heads were never trained (a "
                        f"{model.mode} checkpoint); {task} needs an image_text_itc (or retrieval) checkpoint")
    return model


def write_results(path, rows, what):
    """write_table, then one line saying what was written where."""
    write_table(path, rows)
    print(f"wrote {len(rows)} {what} to {path}")


def write_table(path, rows):
    """Rows (dicts with the same keys) as CSV or JSON, by the file's extension (written whole, then renamed)."""
    import csv
    import json

    if not path.lower().endswith((".csv", ".json")):
        raise UserError(f"--out {path}: give a .csv or .json file")
    tmp = f"{path}.tmp"
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        if path.lower().endswith(".csv"):
            writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else [])
            writer.writeheader()
            writer.writerows(rows)
        else:
            json.dump(rows, f, indent=1, ensure_ascii=False, default=str)
    os.replace(tmp, path)


def restore_adapters(model, state_dict, args):
    """LoRA adapters exactly where the state dict has them (rank from their shape, alpha from the run's args),
    acting on the modalities the run adapted (a locked tower of the multiway model shares the attention, not
    its adapters)."""
    alpha = float(args.get("lora_alpha", 1.0))
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear) and f"{name}.lora_A" in state_dict:
            module.enable_lora(state_dict[f"{name}.lora_A"].shape[0], alpha)
    locked = {t for t in ("image", "text") if args.get(f"lock_{t}")}
    if locked:
        model.locked_towers = locked
        model.lora_modalities = set(model.lora_modalities) - locked - {"vl"}


def load_network(path, device, flag="--checkpoint"):
    """(model in eval mode on `device`, checkpoint dict): the network as trained, adapters included where they
    were (never merged), heads the checkpoint does not hold removed. Also util/eval_itc.py's loader."""
    ckpt = load_file(path, flag)
    sd, config = extract_state_dict(ckpt), ckpt.get("model_config") if isinstance(ckpt, dict) else None
    if sd is None or not config:
        raise UserError(f"{flag} {path}: no model weights with a model_config (a pretraining or fine-tuning "
                        "checkpoint, or a merged weights file, is expected)")
    sd = split_finetune_state(sd)
    model = model_from_config(config)
    if any(".lora_" in k for k in sd):
        restore_adapters(model, sd, ckpt.get("args") or {})
    absent = {k.split(".")[0] for k in model.state_dict() if k not in sd}
    discard_pretraining_heads(model, keep=[h for h in PRETRAINING_HEADS if h not in absent])
    try:
        model.load_state_dict(sd)
    except RuntimeError as e:
        raise UserError(f"{flag} {path}: does not match its own model_config ({str(e).splitlines()[0]})") from None
    return model.to(device).eval(), ckpt
