"""What the UI shows: thumbnails, markdown tables, column schemas and stage timings built from real files."""

import base64
import io
import os

import numpy as np
import pytest
from dagster import AssetMaterialization, DagsterInstance, MetadataValue
from PIL import Image

from embedding_pipeline import ingest, thumbnails
from embedding_pipeline.defs import metadata as ui
from embedding_pipeline.settings import load_settings
from embedding_pipeline.sources.samples import write_sample_drop
from embedding_pipeline.storage import arrow, layout
from embedding_pipeline_tests.images import encode


def _jpeg_of_uri(uri: str) -> Image.Image:
    assert uri.startswith("data:image/jpeg;base64,")
    return Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))


def _photo(height: int, width: int) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 255 // width, y * 255 // height, (x + y) % 256], axis=-1).astype(np.uint8)


@pytest.fixture
def settings(tmp_path):
    return load_settings(environ={"EMBEDDING_PIPELINE_HOME": str(tmp_path)})


# ---------------------------------------------------------------------------------------------- thumbnails


def test_thumbnail_fits_the_box_keeps_aspect_and_is_small():
    uri = thumbnails.thumbnail_uri(encode(_photo(480, 640), "JPEG"))
    image = _jpeg_of_uri(uri)
    assert image.size == (96, 72) and image.mode == "RGB"
    assert len(uri) < 6_000


def test_thumbnail_of_transparent_png_is_flattened_on_white():
    rgba = np.zeros((50, 50, 4), np.uint8)  # fully transparent
    image = _jpeg_of_uri(thumbnails.thumbnail_uri(encode(rgba, "PNG")))
    assert np.asarray(image).min() > 240


def test_no_thumbnail_for_broken_huge_or_missing_images(tmp_path):
    assert thumbnails.thumbnail_uri(b"\x89PNG\r\n\x1a\n truncated") is None
    assert thumbnails.thumbnail_uri(b"not an image at all") is None
    assert thumbnails.thumbnail_uri(encode(_photo(100, 100), "PNG"), max_pixels=99 * 100) is None
    roots = [tmp_path]
    assert thumbnails.file_thumbnail_uri(tmp_path / "gone.jpg", roots) is None
    assert thumbnails.file_thumbnail_uri(tmp_path, roots) is None  # a folder
    big = tmp_path / "big.png"
    big.write_bytes(encode(_photo(64, 64), "PNG"))
    assert thumbnails.file_thumbnail_uri(big, roots, max_bytes=10) is None
    assert thumbnails.file_thumbnail_uri(big, roots) is not None
    # A stored row's URI outside the roots is never read, image or not.
    assert thumbnails.file_thumbnail_uri(big, [tmp_path / "elsewhere"]) is None
    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)
    assert thumbnails.file_thumbnail_uri(fifo, roots) is None  # returns at once, never waits for a writer


# ---------------------------------------------------------------------------------------------- markdown


def test_cells_cannot_break_the_table_or_inject_markup():
    cell = ui.md_cell("a|b ![x](javascript:alert(1)) <img src=x>\nnext line")
    assert "\n" not in cell and "|" not in cell.replace("\\|", "")
    # Every character markdown could read as markup is escaped, so it shows as text.
    assert cell == "a\\|b \\!\\[x\\]\\(javascript:alert\\(1\\)\\) \\<img src=x\\> next line"
    assert ui.md_cell("x" * 500).endswith("…") and len(ui.md_cell("x" * 500)) == ui.CELL_CHARS
    assert ui.md_code("a|b`c") == "`a\\|b'c`"


def test_thumbnail_grid_rows_of_images_then_captions():
    cells = [(f"img{i}", f"data:image/jpeg;base64,{i}") for i in range(8)] + [("broken", None)]
    lines = ui.thumbnail_grid(cells, columns=6).splitlines()
    assert len(lines) == 2 + 2 * 2  # header + delimiter, then image and caption rows for two rows of six
    assert lines[2].count("![img") == 6 and "`img5`" in lines[3]
    assert "![img7](data:image/jpeg;base64,7)" in lines[4] and "*(no preview)*" in lines[4]
    assert lines[4].count("|") == lines[2].count("|")  # the last row is padded to the same width
    assert ui.thumbnail_grid([]) == "*Nothing to preview.*"


