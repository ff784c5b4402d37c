"""``embedding-pipeline bench duplicates``: where the near-duplicate threshold lies, and what finding groups costs.

1. **Threshold.** Distinct photos (the bundled sample photos, more photos and textures from scikit-image's data,
   and the 25×25 faces and non-faces of its LFW subset) and altered copies of each photo (rescaled to half size,
   JPEG at quality 20, cropped by 10 % of each side's length, a slight colour change, a horizontal flip) are embedded
   through the pipeline's preprocessing and the model on a private Triton. The cosine similarity of each altered
   copy to its original and of each distinct image to its nearest other distinct image are summarised
   (min/p5/p50/p95/max); the threshold is the midpoint of the gap between the two when they separate.
2. **Search vs brute force.** 10,000 synthetic unit vectors (random, plus planted groups of near-copies) are
   written to a private milvus-lite; :func:`~embedding_pipeline.duplicates.find_duplicates` over the whole
   collection is timed against a numpy pass comparing every pair of the same vectors held in memory, and the
   groups of both are compared.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import numpy as np
from PIL import Image, ImageEnhance

from embedding_pipeline import duplicates
from embedding_pipeline.bench import copy_set
from embedding_pipeline.bench.servers import BenchHome
from embedding_pipeline.settings import Settings
from embedding_pipeline.sources.samples import load_photo, photo_names

EXTRA_IMAGES = copy_set.SKIMAGE_EXTRA  # scikit-image data in its wheel, beyond the sample photos
ALTERATIONS = ("rescaled", "jpeg_q20", "crop_10", "colour", "flip")
SYNTHETIC_VECTORS = 10_000
PLANTED_GROUPS = 300  # groups of 2-4 near-copies among the synthetic vectors
PLANTED_COSINE = 0.95  # about how close a planted copy is to its original


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def distinct_images() -> dict[str, tuple[np.ndarray, bool]]:
    """name -> (RGB uint8 image, whether altered copies are made of it)."""
    import skimage.data

    out: dict[str, tuple[np.ndarray, bool]] = {name: (copy_set.rgb(load_photo(name)), True) for name in photo_names()}
    for name in EXTRA_IMAGES:
        out[name] = (copy_set.rgb(getattr(skimage.data, name)()), True)
    for k, face in enumerate(skimage.data.lfw_subset()):
        small = Image.fromarray(copy_set.rgb(face)).resize((100, 100), Image.Resampling.BICUBIC)
        out[f"lfw-{k:03d}"] = (np.asarray(small), False)
    return out


def altered(array: np.ndarray) -> dict[str, bytes]:
    """The altered copies of one image, as encoded files."""
    image = Image.fromarray(array)
    w, h = image.size
    dx, dy = int(w * 0.05), int(h * 0.05)
    colour = ImageEnhance.Color(ImageEnhance.Brightness(image).enhance(1.08)).enhance(0.85)
    return {
        "rescaled": copy_set.encode(image.resize((max(w // 2, 1), max(h // 2, 1)), Image.Resampling.BILINEAR)),
        "jpeg_q20": copy_set.encode(image, quality=20),
        "crop_10": copy_set.encode(image.crop((dx, dy, w - dx, h - dy))),
        "colour": copy_set.encode(colour),
        "flip": copy_set.encode(image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)),
    }


def _embed(settings: Settings, files: list[bytes]) -> np.ndarray:
    from embedding_pipeline.preprocess.preprocessor import for_model
    from embedding_pipeline.serving.client import TritonEmbedder

    with TritonEmbedder.from_settings(settings.triton) as embedder:
        embedder.wait_ready(settings.triton.ready_timeout_s)
        spec = embedder.input_spec()
        prep = for_model(settings, spec.datatype, spec.shape)
        prepared = prep.prepare_all(files)
        failed = [str(e) for e in prepared.errors if e is not None]
        if failed:
            raise RuntimeError(f"{len(failed)} image(s) failed to decode, e.g. {failed[0]}")
        return np.asarray(embedder.embed(prepared.tensors), dtype=np.float32)


def summary(values: np.ndarray) -> dict[str, float]:
    """min, p5, p50, p95, max of ``values`` (rounded to 4 places)."""
    q = np.percentile(values, [0, 5, 50, 95, 100])
    return {k: round(float(v), 4) for k, v in zip(("min", "p5", "p50", "p95", "max"), q)} | {"n": int(values.size)}


def separating_threshold(same: np.ndarray, distinct: np.ndarray) -> dict[str, Any]:
    """The midpoint of the gap between the closest distinct pair and the farthest altered pair, if they separate;
    else the cut that misjudges the fewest pairs."""
    low, high = float(distinct.max()), float(same.min())
    if high > low:
        return {"threshold": round((low + high) / 2, 4), "gap": round(high - low, 4), "separated": True, "errors": 0}
    cuts = np.unique(np.concatenate([same, distinct]))
    errors = [int((same < c).sum() + (distinct >= c).sum()) for c in cuts]
    best = int(np.argmin(errors))
    return {
        "threshold": round(float(cuts[best]), 4),
        "gap": round(high - low, 4),
        "separated": False,
        "errors": errors[best],
    }


def measure_threshold(settings: Settings) -> dict[str, Any]:
    images = distinct_images()
    names = list(images)
    originals = [copy_set.encode(Image.fromarray(array)) for array, _ in images.values()]
    copies: list[tuple[int, str, bytes]] = []
    for i, (array, alter) in enumerate(images.values()):
        if alter:
            copies += [(i, kind, data) for kind, data in altered(array).items()]
    _progress(f"  embedding {len(originals)} distinct images and {len(copies)} altered copies")
    vectors = _embed(settings, originals + [data for _, _, data in copies])
    base, changed = vectors[: len(originals)], vectors[len(originals) :]
    cos = duplicates.pair_scores(base, base, "COSINE")
    np.fill_diagonal(cos, -np.inf)
    nearest = cos.max(1)
    same = np.array(
        [
            float(duplicates.pair_scores(base[i : i + 1], changed[k : k + 1], "COSINE")[0, 0])
            for k, (i, _, _) in enumerate(copies)
        ]
    )
    by_kind = {kind: summary(same[[k for k, c in enumerate(copies) if c[1] == kind]]) for kind in ALTERATIONS}
    photos = np.array([not n.startswith("lfw-") for n in names])
    worst = int(np.argmin(same))
    closest = int(np.argmax(nearest))
    at = {
        f"{cut:.2f}": {
            "altered_found": f"{int((same >= cut).sum())}/{same.size}",
            "distinct_with_a_neighbour": f"{int((nearest >= cut).sum())}/{nearest.size}",
        }
        for cut in (0.85, 0.90, 0.92, 0.94, 0.95)
    }
    return {
        "model_metric": "COSINE",
        "distinct_images": len(originals),
        "altered_copies": len(copies),
        "altered_vs_original": summary(same),
        "altered_by_kind": by_kind,
        "distinct_nearest": summary(nearest),
        "distinct_nearest_photos": summary(nearest[photos]),
        "distinct_nearest_lfw": summary(nearest[~photos]),
        "farthest_copy": {
            "image": names[copies[worst][0]],
            "alteration": copies[worst][1],
            "score": round(float(same[worst]), 4),
        },
        "closest_distinct": {
            "images": [names[closest], names[int(np.argmax(cos[closest]))]],
            "score": round(float(nearest[closest]), 4),
        },
        "at_threshold": at,
        **separating_threshold(same, nearest),
    }


def synthetic_vectors(
    count: int, dim: int, groups: int, seed: int = 7
) -> tuple[list[str], np.ndarray, list[list[str]]]:
    """``count`` unit vectors: random ones, and ``groups`` planted groups (an original and 1-3 near-copies at a
    cosine of about ``PLANTED_COSINE``); returns ids, vectors and the planted groups."""
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((count, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    planted: list[list[str]] = []
    position = 0
    # noise of norm t on a unit vector gives cos = 1/sqrt(1 + t^2)
    t = float(np.sqrt(1 / PLANTED_COSINE**2 - 1))
    for _ in range(groups):
        size = int(rng.integers(2, 5))
        members = list(range(position, position + size))
        for m in members[1:]:
            noise = rng.standard_normal(dim).astype(np.float32)
            noise *= t / np.linalg.norm(noise)
            copy = vectors[members[0]] + noise
            vectors[m] = copy / np.linalg.norm(copy)
        planted.append([f"v{m:06d}" for m in members])
        position += size
    return [f"v{i:06d}" for i in range(count)], vectors, planted


def measure_search(home: BenchHome, count: int, dim: int, threshold: float, reps: int = 3) -> dict[str, Any]:
    from embedding_pipeline.index.client import ImageIndex

    ids, vectors, planted = synthetic_vectors(count, dim, PLANTED_GROUPS)
    with home.milvus("lite", "duplicates") as (milvus, _):
        settings = milvus.model_copy(update={"collection": "bench_duplicates", "metric_type": "COSINE"})
        with ImageIndex(settings) as index:
            index.ensure_collection(dim)
            rows = [
                {"id": i, "embedding": v, "uri": f"bench://{i}", "drop": "bench", "sha256": "", "model": "bench"}
                for i, v in zip(ids, vectors)
            ]
            index.upsert(rows)
            index.flush()
            searched, brute = [], []
            report = None
            for _ in range(reps):
                started = time.perf_counter()
                report = duplicates.find_duplicates(index, threshold=threshold)
                searched.append(time.perf_counter() - started)
                started = time.perf_counter()
                reference = duplicates.group_pairs(duplicates.brute_force_pairs(ids, vectors, threshold, "COSINE"))
                brute.append(time.perf_counter() - started)
    assert report is not None
    found = sorted(sorted(g["members"][k]["id"] for k in range(g["size"])) for g in duplicates.group_list(report.table))
    reference = sorted(reference)
    search_s, brute_s = min(searched), min(brute)
    return {
        "vectors": count,
        "dim": dim,
        "planted_groups": len(planted),
        "threshold": threshold,
        "index": f"{settings.index_type} {settings.search_params}",
        "top_k": 16,
        "search_s": round(search_s, 3),
        "brute_force_s": round(brute_s, 3),
        "ratio_search_to_brute_force": round(search_s / brute_s, 2),
        "groups_search": len(found),
        "groups_brute_force": len(reference),
        "same_groups": found == reference,
        "planted_found": found == sorted(planted),
    }


def run(settings: Settings, vectors: int = SYNTHETIC_VECTORS) -> dict[str, Any]:
    with BenchHome(settings) as home:
        with home.triton() as served:
            _progress("threshold: real photos and their altered copies through Triton")
            threshold = measure_threshold(served)
        _progress(f"search: {vectors} synthetic vectors in milvus-lite vs brute force")
        search = measure_search(home, vectors, 1280, threshold["threshold"])
    return {"threshold": threshold, "search": search}


def render(result: dict[str, Any]) -> str:
    t, s = result["threshold"], result["search"]

    def row(name: str, d: dict[str, float]) -> str:
        return f"  {name:<28} n={d['n']:<4} " + "  ".join(f"{k} {d[k]:.4f}" for k in ("min", "p5", "p50", "p95", "max"))

    lines = [
        f"Cosine similarity, {t['distinct_images']} distinct images, {t['altered_copies']} altered copies",
        row("altered vs original", t["altered_vs_original"]),
        *(row(f"  {kind}", d) for kind, d in t["altered_by_kind"].items()),
        row("distinct vs nearest distinct", t["distinct_nearest"]),
        row("  photos and textures", t["distinct_nearest_photos"]),
        row("  LFW 25x25 faces/non-faces", t["distinct_nearest_lfw"]),
        *(
            f"  at {cut}: altered copies found {v['altered_found']}, distinct images with a neighbour "
            f"{v['distinct_with_a_neighbour']}"
            for cut, v in t["at_threshold"].items()
        ),
        f"  farthest copy: {t['farthest_copy']}; closest distinct pair: {t['closest_distinct']}",
        f"  threshold {t['threshold']} (gap {t['gap']}, separated: {t['separated']}, misjudged pairs: {t['errors']})",
        "",
        f"Near-duplicate groups over {s['vectors']} synthetic {s['dim']}-d vectors "
        f"({s['planted_groups']} planted groups), threshold {s['threshold']}",
        f"  index search ({s['index']}, top {s['top_k']}): {s['search_s']:.3f} s; "
        f"brute force numpy: {s['brute_force_s']:.3f} s (ratio {s['ratio_search_to_brute_force']})",
        f"  groups: {s['groups_search']} by search, {s['groups_brute_force']} by brute force; same groups: "
        f"{s['same_groups']}; planted groups found exactly: {s['planted_found']}",
    ]
    return "\n".join(lines)
