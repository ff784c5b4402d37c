"""What the Dagster UI shows for a materialization or a search: tables, thumbnails, column schemas, timings.

Every builder takes plain values (stage summaries, Arrow schemas, manifest items, hits) and returns Dagster
metadata, so the assets and ops stay one call each. Markdown is kept small: the whole metadata of an event is
stored in the instance's event log and sent to every browser that opens the page.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Collection, Iterable, Mapping, Sequence

import pyarrow as pa
from dagster import (
    AssetKey,
    AssetRecordsFilter,
    DagsterInstance,
    MetadataValue,
    TableColumn,
    TableColumnConstraints,
    TableSchema,
)

from embedding_pipeline import thumbnails
from embedding_pipeline.runtime.objects import ObjectPath
from embedding_pipeline.settings import Settings
from embedding_pipeline.sources.items import OK, blob_path
from embedding_pipeline.storage import arrow, layout

# 12 thumbnails of 96 px are ≈ 20–50 KB of markdown (1.5–4 KB each for photos); the budget stops the grid earlier
# for unusually busy images.
PREVIEW_ITEMS = 12
PREVIEW_COLUMNS = 6
PREVIEW_MAX_CHARS = 90_000
EXAMPLES_PER_KIND = 2
CELL_CHARS = 120
CAPTION_CHARS = 24
# Ids the pipeline makes up when a drop gives none (content hash, or an error id for an unreadable row): a file
# name says more to a person.
GENERATED_ID_PREFIXES = ("sha256-", "error-")

# The keys Dagster itself understands: the asset page shows the column schema and the row count.
COLUMN_SCHEMA_KEY = "dagster/column_schema"
ROW_COUNT_KEY = "dagster/row_count"

COLUMN_DESCRIPTIONS = {
    "id": "Item id, unique within the drop: the manifest's id, or for a file dropped without one its content hash.",
    "uri": "Where the item came from: a file of the drop, a path or an http(s) URL.",
    "metadata": "The item's metadata, a JSON object (from the manifest row).",
    "sha256": "SHA-256 of the item's bytes: the lineage from the stored vector back to the source bytes.",
    "size": "Size of the item's bytes.",
    "source": "Where the bytes are read from now: the local file, or the blob store copy of a download.",
    "status": "ok, failed or skipped.",
    "error": "Why the item failed or was skipped.",
    "error_kind": "The failure class, from a fixed vocabulary (not_found, not_image, http_error, truncated, ...).",
    "drop": "The drop (partition) the row belongs to.",
    "tensor": "The model's input for this image, exactly as Triton receives it.",
    "embedding": "The image embedding, L2-normalised.",
    "model": "Name and version of the model that produced the vector.",
}

# Stage key -> (asset, what its count means, the summary key holding the count).
STAGES = (
    ("manifest", "raw_image_manifest", "items", "items"),
    ("preprocess", "preprocessed_batches", "images", "images"),
    ("embed", "image_embeddings", "computed", "images"),
    ("index", "milvus_collection", "upserted", "vectors"),
)


# ---------------------------------------------------------------------------------------------------- markdown


def md_cell(value: Any, limit: int = CELL_CHARS) -> str:
    """``value`` as text that cannot break a markdown table cell or inject markup (links, images, HTML)."""
    text = " ".join(str(value).split())
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    for char in "\\|[]()<>*_`#!":
        text = text.replace(char, "\\" + char)
    return text


def md_code(value: Any, limit: int = 60) -> str:
    """``value`` as inline code in a table cell (escapes are not interpreted inside code, so none are added but
    the pipe, which the table parser sees first)."""
    text = " ".join(str(value).replace("`", "'").split())
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return "`" + text.replace("|", "\\|") + "`" if text else ""


def item_label(item_id: str, uri: str = "") -> str:
    """A short human name for an item: its id, or for an id derived from content its file name."""
    if uri and item_id.startswith(GENERATED_ID_PREFIXES):
        name = uri.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]
        return name or item_id
    return item_id


def _image(alt: str, uri: str | None) -> str:
    return f"![{md_cell(alt, 60)}]({uri})" if uri else "*(no preview)*"


def thumbnail_grid(cells: Sequence[tuple[str, str | None]], columns: int = PREVIEW_COLUMNS) -> str:
    """A markdown table of thumbnails, ``columns`` per row, each image row followed by a row of its captions."""
    if not cells:
        return "*Nothing to preview.*"
    width = min(columns, len(cells))
    lines = ["|" + " |" * width, "|" + "---|" * width]
    for start in range(0, len(cells), width):
        row = list(cells[start : start + width])
        row += [("", None)] * (width - len(row))
        lines.append("| " + " | ".join(_image(label, uri) if label else "" for label, uri in row) + " |")
        lines.append("| " + " | ".join(md_code(label, CAPTION_CHARS) if label else "" for label, _ in row) + " |")
    return "\n".join(lines)


def failure_table(
    counts: Mapping[str, int], examples: Iterable[Mapping[str, str]], per_kind: int = EXAMPLES_PER_KIND
) -> str:
    """Failures by kind, most frequent first, with up to ``per_kind`` example items (id and error) of each kind."""
    if not counts:
        return "No failures."
    by_kind: dict[str, list[Mapping[str, str]]] = {}
    for failure in examples:
        kind = failure.get("error_kind") or "error"
        by_kind.setdefault(kind, [])
        if len(by_kind[kind]) < per_kind:
            by_kind[kind].append(failure)
    lines = ["| kind | count | examples |", "|---|---:|---|"]
    for kind, count in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        shown = [
            f"**{md_cell(item_label(f.get('id', ''), f.get('uri', '')), 40)}**: {md_cell(f.get('error', ''))}"
            for f in by_kind.get(kind, [])
        ]
        lines.append(f"| {md_code(kind, 40)} | {count} | {'; '.join(shown) if shown else '—'} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- stage summaries


def summary_metadata(summary: Mapping[str, Any]) -> dict[str, Any]:
    """A stage summary as metadata: numbers stay numbers (the UI plots them across partitions), lists and dicts
    become JSON, and failures also get a readable table."""
    out: dict[str, Any] = {}
    for key, value in summary.items():
        if isinstance(value, (dict, list)):
            out[key] = MetadataValue.json(value)
        elif key.endswith("bytes"):
            out[key] = MetadataValue.int(int(value))
        else:
            out[key] = value
    if "failures_by_kind" in summary:
        out["failures"] = MetadataValue.md(
            failure_table(summary["failures_by_kind"], summary.get("failure_examples", []))
        )
    return out


# -------------------------------------------------------------------------------------------- column schema


def _type_name(data_type: pa.DataType) -> str:
    if isinstance(data_type, pa.FixedShapeTensorType):
        return f"tensor<{data_type.value_type}>[{'×'.join(str(d) for d in data_type.shape)}]"
    if pa.types.is_fixed_size_list(data_type):
        return f"{data_type.value_type}[{data_type.list_size}]"
    return str(data_type)


def column_schema(schema: pa.Schema) -> TableSchema:
    """Dagster's column schema of an Arrow schema, with what each column means."""
    notes = {k.decode(): json.loads(v) for k, v in (schema.metadata or {}).items() if _is_json(v)}
    columns = []
    for field in schema:
        description = COLUMN_DESCRIPTIONS.get(field.name, "")
        if field.name == "tensor" and notes.get("layout"):
            description += f" Layout {notes['layout']}."
        columns.append(
            TableColumn(
                name=field.name,
                type=_type_name(field.type),
                description=description or None,
                constraints=TableColumnConstraints(nullable=field.nullable),
            )
        )
    return TableSchema(columns=columns)


