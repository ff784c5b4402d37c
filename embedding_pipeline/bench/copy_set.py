"""The copy-detection evaluation set: distinct images that install offline with the project, and the altered copies
a user searches with ("find the original of this screenshot / crop / re-encode").

None of them is a sample photo the search tests use. The set is built the same way on every machine:

* **photographs** — scikit-image's bundled images beyond the sample photos (textures, a clock, the moon, a page,
  a horse ...), two regions of each large texture as images of their own (alike on purpose: gravel next to gravel),
  and faces from scikit-image's LFW subset (small, and all alike);
* **illustrations** — drawn here from a seed: posters, bar charts, diagrams, stripes, mosaics, landscapes, documents
  and application windows, eight of each family (a family's members share a style, so they are alike too).

Eight kinds of alteration, each a geometric, photometric, compression, framing/overlay or mirror change:
``crop`` (the central half of the area), ``rotate`` (20°, black corners), ``jpeg`` (quality 8), ``grey``,
``mirror``, ``framed`` (inside a screenshot-like window with a title and a caption bar), ``shear`` (0.3, black
corners) and ``dark`` (dark and low-contrast).
"""

from __future__ import annotations

import io
import math
import random
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFont

ALTERATIONS = ("crop", "rotate", "jpeg", "grey", "mirror", "framed", "shear", "dark")
# scikit-image data in its wheel that the sample photos (sources/samples.py) do not use.
# (``cat`` is ``chelsea`` again: left out.) The near-duplicate benchmark uses these too.
SKIMAGE_EXTRA = (
    "brick",
    "cell",
    "clock",
    "grass",
    "gravel",
    "moon",
    "page",
    "text",
    "colorwheel",
    "logo",
    "checkerboard",
)
PHOTOS = (*SKIMAGE_EXTRA, "horse", "microaneurysms", "binary_blobs")
# Large textures that also give two regions each, as distinct images.
REGIONS = ("brick", "cell", "grass", "gravel", "moon")
FACES = 20
FAMILIES = ("poster", "chart", "diagram", "stripes", "mosaic", "landscape", "document", "window")
PER_FAMILY = 8


def rgb(array: np.ndarray) -> np.ndarray:
    """Any scikit-image array (bool, grey, float, RGBA) as contiguous RGB uint8."""
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    if array.dtype != np.uint8:
        array = (255 * (array.astype(np.float64) - array.min()) / max(float(np.ptp(array)), 1e-9)).astype(np.uint8)
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    return np.ascontiguousarray(array[..., :3])


def photographs() -> dict[str, np.ndarray]:
    import skimage.data

    out: dict[str, np.ndarray] = {}
    for name in PHOTOS:
        out[name] = rgb(getattr(skimage.data, name)())
    for name in REGIONS:
        image = out[name]
        h, w = image.shape[:2]
        rh, rw = int(h * 0.55), int(w * 0.55)
        out[f"{name}-top-left"] = np.ascontiguousarray(image[:rh, :rw])
        out[f"{name}-bottom-right"] = np.ascontiguousarray(image[h - rh :, w - rw :])
    for k, face in enumerate(skimage.data.lfw_subset()[:FACES]):
        small = Image.fromarray(rgb(face)).resize((112, 112), Image.Resampling.BICUBIC)
        out[f"face-{k:02d}"] = np.asarray(small)
    return out


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def _colour(rng: random.Random) -> tuple[int, int, int]:
    return (rng.randrange(256), rng.randrange(256), rng.randrange(256))


def _word(rng: random.Random, n: int) -> str:
    return "".join(rng.choice("ABCDEFGHIJKLMNOPRSTUVWXYZ") for _ in range(n))


def _gradient(w: int, h: int, top: tuple[int, int, int], bottom: tuple[int, int, int]) -> Image.Image:
    t = np.linspace(0.0, 1.0, h)[:, None, None]
    rows = (1 - t) * np.array(top) + t * np.array(bottom)
    return Image.fromarray(np.repeat(rows, w, axis=1).astype(np.uint8))


