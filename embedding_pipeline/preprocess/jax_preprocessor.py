"""The preprocessing API of the original specification: ``JAXImagePreprocessor(image_size=…, mean=…, std=…)``.

A thin front for the same decode + JAX kernels the pipeline uses::

    pre = JAXImagePreprocessor(image_size=(299, 299), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    x = pre.preprocess_single("photo.jpg")                      # float32 (3, 299, 299)
    xs = pre.preprocess_batch(["a.jpg", "https://example.com/b.jpg"])  # float32 (2, 3, 299, 299)

Defaults produce float32 NCHW normalised with ImageNet's mean/std; ``dtype="uint8"`` gives raw pixels and
``channels_first=False`` NHWC. To match a model served by Triton exactly, use
``preprocess.preprocessor.for_model`` with the model's reported input instead.
"""

from __future__ import annotations

from typing import Literal, Sequence

import numpy as np

from embedding_pipeline.preprocess.preprocessor import Prepared, SourceError, from_settings
from embedding_pipeline.preprocess.spec import IMAGENET_MEAN, IMAGENET_STD, TensorSpec
from embedding_pipeline.settings import Settings, load_settings
from embedding_pipeline.sources.fetch import FetchError
from embedding_pipeline.sources.inputs import ImageInput, read_image_input
from embedding_pipeline.sources.statuses import ErrorKind


class PreprocessError(ValueError):
    """Some inputs could not be preprocessed; ``errors`` maps each failed input's position to its message."""

    def __init__(self, errors: dict[int, str]):
        self.errors = errors
        listed = "; ".join(f"#{i}: {msg}" for i, msg in sorted(errors.items())[:5])
        more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
        super().__init__(f"{len(errors)} image(s) could not be preprocessed: {listed}{more}")


class JAXImagePreprocessor:
    def __init__(
        self,
        image_size: int | tuple[int, int] = 224,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        resize_size: int | None = None,
        resize_policy: Literal["crop", "pad"] = "crop",
        dtype: str = "float32",
        channels_first: bool = True,
        batch_size: int = 32,
        cache_compiled: bool = True,
        settings: Settings | None = None,
    ):
        self.settings = settings or load_settings()
        height, width = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        datatype = {"float32": "FP32", "float16": "FP16", "uint8": "UINT8"}[dtype]
        shape = (3, height, width) if channels_first else (height, width, 3)
        spec = TensorSpec.from_model_input(datatype, shape, mean=tuple(mean), std=tuple(std))
        self._pre = from_settings(self.settings, spec, batch_size, resize_size, resize_policy, cache_compiled)

    @property
    def spec(self) -> TensorSpec:
        return self._pre.spec

    def _reader(self, image: ImageInput):
        def read() -> bytes:
            try:
                return read_image_input(image, self.settings.sources)
            except FetchError as exc:
                raise SourceError(getattr(exc, "kind", ErrorKind.UNREADABLE), str(exc)) from None

        return read

    def preprocess_many(self, images: Sequence[ImageInput]) -> Prepared:
        """Never raises for bad inputs: tensors for the good ones (in order) and an error per input."""
        return self._pre.prepare_all([self._reader(image) for image in images])

    def preprocess_batch(self, images: Sequence[ImageInput]) -> np.ndarray:
        """An (N, …) array for N inputs; raises :class:`PreprocessError` naming every input that failed."""
        prepared = self.preprocess_many(images)
        errors = {i: str(e) for i, e in enumerate(prepared.errors) if e is not None}
        if errors:
            raise PreprocessError(errors)
        return prepared.tensors

    def preprocess_single(self, image: ImageInput) -> np.ndarray:
        return self.preprocess_batch([image])[0]