def _is_json(value: bytes) -> bool:
    try:
        json.loads(value)
    except ValueError:
        return False
    return True


def arrow_file_schema(path: Path | ObjectPath) -> pa.Schema | None:
    """The schema of an Arrow IPC file (read from its footer, no data), or ``None`` if there is no such file."""
    if not path.is_file():
        return None
    if isinstance(path, ObjectPath):
        return arrow.read_table(path).schema
    with pa.memory_map(str(path)) as source:
        return pa.ipc.open_file(source).schema


def output_schema_metadata(path: Path | ObjectPath) -> dict[str, Any]:
    """``dagster/column_schema`` of the Arrow file at ``path`` or, for a folder of batches, of its first batch."""
    first = path if path.suffix == ".arrow" else next(iter(arrow.batch_files(path)), None)
    schema = arrow_file_schema(first) if first is not None else None
    return {COLUMN_SCHEMA_KEY: column_schema(schema)} if schema is not None else {}


# ---------------------------------------------------------------------------------------------- thumbnails


def drop_preview(
    settings: Settings,
    drop: str,
    only: Collection[str] | None = None,
    what: str = "good items",
    limit: int = PREVIEW_ITEMS,
    max_chars: int = PREVIEW_MAX_CHARS,
) -> MetadataValue | None:
    """A thumbnail grid of the first good items of the drop (from its manifest; of those in ``only`` if given),
    within ``max_chars``; ``what`` names them in the heading."""
    rows = _manifest_rows(settings, drop, ["id", "uri", "source", "status"])
    good = [r for r in rows if r["status"] == OK and (only is None or r["id"] in only)]
    cells: list[tuple[str, str | None]] = []
    used = 0
    for row in good:
        if len(cells) >= limit:
            break
        uri = _thumbnail(settings, row["source"])
        if uri is not None and used + len(uri) > max_chars:
            break
        used += len(uri or "")
        cells.append((item_label(row["id"], row["uri"]), uri))
    if not cells:
        return None
    header = f"{len(cells)} of {len(good)} {what} of drop {md_code(drop)}\n\n"
    return MetadataValue.md(header + thumbnail_grid(cells))


