"""Where a drop's stage outputs live under ``<home>/data``, and the manifest's schema.

One drop owns ``manifests/<drop>.arrow`` (its items), ``preprocessed/<drop>/`` (tensor batches),
``embeddings/<drop>/`` (vectors), ``index/<drop>.json`` (what the index stage could not write) and
``duplicates/<drop>.parquet`` (its near-duplicate groups, when they were looked for); downloaded
images are shared by content under ``blobs/``. The stages write these, retention removes them, the checks read them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from embedding_pipeline.settings import Settings

# One row per item of the drop, good or not (status, error kind and message say which).
MANIFEST_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("uri", pa.string()),
        ("metadata", pa.string()),
        ("sha256", pa.string()),
        ("size", pa.int64()),
        ("source", pa.string()),
        ("file_id", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("error_kind", pa.string()),
    ]
)


@dataclass(frozen=True)
class DropFiles:
    """Where one drop's stage outputs live."""

    data: Path
    drop: str

    @property
    def manifest(self) -> Path:
        return self.data / "manifests" / f"{self.drop}.arrow"

    @property
    def preprocessed(self) -> Path:
        return self.data / "preprocessed" / self.drop

    @property
    def embeddings(self) -> Path:
        return self.data / "embeddings" / self.drop

    @property
    def blobs(self) -> Path:
        return self.data / "blobs"

    @property
    def index_report(self) -> Path:
        """What the index stage could not write (ids held by another drop's image), per item."""
        return self.data / "index" / f"{self.drop}.json"

    @property
    def duplicates(self) -> Path:
        """The drop's near-duplicate groups (Parquet), written by the ``near_duplicates`` asset."""
        return self.data / "duplicates" / f"{self.drop}.parquet"


def collection_duplicates(settings: Settings, collection: str) -> Path:
    """The near-duplicate groups of a whole collection (Parquet), apart from any drop's outputs."""
    return settings.paths.data / "collection_duplicates" / f"{collection}.parquet"


def drop_files(settings: Settings, drop: str) -> DropFiles:
    """The stage outputs of ``drop`` under the configured data directory."""
    return DropFiles(settings.paths.data, drop)
