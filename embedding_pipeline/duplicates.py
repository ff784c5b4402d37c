"""Near-duplicate groups: images whose vectors are at least as close as a threshold, found with the index's own
search, never by comparing every pair.

Each query row's stored vector is searched in the collection (``top_k`` neighbours, ``batch_size`` queries per
call); every hit at least as close as the threshold is a pair, and the groups are the connected components of the
pairs (union-find). A group larger than ``top_k`` still forms as long as its members link to each other. Range
search (``radius``/``range_filter``, which milvus-lite 3.2 and Milvus 2.3.5 both answer) would still cap the hits
per query at its limit, so plain top-k search is used.

*Scope.* For a drop the queries are the drop's rows and the candidates the whole collection: an image that
duplicates an older image of another drop is found, and the group holds both. Groups among other drops' rows
alone are left out (a whole-collection run finds them). Without a drop every row is a query.

*Scores.* COSINE and IP are similarities (higher is closer), L2 a squared distance (lower is closer); every
comparison goes through :func:`passes` / :func:`closer`, so the direction is decided in one place. In the output
each member has its score to the group's representative (the member closest to all others) and its best score to
any other member (``link_score``: the evidence that it belongs, always at least as close as the threshold).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping, Protocol, Sequence

import numpy as np
import pyarrow as pa

from embedding_pipeline.index import expressions
from embedding_pipeline.index import params as index_params
from embedding_pipeline.index.client import VECTOR_FIELD, Hit, all_rows_filter, drop_filter
from embedding_pipeline.index.params import pair_scores
from embedding_pipeline.settings import DUPLICATES_COSINE, Settings
from embedding_pipeline.storage import arrow

METRICS = ("COSINE", "IP", "L2")
# Float32 scores computed by the engine and by numpy differ in the last bits: an output check allows this much.
SCORE_TOLERANCE = 1e-4

SCHEMA = pa.schema(
    [
        ("group", pa.int32()),
        ("id", pa.string()),
        ("uri", pa.string()),
        ("drop", pa.string()),
        ("representative", pa.bool_()),
        ("score", pa.float32()),
        ("link_score", pa.float32()),
    ]
)


class DuplicateIndex(Protocol):
    """What grouping needs of an :class:`~embedding_pipeline.index.client.ImageIndex` (tests pass fakes)."""

    @property
    def settings(self) -> Any: ...  # MilvusSettings: metric_type

    def has_membership(self) -> bool: ...

    def scan(self, filter: str, fields: Sequence[str], strong: bool = False) -> Iterator[dict[str, Any]]: ...

    def search(
        self,
        vectors: Any,
        top_k: int = 10,
        filter: str | None = None,
        search_params: dict[str, Any] | None = None,
        consistency_level: str | None = None,
    ) -> list[list[Hit]]: ...

    def vectors(self, ids: Sequence[str]) -> dict[str, np.ndarray]: ...


# ------------------------------------------------------------------------------------------- metric direction


def _higher(metric: str) -> bool:
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; use one of {', '.join(METRICS)}")
    return index_params.higher_is_better(metric)


def passes(score: float, threshold: float, metric: str) -> bool:
    """True when ``score`` is at least as close as ``threshold`` (a tie counts as a duplicate): the rule of
    :func:`embedding_pipeline.index.params.passes`, which search's ``min_score`` and ``collapse`` use too."""
    _higher(metric)
    return index_params.passes(metric, score, threshold)


def closer(a: float, b: float, metric: str) -> bool:
    """True when score ``a`` is strictly closer than score ``b``."""
    return a > b if _higher(metric) else a < b


def in_metric(cosine: float, metric: str) -> float:
    """A cosine similarity in ``metric``'s terms: the same for IP on unit vectors, the squared distance
    ``2 - 2·cos`` for L2."""
    return cosine if _higher(metric) else round(2.0 - 2.0 * cosine, 6)


def default_threshold(metric: str) -> float:
    """The measured default (a cosine similarity) in ``metric``'s terms."""
    return in_metric(DUPLICATES_COSINE, metric)


# The loosest thresholds allowed (cosine 0.5 in each metric's terms): looser ones join nearly every image into one
# group (the neighbour graph is connected), which only costs time and memory and says nothing.
LOOSEST = {"COSINE": 0.5, "IP": 0.5, "L2": 1.0}


def check_threshold(threshold: float, metric: str) -> float:
    """``threshold`` if it is finite and no looser than :data:`LOOSEST`; ValueError naming the bound otherwise."""
    loosest = LOOSEST[metric] if metric in LOOSEST else LOOSEST["COSINE"]
    if not np.isfinite(threshold) or closer(loosest, threshold, metric):
        bound = "at least" if _higher(metric) else "at most"
        raise ValueError(f"threshold {threshold!r}: for {metric} it must be {bound} {loosest}")
    return threshold


