"""``embedding-pipeline bench preprocess``: decode + JAX preprocessing against a Pillow-only baseline and the
model's own throughput (ONNX Runtime, no server), all measured in this run on the same synthetic JPEGs.

The question it answers: is preprocessing ever the bottleneck? It must outrun the model by a wide margin.
"""

from __future__ import annotations

import io
import json
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from embedding_pipeline.bench import synthetic
from embedding_pipeline.preprocess import kernels
from embedding_pipeline.preprocess.decode import Geometry
from embedding_pipeline.preprocess.preprocessor import for_model
from embedding_pipeline.settings import Settings

PROBE = Path(__file__).with_name("ort_probe.py")


def _model_input(settings: Settings) -> tuple[Path, str, tuple[int, ...]]:
    from embedding_pipeline.serving.models import ensure_default_model, read_sidecar

    model = ensure_default_model(settings.paths)
    sidecar = read_sidecar(model)
    if sidecar is None:
        raise RuntimeError(f"the model description next to {model} is missing or unreadable")
    first = sidecar["inputs"][0]
    return model, first["datatype"], tuple(first["shape"][1:])


def pillow_baseline(images: list[bytes], geometry: Geometry, threads: int) -> float:
    """Images/s of the same job in Pillow alone: draft decode, RGB, BILINEAR resize of the same box."""

    def one(data: bytes) -> np.ndarray:
        img: Image.Image = Image.open(io.BytesIO(data))
        scale = max(geometry.scale(img.height, img.width), 1.0)
        img.draft("RGB", (int(img.width / scale + 0.999), int(img.height / scale + 0.999)))
        img = img.convert("RGB")
        top, left, bh, bw = geometry.box(img.height, img.width)
        out = img.resize(
            (geometry.width, geometry.height), Image.Resampling.BILINEAR, box=(left, top, left + bw, top + bh)
        )
        return np.asarray(out)

    started = time.perf_counter()
    if threads > 1:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(one, images))
    else:
        for data in images:
            one(data)
    return len(images) / (time.perf_counter() - started)


def pipeline_rate(images: list[bytes], settings: Settings, datatype: str, shape: tuple[int, ...]) -> dict[str, Any]:
    prep = for_model(settings, datatype, shape)
    size = prep.batch_size
    chunks = [images[i : i + size] for i in range(0, len(images), size)]
    traced_before = sum(kernels.traces.values())
    started = time.perf_counter()
    first = next(prep.stream(chunks[:1]))  # compile (or load from the persistent cache)
    first_call_s = time.perf_counter() - started
    assert not any(first.errors)
    started = time.perf_counter()
    done = sum(len(p.tensors) for p in prep.stream(chunks))
    elapsed = time.perf_counter() - started
    return {
        "images_per_s": done / elapsed,
        "first_batch_s": first_call_s,
        "compilations": sum(kernels.traces.values()) - traced_before,
        "geometry": prep.geometry,
        "tensor": prep.spec.describe(),
        "workers": prep.workers,
    }


def model_rate(settings: Settings, model: Path, seconds: float) -> dict[str, Any]:
    from embedding_pipeline.runtime.environments import ensure_env

    python = ensure_env(settings.paths, "serving")
    out = subprocess.run(
        [str(python), "-I", str(PROBE), "--model", str(model), "--seconds", str(seconds)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(settings: Settings, count: int = 512, seconds: float = 5.0) -> dict[str, Any]:
    model, datatype, shape = _model_input(settings)
    images = list(synthetic.jpegs(count))
    ours = pipeline_rate(images, settings, datatype, shape)
    geometry = ours.pop("geometry")
    pillow_1 = pillow_baseline(images, geometry, 1)
    pillow_n = pillow_baseline(images, geometry, ours["workers"])
    onnx = model_rate(settings, model, seconds)
    return {
        "images": count,
        "image_size": list(synthetic.SIZE),
        "preprocess_images_per_s": round(ours["images_per_s"], 1),
        "preprocess_first_batch_s": round(ours["first_batch_s"], 2),
        "compilations": ours["compilations"],
        "tensor": ours["tensor"],
        "pillow_1_thread_images_per_s": round(pillow_1, 1),
        f"pillow_{ours['workers']}_threads_images_per_s": round(pillow_n, 1),
        "model_onnxruntime_images_per_s": round(onnx["images_per_s"], 1),
        "ratio_preprocess_to_model": round(ours["images_per_s"] / onnx["images_per_s"], 2),
        "ratio_preprocess_to_pillow_same_threads": round(ours["images_per_s"] / pillow_n, 2),
    }


def render(result: dict[str, Any]) -> str:
    w, h = result["image_size"]
    threads = next(k for k in result if k.startswith("pillow_") and "threads" in k)
    lines = [
        f"Preprocessing benchmark: {result['images']} synthetic {w}x{h} JPEGs -> {result['tensor']}",
        f"  decode + JAX (this pipeline)   {result['preprocess_images_per_s']:>9.1f} images/s"
        f"   (first batch {result['preprocess_first_batch_s']} s, {result['compilations']} compilation)",
        f"  Pillow only, 1 thread          {result['pillow_1_thread_images_per_s']:>9.1f} images/s",
        f"  Pillow only, same threads      {result[threads]:>9.1f} images/s",
        f"  model only (ONNX Runtime)      {result['model_onnxruntime_images_per_s']:>9.1f} images/s",
        f"  preprocessing / model          {result['ratio_preprocess_to_model']:>9.2f} x   (target >= 2)",
        f"  preprocessing / Pillow         {result['ratio_preprocess_to_pillow_same_threads']:>9.2f} x",
    ]
    return "\n".join(lines)
