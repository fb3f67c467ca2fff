"""Decoding image bytes for the data pipelines: every failure is a BadSample naming why (the datasets replace
such samples), huge images are guarded (--max_image_pixels: JPEGs decode reduced, others are refused), any PIL
mode becomes RGB, and a transform that knows its crop can have a JPEG decoded at reduced size (draft_region).
"""
import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError


class BadSample(Exception):
    """A sample whose image cannot be read or decoded; args[0] is the reason."""


DEFAULT_MAX_IMAGE_PIXELS = 6000 * 6000  # --max_image_pixels: larger JPEGs decode at 1/2, 1/4 or 1/8 scale
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_LIMITS = {"max_pixels": DEFAULT_MAX_IMAGE_PIXELS}


def set_max_image_pixels(n: int):
    """The process-wide --max_image_pixels (set before the DataLoader forks its workers, which inherit it).
    PIL's own guard (it refuses to open anything over twice Image.MAX_IMAGE_PIXELS) is raised to 64 x n, so a
    JPEG that fits at 1/8 scale can still be opened and decoded reduced."""
    _LIMITS["max_pixels"] = int(n)
    Image.MAX_IMAGE_PIXELS = max(Image.MAX_IMAGE_PIXELS or 0, 64 * int(n))
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)  # sizes are checked against n


def decode_image(data: bytes, max_pixels: int = None) -> Image.Image:
    """Fully decode image bytes to an RGB PIL image (to_rgb), or raise BadSample naming why.

    An image whose header says it has more than `max_pixels` pixels (default: set_max_image_pixels's) is
    decoded at reduced size when it is a
    JPEG (the decoder's own 1/2, 1/4 or 1/8 scaling: the first that fits; a 8000x8000 photo costs a quarter of
    the time and memory), and is a BadSample otherwise (or when even 1/8 does not fit)."""
    return finish_image(open_image(data, max_pixels))


def open_image(data: bytes, max_pixels: int = None) -> Image.Image:
    """decode_image's first half: the header read and checked, pixels not decoded yet (PIL is lazy), so a
    transform that knows its crop can still ask the JPEG decoder for a reduced size (draft_region)."""
    if len(data) == 0:
        raise BadSample("zero-byte file")
    # Decoders of untrusted bytes raise many types (OSError, SyntaxError, struct.error, ...);
    # any failure here means "this sample is unusable", never "stop the run".
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise BadSample("not an image") from None
    except Image.DecompressionBombError as e:
        raise BadSample(f"too large to decode: {e}") from None
    except Exception as e:
        raise BadSample(f"corrupt image header: {e}") from None
    _fit_pixels(img, max_pixels or _LIMITS["max_pixels"])
    return img


def finish_image(img: Image.Image) -> Image.Image:
    """decode_image's second half: the pixels decoded, as RGB, or BadSample (a truncated file fails only here)."""
    try:
        img.load()
        return to_rgb(img)
    except Exception as e:
        raise BadSample(f"truncated or corrupt image: {e}") from None


def draft_region(img: Image.Image, box, out_size: int) -> Image.Image:
    """The RGB pixels of `box` (left, top, right, bottom in the header's pixel grid) of an image from
    open_image, for an output of `out_size` pixels a side. A JPEG not decoded yet is decoded at the largest
    reduction (1/2, 1/4, 1/8: the decoder's own DCT scaling) that leaves the box at least out_size on both
    sides, and the box is scaled to the reduced grid: the crop was drawn on the full size, so the views keep
    their distribution while a 1500 px photo cropped to 224 decodes up to 64x fewer pixels. Anything else
    (not a JPEG, decoded already, a crop under twice the output) decodes in full."""
    left, top, right, bottom = box
    w, h = img.size
    fits = [d for d in (8, 4, 2) if (right - left) / d >= out_size and (bottom - top) / d >= out_size]
    if fits and img.format == "JPEG" and getattr(img, "tile", None) and not getattr(img, "decoderconfig", None):
        img.draft(img.mode, (w // fits[0], h // fits[0]))  # PIL picks the largest scale giving at least this
    rgb = finish_image(img)
    sx, sy = rgb.width / w, rgb.height / h
    if (sx, sy) != (1.0, 1.0):
        box = (left * sx, top * sy, max(left * sx + 1, right * sx), max(top * sy + 1, bottom * sy))
        box = tuple(int(round(v)) for v in box)
    return rgb.crop(box)


def _fit_pixels(img, max_pixels):
    """Ask the JPEG decoder for the largest scale (1, 1/2, 1/4, 1/8) within `max_pixels`, or raise BadSample."""
    w, h = img.size
    if w * h <= max_pixels:
        return
    scale = next((d for d in (2, 4, 8) if (w // d) * (h // d) <= max_pixels), None)
    if img.format != "JPEG" or scale is None:
        raise BadSample(f"{w}x{h} pixels is over --max_image_pixels {max_pixels}"
                        + ("" if img.format == "JPEG" else f" and a {img.format} cannot be decoded at reduced size"))
    img.draft(img.mode, (-(-w // scale), -(-h // scale)))


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB of any PIL mode: 16-bit grey scaled by 1/257 (not clipped to white), transparency (RGBA, LA, PA,
    palette with a transparent colour) composited on white, CMYK (plain or Adobe's inverted, which PIL's JPEG
    decoder undoes) and the rest through PIL's conversions."""
    if img.mode in SIXTEEN_BIT_MODES:
        grey = np.asarray(img, dtype=np.float64) / 257.0
        return Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8), "L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")