def threshold_for(settings: Settings, metric: str, given: float | None = None) -> float:
    """``given`` (in ``metric``'s terms), else ``duplicates.threshold`` (a cosine similarity, converted), else the
    measured default for ``metric``. One configured value so means the same closeness in every collection."""
    if given is not None:
        return float(given)
    if settings.duplicates.threshold is not None:
        return in_metric(float(settings.duplicates.threshold), metric)
    return default_threshold(metric)


# -------------------------------------------------------------------------------------------------- grouping


class UnionFind:
    """Disjoint sets of ids; the root of a set is its smallest id, so the outcome does not depend on order."""

    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, x: str) -> str:
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]  # path halving
            x = self.parent[x]
        return x

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def groups(self) -> list[list[str]]:
        """Sets of two or more, each sorted, largest first (then by first id)."""
        members: dict[str, list[str]] = {}
        for x in list(self.parent):
            members.setdefault(self.find(x), []).append(x)
        found = [sorted(m) for m in members.values() if len(m) > 1]
        return sorted(found, key=lambda g: (-len(g), g[0]))


Pairs = dict[tuple[str, str], float]


def add_pair(pairs: Pairs, a: str, b: str, score: float, metric: str) -> None:
    """Record the pair (a, b) once, whichever way it was found, with its closest score."""
    if a == b:
        return
    key = (a, b) if a < b else (b, a)
    if key not in pairs or closer(score, pairs[key], metric):
        pairs[key] = score


def group_pairs(pairs: Iterable[tuple[str, str]]) -> list[list[str]]:
    """Connected components of the pairs (union-find), largest first."""
    sets = UnionFind()
    for a, b in pairs:
        sets.union(a, b)
    return sets.groups()


def brute_force_pairs(
    ids: Sequence[str], vectors: np.ndarray, threshold: float, metric: str, chunk: int = 1024
) -> Pairs:
    """Every pair at least as close as ``threshold``, by comparing all pairs in numpy (the benchmark's reference)."""
    pairs: Pairs = {}
    vectors = np.asarray(vectors, dtype=np.float32)
    for start in range(0, len(ids), chunk):
        scores = pair_scores(vectors[start : start + chunk], vectors, metric)
        hits = scores >= threshold if _higher(metric) else scores <= threshold
        for i, j in zip(*np.nonzero(hits)):
            if start + i < j:
                add_pair(pairs, ids[start + i], ids[j], float(scores[i, j]), metric)
    return pairs


# ------------------------------------------------------------------------------------------------ the search


@dataclass(frozen=True)
class Row:
    id: str
    uri: str
    drop: str


def search_pairs(
    search: Callable[[np.ndarray], list[list[Hit]]],
    queries: Iterable[tuple[Sequence[Row], np.ndarray]],
    threshold: float,
    metric: str,
) -> tuple[Pairs, dict[str, Row], int]:
    """Pairs at least as close as ``threshold`` among the hits of each batch of query vectors; returns the pairs,
    what is known of each id met (uri, drop) and the number of queries."""
    pairs: Pairs = {}
    rows: dict[str, Row] = {}
    count = 0
    for batch, vectors in queries:
        count += len(batch)
        for row, hits in zip(batch, search(vectors)):
            rows[row.id] = row
            for hit in hits:
                if hit.id != row.id and passes(hit.score, threshold, metric):
                    add_pair(pairs, row.id, hit.id, hit.score, metric)
                    rows.setdefault(hit.id, Row(hit.id, hit.uri, hit.drop))
    return pairs, rows, count


def _query_batches(index: DuplicateIndex, filter: str, size: int) -> Iterator[tuple[list[Row], np.ndarray]]:
    """The rows matching ``filter`` with their stored vectors, ``size`` at a time (read at Strong consistency)."""
    batch: list[Row] = []
    vectors: list[Any] = []
    for r in index.scan(filter, ["id", "uri", "drop", VECTOR_FIELD], strong=True):
        batch.append(Row(r["id"], r.get("uri", ""), r.get("drop", "")))
        vectors.append(r[VECTOR_FIELD])
        if len(batch) == size:
            yield batch, np.asarray(vectors, dtype=np.float32)
            batch, vectors = [], []
    if batch:
        yield batch, np.asarray(vectors, dtype=np.float32)


def _representative(members: np.ndarray, metric: str) -> int:
    """The member closest to all others (summed score), in O(n·d): no n×n matrix, whatever the group's size."""
    total = members.sum(0)
    if metric == "COSINE":
        unit = members / np.maximum(np.linalg.norm(members, axis=1, keepdims=True), 1e-12)
        totals = unit @ unit.sum(0)
    elif metric == "IP":
        totals = members @ total
    else:  # L2: the sum of squared distances to every member, expanded
        squares = (members * members).sum(1)
        totals = len(members) * squares + squares.sum() - 2.0 * (members @ total)
    ranked = -totals if _higher(metric) else totals
    return int(np.argmin(ranked))  # ties: the first, i.e. the smallest id (members are sorted)


