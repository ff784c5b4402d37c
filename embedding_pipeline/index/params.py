"""Vector index types, their build and search parameters: defaults per type, and checks that name the bad key.

Milvus silently ignores search parameters it does not know (an ``ef`` sent to an IVF index, a typo like ``nprob``),
so a wrong key would cost recall or speed without a word. Every key is therefore checked here against the index type
in use, before anything reaches the server.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from embedding_pipeline.settings import ConfigError, MilvusSettings

INT_MAX = 2**31 - 1


@dataclass(frozen=True)
class Param:
    default: int
    low: int
    high: int


@dataclass(frozen=True)
class IndexKind:
    build: Mapping[str, Param]
    search: Mapping[str, Param]


# Ranges are Milvus's own (knowhere 2.x); defaults are the usual starting points for up to a few million vectors.
INDEX_KINDS: dict[str, IndexKind] = {
    "FLAT": IndexKind(build={}, search={}),
    "IVF_FLAT": IndexKind(
        build={"nlist": Param(128, 1, 65536)},
        search={"nprobe": Param(16, 1, 65536)},  # at most nlist (65536): every cluster
    ),
    "HNSW": IndexKind(
        # Milvus accepts up to INT_MAX, but one query with such an ef walks the whole graph: a caller could pin the
        # server with one request. 32768 is far past any useful recall.
        build={"M": Param(16, 2, 2048), "efConstruction": Param(256, 1, INT_MAX)},
        search={"ef": Param(64, 1, 32768)},
    ),
}

# The settings' field defaults are HNSW's. A configuration that picks another index type without touching them means
# "the defaults of my type", not "HNSW parameters on IVF".
_SETTINGS_BUILD_DEFAULT = MilvusSettings.model_fields["index_params"].get_default(call_default_factory=True)
_SETTINGS_SEARCH_DEFAULT = MilvusSettings.model_fields["search_params"].get_default(call_default_factory=True)


def _kind(index_type: str) -> IndexKind:
    try:
        return INDEX_KINDS[index_type]
    except KeyError:
        raise ConfigError(
            f"milvus.index_type {index_type!r} is not supported; use one of {', '.join(INDEX_KINDS)}"
        ) from None


def _given(settings: MilvusSettings, name: str, settings_default: dict[str, Any]) -> dict[str, Any]:
    value = dict(getattr(settings, name))
    if name not in settings.model_fields_set or (settings.index_type != "HNSW" and value == settings_default):
        return {}
    return value


def _checked(given: Mapping[str, Any], allowed: Mapping[str, Param], where: str, index_type: str) -> dict[str, Any]:
    """``given`` over the defaults of ``allowed``; refuses unknown keys and out-of-range values, naming them."""
    out = {key: p.default for key, p in allowed.items()}
    for key, value in given.items():
        if key not in allowed:
            accepted = ", ".join(allowed) or "none"
            raise ConfigError(f"{where}: unknown key {key!r} for index type {index_type} (accepted: {accepted})")
        p = allowed[key]
        if isinstance(value, bool) or not isinstance(value, int):
            try:
                value = int(str(value))
            except ValueError:
                raise ConfigError(f"{where}.{key} must be an integer, not {value!r}") from None
        if not p.low <= value <= p.high:
            raise ConfigError(f"{where}.{key} must be between {p.low} and {p.high}, not {value}")
        out[key] = value
    return out


def build_params(settings: MilvusSettings) -> dict[str, Any]:
    """Index build parameters for ``settings.index_type``: the type's defaults overlaid with the configured ones."""
    kind = _kind(settings.index_type)
    given = _given(settings, "index_params", _SETTINGS_BUILD_DEFAULT)
    return _checked(given, kind.build, "milvus.index_params", settings.index_type)


def search_params(
    settings: MilvusSettings, override: Mapping[str, Any] | None = None, top_k: int | None = None
) -> dict[str, Any]:
    """Search parameters for one query: type defaults < configured ``search_params`` < ``override``.

    HNSW cannot return more than ``ef`` candidates, so ``ef`` is raised to ``top_k`` when smaller.
    """
    kind = _kind(settings.index_type)
    given = _given(settings, "search_params", _SETTINGS_SEARCH_DEFAULT)
    params = _checked(given, kind.search, "milvus.search_params", settings.index_type)
    if override:
        checked = _checked(override, kind.search, "search_params", settings.index_type)
        params.update({key: checked[key] for key in override})
    if "ef" in params and top_k is not None:
        params["ef"] = max(params["ef"], top_k)
    return params


def check_settings(settings: MilvusSettings) -> None:
    """Raise :class:`ConfigError` now if the index or search parameters don't fit the index type."""
    build_params(settings)
    search_params(settings)


# Milvus refuses a search whose offset + limit exceeds this.
MAX_RESULT_WINDOW = 16384
# Metrics whose scores grow with similarity; for L2 the score is a (squared) distance and shrinks with it.
SIMILARITY_METRICS = frozenset({"COSINE", "IP"})


def higher_is_better(metric: str) -> bool:
    """True for COSINE and IP (a score is a similarity), False for L2 (a score is a distance)."""
    return metric.upper() in SIMILARITY_METRICS


def passes(metric: str, score: float, threshold: float) -> bool:
    """Whether ``score`` is at least as good as ``threshold``: ``score >= threshold`` for COSINE and IP,
    ``score <= threshold`` for L2. The one rule behind ``min_score`` and near-duplicate thresholds."""
    return score >= threshold if higher_is_better(metric) else score <= threshold


def pair_scores(a: np.ndarray, b: np.ndarray, metric: str) -> np.ndarray:
    """Scores of every row of ``a`` against every row of ``b`` as the engine computes them ([len(a), len(b)]):
    cosine similarity, inner product, or squared L2 distance. The one place that knows how each metric scores;
    search's collapse, the near-duplicate groups and the tests use it."""
    a = np.asarray(a, dtype=np.float32)
    b = np.asarray(b, dtype=np.float32)
    if metric == "L2":
        sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)
        return np.maximum(sq, 0.0)
    if metric == "COSINE":
        a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
        b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    elif metric != "IP":
        raise ValueError(f"unknown metric {metric!r}; use COSINE, IP or L2")
    return a @ b.T
