"""JAX kernels: a fixed-shape batch of padded canvases → the model's input tensor, compiled once per process.

Each image arrives on a square canvas (edge-padded, so the antialiasing filter never sees black borders) with its
own crop box. ``jax.image.scale_and_translate`` maps every box onto ``image_size``² with a triangle (bilinear,
antialiased) filter — per image scale and offset under ``vmap`` — so mixed input sizes share one compiled kernel.
Batches are padded to a fixed size with a validity mask, for the same reason.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np

_cache_dir: Path | None = None


def enable_compilation_cache(path: Path) -> None:
    """Persist compiled kernels under ``path`` so a new process skips most of the first-call compile."""
    global _cache_dir
    if _cache_dir == path:
        return
    import jax

    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    _cache_dir = path


def canvas_size(image_size: int) -> int:
    # Decoding keeps crop boxes under 2 * image_size; a small margin leaves room for the filter's support.
    return 2 * image_size + 32


@lru_cache(maxsize=None)
def _compiled(image_size: int, out_dtype: str, mean: tuple[float, ...], std: tuple[float, ...], channels_first: bool):
    import jax
    import jax.numpy as jnp

    out_shape = (image_size, image_size, 3)

    def one(canvas, box):
        top, left, side_y, side_x = box[0], box[1], box[2], box[3]
        scale = jnp.stack([image_size / side_y, image_size / side_x])
        translation = jnp.stack([-top * scale[0], -left * scale[1]])
        resized = jax.image.scale_and_translate(
            canvas.astype(jnp.float32), out_shape, (0, 1), scale, translation, method="linear", antialias=True
        )
        if out_dtype == "uint8":
            out = jnp.clip(jnp.round(resized), 0, 255).astype(jnp.uint8)
        else:
            out = ((resized / 255.0 - jnp.asarray(mean)) / jnp.asarray(std)).astype(out_dtype)
        return jnp.transpose(out, (2, 0, 1)) if channels_first else out

    def batch(canvases, boxes, mask):
        out = jax.vmap(one)(canvases, boxes)
        return jnp.where(mask.reshape((-1,) + (1,) * (out.ndim - 1)), out, jnp.zeros_like(out))

    return jax.jit(batch)


def place_on_canvas(
    pixels: np.ndarray, box: tuple[float, float, float, float], size: int
) -> tuple[np.ndarray, tuple[float, float, float, float]]:
    """Cut a window around ``box`` out of ``pixels`` and edge-pad it to ``size``²; returns the moved box."""
    top, left, side_y, side_x = box
    margin = 8
    y0 = max(0, int(np.floor(top)) - margin)
    x0 = max(0, int(np.floor(left)) - margin)
    y1 = min(pixels.shape[0], y0 + size)
    x1 = min(pixels.shape[1], x0 + size)
    window = pixels[y0:y1, x0:x1]
    pad = ((0, size - window.shape[0]), (0, size - window.shape[1]), (0, 0))
    canvas = np.pad(window, pad, mode="edge") if any(p[1] for p in pad) else window
    return canvas, (top - y0, left - x0, side_y, side_x)


def run_batch(
    canvases: np.ndarray,
    boxes: np.ndarray,
    mask: np.ndarray,
    image_size: int,
    out_dtype: str = "uint8",
    mean: Sequence[float] = (0.0, 0.0, 0.0),
    std: Sequence[float] = (1.0, 1.0, 1.0),
    channels_first: bool = False,
) -> np.ndarray:
    """Apply the compiled kernel; shapes must be fixed by the caller (pad the batch, set ``mask``)."""
    fn = _compiled(image_size, out_dtype, tuple(map(float, mean)), tuple(map(float, std)), channels_first)
    return np.asarray(fn(canvases, boxes.astype(np.float32), mask))
