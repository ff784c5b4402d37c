"""A fixed, reproducible set of 640×480 JPEGs cut from the bundled sample photos (realistic content: random
noise would decode and compress unlike any photo)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from embedding_pipeline.sources.samples import load_photo, photo_names

SIZE = (640, 480)


def _bases() -> list[Image.Image]:
    out = []
    for name in photo_names():
        img = Image.fromarray(load_photo(name)).convert("RGB")
        out.append(img.resize((img.width * 2, img.height * 2), Image.Resampling.BICUBIC))  # room for varied crops
    return out


def jpegs(count: int, seed: int = 0, quality: int = 90) -> Iterator[bytes]:
    """``count`` distinct 640×480 JPEGs: random crops, flips and colour shifts of the sample photos."""
    rng = np.random.default_rng(seed)
    bases = _bases()
    for i in range(count):
        base = bases[i % len(bases)]
        scale = rng.uniform(0.5, 1.0)
        w, h = int(base.width * scale), int(base.width * scale * 3 / 4)
        h = min(h, base.height)
        x, y = int(rng.integers(0, base.width - w + 1)), int(rng.integers(0, base.height - h + 1))
        img = base.crop((x, y, x + w, y + h)).resize(SIZE, Image.Resampling.BILINEAR)
        if rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        shift = rng.integers(-12, 13, size=3)
        arr = np.clip(np.asarray(img, dtype=np.int16) + shift, 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, "JPEG", quality=quality)
        yield buf.getvalue()


def write_drop(folder: Path, count: int, seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, data in enumerate(jpegs(count, seed)):
        (folder / f"synthetic-{i:06d}.jpg").write_bytes(data)
    (folder / "_READY").touch()
    return folder
