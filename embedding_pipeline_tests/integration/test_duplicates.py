"""Near-duplicate groups on the real stack: a drop with planted altered copies of a few sample photos and distinct
photos, ingested through the real job into Triton + Milvus; the groups found by the collection's search, the CLI's
JSON, the HTTP API's pages, and the on-demand asset with its check in the session's Dagster instance.

Other tests of a session may hold the same photos in other drops (an exact copy under another id is a near-duplicate
too), so the assertions look at this drop's ids.
"""

from __future__ import annotations

import io
import json
import uuid

import pytest
from dagster import DagsterInstance
from fastapi.testclient import TestClient
from PIL import Image, ImageEnhance

from embedding_pipeline import cli, duplicates
from embedding_pipeline.api.app import ApiServices, create_app
from embedding_pipeline.api.duplicates import DuplicatesService
from embedding_pipeline.defs import defs
from embedding_pipeline.sources.drops import READY_MARKER
from embedding_pipeline.sources.samples import load_photo
from embedding_pipeline.storage import arrow, layout

pytestmark = pytest.mark.integration

PLANTED = ["chelsea", "coffee", "rocket"]
DISTINCT = ["astronaut", "camera", "coins", "china", "flower"]


def _jpeg(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, "JPEG", quality=90)
    return buf.getvalue()


def copies(name: str) -> dict[str, bytes]:
    """The original and the two alterations every copy of the benchmark kept above the default threshold."""
    image = Image.fromarray(load_photo(name)).convert("RGB")
    colour = ImageEnhance.Color(ImageEnhance.Brightness(image).enhance(1.08)).enhance(0.85)
    return {
        "": _jpeg(image),
        "-flip": _jpeg(image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)),
        "-colour": _jpeg(colour),
    }


@pytest.fixture(scope="module")
def dup_drop(stack):
    from embedding_pipeline.orchestration import runs

    drop = f"dups-{uuid.uuid4().hex[:6]}"
    folder = stack.drops / drop
    folder.mkdir(parents=True)
    rows, planted = [], []
    for name in PLANTED:
        group = []
        for suffix, data in copies(name).items():
            (folder / f"{name}{suffix}.jpg").write_bytes(data)
            rows.append({"id": f"{drop}-{name}{suffix}", "uri": f"{name}{suffix}.jpg"})
            group.append(f"{drop}-{name}{suffix}")
        planted.append(sorted(group))
    for name in DISTINCT:
        (folder / f"{name}.jpg").write_bytes(copies(name)[""])
        rows.append({"id": f"{drop}-{name}", "uri": f"{name}.jpg"})
    (folder / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / READY_MARKER).touch()
    summary = runs.ingest(stack, folder)
    assert summary["success"], summary
    return drop, planted, {r["id"] for r in rows}


def own_groups(groups: list[dict], ids: set[str]) -> list[list[str]]:
    """Each group's members from this drop, for groups holding two or more of them. The session's collection is
    shared with other tests' drops, which hold the same sample photos: a group may join one of this drop's
    images to another drop's copy of it, which says nothing about this drop's own groups."""
    found = [sorted(m["id"] for m in g["members"] if m["id"] in ids) for g in groups]
    return sorted(g for g in found if len(g) > 1)


def test_planted_groups_are_found_and_distinct_photos_stay_apart(stack, dup_drop):
    drop, planted, ids = dup_drop
    report = duplicates.find_for(stack, drop)
    assert report.metric == "COSINE" and report.threshold == duplicates.default_threshold("COSINE")
    assert report.queries == len(ids)
    assert own_groups(duplicates.group_list(report.table), ids) == sorted(planted)
    assert not duplicates.table_problems(report.table, report.threshold, report.metric)


def test_cli_json(stack, dup_drop, capsys):
    drop, planted, ids = dup_drop
    assert cli.main(["duplicates", drop, "--json"]) == 0
    page = json.loads(capsys.readouterr().out)
    assert page["drop"] == drop and page["metric"] == "COSINE"
    assert own_groups(page["groups"], ids) == sorted(planted)
    # A threshold nothing reaches: no groups.
    assert cli.main(["duplicates", drop, "--threshold", "1.01", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["total_groups"] == 0


def test_api_pages_across_a_boundary(stack, dup_drop):
    drop, planted, ids = dup_drop
    services = ApiServices(None, None, None, lambda: {}, DuplicatesService(stack))
    with TestClient(create_app(stack, services, api_key=""), base_url="http://127.0.0.1") as client:
        first = client.get("/duplicates", params={"drop": drop, "limit": 2})
        assert first.status_code == 200, first.text
        total = first.json()["total_groups"]
        assert total >= len(planted) and len(first.json()["groups"]) == 2
        rest = client.get("/duplicates", params={"drop": drop, "offset": 2, "limit": 100})
        assert rest.status_code == 200, rest.text
        groups = first.json()["groups"] + rest.json()["groups"]
        assert [g["group"] for g in groups] == list(range(total))
        assert own_groups(groups, ids) == sorted(planted)
        assert client.get("/duplicates", params={"drop": "no-such-drop"}).status_code == 404


def test_asset_and_its_check_materialize(stack, dup_drop):
    drop, planted, ids = dup_drop
    job = defs.resolve_job_def("find_duplicates")
    result = job.execute_in_process(instance=DagsterInstance.get(), partition_key=drop, raise_on_error=False)
    assert result.success
    [materialization] = result.get_asset_materialization_events()
    metadata = {k: v.value for k, v in materialization.materialization.metadata.items()}
    assert metadata["groups"] >= len(planted)
    assert "data:image/jpeg;base64," in metadata["largest_groups"]  # thumbnails of the members
    [evaluation] = result.get_asset_check_evaluations()
    assert evaluation.check_name == "duplicate_groups_sound" and evaluation.passed
    table = arrow.read_parquet(layout.drop_files(stack, drop).duplicates)
    assert table.schema.metadata[b"metric"] == b"COSINE"
    assert own_groups(duplicates.group_list(table), ids) == sorted(planted)


def test_whole_collection_job(stack, dup_drop):
    drop, planted, ids = dup_drop
    job = defs.resolve_job_def("collection_duplicates")
    config = {"ops": {"collection_duplicate_groups": {"config": {"threshold": 0.94}}}}
    result = job.execute_in_process(run_config=config, instance=DagsterInstance.get(), raise_on_error=False)
    assert result.success
    table = arrow.read_parquet(layout.collection_duplicates(stack, stack.milvus.collection))
    assert own_groups(duplicates.group_list(table), ids) == sorted(planted)
