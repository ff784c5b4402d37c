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


# EXIF orientation -> the transform that *undoes* it; a file stores transform⁻¹(photo) plus the tag, so
# applying the tag shows the upright photo.
_STORE = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: np.transpose(a, (1, 0, 2)),
    6: lambda a: np.rot90(a, 1),
    7: lambda a: np.transpose(a[::-1, ::-1], (1, 0, 2)),
    8: lambda a: np.rot90(a, -1),
}


def oriented(array: np.ndarray, orientation: int, fmt: str = "JPEG", **kwargs) -> bytes:
    """``array`` stored as a camera would with EXIF ``orientation`` (1–8): upright once the tag is applied."""
    img = Image.fromarray(np.ascontiguousarray(_STORE[orientation](array)))
    exif = img.getexif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    img.save(buf, format=fmt, exif=exif, **kwargs)
    return buf.getvalue()
