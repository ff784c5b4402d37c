"""The Parquet export without a server: schema, one row group per page, values read back, the temporary file renamed
only when complete, an empty export, unknown drops and bad selections refused. Rows come from a fake source that
pages like the index client does."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embedding_pipeline import cli, export
from embedding_pipeline.index.client import CollectionError, drop_filter

DIM = 6


def make_rows(count: int, drops: Sequence[str] = ("a",), dim: int = DIM) -> list[dict[str, Any]]:
    rng = np.random.default_rng(count)
    return [
        {
            "id": f"img-{i:04d}",
            "uri": f"photos/{i}.jpg",
            "drop": drops[0],
            "drops": list(drops),
            "sha256": f"{i:064x}",
            "model": "m:1@abc",
            "metadata": {"n": i, "name": f"é{i}"},
            "embedding": rng.standard_normal(dim).astype(np.float32).tolist(),
        }
        for i in range(count)
    ]


class FakeRowSource:
    """Rows in memory, paged in key order like ``ImageIndex.pages``; understands the filters the export builds."""

    def __init__(self, rows: list[dict[str, Any]], dim: int | None = DIM, membership: bool = True, fail_after=None):
        self.collection = "fake_collection"
        self.rows = sorted(rows, key=lambda r: r["id"])
        self.dim = dim
        self.membership = membership
        self.fail_after = fail_after  # raise after yielding this many pages of the export
        self.filters: list[str] = []
        self.during: list[Path] = []  # folder listings seen while pages are read
        self.watch: Path | None = None

    def dimension(self) -> int | None:
        return self.dim

    def has_membership(self) -> bool:
        return self.membership

    def _matches(self, row: dict[str, Any], filter: str) -> bool:
        if filter == 'id != ""':
            return True
        return any(drop_filter(d) in filter for d in row.get("drops") or [row["drop"]])

    def pages(
        self, filter: str, fields: Sequence[str], page_rows: int = 1000, strong: bool = False
    ) -> Iterator[list[dict[str, Any]]]:
        self.filters.append(filter)
        matching = [r for r in self.rows if self._matches(r, filter)]
        columns = {"id", *fields}
        for n, start in enumerate(range(0, len(matching), page_rows)):
            if self.fail_after is not None and page_rows > 1 and n >= self.fail_after:
                raise CollectionError("the server went away")
            if self.watch is not None:
                self.during.extend(sorted(self.watch.iterdir()))
            yield [{k: v for k, v in r.items() if k in columns} for r in matching[start : start + page_rows]]


def test_schema_has_a_fixed_size_float32_vector_and_json_metadata():
    schema = export.export_schema(1280, "images__m")
    assert schema.names == ["id", "uri", "drop", "drops", "sha256", "model", "metadata", "embedding"]
    assert schema.field("embedding").type == pa.list_(pa.float32(), 1280)
    assert schema.field("drops").type == pa.list_(pa.string())
    assert schema.field("metadata").type == pa.string()
    assert schema.metadata[export.DIMENSION_KEY] == b"1280"
    assert schema.metadata[export.COLLECTION_KEY] == b"images__m"


def test_export_writes_one_row_group_per_page_and_reads_back_exactly(tmp_path):
    rows = make_rows(10, drops=("a", "b"))
    source = FakeRowSource(rows)
    out = tmp_path / "out.parquet"
    summary = export.export_rows(source, out, all_rows=True, page_rows=4)
    assert (summary.rows, summary.row_groups, summary.dimension) == (10, 3, DIM)
    assert summary.bytes == out.stat().st_size and summary.path == str(out)
    meta = pq.ParquetFile(out).metadata
    assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == [4, 4, 2]
    table = pq.read_table(out)
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), DIM)
    assert table.column("id").to_pylist() == [r["id"] for r in rows]
    assert table.column("drops").to_pylist() == [["a", "b"]] * 10
    assert [json.loads(m) for m in table.column("metadata").to_pylist()] == [r["metadata"] for r in rows]
    vectors = np.asarray(table.column("embedding").combine_chunks().flatten()).reshape(-1, DIM)
    assert vectors.dtype == np.float32
    np.testing.assert_array_equal(vectors, np.asarray([r["embedding"] for r in rows], dtype=np.float32))
    # The vector is asked for as an output field of the paged query.
    assert source.filters[-1] == 'id != ""'


def test_named_drops_select_their_rows_once_through_escaped_drop_filters(tmp_path):
    odd = 'we"ird\ndrop'
    rows = make_rows(3, drops=("a",)) + [
        {**r, "id": f"x-{i}", "drop": odd, "drops": [odd, "a"]} for i, r in enumerate(make_rows(2))
    ]
    rows += [{**r, "id": f"z-{i}", "drop": "c", "drops": ["c"]} for i, r in enumerate(make_rows(2))]
    source = FakeRowSource(rows)
    out = tmp_path / "sel.parquet"
    summary = export.export_rows(source, out, drops=[odd, "a", odd])
    assert summary.drops == [odd, "a"]
    ids = pq.read_table(out).column("id").to_pylist()
    assert ids == sorted(r["id"] for r in rows if r["drop"] != "c")  # a row listed by both drops comes once
    assert source.filters[-1] == f"({drop_filter(odd)}) or ({drop_filter('a')})"
    assert '\\"' in source.filters[-1] and "\\n" in source.filters[-1]


def test_a_collection_without_membership_lists_each_row_by_its_drop(tmp_path):
    rows = [{k: v for k, v in r.items() if k != "drops"} for r in make_rows(3)]
    source = FakeRowSource(rows, membership=False)
    source._matches = lambda row, filter: filter == 'id != ""' or row["drop"] in filter  # type: ignore[method-assign]
    out = tmp_path / "legacy.parquet"
    export.export_rows(source, out, drops=["a"])
    assert source.filters[-1] == 'drop == "a"'
    assert pq.read_table(out).column("drops").to_pylist() == [["a"]] * 3


def test_an_empty_collection_still_writes_a_valid_file_with_the_schema(tmp_path):
    out = tmp_path / "empty.parquet"
    summary = export.export_rows(FakeRowSource([]), out, all_rows=True)
    assert (summary.rows, summary.row_groups) == (0, 0)
    table = pq.read_table(out)
    assert table.num_rows == 0
    assert table.schema == export.export_schema(DIM, "fake_collection")


def test_the_file_appears_under_its_name_only_when_complete(tmp_path):
    out = tmp_path / "out.parquet"
    source = FakeRowSource(make_rows(9))
    source.watch = tmp_path
    saved = os.umask(0o022)
    try:
        export.export_rows(source, out, all_rows=True, page_rows=4)
    finally:
        os.umask(saved)
    assert out not in source.during  # while pages were read, only the temporary file existed
    assert source.during and all(p.name.startswith(".out.parquet.") and p.suffix == ".tmp" for p in source.during)
    assert sorted(tmp_path.iterdir()) == [out]
    assert out.stat().st_mode & 0o777 == 0o644  # a plain new file's permissions, not the temporary file's 0600


def test_a_failed_export_leaves_no_file_and_keeps_the_previous_one(tmp_path):
    out = tmp_path / "out.parquet"
    out.write_bytes(b"previous export")
    with pytest.raises(CollectionError, match="went away"):
        export.export_rows(FakeRowSource(make_rows(9), fail_after=1), out, all_rows=True, page_rows=4)
    assert out.read_bytes() == b"previous export"
    assert sorted(tmp_path.iterdir()) == [out]  # no temporary file left behind

    fresh = tmp_path / "fresh.parquet"
    with pytest.raises(CollectionError):
        export.export_rows(FakeRowSource(make_rows(9), fail_after=2), fresh, all_rows=True, page_rows=4)
    assert not fresh.exists()
    assert sorted(tmp_path.iterdir()) == [out]


def test_a_vector_of_the_wrong_length_is_refused_and_nothing_written(tmp_path):
    rows = make_rows(3)
    rows[1]["embedding"] = rows[1]["embedding"][:-1]
    out = tmp_path / "bad.parquet"
    with pytest.raises(CollectionError, match="img-0001"):
        export.export_rows(FakeRowSource(rows), out, all_rows=True)
    assert list(tmp_path.iterdir()) == []


def test_an_unknown_drop_is_refused_by_name_before_anything_is_written(tmp_path):
    out = tmp_path / "x.parquet"
    with pytest.raises(export.ExportError, match="'nope'") as info:
        export.export_rows(FakeRowSource(make_rows(3)), out, drops=["a", "nope"])
    assert "'a'" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_a_missing_collection_is_refused(tmp_path):
    with pytest.raises(export.ExportError, match="does not exist"):
        export.export_rows(FakeRowSource([], dim=None), tmp_path / "x.parquet", all_rows=True)


@pytest.mark.parametrize(("drops", "all_rows"), [([], False), (["a"], True)])
def test_exactly_one_of_drops_and_all(drops, all_rows, tmp_path):
    with pytest.raises(export.ExportError, match="not both and not neither"):
        export.export_rows(FakeRowSource(make_rows(1)), tmp_path / "x.parquet", drops=drops, all_rows=all_rows)


def test_cli_refuses_a_bad_selection_before_starting_anything(tmp_path, capsys):
    out = tmp_path / "x.parquet"
    assert cli.main(["export", "--out", str(out)]) == 2
    assert cli.main(["export", "a", "--all", "--out", str(out)]) == 2
    assert "not both and not neither" in capsys.readouterr().err
    assert not out.exists()


def test_page_table_matches_the_schema():
    schema = export.export_schema(DIM)
    table = export.page_table(make_rows(2), schema)
    assert table.schema == schema
    assert export.page_table([], schema).num_rows == 0


def test_a_run_writes_its_export_in_the_exports_folder_only(tmp_path):
    from embedding_pipeline.defs.export import export_path

    home = tmp_path / "home"
    assert export_path(home, "cats.parquet") == home / "exports" / "cats.parquet"
    for bad in ("/etc/passwd.parquet", "../x.parquet", "a/b.parquet", ".hidden.parquet", "x.txt", "dagster.yaml", ""):
        with pytest.raises(ValueError, match="file name"):
            export_path(home, bad)
    (home / "exports" / "link.parquet").symlink_to(tmp_path / "elsewhere.parquet")
    with pytest.raises(ValueError, match="not a regular file"):
        export_path(home, "link.parquet")
    (home / "exports" / "dir.parquet").mkdir()
    with pytest.raises(ValueError, match="not a regular file"):
        export_path(home, "dir.parquet")