def _manifest_rows(settings: Settings, drop: str, columns: list[str]) -> list[dict[str, Any]]:
    """Only the named columns of the drop's manifest (no per-row JSON parsing: drops can be large); ``[]`` when
    the drop has no manifest (never materialized, or deleted)."""
    try:
        table = arrow.read_table(layout.drop_files(settings, drop).manifest)
    except (OSError, pa.ArrowInvalid):
        return []
    return table.select(columns).to_pylist()


def _thumbnail(settings: Settings, source: str | Path) -> str | None:
    # Sources come from manifests and stored rows: read only inside the drops, the allowed roots and the blob store.
    drops = settings.drops_location
    local = [drops] if isinstance(drops, Path) else []  # objects in a bucket get no thumbnail in the UI
    roots = [*local, *settings.sources.allowed_roots, layout.drop_files(settings, "_").blobs]
    return thumbnails.file_thumbnail_uri(
        source, roots, max_pixels=settings.preprocess.max_pixels, max_bytes=settings.sources.max_image_bytes
    )


def hit_thumbnails(
    settings: Settings,
    hits: Sequence[Mapping[str, Any]],
    limit: int = 2 * PREVIEW_ITEMS,
    max_chars: int = PREVIEW_MAX_CHARS,
) -> list[str | None]:
    """A thumbnail per hit (the first ``limit`` hits, within ``max_chars``; ``None`` for the rest), from where the
    pipeline read the image: the drop's manifest records the source of every item; a download's blob is also
    found by its sha256 when the manifest is gone."""
    sources: dict[str, dict[str, str]] = {}
    out: list[str | None] = []
    used = 0
    for hit in hits:
        if len(out) >= limit or used >= max_chars:
            out.append(None)
            continue
        drop = hit.get("drop") or ""
        if drop and drop not in sources:
            sources[drop] = {r["id"]: r["source"] for r in _manifest_rows(settings, drop, ["id", "source"])}
        source = sources.get(drop, {}).get(hit.get("id", ""))
        if not source and hit.get("sha256"):
            source = str(blob_path(layout.drop_files(settings, drop).blobs, hit["sha256"]))
        uri = _thumbnail(settings, source) if source else None
        if uri is not None and used + len(uri) > max_chars:
            uri = None
        used += len(uri or "")
        out.append(uri)
    return out


