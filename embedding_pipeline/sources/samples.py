"""Real photos that ship inside the scikit-image and scikit-learn wheels: the sample drop and test data.

Nothing is downloaded: only images bundled in the installed wheels are used.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from embedding_pipeline.sources.drops import READY_MARKER

# name -> (loader, category)
_PHOTOS = {
    "astronaut": ("skimage", "people"),
    "camera": ("skimage", "people"),
    "chelsea": ("skimage", "animals"),
    "coffee": ("skimage", "food"),
    "rocket": ("skimage", "vehicles"),
    "stereo_motorcycle": ("skimage", "vehicles"),
    "hubble_deep_field": ("skimage", "space"),
    "retina": ("skimage", "science"),
    "immunohistochemistry": ("skimage", "science"),
    "coins": ("skimage", "objects"),
    "china": ("sklearn", "urban"),
    "flower": ("sklearn", "nature"),
}


def photo_names() -> list[str]:
    return list(_PHOTOS)


def category(name: str) -> str:
    return _PHOTOS[name][1]


def load_photo(name: str) -> np.ndarray:
    """An HxWx3 (or HxW grey) uint8 photo by name."""
    source, _ = _PHOTOS[name]
    if source == "sklearn":
        from sklearn.datasets import load_sample_image

        return load_sample_image(f"{name}.jpg")
    import skimage.data

    image = getattr(skimage.data, name)()
    return image[0] if isinstance(image, tuple) else image


def write_sample_drop(drops_dir: Path, name: str = "sample-photos") -> Path:
    """Write the photos as JPEG files plus a JSONL manifest (ids and categories), then the ``_READY`` marker."""
    from PIL import Image

    folder = drops_dir / name
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for photo in photo_names():
        path = folder / f"{photo}.jpg"
        if not path.exists():
            Image.fromarray(load_photo(photo)).save(path, quality=92)
        rows.append({"id": photo, "uri": path.name, "metadata": {"category": category(photo), "source": "sample"}})
    (folder / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / READY_MARKER).touch()
    return folder