def test_items_without_their_own_id_are_labelled_by_file_name():
    assert ui.item_label("chelsea", "/drops/d/cat.jpg") == "chelsea"
    assert ui.item_label("sha256-0123abcd", "/drops/d/cat.jpg") == "cat.jpg"
    assert ui.item_label("sha256-0123abcd", "https://example.org/img/dog.png?size=large") == "dog.png"
    assert ui.item_label("error-77", "") == "error-77"


def test_failure_table_by_kind_most_frequent_first_with_examples():
    failures = [{"id": f"u{i}", "error_kind": "http_error", "error": f"HTTP 404 | {i}"} for i in range(3)]
    failures.append(
        {"id": "sha256-99", "error_kind": "truncated", "error": "image file is truncated", "uri": "/drops/d/broken.jpg"}
    )
    table = ui.failure_table({"truncated": 1, "http_error": 3, "not_image": 2}, failures).splitlines()
    assert table[0] == "| kind | count | examples |"
    assert [row.split("|")[1].strip() for row in table[2:]] == ["`http_error`", "`not_image`", "`truncated`"]
    assert "**u0**: HTTP 404 \\| 0; **u1**" in table[2] and "u2" not in table[2]  # two examples per kind
    assert table[3].endswith("| 2 | — |")
    assert "**broken.jpg**: image file is truncated" in table[4]
    assert ui.failure_table({}, []) == "No failures."


def test_summary_metadata_keeps_numbers_and_adds_a_failures_table():
    meta = ui.summary_metadata(
        {
            "items": 3,
            "bytes": 10.0,
            "seconds": 0.5,
            "failures_by_kind": {"not_image": 1},
            "failure_examples": [{"id": "a", "error_kind": "not_image", "error": "HTML page"}],
        }
    )
    assert meta["items"] == 3 and meta["seconds"] == 0.5
    assert meta["bytes"] == MetadataValue.int(10)
    assert meta["failures_by_kind"] == MetadataValue.json({"not_image": 1})
    assert "| `not_image` | 1 | **a**: HTML page |" in meta["failures"].value


# ------------------------------------------------------------------------------------------ column schema


def test_column_schema_of_tensor_and_embedding_batches(tmp_path):
    tensors = arrow.tensor_schema((224, 224, 3), "uint8", {"drop": "d", "layout": "NHWC"})
    schema = ui.column_schema(tensors)
    by_name = {c.name: c for c in schema.columns}
    assert [c.name for c in schema.columns] == ["id", "drop", "sha256", "uri", "tensor"]
    assert by_name["tensor"].type == "tensor<uint8>[224×224×3]"
    assert "Layout NHWC" in by_name["tensor"].description
    assert "SHA-256" in by_name["sha256"].description

    embeddings = tmp_path / "embeddings"
    with arrow.DropWriter(embeddings) as writer:
        rows = {
            "id": ["a"],
            "drop": ["d"],
            "sha256": ["0" * 64],
            "uri": ["a.jpg"],
            "model": ["m:1"],
            "metadata": ["{}"],
        }
        writer.write(arrow.embedding_table(rows, np.ones((1, 8), np.float32), arrow.embedding_schema(8)))
        writer.commit()
    found = ui.output_schema_metadata(embeddings)[ui.COLUMN_SCHEMA_KEY]
    assert {c.name: c.type for c in found.columns}["embedding"] == "float[8]"
    assert ui.output_schema_metadata(tmp_path / "nothing-here") == {}


def test_manifest_schema_and_a_preview_of_real_photos_within_budget(settings):
    write_sample_drop(settings.drops, "photos")
    summary = ingest.build_manifest(settings, "photos")
    files = layout.drop_files(settings, "photos")
    names = [c.name for c in ui.output_schema_metadata(files.manifest)[ui.COLUMN_SCHEMA_KEY].columns]
    assert names == layout.MANIFEST_SCHEMA.names

    preview = ui.drop_preview(settings, "photos")
    text = preview.value
    assert text.startswith(f"12 of {summary.ok} good items of drop `photos`")
    assert text.count("](data:image/jpeg;base64,") == 12 and "`chelsea`" in text
    assert len(text) < 100_000
    # A tight budget stops adding thumbnails rather than growing the event.
    assert ui.drop_preview(settings, "photos", max_chars=9_000).value.count("data:image") < 4
    assert ui.drop_preview(settings, "no-such-drop") is None
    only = ui.drop_preview(settings, "photos", only={"coffee", "rocket"}, what="embedded items").value
    assert only.startswith("2 of 2 embedded items") and "`coffee`" in only and "`chelsea`" not in only


# ---------------------------------------------------------------------------------------------- search


