"""Pillow decoding: bytes → uint8 RGB, oriented, reduced cheaply to just above what the model needs.

The exact resize is left to the JAX kernel; here we only (1) let libjpeg decode at ½–⅛ scale in the DCT domain
(``Image.draft``, several times faster than a full decode) and (2) cut other large images down by an integer
factor, never below the size the kernel will sample.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

# Bigger images are refused as likely decompression bombs (Pillow's own default is ~89 Mpx with a warning).
MAX_PIXELS = 64_000_000


class DecodeError(Exception):
    """The bytes are not a decodable image; the message goes into the per-item error column."""


@dataclass(frozen=True)
class Geometry:
    """How to turn an image into the model's square input: resize the short side, then centre-crop."""

    image_size: int = 224
    resize_size: int = 256

    def crop_box(self, height: float, width: float) -> tuple[float, float, float, float]:
        """(top, left, side_y, side_x) of the source region that becomes the model input, in source pixels."""
        side = min(height, width) * self.image_size / self.resize_size
        return (height - side) / 2, (width - side) / 2, side, side


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit greyscale: scale to 8 bits instead of clipping.
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if arr.max() > 255 else 255.0
        return Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)).convert("RGB")
    return img.convert("RGB")


def decode(data: bytes, geometry: Geometry) -> tuple[np.ndarray, tuple[float, float, float, float]]:
    """Decode to uint8 HxWx3 and give the crop box in the returned array's pixels.

    The array may be smaller than the original (draft decode / integer reduction) but the box always spans at
    least ``geometry.image_size`` pixels, so the kernel only ever downsamples or keeps the size.
    """
    try:
        img = Image.open(io.BytesIO(data))
        width, height = img.size
        if width * height > MAX_PIXELS:
            raise DecodeError(f"image too large: {width}x{height} pixels > {MAX_PIXELS}")
        orientation = img.getexif().get(0x0112, 1) if hasattr(img, "getexif") else 1
        if img.format == "JPEG":
            # Ask for the smallest DCT scale that keeps the crop region at least image_size wide.
            factor = geometry.image_size / geometry.crop_box(height, width)[2]
            img.draft("RGB", (math.ceil(width * factor), math.ceil(height * factor)))
        img.load()
    except DecodeError:
        raise
    except Image.DecompressionBombError as exc:
        raise DecodeError(f"refused as a decompression bomb: {exc}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise DecodeError(f"cannot decode image: {exc}") from None
    if getattr(img, "n_frames", 1) > 1:
        img.seek(0)
    if orientation != 1:
        img = ImageOps.exif_transpose(img)
    img = _to_rgb(img)
    w, h = img.size
    side = geometry.crop_box(h, w)[2]
    reduce = int(side // (2 * geometry.image_size))
    if reduce >= 2:
        img = img.reduce(reduce)
        w, h = img.size
    return np.asarray(img, dtype=np.uint8), geometry.crop_box(h, w)
