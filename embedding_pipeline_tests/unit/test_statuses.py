"""The item status and error kind vocabularies: the enums, the documented tables and the serialised form agree."""

import json
import re
from pathlib import Path

import pyarrow as pa
from dagster import MetadataValue
from dagster._serdes import serialize_value

from embedding_pipeline import ingest
from embedding_pipeline.defs.metadata import summary_metadata
from embedding_pipeline.sources import items
from embedding_pipeline.sources.statuses import ErrorKind, ItemStatus

TABLE_DOC = Path(__file__).resolve().parents[2] / "docs" / "operations.md"


def _readme_table() -> dict[str, str]:
    """kind -> status (``failed†`` for transient kinds) from the item table in docs/operations.md."""
    text = TABLE_DOC.read_text()
    table = text[text.index("| kind | status | meaning |") :].split("\n\n", 1)[0]
    found = {}
    for line in table.splitlines()[2:]:
        kinds, status = (cell.strip() for cell in line.strip("|").split("|")[:2])
        for kind in re.findall(r"`([a-z_]+)`", kinds):
            found[kind] = status
    return found


def _docstring_table() -> dict[str, str]:
    """kind -> status from the table in ``sources/items.py``'s docstring."""
    return dict(re.findall(r"^``([a-z_]+)``\s+(\S+)", items.__doc__, re.MULTILINE))


def test_error_kinds_are_the_documented_ones():
    readme, docstring = _readme_table(), _docstring_table()
    assert readme == docstring
    assert {k.value for k in ErrorKind} == set(readme)


def test_statuses_are_the_documented_ones():
    documented = {status.rstrip("†") for status in _readme_table().values()}
    assert {s.value for s in ItemStatus} == documented | {"ok"} == {"ok", "failed", "skipped"}
    # The names the rest of the package imports are the members themselves.
    assert (items.OK, items.FAILED, items.SKIPPED) == (ItemStatus.OK, ItemStatus.FAILED, ItemStatus.SKIPPED)


def test_transient_and_skip_kinds_match_the_table():
    table = _readme_table()
    assert items.TRANSIENT_KINDS == {k for k, s in table.items() if s == "failed†"}
    assert all(isinstance(k, ErrorKind) for k in items.TRANSIENT_KINDS)
    assert items._SKIP_KINDS == {k for k, s in table.items() if s == "skipped"}
    # Kinds read back from JSON or Arrow are plain strings: they classify the same.
    assert items.is_transient("timeout") and items.is_transient(ErrorKind.TIMEOUT)
    assert not items.is_transient("not_found")


def test_members_serialise_as_their_strings():
    row = {
        "id": "a",
        "uri": "x.png",
        "status": ItemStatus.FAILED,
        "error_kind": ErrorKind.ID_CONFLICT,
        "error": "taken",
        "stage": "index",
        "sha256": "",
        "kept_previous": [],
    }
    plain = {**row, "status": "failed", "error_kind": "id_conflict"}
    assert json.dumps(row) == json.dumps(plain)
    assert json.dumps(row, indent=2) == json.dumps(plain, indent=2)
    assert f"{row['status']:<8} {row['error_kind']}" == "failed   id_conflict"
    assert row == plain
    # As a manifest column: Arrow stores the string and gives back a plain str that still compares equal.
    table = pa.Table.from_pydict({"status": [ItemStatus.SKIPPED]}, schema=pa.schema([("status", pa.string())]))
    (value,) = table.column("status").to_pylist()
    assert type(value) is str and value == ItemStatus.SKIPPED


def test_failure_records_hold_plain_strings():
    # Failure examples are logged (their repr) and stored as Dagster metadata, which refuses unknown enum members.
    failure = ingest._failure("a", ErrorKind.NOT_IMAGE, "text, not an image", "a.txt")
    plain = {"id": "a", "error_kind": "not_image", "error": "text, not an image", "uri": "a.txt"}
    assert failure == plain and repr(failure) == repr(plain)
    assert type(failure["error_kind"]) is str
    summary = {"failed": 1, **ingest._failure_summary([failure])}
    metadata = summary_metadata(summary)
    serialize_value(metadata)
    assert metadata["failures_by_kind"] == MetadataValue.json({"not_image": 1})
    assert metadata["failure_examples"] == MetadataValue.json([plain])
