"""Images in, model-ready tensors out: Pillow decode on host threads, then one compiled JAX kernel per batch.

Decoding releases the GIL, so a small thread pool decodes batch *n + 1* while the kernel (which uses every core
through XLA) runs batch *n*.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Literal, Sequence, Union

import numpy as np

from embedding_pipeline.preprocess import kernels
from embedding_pipeline.preprocess.decode import DecodeError, DecodeOptions, Geometry, decode
from embedding_pipeline.preprocess.spec import TensorSpec

if TYPE_CHECKING:
    from embedding_pipeline.settings import Settings

# An input is encoded bytes, or a callable producing them (so reading a file happens on a decode thread too).
Source = Union[bytes, Callable[[], bytes]]


class SourceError(Exception):
    """Raised by a source callable whose bytes cannot be read; recorded per item like a decode error."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


@dataclass
class Failure:
    kind: str
    message: str

    def __str__(self) -> str:
        return self.message


@dataclass
class Prepared:
    """A batch's output: tensors for the images that decoded (in input order) and an error per input."""

    tensors: np.ndarray
    errors: list[Failure | None]

    @property
    def ok_positions(self) -> list[int]:
        return [i for i, e in enumerate(self.errors) if e is None]


@dataclass
class _Decoded:
    canvases: np.ndarray
    boxes: np.ndarray
    extents: np.ndarray
    mask: np.ndarray
    errors: list[Failure | None]


class Preprocessor:
    """Turns encoded images into the model's input tensor, ``batch_size`` at a time.

    The kernel always sees ``batch_size`` canvases of one shape, so it compiles once per process whatever the
    mix of input sizes; short batches are padded and masked.
    """

    def __init__(
        self,
        spec: TensorSpec,
        resize_size: int | None = None,
        batch_size: int = 32,
        cache_dir: Path | None = None,
        policy: Literal["crop", "pad"] = "crop",
        pad_color: Sequence[int] = (124, 116, 104),
        options: DecodeOptions = DecodeOptions(),  # noqa: B008 - frozen dataclass, never mutated
        workers: int = 2,
    ):
        self.spec = spec
        short = min(spec.height, spec.width)
        self.geometry = Geometry(spec.height, spec.width, resize_size or round(short * 256 / 224), policy)
        self.batch_size = batch_size
        self.canvas = kernels.canvas_shape(spec.height, spec.width)
        self.pad_color = tuple(int(c) for c in pad_color)
        self.options = options
        self.workers = max(1, workers)
        if cache_dir is not None:
            kernels.enable_compilation_cache(cache_dir)

    # -- decode (host) -------------------------------------------------------------------------------------

    def _decode_one(self, source: Source, canvas: np.ndarray):
        try:
            data = source() if callable(source) else source
            pixels, box = decode(data, self.geometry, self.options)
        except DecodeError as exc:
            return Failure(exc.kind, str(exc))
        except SourceError as exc:
            return Failure(exc.kind, str(exc))
        return kernels.place_on_canvas(pixels, box, canvas)

    def _decode(self, sources: Sequence[Source], pool: ThreadPoolExecutor | None) -> _Decoded:
        if len(sources) > self.batch_size:
            raise ValueError(f"at most {self.batch_size} images per batch, got {len(sources)}")
        n = self.batch_size
        canvases = np.zeros((n, *self.canvas, 3), dtype=np.uint8)
        boxes = np.tile(np.array([0, 0, 1, 1], dtype=np.float32), (n, 1))
        extents = np.ones((n, 2), dtype=np.int32)
        mask = np.zeros((n,), dtype=bool)
        jobs = [(s, canvases[i]) for i, s in enumerate(sources)]
        results = pool.map(lambda job: self._decode_one(*job), jobs) if pool else [self._decode_one(*j) for j in jobs]
        errors: list[Failure | None] = []
        for i, result in enumerate(results):
            if isinstance(result, Failure):
                errors.append(result)
                continue
            boxes[i], extents[i] = result
            mask[i] = True
            errors.append(None)
        return _Decoded(canvases, boxes, extents, mask, errors)

    # -- kernel (JAX) --------------------------------------------------------------------------------------

    def _run(self, decoded: _Decoded) -> Prepared:
        if not decoded.mask.any():
            return Prepared(np.zeros((0, *self.spec.shape), dtype=self.spec.dtype), decoded.errors)
        spec = self.spec
        out = kernels.run_batch(
            decoded.canvases,
            decoded.boxes,
            decoded.extents,
            decoded.mask,
            spec.height,
            spec.width,
            spec.dtype,
            spec.mean,
            spec.std,
            spec.channels_first,
            self.pad_color,
        )
        return Prepared(out[decoded.mask], decoded.errors)

    # -- public --------------------------------------------------------------------------------------------

    def prepare(self, sources: Sequence[Source]) -> Prepared:
        """One batch (at most ``batch_size`` inputs); errors line up with ``sources``."""
        if self.workers > 1 and len(sources) > 1:
            with ThreadPoolExecutor(self.workers) as pool:
                return self._run(self._decode(sources, pool))
        return self._run(self._decode(sources, None))

    def stream(self, batches: Iterable[Sequence[Source]]) -> Iterator[Prepared]:
        """One :class:`Prepared` per input batch, decoding the next batch while the kernel runs this one."""
        with ThreadPoolExecutor(self.workers) as pool, ThreadPoolExecutor(1) as ahead:
            pending: Future | None = None
            for sources in batches:
                upcoming = ahead.submit(self._decode, list(sources), pool)
                if pending is not None:
                    yield self._run(pending.result())
                pending = upcoming
            if pending is not None:
                yield self._run(pending.result())

    def prepare_all(self, sources: Sequence[Source]) -> Prepared:
        """Any number of inputs, in batches; errors line up with ``sources``. Holds every tensor: for large
        inputs iterate :meth:`stream` instead."""
        chunks = [sources[i : i + self.batch_size] for i in range(0, len(sources), self.batch_size)]
        tensors, errors = [], []
        for part in self.stream(chunks):
            tensors.append(part.tensors)
            errors.extend(part.errors)
        if not tensors:
            return Prepared(np.zeros((0, *self.spec.shape), dtype=self.spec.dtype), [])
        return Prepared(np.concatenate(tensors), errors)


def from_settings(
    settings: "Settings",
    spec: TensorSpec,
    batch_size: int | None = None,
    resize_size: int | None = None,
    policy: Literal["crop", "pad"] | None = None,
    cache: bool = True,
) -> Preprocessor:
    """A preprocessor for ``spec`` with the decode and resize knobs of ``settings`` (arguments override)."""
    p = settings.preprocess
    return Preprocessor(
        spec,
        resize_size=resize_size or p.resize_size,
        batch_size=batch_size or p.batch_size,
        cache_dir=settings.paths.jax_cache if cache else None,
        policy=policy or p.resize_policy,
        pad_color=p.pad_color,
        options=DecodeOptions(max_pixels=p.max_pixels, background=p.background, allow_truncated=p.allow_truncated),
        workers=p.decode_workers,
    )


def for_model(settings: "Settings", datatype: str, shape: Sequence[int], batch_size: int | None = None) -> Preprocessor:
    """The preprocessor that produces exactly the model input Triton reports, tuned by the settings."""
    p = settings.preprocess
    spec = TensorSpec.from_model_input(datatype, tuple(shape), size=p.size, mean=p.mean, std=p.std)
    return from_settings(settings, spec, batch_size)
