"""Pillow decoding: bytes → uint8 RGB, oriented, reduced cheaply to just above what the model needs.

The exact resize is left to the JAX kernel; here we only (1) let libjpeg decode at ½–⅛ scale in the DCT domain
(``Image.draft``, several times faster than a full decode) and (2) cut other large images down by an integer
factor, so the region the kernel samples is at most twice the output size (its filter has a fixed tap count).

Errors carry a ``kind`` for the per-item status: ``truncated``, ``too_many_pixels`` or ``decode_error``.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image, ImageFile, ImageOps

from embedding_pipeline.sources.sniff import PIL_FORMATS
from embedding_pipeline.sources.statuses import ErrorKind

# Pillow's own guard warns at ~89 Mpx and refuses at twice that; ours refuses earlier and says why.
DEFAULT_MAX_PIXELS = 64_000_000
# The kernel's filter covers at most this many source pixels per output pixel (see kernels.TAPS).
MAX_SCALE = 2.0

Box = tuple[float, float, float, float]  # top, left, height, width in source pixels (floats: sub-pixel exact)


class DecodeError(Exception):
    """The bytes are not a decodable image; the message goes into the per-item error column."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class Geometry:
    """Which region of an image becomes the model input.

    * ``crop`` (the ImageNet convention): resize so the short side is ``resize_size``, then centre-crop
      ``height``×``width`` — the box is the largest centred region of the output's aspect, shrunk by
      ``min(height, width) / resize_size``;
    * ``pad``: the whole image, centred in the smallest region of the output's aspect that holds it
      (letterboxing); the kernel fills the outside with ``pad_color``.
    """

    height: int = 224
    width: int = 224
    resize_size: int = 256
    policy: Literal["crop", "pad"] = "crop"

    def box(self, height: float, width: float) -> Box:
        aspect = self.height / self.width
        taller = height / width > aspect
        if self.policy == "crop":
            bh, bw = (width * aspect, width) if taller else (height, height / aspect)
            shrink = min(self.height, self.width) / self.resize_size
            bh, bw = bh * shrink, bw * shrink
        else:
            bh, bw = (height, height / aspect) if taller else (width * aspect, width)
        return (height - bh) / 2, (width - bw) / 2, bh, bw

    def scale(self, height: float, width: float) -> float:
        """Source pixels per output pixel for an image of this size."""
        return self.box(height, width)[2] / self.height


@dataclass(frozen=True)
class DecodeOptions:
    max_pixels: int = DEFAULT_MAX_PIXELS
    background: tuple[int, int, int] = (255, 255, 255)  # alpha is composited on this
    allow_truncated: bool = False


def _to_rgb(img: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    if img.mode == "CMYK":
        return _cmyk_to_rgb(img)
    if img.mode.startswith("I") or img.mode == "F":
        # 16/32-bit integer or float greyscale: scale into 8 bits instead of clipping. One float32 array, scaled
        # in place (float64 temporaries cost ~1 GB per decode at the pixel cap).
        arr = np.array(img, dtype=np.float32)
        top = float(arr.max()) if arr.size else 0.0
        full = 1.0 if img.mode == "F" and top <= 1.0 else 65535.0 if top > 255 else 255.0
        arr *= np.float32(255.0 / full)
        arr += np.float32(0.5)
        np.clip(arr, 0, 255, out=arr)
        grey = arr.astype(np.uint8)
        del arr
        return Image.fromarray(grey).convert("RGB")
    return img.convert("RGB")


def _cmyk_to_rgb(img: Image.Image) -> Image.Image:
    # Print CMYK is device-dependent: its embedded ICC profile gives the real colours; Pillow's formula is a
    # rough fallback for files without one.
    profile = img.info.get("icc_profile")
    if profile:
        try:
            from PIL import ImageCms

            source = ImageCms.ImageCmsProfile(io.BytesIO(profile))
            converted = ImageCms.profileToProfile(img, source, ImageCms.createProfile("sRGB"), outputMode="RGB")
            assert converted is not None  # None only with inPlace=True
            return converted
        except Exception:  # noqa: BLE001 - a broken profile falls back to the formula, never fails the image
            pass
    return img.convert("RGB")


def _decode_error(exc: Exception) -> DecodeError:
    text = str(exc) or type(exc).__name__
    if "truncated" in text.lower() or isinstance(exc, EOFError):
        return DecodeError(ErrorKind.TRUNCATED, f"truncated image data: {text}")
    return DecodeError(ErrorKind.DECODE_ERROR, f"cannot decode image: {text}")


def decode(data: bytes, geometry: Geometry, options: DecodeOptions = DecodeOptions()) -> tuple[np.ndarray, Box]:
    """Decode to uint8 HxWx3 and give the model box in the returned array's pixels.

    The array may be smaller than the original (draft decode / integer reduction), but never so small that the
    kernel would have to upsample an image that had the pixels.
    """
    # Pillow reads this flag at load time; it is per process, and a process has one configuration.
    ImageFile.LOAD_TRUNCATED_IMAGES = options.allow_truncated
    try:
        img: Image.Image = Image.open(io.BytesIO(data), formats=PIL_FORMATS)
        width, height = img.size
        if width * height > options.max_pixels:
            raise DecodeError(
                ErrorKind.TOO_MANY_PIXELS, f"image too large: {width}x{height} pixels > {options.max_pixels} allowed"
            )
        orientation = img.getexif().get(0x0112, 1)
        if img.format == "JPEG":
            # Ask libjpeg for the smallest DCT scale that keeps the model box at least output-sized.
            scale = max(geometry.scale(height, width), 1.0)
            img.draft(img.mode if img.mode == "CMYK" else "RGB", (math.ceil(width / scale), math.ceil(height / scale)))
        img.load()
        if orientation != 1:
            img = ImageOps.exif_transpose(img)
        img = _to_rgb(img, options.background)
    except DecodeError:
        raise
    except Image.DecompressionBombError as exc:
        raise DecodeError(ErrorKind.TOO_MANY_PIXELS, f"refused as a decompression bomb: {exc}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:  # what Pillow raises for broken data
        raise _decode_error(exc) from None
    w, h = img.size
    reduce = math.ceil(geometry.scale(h, w) / MAX_SCALE)
    if reduce >= 2:
        img = img.reduce(reduce)
        w, h = img.size
    return np.asarray(img, dtype=np.uint8), geometry.box(h, w)
