"""Data-quality checks of a drop's embeddings and of its rows in the vector index, as plain functions.

Each check returns an :class:`Outcome`: passed or not, one sentence that says why, and metadata that lets a person
see the failure without opening a file (expected vs actual counts, the ids at fault). The Dagster asset checks
(``defs/checks.py``) only turn outcomes into check results; everything here runs on Arrow tables, numpy vectors and
an index client, so it is tested without Dagster or a server.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Protocol, Sequence

import numpy as np
import pyarrow as pa

from embedding_pipeline.index import expressions
from embedding_pipeline.index import params as index_params
from embedding_pipeline.settings import MilvusSettings
from embedding_pipeline.storage import arrow
from embedding_pipeline.vectors import NORM_TOLERANCE

# How many offending ids a check lists in its metadata (the counts are always complete).
EXAMPLES = 10
# Stored vectors searched for themselves per drop: enough to catch a broken or wrongly parameterised index, few
# enough to cost well under a second.
SELF_RETRIEVAL_SAMPLE = 16
# Candidates asked for per self-retrieval query, so that an exact duplicate stored under another id (the same image
# in two drops) is seen as a tie at rank 1 rather than as a miss.
SELF_RETRIEVAL_TOP_K = 10
# Scores this close to the best one count as the same rank (float32 scores of identical vectors differ by ~1e-7).
TIE_TOLERANCE = 1e-5
# The row limit of one plain Milvus query: above it the row-count check compares counts only, not id sets.
ID_LISTING_LIMIT = 16384


@dataclass(frozen=True)
class Outcome:
    """The result of one check: ``metadata`` values are plain numbers, strings, lists and dicts."""

    check: str
    passed: bool
    description: str
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class EmbeddingStats:
    """What the checks need to know about a drop's stored embeddings, gathered in one pass over its files."""

    files: int = 0
    rows: int = 0
    ids: Counter = field(default_factory=Counter)
    rows_by_dimension: Counter = field(default_factory=Counter)
    rows_by_model: Counter = field(default_factory=Counter)
    non_finite_ids: list[str] = field(default_factory=list)
    # (id, norm) of finite vectors whose norm is off 1 by more than the tolerance
    off_norm: list[tuple[str, float]] = field(default_factory=list)
    # finite vectors of norm 0: no direction, so no cosine similarity to anything
    zero_norm_ids: list[str] = field(default_factory=list)
    norm_min: float | None = None
    norm_max: float | None = None

    @property
    def duplicate_ids(self) -> list[str]:
        return sorted(i for i, n in self.ids.items() if n > 1)


def stats_of_tables(tables: Iterable[pa.Table], tolerance: float = NORM_TOLERANCE) -> EmbeddingStats:
    """Statistics over embedding tables (the schema of :func:`storage.arrow.embedding_schema`)."""
    stats = EmbeddingStats()
    for table in tables:
        stats.files += 1
        if table.num_rows == 0:
            continue
        ids = table.column("id").to_pylist()
        vectors = arrow.vectors_of(table)
        stats.rows += table.num_rows
        stats.ids.update(ids)
        stats.rows_by_dimension[int(vectors.shape[1])] += table.num_rows
        stats.rows_by_model.update(table.column("model").to_pylist())
        finite = np.isfinite(vectors).all(axis=1)
        stats.non_finite_ids.extend(i for i, ok in zip(ids, finite) if not ok)
        # float64 so that a float32 overflow in the sum of squares is not mistaken for a bad vector
        norms = np.linalg.norm(vectors[finite].astype(np.float64), axis=1)
        if norms.size:
            low, high = float(norms.min()), float(norms.max())
            stats.norm_min = low if stats.norm_min is None else min(stats.norm_min, low)
            stats.norm_max = high if stats.norm_max is None else max(stats.norm_max, high)
        finite_ids = [i for i, ok in zip(ids, finite) if ok]
        stats.off_norm.extend((i, float(n)) for i, n in zip(finite_ids, norms) if abs(n - 1.0) > tolerance)
        stats.zero_norm_ids.extend(i for i, n in zip(finite_ids, norms) if n == 0.0)
    return stats


