"""Small JPEG thumbnails as ``data:`` URIs, for previews in the Dagster UI (markdown metadata).

The Dagster UI (1.13) renders ``![alt](data:image/jpeg;base64,...)`` in markdown metadata: its sanitiser allows
the ``data`` protocol for image sources. So a preview needs no file server and survives the drop's files being
deleted. Thumbnails are kept tiny (≈ 2–5 KB each) because every metadata value is stored in the event log.

A preview is a courtesy: an image that cannot be thumbnailed (vanished, corrupt, too many pixels) yields ``None``
and is shown as a placeholder, never an error.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageOps

from embedding_pipeline.sources.fetch import FetchError, read_local_file
from embedding_pipeline.sources.sniff import PIL_FORMATS

THUMBNAIL_PX = 96  # longest side; the UI shows them at their natural size
JPEG_QUALITY = 70
# Refuse to open images that declare more pixels than this (the decompression-bomb guard of the preprocess stage
# is configurable; previews use the same default unless told otherwise).
DEFAULT_MAX_PIXELS = 64_000_000
DEFAULT_MAX_BYTES = 50 * 1024 * 1024


def thumbnail_jpeg(
    data: bytes, size: int = THUMBNAIL_PX, quality: int = JPEG_QUALITY, max_pixels: int = DEFAULT_MAX_PIXELS
) -> bytes | None:
    """A JPEG of ``data`` (any image Pillow reads) fitted into ``size``×``size``, or ``None`` if it cannot be made."""
    img: Image.Image
    try:
        with Image.open(io.BytesIO(data), formats=PIL_FORMATS) as img:
            width, height = img.size
            if width * height > max_pixels:
                return None
            # libjpeg decodes at 1/2..1/8 scale in the DCT domain: a 12 Mpx photo costs a few milliseconds.
            img.draft("RGB", (size * 2, size * 2))
            img = ImageOps.exif_transpose(img)
            img = _flatten(img)
            img.thumbnail((size, size), Image.Resampling.LANCZOS)
            out = io.BytesIO()
            img.save(out, format="JPEG", quality=quality, optimize=True)
            return out.getvalue()
    except Exception:  # noqa: BLE001 - Pillow raises many types for bad input; a preview must never fail a run
        return None


def _flatten(img: Image.Image) -> Image.Image:
    """RGB, with transparency composited on white (JPEG has no alpha)."""
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return img.convert("RGB")


def data_uri(jpeg: bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii")


def thumbnail_uri(data: bytes, size: int = THUMBNAIL_PX, max_pixels: int = DEFAULT_MAX_PIXELS) -> str | None:
    """``data:image/jpeg;base64,...`` of a thumbnail of ``data``, or ``None``."""
    jpeg = thumbnail_jpeg(data, size=size, max_pixels=max_pixels)
    return data_uri(jpeg) if jpeg is not None else None


def file_thumbnail_uri(
    path: str | Path,
    roots: Sequence[Path],
    size: int = THUMBNAIL_PX,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> str | None:
    """A thumbnail ``data:`` URI of the image file at ``path``, read through the guarded reader (inside ``roots``, a
    regular file, at most ``max_bytes``), or ``None`` (outside, missing, not a file, too big, not an image)."""
    try:
        data, _ = read_local_file(path, list(roots), max_bytes)
    except FetchError:
        return None
    return thumbnail_uri(data, size=size, max_pixels=max_pixels)