def test_search_results_show_query_and_hit_thumbnails(settings):
    folder = write_sample_drop(settings.drops, "photos")
    ingest.build_manifest(settings, "photos")
    hits = [
        {"id": "chelsea", "score": 1.0, "uri": "chelsea.jpg", "drop": "photos", "sha256": ""},
        {"id": "coffee", "score": 0.4321, "uri": "coffee.jpg", "drop": "photos", "sha256": ""},
        {"id": "deleted", "score": 0.1, "uri": "x.jpg", "drop": "gone", "sha256": "ab" * 32},
    ]
    images = ui.hit_thumbnails(settings, hits)
    assert images[0] is not None and images[1] is not None and images[2] is None
    query = thumbnails.file_thumbnail_uri(folder / "chelsea.jpg", [folder])
    text = ui.search_results(str(folder / "chelsea.jpg"), query, hits, images)
    assert text.splitlines()[2].startswith("![query](data:image/jpeg;base64,")
    assert "| 1 | chelsea | 1.0000 | ![chelsea](data:image/jpeg;base64," in text
    assert "| 2 | coffee | 0.4321 |" in text and "| 3 | deleted | 0.1000 | *(no preview)* |" in text
    assert ui.hit_thumbnails(settings, hits, limit=1)[1] is None
    assert "No hits." in ui.search_results("q.jpg", None, [], [])


# ------------------------------------------------------------------------------------------- stage timings


def test_stage_timings_from_earlier_materializations_in_the_instance():
    with DagsterInstance.ephemeral() as instance:
        for asset, metadata in [
            ("raw_image_manifest", {"seconds": 0.5, "items": 10}),
            ("preprocessed_batches", {"seconds": 2.0, "images": 8}),
            ("image_embeddings", {"seconds": 4.0, "computed": 8}),
        ]:
            instance.report_runless_asset_event(AssetMaterialization(asset, partition="d1", metadata=metadata))
        # Another drop's figures must not leak in.
        instance.report_runless_asset_event(
            AssetMaterialization("image_embeddings", partition="d2", metadata={"seconds": 99.0, "computed": 1})
        )
        stages = {**ui.earlier_stage_metadata(instance, "d1"), "index": {"seconds": 1.5, "upserted": 8}}
    out = ui.stage_timings(stages, items_ok=8)
    assert out["embed_seconds"] == 4.0 and out["pipeline_seconds"] == 8.0
    assert out["pipeline_images_per_s"] == 1.0
    rows = out["stage_timings"].value.splitlines()
    assert rows[2] == "| manifest | 0.50 | 10 items | 20.0 |"
    assert rows[4] == "| embed | 4.00 | 8 images | 2.0 |"
    assert rows[5] == "| index | 1.50 | 8 vectors | 5.3 |"
    assert rows[6] == "| **all stages** | **8.00** | **8 images** | **1.0** |"


def test_stage_timings_mark_a_stage_without_figures():
    out = ui.stage_timings({"index": {"seconds": 2.0, "upserted": 4}}, items_ok=4)
    assert "| manifest | — | — | — |" in out["stage_timings"].value
    assert out["pipeline_seconds"] == 2.0 and "manifest_seconds" not in out


# ------------------------------------------------------------------------------- the UI check's browser helper


def test_missing_browser_skips_unless_system_packages_are_required(monkeypatch, tmp_path):
    from embedding_pipeline_tests import browser

    monkeypatch.setattr(browser, "CHROMIUM", tmp_path / "no-chromium")
    monkeypatch.delenv(browser.REQUIRE_ENV, raising=False)
    with pytest.raises(pytest.skip.Exception, match="no-chromium is missing"):
        browser.require_chromium()
    monkeypatch.setenv(browser.REQUIRE_ENV, "1")
    with pytest.raises(pytest.fail.Exception, match="EMBEDDING_PIPELINE_REQUIRE_SYSTEM_PACKAGES=1 requires it"):
        browser.require_chromium()


def test_screenshots_go_where_the_environment_says(monkeypatch, tmp_path):
    from embedding_pipeline_tests import browser

    monkeypatch.setenv(browser.ARTIFACTS_ENV, str(tmp_path / "artefacts"))
    assert browser.artifacts_dir("ui") == tmp_path / "artefacts" / "ui" and (tmp_path / "artefacts" / "ui").is_dir()
    monkeypatch.delenv(browser.ARTIFACTS_ENV)
    assert browser.artifacts_dir("ui") == browser.REPO_ROOT / "test-artifacts" / "ui"