def embedding_stats(folder: arrow.Location, tolerance: float = NORM_TOLERANCE) -> EmbeddingStats:
    """Statistics over a drop's embeddings folder (one Arrow file per batch; an absent folder holds none)."""
    return stats_of_tables(arrow.read_batches(folder), tolerance)


def embedding_ids(folder: arrow.Location) -> list[str]:
    """The ids of a drop's embeddings (only the id column is read)."""
    return [i for table in arrow.read_batches(folder, columns=["id"]) for i in table.column("id").to_pylist()]


def ok_item_ids(report: Iterable[Mapping[str, Any]]) -> list[str]:
    """Ids the drop's embeddings must hold: the items that passed the manifest and preprocessing
    (``ingest.item_report`` rows with status ok) and the earlier rows kept for items that failed transiently."""
    rows = list(report)
    # An id conflict is found when indexing: the item was embedded all the same.
    embedded = [r["id"] for r in rows if r["status"] == "ok" or r.get("stage") == "index"]
    return embedded + [i for r in rows for i in r.get("kept_previous") or []]


def _examples(values: Iterable[Any]) -> list[Any]:
    return sorted(values)[:EXAMPLES]


# -- embeddings ------------------------------------------------------------------------------------------------


def count_matches_items(stats: EmbeddingStats, expected_ids: Sequence[str]) -> Outcome:
    """One embedding per ok item: same count, same ids, no id twice."""
    expected = set(expected_ids)
    stored = set(stats.ids)
    missing, unexpected, duplicates = expected - stored, stored - expected, stats.duplicate_ids
    passed = not (missing or unexpected or duplicates) and stats.rows == len(expected)
    if passed:
        description = f"{stats.rows} embedding(s), one per ok item"
    else:
        problems = [f"{len(missing)} ok item(s) have no embedding"] if missing else []
        problems += [f"{len(unexpected)} embedding(s) belong to no ok item"] if unexpected else []
        problems += [f"{len(duplicates)} id(s) embedded more than once"] if duplicates else []
        description = f"expected {len(expected)} embedding(s) (the ok items), found {stats.rows}: " + "; ".join(
            problems or ["counts differ"]
        )
    return Outcome(
        "embeddings_match_ok_items",
        passed,
        description,
        {
            "expected": len(expected),
            "actual": stats.rows,
            "missing_ids": _examples(missing),
            "unexpected_ids": _examples(unexpected),
            "duplicate_ids": duplicates[:EXAMPLES],
        },
    )


def dimension_matches_model(
    stats: EmbeddingStats, model_dimension: int, served_model: str, configured_dimension: int | None = None
) -> Outcome:
    """Every vector has the served model's output dimension (and ``milvus.embedding_dim`` where set), and all of the
    drop's vectors come from that one model: vectors of another model are of another space, whatever their size."""
    dims = {int(d): n for d, n in stats.rows_by_dimension.items()}
    models = dict(stats.rows_by_model)
    problems = []
    wrong_dims = {d: n for d, n in dims.items() if d != model_dimension}
    if wrong_dims:
        problems.append(f"{sum(wrong_dims.values())} vector(s) are not {model_dimension}-d (found {sorted(dims)})")
    other_models = {m: n for m, n in models.items() if m != served_model}
    if other_models:
        problems.append(
            f"{sum(other_models.values())} vector(s) come from {sorted(other_models)}, not the served model "
            f"{served_model!r}: re-run the drop to embed them with it"
        )
    if configured_dimension is not None and configured_dimension != model_dimension:
        problems.append(f"milvus.embedding_dim is {configured_dimension} but the model returns {model_dimension}-d")
    passed = not problems
    description = f"{stats.rows} {model_dimension}-d vector(s) from {served_model}" if passed else "; ".join(problems)
    metadata: dict[str, Any] = {
        "expected_dimension": model_dimension,
        "dimensions": {str(d): n for d, n in sorted(dims.items())},
        "served_model": served_model,
        "models": models,
    }
    if configured_dimension is not None:
        metadata["configured_dimension"] = configured_dimension
    return Outcome("dimension_matches_model", passed, description, metadata)


