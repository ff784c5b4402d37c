"""Search options on the real stack (Triton, milvus-lite, Dagster), through every surface: by id ("more like
this"), a minimum score, offset pages, and near-duplicates collapsed; the Python API, the CLI, the HTTP API and
the search job return the same hits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from embedding_pipeline.api.app import create_app
from embedding_pipeline.cli import main
from embedding_pipeline.defs import defs
from embedding_pipeline.index.client import Hit, UnknownItem
from embedding_pipeline.index.params import passes
from embedding_pipeline.orchestration import runs
from embedding_pipeline.retrieval import ImageSearcher, search
from embedding_pipeline.sources.samples import load_photo, photo_names
from embedding_pipeline_tests.images import encode

pytestmark = pytest.mark.integration

DROP = "near-copies"
PREFIX = "nc-"
ORIGINALS = ("chelsea", "coffee")  # each with two planted near-copies


def _rescaled(array: np.ndarray, factor: float) -> np.ndarray:
    image = Image.fromarray(array)
    return np.asarray(image.resize((int(image.width * factor), int(image.height * factor)), Image.Resampling.LANCZOS))


@pytest.fixture(scope="module")
def near_copies(stack, tmp_path_factory) -> dict[str, str]:
    """Every sample photo, plus a recompressed and a rescaled copy of two of them, ingested as one drop through the
    real job; returns id -> the photo it shows. Ids carry a prefix and the originals an encoding of their own, so
    other tests' drops of the same photos (the session's collection is shared) neither clash with nor tie them."""
    folder = tmp_path_factory.mktemp("drops") / DROP
    folder.mkdir()
    shows: dict[str, str] = {}
    for name in photo_names():
        photo = load_photo(name)
        if photo.ndim == 2:
            photo = np.stack([photo] * 3, axis=-1)
        (folder / f"{name}.jpg").write_bytes(encode(photo, "JPEG", quality=91))
        shows[name] = name
        if name in ORIGINALS:
            (folder / f"{name}-q40.jpg").write_bytes(encode(photo, "JPEG", quality=40))
            (folder / f"{name}-half.jpg").write_bytes(encode(_rescaled(photo, 0.5), "JPEG", quality=90))
            shows[f"{name}-q40"] = shows[f"{name}-half"] = name
    manifest = [{"uri": f"{item}.jpg", "id": PREFIX + item} for item in shows]
    (folder / "manifest.jsonl").write_text("".join(json.dumps(row) + "\n" for row in manifest))
    summary = runs.ingest(stack, folder, DROP)
    assert summary["success"] and summary["ok"] == len(shows), summary
    return {PREFIX + item: photo for item, photo in shows.items()}


def _ids(hits) -> list[str]:  # noqa: ANN001
    return [h["id"] for h in hits]


def test_more_like_this_uses_the_stored_vector_and_leaves_the_item_out(stack, near_copies):
    drop_only = f'drop == "{DROP}"'
    hits = search(id="nc-chelsea", top_k=3, filter=drop_only, settings=stack)
    assert all(isinstance(h, Hit) for h in hits) and "nc-chelsea" not in _ids(hits)
    assert set(_ids(hits)[:2]) == {"nc-chelsea-q40", "nc-chelsea-half"}
    with_self = search(id="nc-chelsea", top_k=3, filter=drop_only, settings=stack, include_self=True)
    assert with_self[0]["id"] == "nc-chelsea" and with_self[0].score == pytest.approx(1.0, abs=1e-4)
    # The same ranking as searching with the image itself (one embedding, one Milvus call either way).
    by_image = search(stack.drops / DROP / "chelsea.jpg", top_k=4, filter=drop_only, settings=stack)
    assert _ids(by_image) == _ids(with_self[:1]) + _ids(hits)
    with pytest.raises(UnknownItem, match="'no-such-photo'"):
        search(id="no-such-photo", settings=stack)


def test_min_score_and_offset_pages_tile_the_ranking(stack, near_copies):
    drop_only = f'drop == "{DROP}"'
    full = search(id="nc-coffee", top_k=len(near_copies), filter=drop_only, settings=stack)
    cut = full[5].score
    kept = [h for h in full if passes(stack.milvus.metric_type, h.score, cut)]
    assert 6 <= len(kept) < len(full)
    pages: list[str] = []
    for offset in range(0, len(full), 4):  # a page boundary inside the kept hits
        pages += _ids(search(id="nc-coffee", top_k=4, offset=offset, min_score=cut, filter=drop_only, settings=stack))
    assert pages == _ids(kept)
    assert all(h.score >= cut for h in kept)  # COSINE: higher is better


def test_collapse_folds_the_planted_copies(stack, near_copies):
    drop_only = f'drop == "{DROP}"'
    query = stack.drops / DROP / "chelsea-q40.jpg"
    plain = search(query, top_k=3, filter=drop_only, settings=stack)
    assert {near_copies[i] for i in _ids(plain)} == {"chelsea"}  # three copies of one photo fill the top three
    folded = search(query, top_k=3, filter=drop_only, settings=stack, collapse=0.9)
    assert len({near_copies[i] for i in _ids(folded)}) == 3
    assert near_copies[folded[0]["id"]] == "chelsea" and {near_copies[d] for d in folded[0]["duplicates"]} == {
        "chelsea"
    }
    assert len(folded[0]["duplicates"]) == 2
    # Page 2 goes on after the folded page 1: no photo twice.
    second = search(query, top_k=3, offset=3, filter=drop_only, settings=stack, collapse=0.9)
    assert not {near_copies[i] for i in _ids(second)} & {near_copies[i] for i in _ids(folded)}


def test_the_cli_searches_by_id_with_every_option(stack, near_copies, capsys):
    assert main(["search", "--id", "nc-coffee", "--top-k", "2", "--filter", f'drop == "{DROP}"', "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert {h["id"] for h in printed} == {"nc-coffee-q40", "nc-coffee-half"}
    assert (
        main(
            [
                "search",
                "--id",
                "nc-coffee",
                "--top-k",
                "2",
                "--offset",
                "2",
                "--min-score",
                "-1",
                "--collapse",
                "--filter",
                f'drop == "{DROP}"',
            ]
        )
        == 0
    )
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[0].lstrip().startswith("3 ")
    assert main(["search", "--id", "no-such-photo"]) == 1
    assert "'no-such-photo'" in capsys.readouterr().err
    assert main(["search", str(stack.drops / DROP / "coffee.jpg"), "--id", "nc-coffee"]) == 2


def test_the_http_api_searches_by_id_pages_and_collapses(stack, near_copies):
    with TestClient(create_app(stack), base_url="http://127.0.0.1") as client:
        drop_only = f'drop == "{DROP}"'
        answer = client.post("/search", json={"query_id": "nc-chelsea", "topk": 2, "filter_expr": drop_only})
        assert answer.status_code == 200, answer.text
        results = answer.json()["results"]
        assert {r["id"] for r in results} == {"nc-chelsea-q40", "nc-chelsea-half"} and "duplicates" not in results[0]
        python = search(id="nc-chelsea", top_k=2, filter=drop_only, settings=stack)
        assert [(r["id"], pytest.approx(r["score"], abs=1e-5)) for r in results] == [(h.id, h.score) for h in python]
        page = client.post(
            "/search",
            json={"query_id": "nc-chelsea", "topk": 2, "offset": 2, "filter_expr": drop_only, "min_score": 0.0},
        )
        assert page.status_code == 200 and {r["id"] for r in page.json()["results"]}.isdisjoint(_ids(results))
        folded = client.post(
            "/search",
            json={
                "query_id": "nc-chelsea",
                "include_self": True,
                "topk": 3,
                "filter_expr": drop_only,
                "collapse": True,
                "collapse_threshold": 0.9,
            },
        ).json()["results"]
        assert folded[0]["id"] == "nc-chelsea" and sorted(folded[0]["duplicates"]) == [
            "nc-chelsea-half",
            "nc-chelsea-q40",
        ]
        missing = client.post("/search", json={"query_id": "no-such-photo"})
        assert missing.status_code == 404 and "'no-such-photo'" in missing.json()["error"]["message"]
        both = client.post("/search", json={"query_id": "nc-chelsea", "vector": [1.0]})
        assert both.status_code == 422
        window = client.post("/search", json={"query_id": "nc-chelsea", "topk": 10, "offset": 16380})
        assert window.status_code == 422


def test_the_search_job_searches_by_id(stack, near_copies):
    from dagster import DagsterInstance

    config = {"id": "nc-coffee", "top_k": 2, "filter": f'drop == "{DROP}"', "collapse": False}
    result = defs.resolve_job_def("search_images").execute_in_process(
        run_config={"ops": {"embed_query": {"config": config}}}, instance=DagsterInstance.ephemeral()
    )
    assert result.success
    hits = result.output_for_node("search_collection")
    assert {h["id"] for h in hits} == {"nc-coffee-q40", "nc-coffee-half"}


def test_searchers_and_the_search_function_return_the_same_hits(stack, near_copies):
    with ImageSearcher(stack) as searcher:
        by_searcher = searcher.search_by_id("nc-coffee", 3, f'drop == "{DROP}"')
    assert by_searcher == search(id="nc-coffee", top_k=3, filter=f'drop == "{DROP}"', settings=stack)
    assert [dict(h) for h in by_searcher] == [h.as_dict() for h in by_searcher]
    assert isinstance(Path(by_searcher[0]["uri"]).name, str)


def test_the_code_locations_resources_search_in_a_plain_session(stack, near_copies):
    # The three lines docs/pipeline.md shows, outside any run: the same hits as the search function.
    with defs.resources["milvus"].searcher(defs.resources["triton"]) as searcher:
        hits = searcher.search(stack.drops / DROP / "coffee.jpg", top_k=3, filter=f'drop == "{DROP}"')
    assert _ids(hits) == _ids(search(stack.drops / DROP / "coffee.jpg", top_k=3, filter=f'drop == "{DROP}"'))
    assert {near_copies[i] for i in _ids(hits)} == {"coffee"}