def _links(members: np.ndarray, metric: str, chunk: int = 1024) -> np.ndarray:
    """Each member's best score to another member, a block of rows at a time (memory O(chunk·n))."""
    out = np.empty(len(members), dtype=np.float64)
    for start in range(0, len(members), chunk):
        block = pair_scores(members[start : start + chunk], members, metric).astype(np.float64)
        rows = np.arange(block.shape[0])
        block[rows, start + rows] = -np.inf if _higher(metric) else np.inf
        out[start : start + chunk] = block.max(1) if _higher(metric) else block.min(1)
    return out


def grouped_table(
    groups: Sequence[Sequence[str]],
    rows: Mapping[str, Row],
    vectors: Mapping[str, np.ndarray],
    metric: str,
    pairs: Pairs | None = None,
) -> pa.Table:
    """One row per member: group number, id, uri, drop, representative flag, score to the representative and best
    score to another member. The representative is the member closest to all others (ties: the smallest id).
    With ``pairs`` (what the search found), a member's best link is taken from them: no all-pairs pass."""
    out: dict[str, list[Any]] = {name: [] for name in SCHEMA.names}
    best: dict[str, float] = {}
    for (a, b), score in (pairs or {}).items():
        for member in (a, b):
            if member not in best or closer(score, best[member], metric):
                best[member] = score
    for number, members in enumerate(groups):
        members = sorted(members)
        matrix = np.stack([vectors[m] for m in members]).astype(np.float32)
        rep = _representative(matrix, metric)
        to_rep = pair_scores(matrix, matrix[rep : rep + 1], metric)[:, 0]
        links = [best[m] for m in members] if pairs is not None and all(m in best for m in members) else None
        if links is None:
            links = list(_links(matrix, metric))
        for k, member in enumerate(members):
            row = rows.get(member, Row(member, "", ""))
            out["group"].append(number)
            out["id"].append(member)
            out["uri"].append(row.uri)
            out["drop"].append(row.drop)
            out["representative"].append(k == rep)
            out["score"].append(float(to_rep[k]))
            out["link_score"].append(float(links[k]))
    return pa.Table.from_pydict(out, schema=SCHEMA)


@dataclass
class DuplicateReport:
    """The groups found (``table``, see :data:`SCHEMA`) and how they were found."""

    table: pa.Table
    threshold: float
    metric: str
    drop: str | None
    queries: int
    pairs: int
    seconds: float

    @property
    def groups(self) -> int:
        return group_count(self.table)

    @property
    def members(self) -> int:
        return self.table.num_rows

    def as_dict(self) -> dict[str, Any]:
        """The figures (no rows): what the asset's metadata and the CLI show."""
        return {
            "drop": self.drop,
            "scope": f"drop {self.drop}" if self.drop else "collection",
            "threshold": self.threshold,
            "metric": self.metric,
            "queries": self.queries,
            "pairs": self.pairs,
            "groups": self.groups,
            "images_in_groups": self.members,
            "seconds": round(self.seconds, 3),
        }


def find_duplicates(
    index: DuplicateIndex,
    drop: str | None = None,
    threshold: float | None = None,
    top_k: int = 16,
    batch_size: int = 256,
) -> DuplicateReport:
    """Near-duplicate groups of ``drop`` (its rows against the whole collection) or, without one, of the whole
    collection. ``threshold`` is in the collection's metric (default: the measured default for it)."""
    if top_k < 2:
        raise ValueError("top_k must be at least 2 (the first hit of a stored vector is itself)")
    metric = index.settings.metric_type
    threshold = check_threshold(default_threshold(metric) if threshold is None else float(threshold), metric)
    started = time.perf_counter()
    if drop is None:
        scope = all_rows_filter()
    else:
        # A collection made before drop membership lists one drop per row, in ``drop``.
        scope = drop_filter(drop) if index.has_membership() else expressions.equals("drop", drop)

    def search(vectors: np.ndarray) -> list[list[Hit]]:
        return index.search(vectors, top_k=top_k, consistency_level="Strong")

    pairs, rows, queries = search_pairs(search, _query_batches(index, scope, batch_size), threshold, metric)
    groups = group_pairs(pairs)
    grouped = sorted({m for g in groups for m in g})
    vectors = index.vectors(grouped) if grouped else {}
    missing = [m for m in grouped if m not in vectors]
    if missing:
        # A row deleted between the search and this read (a drop deleted meanwhile): leave it out of its group.
        groups = [kept for g in groups if len(kept := [m for m in g if m in vectors]) > 1]
    table = grouped_table(groups, rows, vectors, metric, pairs)
    return DuplicateReport(table, threshold, metric, drop, queries, len(pairs), time.perf_counter() - started)


