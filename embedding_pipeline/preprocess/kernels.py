"""JAX kernels: a fixed-shape batch of canvases → the model's input tensor, compiled once per process.

Each image arrives on a canvas of fixed size (top-left aligned, with its valid extent) together with its own
model box. The resize is separable and antialiased with a triangle filter — the same maths as Pillow's
``BILINEAR`` — but written as a *sparse* filter: every output pixel reads ``TAPS`` source pixels per axis,
gathered with per-image indices and weights computed inside the kernel. A dense resize matrix (what
``jax.image.scale_and_translate`` builds) spends >95 % of its multiply-adds on zero weights; the sparse form is
several times faster on CPU. Per-image boxes are traced values under ``vmap``, and batches are padded to a fixed
size with a validity mask, so mixed input sizes and short batches all share one compiled kernel.

Taps outside the image get zero weight and the rest are renormalised (as Pillow does at borders); output pixels
that fall outside the image — only in the ``pad`` policy — are blended with the pad colour by their coverage.
"""

from __future__ import annotations

from collections import Counter
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np

# Source pixels each output pixel may read per axis. A triangle filter downsampling by s has radius s, so it
# covers < 2s + 1 pixels; decode keeps s <= MAX_SCALE (2), hence 5.
TAPS = 5
# Extra canvas pixels around the box, for the filter's reach beyond the box edges.
MARGIN = 4

_cache_dir: Path | None = None
# How many times each kernel was traced (= compiled) in this process, by (height, width, dtype,
# channels_first, batch size); tests and benchmarks read it.
traces: Counter = Counter()


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


def canvas_shape(height: int, width: int) -> tuple[int, int]:
    """A canvas holds any box of up to MAX_SCALE × the output, plus the filter's margin on both sides."""
    return 2 * height + 4 * MARGIN, 2 * width + 4 * MARGIN


def _taps(start, length, extent, n: int):
    """Indices (n, TAPS) and normalised weights of the source pixels behind each of ``n`` output pixels."""
    import jax.numpy as jnp

    scale = length / n
    radius = jnp.maximum(1.0, scale)  # antialias when shrinking, plain bilinear when enlarging
    centre = start + (jnp.arange(n, dtype=jnp.float32) + 0.5) * scale
    first = jnp.floor(centre - radius - 0.5).astype(jnp.int32) + 1
    index = first[:, None] + jnp.arange(TAPS, dtype=jnp.int32)[None, :]
    weight = jnp.maximum(0.0, 1.0 - jnp.abs(index.astype(jnp.float32) + 0.5 - centre[:, None]) / radius)
    weight = jnp.where((index >= 0) & (index < extent), weight, 0.0)
    total = weight.sum(axis=1, keepdims=True)
    weight = weight / jnp.where(total > 0, total, 1.0)
    return jnp.clip(index, 0, extent - 1), weight


def _coverage(start, length, extent, n: int):
    """Fraction of each output pixel that lies on the image (1 everywhere unless the box leaves the image)."""
    import jax.numpy as jnp

    lo = (0.0 - start) * n / length
    hi = (extent - start) * n / length
    edges = jnp.arange(n, dtype=jnp.float32)
    return jnp.clip(jnp.minimum(edges + 1.0, hi) - jnp.maximum(edges, lo), 0.0, 1.0)


@lru_cache(maxsize=None)
def _compiled(
    height: int,
    width: int,
    out_dtype: str,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    channels_first: bool,
    pad_color: tuple[int, int, int],
):
    import jax
    import jax.numpy as jnp

    def one(canvas, box, extent):
        top, left, box_h, box_w = box[0], box[1], box[2], box[3]
        rows, row_w = _taps(top, box_h, extent[0], height)
        cols, col_w = _taps(left, box_w, extent[1], width)
        # Columns first: the gathers then read whole contiguous rows, which XLA's CPU backend does fastest.
        narrow = sum(col_w[None, :, k, None] * canvas[:, cols[:, k]].astype(jnp.float32) for k in range(TAPS))
        out = sum(row_w[:, k, None, None] * narrow[rows[:, k]] for k in range(TAPS))
        cover = _coverage(top, box_h, extent[0], height)[:, None] * _coverage(left, box_w, extent[1], width)[None]
        out = out * cover[..., None] + jnp.asarray(pad_color, jnp.float32) * (1.0 - cover[..., None])
        if out_dtype == "uint8":
            out = jnp.clip(jnp.round(out), 0, 255).astype(jnp.uint8)
        else:
            out = ((out / 255.0 - jnp.asarray(mean)) / jnp.asarray(std)).astype(out_dtype)
        return jnp.transpose(out, (2, 0, 1)) if channels_first else out

    def batch(canvases, boxes, extents, mask):
        # Runs only while tracing, i.e. once per compilation of this output for this batch size.
        traces[(height, width, out_dtype, channels_first, canvases.shape[0])] += 1
        out = jax.vmap(one)(canvases, boxes, extents)
        return jnp.where(mask.reshape((-1,) + (1,) * (out.ndim - 1)), out, jnp.zeros_like(out))

    return jax.jit(batch)


def place_on_canvas(
    pixels: np.ndarray, box: tuple[float, float, float, float], canvas: np.ndarray
) -> tuple[tuple[float, float, float, float], tuple[int, int]]:
    """Copy the window around ``box`` into ``canvas`` (top-left); return the box moved into canvas
    coordinates and the window's valid extent (rows, columns)."""
    top, left, box_h, box_w = box
    y0 = max(0, int(np.floor(top)) - MARGIN)
    x0 = max(0, int(np.floor(left)) - MARGIN)
    window = pixels[y0 : y0 + canvas.shape[0], x0 : x0 + canvas.shape[1]]
    canvas[: window.shape[0], : window.shape[1]] = window
    return (top - y0, left - x0, box_h, box_w), (window.shape[0], window.shape[1])


def run_batch(
    canvases: np.ndarray,
    boxes: np.ndarray,
    extents: np.ndarray,
    mask: np.ndarray,
    height: int,
    width: int,
    out_dtype: str = "uint8",
    mean: Sequence[float] = (0.0, 0.0, 0.0),
    std: Sequence[float] = (1.0, 1.0, 1.0),
    channels_first: bool = False,
    pad_color: Sequence[int] = (0, 0, 0),
) -> np.ndarray:
    """Apply the compiled kernel; shapes must be fixed by the caller (pad the batch, set ``mask``)."""
    fn = _compiled(
        height,
        width,
        out_dtype,
        tuple(map(float, mean)),
        tuple(map(float, std)),
        channels_first,
        tuple(int(c) for c in pad_color),
    )
    return np.asarray(fn(canvases, boxes.astype(np.float32), extents.astype(np.int32), mask))
