"""The Dagster UI as a user sees it, in Debian's headless Chromium against the real webserver.

A small drop (eight photos, one truncated JPEG, one HTML page named .jpg, one manifest row whose file is missing) is
ingested and searched in the session's instance; then the asset graph, the drop's materialization, the Arrow
column schema and the search run are rendered and checked for what must be shown: asset names and kinds, stage
timings, failures by kind, thumbnails that really decoded, and the results table with scores. Screenshots are kept
under ``test-artifacts/ui/`` (or ``$EMBEDDING_PIPELINE_ARTIFACTS/ui/``).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
from dagster import DagsterInstance

from embedding_pipeline import services
from embedding_pipeline.orchestration import instance as orchestration_instance
from embedding_pipeline.orchestration import names, runs
from embedding_pipeline.runtime import processes
from embedding_pipeline.sources.samples import load_photo
from embedding_pipeline_tests.browser import (
    artifacts_dir,
    chromium_page,
    dismiss_welcome,
    rendered_images,
    require_chromium,
)
from embedding_pipeline_tests.images import altered_copies, encode

pytestmark = pytest.mark.integration

DROP = "ui-tour"
PHOTOS = ["astronaut", "chelsea", "coffee", "rocket", "stereo_motorcycle", "hubble_deep_field", "china", "flower"]
ASSETS = ["raw_image_manifest", "preprocessed_batches", "image_embeddings", "milvus_collection"]


def _write_drop(folder: Path) -> Path:
    """Photos listed in a manifest with their own ids (prefixed, so no other drop's rows are touched), plus three
    items that fail in different ways."""
    folder.mkdir(parents=True)
    rows = []
    for name in PHOTOS:
        (folder / f"{name}.jpg").write_bytes(encode(load_photo(name), "JPEG", quality=88))
        rows.append({"id": f"tour-{name}", "uri": f"{name}.jpg", "metadata": {"photo": name}})
    rows.append({"id": "tour-missing", "uri": "missing.jpg"})
    (folder / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "broken.jpg").write_bytes(encode(load_photo("coffee"), "JPEG")[:4000])
    (folder / "notes.jpg").write_bytes(b"<!doctype html><html><body>404 not found</body></html>")
    return folder


def _search(settings, query: Path) -> str:
    from embedding_pipeline.defs import defs

    config = {"image": str(query), "top_k": 5, "filter": f'drop == "{DROP}"'}
    result = defs.resolve_job_def("search_images").execute_in_process(
        run_config={"ops": {"embed_query": {"config": config}}}, instance=DagsterInstance.get()
    )
    assert result.success
    return result.run_id


@pytest.fixture(scope="module")
def ui(stack, tmp_path_factory, request):
    """The drop ingested, one search run, and the webserver on 127.0.0.1 (stopped at the end)."""
    require_chromium()  # before spending a minute on runs the browser could not look at
    work = tmp_path_factory.mktemp("ui")
    summary = runs.ingest(stack, _write_drop(work / DROP), DROP)
    assert summary["success"], summary
    assert (summary["ok"], summary["failed"]) == (len(PHOTOS), 3), summary
    query = work / "chelsea-crop.jpg"
    query.write_bytes(altered_copies(load_photo("chelsea"))["crop"])
    search_run = _search(stack, query)

    paths = stack.paths
    started = processes.read(paths.run, services.WEBSERVER) is None
    if started:
        argv = [
            str(Path(sys.executable).with_name("dagster-webserver")),
            "-h",
            "127.0.0.1",
            "-p",
            str(stack.dagster.webserver_port),
            "-w",
            str(orchestration_instance.prepare_dagster_home(stack)),
        ]
        proc = processes.start(paths.run, paths.logs, services.WEBSERVER, argv, env=services.child_env(stack))
    url = services.webserver_url(stack)
    try:
        if started:
            processes.wait_until(lambda: processes.http_ok(f"{url}/server_info"), 120, f"Dagster UI at {url}", proc)
        dismiss_welcome(url)
        shots = artifacts_dir("ui")
        yield {"url": url, "search_run": search_run, "shots": shots}
        # Past pytest's output capture: the path is worth seeing when the tests pass too.
        with request.config.pluginmanager.get_plugin("capturemanager").global_and_fixture_disabled():
            print(f"\nUI screenshots: {shots}")
    finally:
        if started:
            processes.stop(paths.run, services.WEBSERVER)


def _open(page, url: str, ready_text: str) -> None:
    page.goto(url)
    page.get_by_text(ready_text, exact=True).first.wait_for()
    page.wait_for_load_state("networkidle")


def _dialog_of(page, row_label: str, action: str):
    """Open the metadata dialog of the entry ``row_label`` (the UI puts long values behind a link)."""
    page.locator("tr", has=page.get_by_text(row_label, exact=True)).get_by_text(action).first.click()
    dialog = page.get_by_role("dialog")
    dialog.wait_for()
    return dialog


def _wait_images_decoded(page, minimum: int) -> list[dict]:
    page.wait_for_function(
        f"""() => {{ const imgs = document.querySelectorAll('[role=dialog] img');
                    return imgs.length >= {minimum} && Array.from(imgs).every(i => i.complete); }}"""
    )
    return rendered_images(page, "[role=dialog]")


def test_asset_graph_names_the_stages_and_their_kinds(ui):
    # Wide enough that the graph, which now reaches the on-demand near_duplicates asset, keeps full labels.
    with chromium_page(width=1920, height=1080) as page:
        _open(page, f"{ui['url']}/locations/{names.LOCATION_NAME}/asset-groups/image_ingest", "milvus_collection")
        graph = page.inner_text("body")
        page.screenshot(path=ui["shots"] / "asset-graph.png")
    for name in ASSETS:
        assert name in graph
    kinds = {line.strip() for line in graph.splitlines()}
    assert {"triton", "milvus", "jax"} <= kinds, sorted(kinds)[:80]


def test_drop_materialization_shows_timings_failures_and_real_thumbnails(ui):
    with chromium_page(height=1400) as page:
        _open(page, f"{ui['url']}/assets/milvus_collection?view=partitions&partition={DROP}", "stage_timings")
        text = page.inner_text("body")
        page.screenshot(path=ui["shots"] / "drop-materialization.png")
        # Short markdown is rendered in place: the stage table and the failures by kind.
        for stage in ("manifest", "preprocess", "embed", "index", "all stages"):
            assert stage in text
        assert re.search(r"all stages\s+[\d.]+\s+8 images\s+[\d.]+", text), text[:3000]
        for kind in ("not_found", "not_image", "truncated"):
            assert kind in text
        assert "broken.jpg" in text and "notes.jpg" in text  # examples name the files, not content hashes

        dialog = _dialog_of(page, "preview", "[Show Markdown]")
        images = _wait_images_decoded(page, len(PHOTOS))
        dialog.screenshot(path=ui["shots"] / "drop-preview.png")
        assert "8 of 8 embedded items" in dialog.inner_text()
        assert len(images) == len(PHOTOS)
        for image in images:
            assert image["dataUri"] and image["naturalWidth"] > 0 and image["naturalHeight"] > 0, image
        assert max(i["naturalWidth"] for i in images) == 96


@pytest.mark.parametrize(
    "asset, columns, vector_type",
    [
        ("preprocessed_batches", ["id", "drop", "sha256", "uri", "tensor"], r"tensor<uint8>\[\d+×\d+×3\]"),
        ("image_embeddings", ["id", "drop", "sha256", "uri", "embedding", "model", "metadata"], r"float\[\d+\]"),
    ],
)
def test_arrow_outputs_show_their_column_schema(ui, asset, columns, vector_type):
    with chromium_page() as page:
        _open(page, f"{ui['url']}/assets/{asset}?view=partitions&partition={DROP}", "dagster/column_schema")
        dialog = _dialog_of(page, "dagster/column_schema", "[Show Table Schema]")
        # Descriptions render as markdown, which the UI may draw a moment after the table itself.
        dialog.get_by_text("SHA-256 of the item's bytes", exact=False).first.wait_for()
        schema = dialog.inner_text()
        dialog.screenshot(path=ui["shots"] / f"{asset}-schema.png")
    assert [c for c in columns if c not in schema.split()] == []
    assert re.search(vector_type, schema), schema
    assert "SHA-256 of the item's bytes" in schema


def test_search_run_shows_query_and_hits_with_thumbnails_and_scores(ui):
    with chromium_page() as page:
        _open(page, f"{ui['url']}/runs/{ui['search_run']}", "report_results")
        page.get_by_text("[Show Markdown]").first.click()
        dialog = page.get_by_role("dialog")
        dialog.wait_for()
        images = _wait_images_decoded(page, 6)  # the query and five hits
        text = dialog.inner_text()
        dialog.screenshot(path=ui["shots"] / "search-results.png")
    assert [i["alt"] for i in images[:2]] == ["query", "tour-chelsea"]
    assert all(i["dataUri"] and i["naturalWidth"] > 0 for i in images), images
    first = re.search(r"^1\s+tour-chelsea\s+(0\.\d{4}|1\.0000)", text, re.MULTILINE)
    assert first and float(first.group(1)) > 0.6, text
    scores = [float(s) for s in re.findall(r"^\d\s+tour-\S+\s+([01]\.\d{4})", text, re.MULTILINE)]
    assert len(scores) == 5 and scores == sorted(scores, reverse=True), text