def write_report(path: arrow.Location, report: DuplicateReport) -> None:
    """The groups as Parquet at ``path`` (atomically), with the threshold, metric and scope in its metadata."""
    meta = {"threshold": str(report.threshold), "metric": report.metric, "drop": report.drop or ""}
    arrow.write_parquet(path, report.table.replace_schema_metadata(meta))


# ------------------------------------------------------------------------------------------------ reading back


def group_list(table: pa.Table, offset: int = 0, limit: int | None = None) -> list[dict[str, Any]]:
    """Groups ``offset`` to ``offset + limit`` (in group order: largest first) as plain dicts, each with its
    representative first: ``{"group", "size", "representative", "members": [{id, uri, drop, score,
    link_score, representative}]}``."""
    if offset < 0 or (limit is not None and limit < 0):
        raise ValueError("offset and limit must not be negative")
    numbers = sorted(set(table.column("group").to_pylist()))
    wanted = numbers[offset : None if limit is None else offset + limit]
    if not wanted:
        return []
    chosen = set(wanted)
    members: dict[int, list[dict[str, Any]]] = {n: [] for n in wanted}
    for row in table.to_pylist():
        if row["group"] in chosen:
            members[row["group"]].append({k: v for k, v in row.items() if k != "group"})
    out = []
    for number in wanted:
        group = sorted(members[number], key=lambda m: (not m["representative"], m["id"]))
        out.append({"group": number, "size": len(group), "representative": group[0]["id"], "members": group})
    return out


def group_count(table: pa.Table) -> int:
    return len(set(table.column("group").to_pylist()))


def table_problems(
    table: pa.Table, threshold: float, metric: str, known_ids: Iterable[str] | None = None
) -> dict[str, list[Any]]:
    """What is wrong with a groups table, by kind (empty when sound): ids in two groups, groups of fewer than two,
    groups without exactly one representative, members whose best link is not as close as ``threshold``, and ids
    not among ``known_ids`` (when given)."""
    seen: dict[str, int] = {}
    twice: list[str] = []
    sizes: dict[int, int] = {}
    reps: dict[int, int] = {}
    weak: list[dict[str, Any]] = []
    slack = SCORE_TOLERANCE if _higher(metric) else -SCORE_TOLERANCE
    for row in table.to_pylist():
        number, member = row["group"], row["id"]
        if member in seen and seen[member] != number:
            twice.append(member)
        seen[member] = number
        sizes[number] = sizes.get(number, 0) + 1
        reps[number] = reps.get(number, 0) + int(bool(row["representative"]))
        if not passes(row["link_score"] + slack, threshold, metric):
            weak.append({"id": member, "group": number, "link_score": row["link_score"]})
    problems: dict[str, list[Any]] = {
        "in_two_groups": sorted(set(twice)),
        "groups_of_one": sorted(n for n, size in sizes.items() if size < 2),
        "not_one_representative": sorted(n for n, count in reps.items() if count != 1),
        "below_threshold": weak,
    }
    if known_ids is not None:
        known = set(known_ids)
        problems["unknown_ids"] = sorted(m for m in seen if m not in known)
    return {kind: found for kind, found in problems.items() if found}


def report_page(report: DuplicateReport, offset: int = 0, limit: int | None = None) -> dict[str, Any]:
    """The report as the CLI's JSON and the HTTP API answer it: figures, then groups ``offset`` to
    ``offset + limit``."""
    return {
        "drop": report.drop,
        "threshold": report.threshold,
        "metric": report.metric,
        "total_groups": report.groups,
        "images_in_groups": report.members,
        "offset": offset,
        "limit": limit,
        "groups": group_list(report.table, offset, limit),
    }


def find_for(settings: Settings, drop: str | None = None, threshold: float | None = None) -> DuplicateReport:
    """The groups of ``drop`` in the collection that holds its rows (its model's), or of the whole collection
    search uses; ``threshold`` defaults to ``duplicates.threshold``, else the measured default for the metric."""
    from embedding_pipeline.index.client import ImageIndex
    from embedding_pipeline.index.collections import index_for_drop

    index = ImageIndex(settings.milvus) if drop is None else index_for_drop(settings, settings.milvus, drop)
    with index:
        chosen = threshold_for(settings, index.settings.metric_type, threshold)
        return find_duplicates(
            index, drop, chosen, top_k=settings.duplicates.top_k, batch_size=settings.duplicates.batch_size
        )
