"""Images in, model-ready tensors out: Pillow decode on the host, then one compiled JAX kernel per batch."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from embedding_pipeline.preprocess import kernels
from embedding_pipeline.preprocess.decode import DecodeError, Geometry, decode
from embedding_pipeline.preprocess.spec import TensorSpec


@dataclass
class Prepared:
    """A batch's output: tensors for the images that decoded (in input order) and an error per input."""

    tensors: np.ndarray
    errors: list[str | None]

    @property
    def ok_positions(self) -> list[int]:
        return [i for i, e in enumerate(self.errors) if e is None]


class Preprocessor:
    """Turns encoded images into the model's input tensor, ``batch_size`` at a time.

    The kernel always sees ``batch_size`` canvases of one size, so it compiles once per process whatever the mix
    of input sizes; short batches are padded and masked.
    """

    def __init__(
        self,
        spec: TensorSpec,
        resize_size: int | None = None,
        batch_size: int = 32,
        cache_dir: Path | None = None,
    ):
        self.spec = spec
        self.geometry = Geometry(spec.image_size, resize_size or round(spec.image_size * 256 / 224))
        self.batch_size = batch_size
        self.canvas = kernels.canvas_size(spec.image_size)
        if cache_dir is not None:
            kernels.enable_compilation_cache(cache_dir)

    def prepare(self, images: Sequence[bytes]) -> Prepared:
        if len(images) > self.batch_size:
            raise ValueError(f"at most {self.batch_size} images per call, got {len(images)}")
        canvases = np.zeros((self.batch_size, self.canvas, self.canvas, 3), dtype=np.uint8)
        boxes = np.ones((self.batch_size, 4), dtype=np.float32)
        mask = np.zeros((self.batch_size,), dtype=bool)
        errors: list[str | None] = []
        for i, data in enumerate(images):
            try:
                pixels, box = decode(data, self.geometry)
            except DecodeError as exc:
                errors.append(str(exc))
                continue
            canvases[i], boxes[i] = kernels.place_on_canvas(pixels, box, self.canvas)
            mask[i] = True
            errors.append(None)
        if not mask.any():
            return Prepared(np.zeros((0, *self.spec.shape), dtype=self.spec.dtype), errors)
        out = kernels.run_batch(
            canvases,
            boxes,
            mask,
            self.spec.image_size,
            self.spec.dtype,
            self.spec.mean,
            self.spec.std,
            self.spec.channels_first,
        )
        return Prepared(out[mask], errors)

    def prepare_all(self, images: Sequence[bytes]) -> Prepared:
        """Any number of images, in batches; errors line up with ``images``."""
        tensors, errors = [], []
        for start in range(0, len(images), self.batch_size):
            part = self.prepare(images[start : start + self.batch_size])
            tensors.append(part.tensors)
            errors.extend(part.errors)
        if not tensors:
            return Prepared(np.zeros((0, *self.spec.shape), dtype=self.spec.dtype), [])
        return Prepared(np.concatenate(tensors), errors)