def vectors_are_finite(stats: EmbeddingStats) -> Outcome:
    """No NaN or infinite component in any vector (one poisons every distance computed against it)."""
    bad = stats.non_finite_ids
    passed = not bad
    description = (
        f"all {stats.rows} vector(s) are finite"
        if passed
        else f"{len(bad)} of {stats.rows} vector(s) hold NaN or infinite values: {', '.join(_examples(bad))}"
    )
    return Outcome(
        "vectors_are_finite", passed, description, {"non_finite": len(bad), "non_finite_ids": _examples(bad)}
    )


def vectors_are_normalised(stats: EmbeddingStats, tolerance: float = NORM_TOLERANCE, unit_norm: bool = True) -> Outcome:
    """Every finite vector has L2 norm 1 within ``tolerance`` (``stats`` must be gathered with the same tolerance).

    With ``unit_norm`` off (a model that does not normalise its output) only zero vectors fail: they have no
    direction to compare. Non-finite vectors are left to :func:`vectors_are_finite`.
    """
    finite_rows = stats.rows - len(stats.non_finite_ids)
    off = sorted(stats.off_norm, key=lambda pair: -abs(pair[1] - 1.0)) if unit_norm else []
    zero = stats.zero_norm_ids
    passed = not off and not zero
    if passed:
        description = (
            f"all {finite_rows} finite vector(s) have norm 1 ± {tolerance:g}"
            if unit_norm
            else f"no zero vector among {finite_rows} finite vector(s) (unit norm not required: quality.unit_norm)"
        )
    elif off:
        shown = ", ".join(f"{i} ({n:.4g})" for i, n in off[:EXAMPLES])
        description = (
            f"{len(off)} vector(s) are not L2-normalised (norm off 1 by more than {tolerance:g}): {shown}; "
            "if the model does not normalise its output, set quality.unit_norm: false"
        )
    else:
        description = f"{len(zero)} vector(s) are all zeros: {', '.join(_examples(zero))}"
    metadata: dict[str, Any] = {
        "unit_norm_required": unit_norm,
        "tolerance": tolerance,
        "off_norm": len(off),
        "off_norm_ids": {i: round(n, 6) for i, n in off[:EXAMPLES]},
        "zero_norm_ids": _examples(zero),
    }
    if stats.norm_min is not None:
        metadata.update(norm_min=round(stats.norm_min, 6), norm_max=round(stats.norm_max or 0.0, 6))
    return Outcome("vectors_are_normalised", passed, description, metadata)


def embedding_outcomes(
    stats: EmbeddingStats,
    expected_ids: Sequence[str],
    model_dimension: int,
    served_model: str,
    configured_dimension: int | None = None,
    tolerance: float = NORM_TOLERANCE,
    unit_norm: bool = True,
) -> list[Outcome]:
    """All embedding checks of a drop (``stats`` gathered with ``tolerance``)."""
    return [
        count_matches_items(stats, expected_ids),
        dimension_matches_model(stats, model_dimension, served_model, configured_dimension),
        vectors_are_finite(stats),
        vectors_are_normalised(stats, tolerance, unit_norm),
    ]


# -- collection ------------------------------------------------------------------------------------------------


