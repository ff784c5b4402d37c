"""The ``export_embeddings`` job: a Parquet file of drops (or the whole collection), vectors included, from the
Dagster UI (Launchpad) or the Dagster CLI.

One op, configured with the drops (or ``all: true``) and the output path. It reads the collection search uses and
records the rows, bytes and path as metadata; the logic is :mod:`embedding_pipeline.export`.
"""

import re
from pathlib import Path

from dagster import Config, MetadataValue, OpExecutionContext, Out, in_process_executor, job, op
from pydantic import Field

from embedding_pipeline.defs.resources import MilvusResource, step_settings
from embedding_pipeline.export import export_embeddings
from embedding_pipeline.orchestration.names import EXPORT_JOB


class ExportConfig(Config):
    """What to export (drops, or ``all``: exactly one of them) and where to write it."""

    drops: list[str] = Field(default_factory=list, description="The drops (partition keys) to export.")
    all: bool = Field(False, description="Export every row of the collection instead of named drops.")
    out: str = Field(
        description="The file name to write in the state directory's `exports/` folder, e.g. `cats.parquet` "
        "(replaced when complete). A run launched from the UI writes there only; `embedding-pipeline export "
        "--out` writes anywhere its user can."
    )
    collection: str = Field("", description="The collection to read; empty: the one search uses.")


# A file name, nothing more: no folder, no "..", no hidden file.
EXPORT_NAME = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,127}\.parquet\Z")


def export_path(home: Path, name: str) -> Path:
    """``<home>/exports/<name>``: where a run may write, whoever launched it. Anyone who can launch a run can set
    the config, so it never names another place: a path, ``..``, a link in the way or a non-file target is refused."""
    if not EXPORT_NAME.match(name):
        raise ValueError(
            f"out {name!r}: give a file name ending in .parquet (letters, digits, '.', '_', '-'); it is written in "
            f"{home / 'exports'}"
        )
    folder = home / "exports"
    if folder.is_symlink():
        raise ValueError(f"{folder} is a link; exports are written into a real folder only")
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / name
    if target.is_symlink() or (target.exists() and not target.is_file()):
        raise ValueError(f"{target} exists and is not a regular file; remove it or pick another name")
    return target


@op(
    out=Out(dict, description="What was written: path, collection, dimension, drops, rows, bytes, row groups."),
    tags={"kind": "export"},
)
def export_parquet(context: OpExecutionContext, config: ExportConfig, milvus: MilvusResource) -> dict:
    """Writes the rows of the chosen drops, or of the whole collection, with their vectors to one Parquet file
    (written under a temporary name and renamed when complete). Refuses an unknown drop."""
    settings = step_settings(milvus=milvus)
    out = export_path(settings.paths.root, config.out)
    summary = export_embeddings(
        settings.milvus, out, config.drops, all_rows=config.all, collection=config.collection or None
    )
    context.log.info(
        f"wrote {summary.rows} rows of {summary.collection!r} ({'all drops' if config.all else summary.drops}) "
        f"to {summary.path}: {summary.bytes} bytes"
    )
    context.add_output_metadata(
        {
            "path": MetadataValue.path(summary.path),
            "rows": summary.rows,
            "bytes": MetadataValue.int(summary.bytes),
            "collection": summary.collection,
            "dimension": summary.dimension,
            "drops": MetadataValue.json(summary.drops),
            "row_groups": summary.row_groups,
            "seconds": MetadataValue.float(summary.seconds),
        }
    )
    return summary.as_dict()


@job(
    name=EXPORT_JOB,
    executor_def=in_process_executor,
    tags={"kind": "export"},
    description="Export drops (config `drops`) or the whole collection (`all: true`) with their vectors to a "
    "Parquet file (`out`): id, uri, drop, drops, sha256, model, metadata (JSON), embedding (fixed-size float32).",
)
def export_embeddings_job():
    export_parquet()


export_jobs = [export_embeddings_job]
