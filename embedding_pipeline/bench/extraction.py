"""Section 1 of ``embedding-pipeline bench``: embedding extraction from real photos, end to end.

Synthetic 640x480 JPEG variants of the bundled sample photos are read from disk, decoded and preprocessed by the
pipeline's own preprocessor and embedded by the model on the real Triton server — the path every ingested image
takes. The reference is the model alone (ONNX Runtime in the serving environment, same file, same threads, no
server, no preprocessing), measured in the same run: the ratio shows what the rest of the pipeline costs.
"""

from __future__ import annotations

import json
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from embedding_pipeline.bench import synthetic
from embedding_pipeline.settings import Settings
from embedding_pipeline.sources.samples import photo_names

TARGET_RATIO = 0.6  # end to end vs model only


@dataclass
class Extraction:
    """The figures of section 1, and the embeddings it produced (reused as real vectors by the index sections)."""

    figures: dict[str, Any]
    vectors: np.ndarray  # [images, dim] float32, L2-normalised by the model
    photos: np.ndarray  # [images] index of the sample photo each variant was cut from


def write_photos(folder: Path, count: int) -> list[Path]:
    """``count`` JPEG variants on disk (the pipeline reads files; holding them all in memory would not)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, data in enumerate(synthetic.jpegs(count)):
        path = folder / f"photo-{i:06d}.jpg"
        path.write_bytes(data)
        paths.append(path)
    return paths


def _reader(path: Path) -> Callable[[], bytes]:
    return path.read_bytes


def model_only(settings: Settings, model: Path, seconds: float, batch: int) -> dict[str, Any]:
    """The model's own throughput: ONNX Runtime in the serving environment (the probe prints one JSON line)."""
    from embedding_pipeline.bench.preprocess import PROBE
    from embedding_pipeline.runtime.environments import ensure_env

    python = ensure_env(settings.paths, "serving")
    argv = [str(python), "-I", str(PROBE), "--model", str(model), "--seconds", str(seconds), "--batch", str(batch)]
    out = subprocess.run(argv, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _model_file(settings: Settings) -> Path:
    from embedding_pipeline.serving.models import ensure_default_model

    return settings.triton.model_path or ensure_default_model(settings.paths)


def run(settings: Settings, folder: Path, images: int, progress: Callable[[str], None]) -> Extraction:
    """Embed ``images`` photo variants through preprocessing + Triton (``settings`` point at a running server)."""
    from embedding_pipeline.preprocess.preprocessor import for_model
    from embedding_pipeline.serving.client import TritonEmbedder

    if images < 1:
        raise ValueError(f"--images must be at least 1, not {images}")
    started = time.perf_counter()
    paths = write_photos(folder, images)
    progress(f"  wrote {images} JPEG variants in {time.perf_counter() - started:.1f} s")
    probe_s = min(5.0, max(1.0, images / 100))
    model = _model_file(settings)
    with TritonEmbedder.from_settings(settings.triton) as embedder:
        embedder.wait_ready(settings.triton.ready_timeout_s)
        spec = embedder.input_spec()
        prep = for_model(settings, spec.datatype, spec.shape)
        chunks = [[_reader(p) for p in paths[i : i + prep.batch_size]] for i in range(0, len(paths), prep.batch_size)]

        # Warm-up, not timed: the JAX kernel compiles (or loads from its cache) and Triton serves a first request.
        t0 = time.perf_counter()
        first = prep.prepare(chunks[0])
        embedder.embed(first.tensors)
        warmup_s = time.perf_counter() - t0

        # The model alone is measured right before and right after, so a neighbour's load during the run
        # weighs on both sides of the ratio alike.
        before = model_only(settings, model, probe_s, batch=prep.batch_size)
        t0 = time.perf_counter()
        parts: list[np.ndarray] = []
        failures: list[str] = []
        tensors = (_checked(prepared, failures) for prepared in prep.stream(chunks))
        for vectors in embedder.embed_stream(tensors):
            parts.append(vectors)
        elapsed = time.perf_counter() - t0
        after = model_only(settings, model, probe_s, batch=prep.batch_size)
        if failures:
            raise RuntimeError(f"{len(failures)} photo variant(s) failed to decode, e.g. {failures[0]}")
        vectors = np.concatenate(parts).astype(np.float32, copy=False)
        label = embedder.model_version_label()
    progress(f"  embedded {len(vectors)} photos in {elapsed:.1f} s")
    onnx_rate = (before["images_per_s"] + after["images_per_s"]) / 2
    rate = len(vectors) / elapsed
    ratio = rate / onnx_rate
    figures = {
        "images": len(vectors),
        "image_size": list(synthetic.SIZE),
        "tensor": prep.spec.describe(),
        "batch_size": prep.batch_size,
        "model": label,
        "dim": int(vectors.shape[1]),
        "triton_concurrency": settings.triton.concurrency,
        "warmup_s": round(warmup_s, 2),
        "seconds": round(elapsed, 2),
        "images_per_s": round(rate, 1),
        "ms_per_image": round(1000 * elapsed / len(vectors), 2),
        "model_only_images_per_s": round(onnx_rate, 1),
        "model_only_before_after": [round(before["images_per_s"], 1), round(after["images_per_s"], 1)],
        "model_only_threads": before["threads"],
        "ratio_to_model_only": round(ratio, 3),
        "target_ratio": TARGET_RATIO,
        "target_met": ratio >= TARGET_RATIO,
    }
    photos = np.arange(len(vectors)) % len(photo_names())  # synthetic.jpegs cycles through the photos
    return Extraction(figures, vectors, photos)


def _checked(prepared, failures: list[str]) -> np.ndarray:  # noqa: ANN001 - a Prepared batch
    failures.extend(str(e) for e in prepared.errors if e is not None)
    return prepared.tensors


def served_model_only(settings: Settings, batch: int, seconds: float) -> dict[str, Any]:
    """The served model alone: images/s for requests of ``batch`` ready-made input tensors, one after another
    (no decoding, no preprocessing, no search) — the ceiling by-image search is compared with."""
    from embedding_pipeline.serving.client import TritonEmbedder

    with TritonEmbedder.from_settings(settings.triton) as embedder:
        spec = embedder.input_spec()
        shape = [224 if d < 0 else d for d in spec.shape]
        tensors = np.random.default_rng(5).integers(0, 255, size=(batch, *shape)).astype(spec.dtype)
        embedder.embed(tensors)  # the first request pays one-off costs
        done, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            embedder.embed(tensors)
            done += batch
        elapsed = time.perf_counter() - started
    return {"batch": batch, "images": done, "seconds": round(elapsed, 2), "images_per_s": round(done / elapsed, 1)}