def _draw(family: str, rng: random.Random) -> Image.Image:
    w, h = rng.randrange(320, 520, 8), rng.randrange(240, 400, 8)
    if family in ("poster", "landscape"):
        image = _gradient(w, h, _colour(rng), _colour(rng))
    else:
        image = Image.new("RGB", (w, h), (250, 250, 248) if family in ("chart", "document", "window") else _colour(rng))
    d = ImageDraw.Draw(image)
    if family == "poster":
        for _ in range(rng.randrange(3, 7)):
            x, y, r = rng.randrange(w), rng.randrange(h), rng.randrange(20, 90)
            d.ellipse((x - r, y - r, x + r, y + r), fill=_colour(rng))
        d.text((w * 0.08, h * 0.68), _word(rng, rng.randrange(4, 8)), fill=_colour(rng), font=_font(h // 7))
    elif family == "chart":
        bars = rng.randrange(4, 10)
        d.line((40, h - 30, w - 20, h - 30), fill=(40, 40, 40), width=2)
        d.line((40, 30, 40, h - 30), fill=(40, 40, 40), width=2)
        step = (w - 70) / bars
        for b in range(bars):
            top = rng.randrange(40, h - 40)
            d.rectangle((50 + b * step, top, 50 + (b + 0.7) * step, h - 31), fill=_colour(rng))
        d.text((50, 6), _word(rng, 6), fill=(20, 20, 20), font=_font(16))
    elif family == "diagram":
        boxes = []
        for _ in range(rng.randrange(3, 7)):
            x, y = rng.randrange(10, w - 110), rng.randrange(10, h - 50)
            boxes.append((x + 50, y + 20))
            d.rounded_rectangle((x, y, x + 100, y + 40), radius=8, outline=(30, 30, 30), width=2, fill=_colour(rng))
            d.text((x + 10, y + 12), _word(rng, 5), fill=(0, 0, 0), font=_font(14))
        for (x0, y0), (x1, y1) in zip(boxes, boxes[1:]):
            d.line((x0, y0, x1, y1), fill=(30, 30, 30), width=2)
    elif family == "stripes":
        width, colours = rng.randrange(8, 40), [_colour(rng) for _ in range(rng.randrange(2, 5))]
        for k, x in enumerate(range(-h, w, width)):
            d.polygon([(x, 0), (x + width, 0), (x + width + h, h), (x + h, h)], fill=colours[k % len(colours)])
        r = rng.randrange(30, 90)
        d.rectangle((w // 2 - r, h // 2 - r, w // 2 + r, h // 2 + r), fill=_colour(rng))
    elif family == "mosaic":
        n = rng.randrange(3, 9)
        for i in range(n):
            for j in range(n):
                d.rectangle((i * w / n, j * h / n, (i + 1) * w / n, (j + 1) * h / n), fill=_colour(rng))
    elif family == "landscape":
        for layer in range(rng.randrange(2, 4)):
            base = h * (0.45 + 0.15 * layer)
            points = [(0, h)] + [(x, base - rng.randrange(0, int(h * 0.3))) for x in range(0, w + 40, 40)] + [(w, h)]
            d.polygon(points, fill=_colour(rng))
        x, y, r = rng.randrange(w), rng.randrange(int(h * 0.35)), rng.randrange(15, 40)
        d.ellipse((x - r, y - r, x + r, y + r), fill=(255, 230, 120))
    elif family == "document":
        d.text((30, 16), _word(rng, rng.randrange(5, 10)), fill=(10, 10, 10), font=_font(22))
        y = 56
        while y < h - 20:
            words = " ".join(_word(rng, rng.randrange(2, 8)).lower() for _ in range(rng.randrange(3, 8)))
            d.text((30, y), words, fill=(60, 60, 60), font=_font(13))
            y += rng.randrange(16, 26)
    else:  # window
        d.rectangle((0, 0, w, 28), fill=_colour(rng))
        d.text((10, 6), _word(rng, 8), fill=(255, 255, 255), font=_font(14))
        for k in range(rng.randrange(3, 8)):
            y = 40 + k * 34
            d.rounded_rectangle((16, y, w // 2, y + 26), radius=5, fill=_colour(rng))
            d.text((24, y + 6), _word(rng, 7).lower(), fill=(0, 0, 0), font=_font(12))
        d.rectangle((w // 2 + 16, 40, w - 16, h - 16), outline=(90, 90, 90), width=2, fill=_colour(rng))
    return image


def illustrations(seed: int = 17) -> dict[str, np.ndarray]:
    out = {}
    for f, family in enumerate(FAMILIES):
        for k in range(PER_FAMILY):
            out[f"{family}-{k}"] = np.asarray(_draw(family, random.Random(seed * 1000 + f * 100 + k)))
    return out


def originals(seed: int = 17) -> dict[str, np.ndarray]:
    """name -> RGB uint8 image: every image of the set."""
    return {**photographs(), **illustrations(seed)}


def encode(image: Image.Image | np.ndarray, quality: int = 92) -> bytes:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buf = io.BytesIO()
    image.convert("RGB").save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _crop(image: Image.Image) -> Image.Image:
    w, h = image.size
    s = math.sqrt(0.5)
    cw, ch = max(int(w * s), 1), max(int(h * s), 1)
    return image.crop(((w - cw) // 2, (h - ch) // 2, (w - cw) // 2 + cw, (h - ch) // 2 + ch))


def _framed(image: Image.Image) -> Image.Image:
    w, h = image.size
    bar, caption = max(h // 10, 14), max(h // 7, 18)
    canvas = Image.new("RGB", (int(w * 1.3), int(h * 1.3) + bar + caption), (236, 236, 236))
    d = ImageDraw.Draw(canvas)
    d.rectangle((0, 0, canvas.width, bar), fill=(52, 58, 70))
    d.text((8, bar // 4), "IMG_2024.jpg - Viewer", fill=(255, 255, 255), font=_font(max(bar // 2, 8)))
    canvas.paste(image, (int(w * 0.15), bar + int(h * 0.15)))
    top = bar + int(h * 1.3)
    d.rectangle((0, top, canvas.width, canvas.height), fill=(255, 255, 255))
    d.text((8, top + caption // 4), "shared from my phone #copy", fill=(20, 20, 20), font=_font(max(caption // 2, 8)))
    return canvas


def _shear(image: Image.Image) -> Image.Image:
    w, h = image.size
    k = 0.3
    return image.transform((int(w + k * h), h), Image.Transform.AFFINE, (1, k, -k * h, 0, 1, 0), fillcolor=(0, 0, 0))


def _dark(image: Image.Image) -> Image.Image:
    return ImageEnhance.Contrast(ImageEnhance.Brightness(image).enhance(0.45)).enhance(0.5)


_ALTER: dict[str, Callable[[Image.Image], bytes]] = {
    "crop": lambda im: encode(_crop(im)),
    "rotate": lambda im: encode(im.rotate(20, expand=True, resample=Image.Resampling.BILINEAR, fillcolor=(0, 0, 0))),
    "jpeg": lambda im: encode(im, quality=8),
    "grey": lambda im: encode(im.convert("L")),
    "mirror": lambda im: encode(im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)),
    "framed": lambda im: encode(_framed(im)),
    "shear": lambda im: encode(_shear(im)),
    "dark": lambda im: encode(_dark(im)),
}


def altered(image: np.ndarray, kinds: tuple[str, ...] = ALTERATIONS) -> dict[str, bytes]:
    """The altered copies of one image, encoded as JPEG (what a user would upload)."""
    pil = Image.fromarray(image).convert("RGB")
    return {kind: _ALTER[kind](pil) for kind in kinds}


def ranking_scores(ranks: list[int | None]) -> dict[str, float]:
    """rank-1, recall@5 and mean average precision of queries with one relevant item each (its 1-based rank in
    the results, None when it is not among them): AP of one query is 1/rank."""
    n = max(len(ranks), 1)
    return {
        "rank1": round(sum(1 for r in ranks if r == 1) / n, 4),
        "recall5": round(sum(1 for r in ranks if r is not None and r <= 5) / n, 4),
        "map": round(sum(1.0 / r for r in ranks if r is not None) / n, 4),
        "queries": len(ranks),
    }
