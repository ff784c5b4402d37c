"""The checked-in bad-input corpus: it is what the generator makes, and the manifest stage sorts every case into
its expected status and error kind (with two local HTTP servers standing in for the internet and an intranet)."""

import json

import numpy as np
import pytest

from embedding_pipeline.settings import SourceSettings
from embedding_pipeline.sources.drops import Drop
from embedding_pipeline.sources.items import collect_items
from embedding_pipeline_tests.corpus import build_drop, make_corpus
from embedding_pipeline_tests.http_servers import TestServer

TEMPLATE_ROWS = [json.loads(line) for line in make_corpus.TEMPLATE.read_text().splitlines() if line.strip()]
EXPECTED = json.loads(make_corpus.EXPECTED.read_text())
RUNTIME_PATHS = {"escape-link.jpg", "a-directory"}  # made by the test: brittle when checked in

# Words the error message of these cases must contain: the message says what went wrong, not just that it did.
MESSAGE_HAS = {
    "url-404": "404",
    "url-metadata-service": "169.254.169.254",
    "url-private-address": "localhost",
    "url-redirect-to-private": "localhost",
    "url-ftp": "ftp",
    "html-named-jpg": "HTML",
    "text-named-jpg": "text",
    "heic-unsupported": "heic",
    "missing-file": "does-not-exist.jpg",
    "duplicate-id": "good-photo.jpg",
}


def test_checked_in_corpus_matches_the_generator(tmp_path):
    names = make_corpus.generate(tmp_path)
    assert names == sorted(p.name for p in make_corpus.FILES.iterdir())
    assert TEMPLATE_ROWS == make_corpus.template_rows()
    assert EXPECTED == make_corpus.expected()
    cases = [make_corpus.case_of(row) for row in TEMPLATE_ROWS]
    assert len(cases) == len(set(cases)) == len(EXPECTED) >= 25
    for row in TEMPLATE_ROWS:
        uri = row.get("uri", "")
        if uri and "://" not in uri and "/" not in uri and uri not in RUNTIME_PATHS and uri != "does-not-exist.jpg":
            assert (make_corpus.FILES / uri).is_file(), uri
    assert sum(p.stat().st_size for p in make_corpus.FILES.iterdir()) < 1024 * 1024


def _corpus_drop(tmp_path, server, private):
    drop = build_drop(tmp_path / "drops" / "corpus", server.base_url, private.base_url, tmp_path / "outside")
    return Drop(drop.name, drop)


def test_manifest_stage_sorts_every_case(tmp_path):
    with TestServer(make_corpus.FILES) as server, TestServer(make_corpus.FILES, url_host="localhost") as private:
        settings = SourceSettings(
            private_allowlist=[f"127.0.0.1:{server.port}"],
            fetch_timeout_s=1,
            fetch_retries=2,
            max_image_bytes=1_000_000,
        )
        items = collect_items(_corpus_drop(tmp_path, server, private), settings, tmp_path / "blobs")

        assert len(items) == len(TEMPLATE_ROWS)  # every file is listed by the manifest: no loose extras
        got, want = {}, {}
        for row, item in zip(TEMPLATE_ROWS, items):
            case = make_corpus.case_of(row)
            expected = EXPECTED[case]
            got[case] = (item.status, item.error_kind)
            want[case] = (expected["manifest_status"], expected["manifest_error_kind"])
            if expected["id"] is not None:
                assert item.id == expected["id"], case
            if item.status == "ok":
                assert item.error == "" and item.sha256, case
            else:
                assert item.error and item.error != item.error_kind, case
                assert MESSAGE_HAS.get(case, "") in item.error, (case, item.error)
        assert got == want

        assert server.requests("/flaky/2/good-photo.jpg") == 3  # two 500s, then the file
        assert server.requests("/files/good-photo.webp") == 1  # listed twice, fetched once
        assert private.requests("/files/good-photo.jpg") == 0  # refused before connecting, redirect included


def test_decode_stage_expectations_hold():
    """Files the manifest stage accepts end with the final status Pillow gives them through the decoder."""
    from embedding_pipeline.preprocess.decode import DecodeError, Geometry, decode

    upright, _ = decode((make_corpus.FILES / "good-upright.jpg").read_bytes(), Geometry())
    for row in TEMPLATE_ROWS:
        case = make_corpus.case_of(row)
        expected = EXPECTED[case]
        path = make_corpus.FILES / row.get("uri", "-")
        if expected["manifest_status"] != "ok" or not path.is_file():
            continue
        try:
            array, _ = decode(path.read_bytes(), Geometry())
        except DecodeError as exc:
            assert (expected["status"], expected["error_kind"]) == ("failed", exc.kind), (case, str(exc))
            continue
        assert (expected["status"], expected["error_kind"]) == ("ok", ""), case
        assert array.dtype == np.uint8 and array.ndim == 3 and array.shape[2] == 3, case
        if case.startswith("jpeg-exif-orientation-"):
            assert array.shape == upright.shape, case
            assert np.abs(array.astype(float) - upright).mean() < 6, case


@pytest.mark.parametrize("name", ["good-orientation-6.jpg", "good-orientation-8.jpg"])
def test_rotated_files_are_stored_sideways(name):
    """The EXIF cases are real: their stored pixels are not upright, only the orientation tag makes them so."""
    from PIL import Image

    with Image.open(make_corpus.FILES / name) as img, Image.open(make_corpus.FILES / "good-upright.jpg") as up:
        assert img.size == (up.height, up.width)
