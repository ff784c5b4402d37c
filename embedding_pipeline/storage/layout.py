"""Where a drop's stage outputs live under ``<home>/data``, and the manifest's schema.

One drop owns ``manifests/<drop>.arrow`` (its items), ``preprocessed/<drop>/`` (tensor batches),
``embeddings/<drop>/`` (vectors), ``index/<drop>.json`` (what the index stage could not write) and
``duplicates/<drop>.parquet`` (its near-duplicate groups, when they were looked for); downloaded
images are shared by content under ``blobs/``. The stages write these, retention removes them, the checks read them.

With ``outputs_uri`` set, the same layout lives under that prefix in a bucket (``data`` is then an
:class:`ObjectPath`); downloaded images stay in the local blob store, which only URL items use.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from embedding_pipeline.runtime.objects import ObjectPath
from embedding_pipeline.settings import Settings

Location = Path | ObjectPath

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

    data: Location
    drop: str
    local: Path | None = None  # the local data folder (downloads); ``data`` when None

    @property
    def manifest(self) -> Location:
        return self.data / "manifests" / f"{self.drop}.arrow"

    @property
    def preprocessed(self) -> Location:
        return self.data / "preprocessed" / self.drop

    @property
    def embeddings(self) -> Location:
        return self.data / "embeddings" / self.drop

    @property
    def blobs(self) -> Path:
        local = self.local if self.local is not None else self.data
        if not isinstance(local, Path):
            raise TypeError("downloads live in the local blob store; DropFiles needs its local folder")
        return local / "blobs"

    @property
    def index_report(self) -> Location:
        """What the index stage could not write (ids held by another drop's image), per item."""
        return self.data / "index" / f"{self.drop}.json"

    @property
    def duplicates(self) -> Location:
        """The drop's near-duplicate groups (Parquet), written by the ``near_duplicates`` asset."""
        return self.data / "duplicates" / f"{self.drop}.parquet"


def collection_duplicates(settings: Settings, collection: str) -> Location:
    """The near-duplicate groups of a whole collection (Parquet), apart from any drop's outputs."""
    return settings.outputs / "collection_duplicates" / f"{collection}.parquet"


def drop_files(settings: Settings, drop: str) -> DropFiles:
    """The stage outputs of ``drop`` under the configured data directory or outputs prefix."""
    return DropFiles(settings.outputs, drop, settings.paths.data)