def rows_match_embeddings(drop_rows: int, stored_ids: set[str] | None, embedding_ids: Iterable[str]) -> Outcome:
    """The drop's row count in the index equals its embeddings count; where the stored ids are known, they are
    exactly the embedded ids."""
    expected = set(embedding_ids)
    missing = expected - stored_ids if stored_ids is not None else set()
    unexpected = stored_ids - expected if stored_ids is not None else set()
    passed = drop_rows == len(expected) and not missing and not unexpected
    if passed:
        description = f"{drop_rows} row(s) in the index, one per embedding"
    else:
        description = f"expected {len(expected)} row(s) for the drop (its embeddings), the index holds {drop_rows}"
        if missing:
            description += f"; {len(missing)} embedded id(s) have no row: {', '.join(_examples(missing))}"
        if unexpected:
            description += f"; {len(unexpected)} row(s) match no embedding: {', '.join(_examples(unexpected))}"
    return Outcome(
        "rows_match_embeddings",
        passed,
        description,
        {
            "expected": len(expected),
            "actual": drop_rows,
            "missing_ids": _examples(missing),
            "unexpected_ids": _examples(unexpected),
        },
    )


def expected_index(settings: MilvusSettings) -> dict[str, Any]:
    """The vector index the settings ask for: type, metric and build parameters (the type's defaults filled in, as
    the collection was built with them)."""
    return {
        "index_type": settings.index_type,
        "metric_type": settings.metric_type,
        "params": index_params.build_params(settings),
    }


def index_as_configured(described: Mapping[str, Any] | None, expected: Mapping[str, Any]) -> Outcome:
    """The collection's vector index (``ImageIndex.describe_index()``; None when there is no collection) has the
    configured type, metric and build parameters."""
    if described is None:
        return Outcome(
            "index_as_configured", False, "the collection does not exist", {"expected": dict(expected), "actual": {}}
        )
    actual: dict[str, Any] = {
        "index_type": described.get("index_type"),
        "metric_type": described.get("metric_type"),
        "params": {k: _number(v) for k, v in dict(described.get("params") or {}).items()},
    }
    wanted_params = {k: _number(v) for k, v in dict(expected["params"]).items()}
    differences = [
        f"{key} is {actual[key]!r}, configured {expected[key]!r}"
        for key in ("index_type", "metric_type")
        if actual[key] != expected[key]
    ]
    differences += [
        f"params.{key} is {actual['params'].get(key)!r}, configured {value!r}"
        for key, value in sorted(wanted_params.items())
        if actual["params"].get(key) != value
    ]
    passed = not differences
    description = (
        f"{actual['index_type']}/{actual['metric_type']} index with {wanted_params or 'no build parameters'}"
        if passed
        else "the vector index differs from the settings: " + "; ".join(differences)
    )
    return Outcome("index_as_configured", passed, description, {"expected": dict(expected), "actual": actual})


def _number(value: Any) -> Any:
    """Engines report build parameters as text ("16"): compare them as numbers."""
    if isinstance(value, str):
        for kind in (int, float):
            try:
                return kind(value)
            except ValueError:
                pass
    return value


class SearchHit(Protocol):
    @property
    def id(self) -> str: ...

    @property
    def score(self) -> float: ...


class VectorIndex(Protocol):
    """What the self-retrieval check needs from an index client (``ImageIndex`` has it)."""

    def vectors(self, ids: Sequence[str]) -> dict[str, np.ndarray]: ...

    def search(
        self, vectors: np.ndarray, top_k: int = 10, *, consistency_level: str | None = None
    ) -> Sequence[Sequence[SearchHit]]: ...


class CollectionIndex(VectorIndex, Protocol):
    """What the collection checks need from an index client (``ImageIndex`` has it)."""

    settings: MilvusSettings

    def exists(self) -> bool: ...

    def count(self, filter: str = "", consistency_level: str | None = None) -> int: ...

    def ids(self, filter: str = "", consistency_level: str | None = None, limit: int = 16384) -> set[str]: ...

    def describe_index(self) -> dict[str, Any]: ...