def search_results(
    query: str, query_thumbnail: str | None, hits: Sequence[Mapping[str, Any]], hit_images: Sequence[str | None]
) -> str:
    """The query image and a table of the hits: rank, id, score, thumbnail, uri."""
    lines = [f"**Query** {md_code(query, 200)}", "", _image("query", query_thumbnail), ""]
    if not hits:
        lines.append("No hits.")
        return "\n".join(lines)
    lines += ["| rank | id | score | image | uri |", "|---:|---|---:|---|---|"]
    for rank, (hit, image) in enumerate(zip(hits, hit_images), 1):
        lines.append(
            f"| {rank} | {md_cell(hit['id'], 60)} | {float(hit['score']):.4f} | {_image(str(hit['id']), image)} "
            f"| {md_cell(hit.get('uri', ''), 80)} |"
        )
    return "\n".join(lines)


DUPLICATE_GROUPS_SHOWN = 8
DUPLICATE_MEMBERS_SHOWN = 6


def duplicate_groups(
    groups: Sequence[Mapping[str, Any]], images: Mapping[str, str | None], total: int | None = None
) -> str:
    """The largest near-duplicate groups: one table row per group with its size and its first members as
    thumbnails, each captioned with its id and score to the representative (the representative first, in bold)."""
    if not groups:
        return "No near-duplicates."
    lines = []
    if total is not None and total > len(groups):
        lines += [f"The {len(groups)} largest of {total} groups.", ""]
    lines += ["| group | size | images (score to the representative) |", "|---:|---:|---|"]
    for group in groups:
        cells = []
        for member in group["members"][:DUPLICATE_MEMBERS_SHOWN]:
            label = md_cell(item_label(member["id"], member.get("uri", "")), 40)
            if member["representative"]:
                label = f"**{label}**"
            cells.append(f"{_image(str(member['id']), images.get(member['id']))} {label} {member['score']:.3f}")
        more = group["size"] - min(group["size"], DUPLICATE_MEMBERS_SHOWN)
        if more:
            cells.append(f"… {more} more")
        lines.append(f"| {group['group']} | {group['size']} | {' '.join(cells)} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- stage timings


def _number(metadata: Mapping[str, Any], key: str) -> float | None:
    entry = metadata.get(key)
    value = getattr(entry, "value", entry)
    return float(value) if isinstance(value, (int, float)) else None


def earlier_stage_metadata(instance: DagsterInstance, drop: str) -> dict[str, Mapping[str, Any]]:
    """The metadata of the latest materialization of each earlier stage's asset for ``drop``, from the instance."""
    found: dict[str, Mapping[str, Any]] = {}
    for stage, asset, _, _ in STAGES[:-1]:
        records = instance.fetch_materializations(
            AssetRecordsFilter(asset_key=AssetKey(asset), asset_partitions=[drop]), limit=1
        ).records
        if records and records[0].asset_materialization is not None:
            found[stage] = records[0].asset_materialization.metadata
    return found


def stage_timings(stages: Mapping[str, Mapping[str, Any]], items_ok: int | None = None) -> dict[str, Any]:
    """A table of seconds, count and rate per stage plus the totals, from each stage's metadata or summary."""
    # The stage names match the assets' `stage` tags; the asset names are left out so the table fits its column.
    lines = ["| stage | seconds | count | per second |", "|---|---:|---:|---:|"]
    total = 0.0
    out: dict[str, Any] = {}
    for stage, _, count_key, unit in STAGES:
        metadata = stages.get(stage)
        if metadata is None:
            lines.append(f"| {stage} | — | — | — |")
            continue
        seconds = _number(metadata, "seconds") or 0.0
        count = int(_number(metadata, count_key) or 0)
        rate = count / seconds if seconds else 0.0
        total += seconds
        out[f"{stage}_seconds"] = round(seconds, 3)
        lines.append(f"| {stage} | {seconds:.2f} | {count} {unit} | {rate:.1f} |")
    out["pipeline_seconds"] = round(total, 3)
    if items_ok is not None:
        out["pipeline_images_per_s"] = round(items_ok / total, 1) if total else 0.0
        lines.append(
            f"| **all stages** | **{total:.2f}** | **{items_ok} images** | **{out['pipeline_images_per_s']:.1f}** |"
        )
    out["stage_timings"] = MetadataValue.md("\n".join(lines))
    return out
