"""What the served model takes and returns, and the server's counters for it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from embedding_pipeline.serving.client.errors import TritonClientError

# Triton datatype names -> numpy dtypes, for the types an image or embedding model plausibly uses.
_NUMPY_TYPES = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
}


@dataclass(frozen=True)
class ModelInputSpec:
    """What the served model takes and returns. ``shape`` excludes the batch dimension, e.g. ``(224, 224, 3)``."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    max_batch_size: int
    output_name: str
    output_dim: int
    output_datatype: str = "FP32"

    @property
    def dtype(self) -> np.dtype:
        try:
            return np.dtype(_NUMPY_TYPES[self.datatype])
        except KeyError:
            raise TritonClientError(f"input datatype {self.datatype} is not supported by this client") from None


@dataclass(frozen=True)
class ModelStatistics:
    """The server's counters for the model (summed over versions unless one version was asked for).

    ``request_count`` counts successful requests, ``inference_count`` the rows (images) they carried,
    ``execution_count`` the model runs — fewer than requests when the dynamic batcher merged some.
    ``batch_executions`` maps each executed batch size to how many runs had it.
    """

    request_count: int = 0
    failed_count: int = 0
    inference_count: int = 0
    execution_count: int = 0
    queue_ns: int = 0
    compute_infer_ns: int = 0
    batch_executions: dict[int, int] = field(default_factory=dict)

    @property
    def largest_batch(self) -> int:
        return max(self.batch_executions, default=0)

    @classmethod
    def from_json(cls, data: dict[str, Any], version: str = "") -> "ModelStatistics":
        """From ``get_inference_statistics`` JSON (HTTP numbers, or gRPC's strings with zero fields left out)."""
        totals: dict[str, int] = dict.fromkeys(("requests", "failed", "rows", "runs", "queue", "infer"), 0)
        batches: dict[int, int] = {}
        for entry in data.get("model_stats", []):
            if version and str(entry.get("version", "")) != version:
                continue
            stats = entry.get("inference_stats", {})
            totals["requests"] += int(stats.get("success", {}).get("count", 0))
            totals["failed"] += int(stats.get("fail", {}).get("count", 0))
            totals["queue"] += int(stats.get("queue", {}).get("ns", 0))
            totals["infer"] += int(stats.get("compute_infer", {}).get("ns", 0))
            totals["rows"] += int(entry.get("inference_count", 0))
            totals["runs"] += int(entry.get("execution_count", 0))
            for batch in entry.get("batch_stats", []):
                size = int(batch.get("batch_size", 0))
                batches[size] = batches.get(size, 0) + int(batch.get("compute_infer", {}).get("count", 0))
        return cls(
            totals["requests"],
            totals["failed"],
            totals["rows"],
            totals["runs"],
            totals["queue"],
            totals["infer"],
            batches,
        )