def sample_ids(ids: Iterable[str], size: int = SELF_RETRIEVAL_SAMPLE) -> list[str]:
    """Up to ``size`` ids spread evenly over the sorted ids: the same sample every time for the same rows, so a
    failure can be reproduced, yet not only the first few ids of the drop."""
    ordered = sorted(set(ids))
    if len(ordered) <= size:
        return ordered
    step = len(ordered) / size
    return [ordered[int(k * step)] for k in range(size)]


def self_retrieval(
    index: VectorIndex,
    candidate_ids: Iterable[str],
    size: int = SELF_RETRIEVAL_SAMPLE,
    top_k: int = SELF_RETRIEVAL_TOP_K,
    **search_kwargs: Any,
) -> Outcome:
    """A sample of the drop's stored vectors, each searched in the whole index, finds its own id at rank 1.

    An id tied with the best score counts as rank 1 (the same image stored under another id scores the same).
    Sampled ids whose vector the index no longer returns are listed but are not a retrieval failure: the row-count
    check reports missing rows.
    """
    sample = sample_ids(candidate_ids, size)
    stored = index.vectors(sample) if sample else {}
    gone = [i for i in sample if i not in stored]
    queried = [i for i in sample if i in stored]
    misses: dict[str, list[list[Any]]] = {}
    ties = 0
    if queried:
        results = index.search(np.stack([stored[i] for i in queried]), top_k=top_k, **search_kwargs)
        for item_id, hits in zip(queried, results):
            if not hits:
                misses[item_id] = []
                continue
            best = hits[0].score
            at_top = [h.id for h in hits if abs(h.score - best) <= TIE_TOLERANCE]
            if item_id in at_top:
                ties += int(len(at_top) > 1)
            elif len(at_top) == len(hits) == top_k:
                ties += 1  # a full list of ties at the top: the id may be just beyond top_k, which is no miss
            else:
                misses[item_id] = [[h.id, round(float(h.score), 6)] for h in hits[:3]]
    passed = not misses
    if passed:
        description = f"{len(queried)} sampled vector(s) each found their own id at rank 1"
    else:
        description = (
            f"{len(misses)} of {len(queried)} sampled vector(s) did not find their own id at rank 1: "
            + ", ".join(_examples(misses))
        )
    if gone:
        description += f" ({len(gone)} sampled id(s) no longer in the index)"
    return Outcome(
        "self_retrieval",
        passed,
        description,
        {
            "sampled": len(queried),
            "found_at_rank_1": len(queried) - len(misses),
            "ties_at_rank_1": ties,
            "sample_ids": sample,
            "misses": {k: misses[k] for k in _examples(misses)},
            "not_in_index": gone[:EXAMPLES],
        },
    )


def collection_outcomes(index: CollectionIndex, drop: str, embedding_ids: Sequence[str]) -> list[Outcome]:
    """All collection checks of a drop against ``index`` (the collection holding the drop's rows)."""
    expected = expected_index(index.settings)
    if not index.exists():
        # A drop without a single good image writes no collection: nothing can be wrong with it yet.
        described = None if embedding_ids else expected
        return [
            rows_match_embeddings(0, set(), embedding_ids),
            index_as_configured(described, expected),
            self_retrieval(index, []),
        ]
    # Strong reads: the checks may run in another process than the writes and must not see a stale count (Milvus
    # 2.x serves a Session read without this process's write timestamps like an eventual one).
    drop_filter = expressions.equals("drop", drop)
    rows = index.count(drop_filter, consistency_level="Strong")
    stored = (
        index.ids(drop_filter, consistency_level="Strong", limit=ID_LISTING_LIMIT) if rows <= ID_LISTING_LIMIT else None
    )
    return [
        rows_match_embeddings(rows, stored, embedding_ids),
        index_as_configured(index.describe_index(), expected),
        self_retrieval(index, stored if stored is not None else embedding_ids, consistency_level="Strong"),
    ]
