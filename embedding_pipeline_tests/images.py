"""Test images: encoded real photos (from wheels) and deliberately broken files."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def encode(array: np.ndarray, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def altered_copies(array: np.ndarray) -> dict[str, bytes]:
    """A horizontal flip, an off-centre crop and a low-quality JPEG of the same photo."""
    h, w = array.shape[:2]
    crop = array[int(h * 0.08) : int(h * 0.95), int(w * 0.05) : int(w * 0.9)]
    return {
        "flip": encode(np.ascontiguousarray(array[:, ::-1]), "JPEG", quality=90),
        "crop": encode(np.ascontiguousarray(crop), "JPEG", quality=90),
        "jpeg30": encode(array, "JPEG", quality=30),
    }
