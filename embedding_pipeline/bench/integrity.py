"""``embedding-pipeline bench integrity``: what the safety of a drop's files costs, against the unguarded way, in
one run on the same synthetic drop (default 5,000 images).

* **guarded reader** — every source read through :func:`~embedding_pipeline.sources.fetch.read_local` (roots after
  realpath, regular file, no link followed, no blocking, size cap, the identity recorded at listing) against a plain
  ``Path.read_bytes``;
* **fsync** — the preprocess stage's output for the drop (uint8 224×224×3 tensors, batches of 32) written with every
  file and folder fsynced before the rename, against the same writes left in the page cache.

Each is reported as a ratio, and as seconds per drop beside the stage it belongs to (decode + JAX preprocessing of
the same images), so the cost reads in context. Timings are the best of ``reps`` runs, alternating the two ways.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from embedding_pipeline.bench import synthetic
from embedding_pipeline.settings import Settings
from embedding_pipeline.sources.fetch import read_local, read_local_file
from embedding_pipeline.storage import arrow

BATCH = 32
SHAPE = (224, 224, 3)


def _best(ways: dict[str, Callable[[], Any]], reps: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(reps):
        for name, way in ways.items():
            started = time.perf_counter()
            way()
            times[name].append(time.perf_counter() - started)
    return {name: min(values) for name, values in times.items()}


def run(settings: Settings, images: int = 5000, reps: int = 3) -> dict[str, Any]:
    settings.paths.root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-integrity-", dir=settings.paths.root))
    try:
        folder = synthetic.write_drop(work / "drop", images, seed=11)
        files = sorted(folder.glob("*.jpg"))
        cap = settings.sources.max_image_bytes
        identity = {f: read_local_file(f, [folder], cap)[1] for f in files}
        reads = _best(
            {
                "plain": lambda: [f.read_bytes() for f in files],
                "guarded": lambda: [read_local(f, [folder], cap, identity=identity[f]) for f in files],
            },
            reps,
        )

        tensors = np.random.default_rng(0).integers(0, 255, (BATCH, *SHAPE), dtype=np.uint8)
        schema = arrow.tensor_schema(SHAPE, "uint8", {"drop": "bench", "layout": "NHWC"})
        rows = {
            "id": [f"i{k}" for k in range(BATCH)],
            "drop": ["bench"] * BATCH,
            "sha256": ["0" * 64] * BATCH,
            "uri": ["u"] * BATCH,
        }
        table = arrow.tensor_table(rows, tensors, schema)
        batches = -(-images // BATCH)

        def write(fsync: bool) -> None:
            with arrow.DropWriter(work / ("synced" if fsync else "cached"), durable=fsync) as writer:
                for _ in range(batches):
                    writer.write(table)
                writer.commit()

        writes = _best({"page_cache": lambda: write(False), "fsync": lambda: write(True)}, reps)

        from embedding_pipeline.preprocess.preprocessor import for_model

        prep = for_model(settings, "UINT8", SHAPE)
        sample = [f.read_bytes() for f in files[: min(512, len(files))]]
        prep.prepare_all(sample[: prep.batch_size])  # compiles the kernel outside the timing
        started = time.perf_counter()
        prep.prepare_all(sample)
        stage_s = (time.perf_counter() - started) * images / len(sample)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {
        "images": images,
        "read": {
            "plain_s": round(reads["plain"], 6),
            "guarded_s": round(reads["guarded"], 6),
            "ratio": round(reads["guarded"] / reads["plain"], 2),
            "extra_us_per_image": round((reads["guarded"] - reads["plain"]) / images * 1e6, 1),
        },
        "write": {
            "batches": batches,
            "megabytes": round(batches * table.nbytes / 1e6),
            "page_cache_s": round(writes["page_cache"], 6),
            "fsync_s": round(writes["fsync"], 6),
            "ratio": round(writes["fsync"] / writes["page_cache"], 2),
        },
        "preprocess_stage_s": round(stage_s, 2),
        "added_share_of_preprocess_stage": round(
            ((reads["guarded"] - reads["plain"]) + (writes["fsync"] - writes["page_cache"])) / stage_s, 4
        ),
    }


def render(result: dict[str, Any]) -> str:
    r, w = result["read"], result["write"]
    return "\n".join(
        [
            f"Drop of {result['images']} images",
            f"  guarded reads: {r['guarded_s']:.3f} s vs plain {r['plain_s']:.3f} s  (x{r['ratio']}, "
            f"+{r['extra_us_per_image']} us/image)",
            f"  fsync'd writes of {w['megabytes']} MB in {w['batches']} files: {w['fsync_s']:.3f} s vs page cache "
            f"{w['page_cache_s']:.3f} s  (x{w['ratio']})",
            f"  preprocess stage for the same drop (decode + JAX): ~{result['preprocess_stage_s']} s; both guards add "
            f"{100 * result['added_share_of_preprocess_stage']:.1f} % to it",
        ]
    )
