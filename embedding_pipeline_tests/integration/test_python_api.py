"""The original specification's Python API against the real stack: its example, run as written there.

Only what depends on the deployment is replaced: the import lines, the YAML path, the image paths and URL (real
sample photos, the URL served by a local HTTP server), and ``dim=512`` (the dimension of the specification's
model; ours produces 1280-d vectors, and another dimension is refused, see docs/pipeline.md).
"""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path
from typing import Any, Iterator

import pytest

from embedding_pipeline.sources.samples import load_photo
from embedding_pipeline_tests.http_servers import TestServer
from embedding_pipeline_tests.images import altered_copies, encode

pytestmark = pytest.mark.integration

# The original specification's Python API example, copied as it is written there (its blank lines inside the
# block carried four spaces of indentation; they are empty here).
ORIGINAL_EXAMPLE = """\
from src.pipeline import ImageEmbeddingPipeline
from src.config import ServiceConfig

# Load configuration
config = ServiceConfig.from_yaml('configs/config.yaml')

# Create pipeline
with ImageEmbeddingPipeline(config) as pipeline:

    # Create a collection
    pipeline.create_collection(
        name="my_images",
        dim=512,
        description="My image embeddings"
    )

    # Insert images
    image_paths = [
        "/path/to/image1.jpg",
        "/path/to/image2.jpg",
        "https://example.com/image3.jpg",  # URLs supported!
    ]

    ids = ["img_1", "img_2", "img_3"]
    metadata = [
        {"category": "nature", "source": "local"},
        {"category": "urban", "source": "local"},
        {"category": "portrait", "source": "web"},
    ]

    pipeline.insert_images(
        inputs=image_paths,
        ids=ids,
        metadata=metadata,
        collection_name="my_images",
    )

    # Search for similar images
    results = pipeline.search_images(
        query_input="/path/to/query.jpg",
        topk=5,
        collection_name="my_images",
    )

    for result in results:
        print(f"ID: {result['id']}, Score: {result['score']:.4f}")
"""


def adapted(example: str, config: Path, photos: Path, url: str) -> str:
    replacements = {
        "from src.pipeline import ImageEmbeddingPipeline": "from embedding_pipeline import ImageEmbeddingPipeline",
        "from src.config import ServiceConfig": "from embedding_pipeline import ServiceConfig",
        "'configs/config.yaml'": repr(str(config)),
        '"/path/to/': f'"{photos}/',
        '"https://example.com/image3.jpg"': repr(url),
        "dim=512": "dim=1280",
    }
    for old, new in replacements.items():
        assert old in example, old
        example = example.replace(old, new)
    return example


@pytest.fixture(scope="module")
def deployment(stack, tmp_path_factory) -> Iterator[dict[str, Any]]:
    """Sample photos in a folder of their own, a local web server for the URL, and a YAML file: the stack's,
    with that folder allowed and the server's address reachable."""
    root = tmp_path_factory.mktemp("python_api")
    photos = root / "photos"
    photos.mkdir()
    flower = load_photo("flower")
    (photos / "image1.jpg").write_bytes(encode(flower, "JPEG", quality=92))
    (photos / "image2.jpg").write_bytes(encode(load_photo("china"), "JPEG", quality=92))
    (photos / "image3.jpg").write_bytes(encode(load_photo("astronaut"), "JPEG", quality=92))
    (photos / "query.jpg").write_bytes(altered_copies(flower)["flip"])
    assert stack.config_file is not None
    with TestServer(files_dir=photos) as web:
        config = root / "config.yaml"
        config.write_text(
            stack.config_file.read_text()
            + f"sources:\n  allowed_roots: ['{photos}']\n  private_allowlist: ['127.0.0.1:{web.port}']\n"
        )
        yield {"config": config, "photos": photos, "web": web, "url": web.url("files/image3.jpg")}


def test_the_original_specifications_example_runs(deployment):
    code = adapted(ORIGINAL_EXAMPLE, deployment["config"], deployment["photos"], deployment["url"])
    out = io.StringIO()
    namespace: dict[str, Any] = {"__name__": "__example__"}
    with contextlib.redirect_stdout(out):
        exec(compile(code, "original_example.py", "exec"), namespace)  # noqa: S102 - the example itself

    printed = re.findall(r"^ID: (\S+), Score: (-?[0-9.]+)$", out.getvalue(), re.M)
    assert len(printed) == 3, out.getvalue()  # topk 5, three images in the collection
    ids = [item_id for item_id, _ in printed]
    scores = [float(score) for _, score in printed]
    assert sorted(ids) == ["img_1", "img_2", "img_3"]
    assert ids[0] == "img_1", out.getvalue()  # the query is a mirrored copy of image1
    assert scores == sorted(scores, reverse=True) and scores[0] > 0.8 > scores[1], scores
    assert deployment["web"].requests("/files/image3.jpg") >= 1

    results = namespace["results"]
    best = results[0]
    assert best["uri"] == f"{deployment['photos']}/image1.jpg"
    assert best["metadata"] == {"category": "nature", "source": "local"}
    assert {r["id"]: r["metadata"]["source"] for r in results} == {"img_1": "local", "img_2": "local", "img_3": "web"}


def test_reports_refusals_filters_and_every_query_kind(deployment, stack):
    from embedding_pipeline import ImageEmbeddingPipeline, ServiceConfig
    from embedding_pipeline.collection_setup import DimensionMismatch

    config = ServiceConfig.from_yaml(deployment["config"])
    photos: Path = deployment["photos"]
    with ImageEmbeddingPipeline(config) as pipeline:
        with pytest.raises(DimensionMismatch, match="dim 512 .* 1280-d"):
            pipeline.create_collection(name="more_images", dim=512, description="the specification's dim")
        created = pipeline.create_collection(name="more_images", description="ours")
        assert created["created"] is True and created["dim"] == 1280
        assert pipeline.create_collection(name="more_images", dim=1280)["created"] is False

        report = pipeline.insert_images(
            inputs=[str(photos / "image2.jpg"), str(photos / "missing.jpg"), deployment["url"]],
            ids=["urban", "missing", "portrait"],
            metadata=[{"category": "urban"}, {"category": "none"}, {"category": "portrait"}],
            collection_name="more_images",
        )
        assert report["launched"] == "process" and report["status"] == "SUCCESS"
        assert (report["items"], report["ok"], report["failed"]) == (3, 2, 1), report
        by_id = {s["id"]: s for s in report["statuses"]}
        assert by_id["urban"]["status"] == "ok" and by_id["portrait"]["uri"] == deployment["url"]
        assert by_id["missing"]["status"] == "failed" and by_id["missing"]["error_kind"] == "not_found", by_id
        assert report["collection"] == "more_images" and report["drop"].startswith("python-")

        astronaut = load_photo("astronaut")
        for query in (astronaut, (photos / "image3.jpg").read_bytes(), photos / "image3.jpg", deployment["url"]):
            hits = pipeline.search_images(query, topk=2, collection_name="more_images")
            assert [h["id"] for h in hits][0] == "portrait"
            assert hits[0]["score"] >= hits[-1]["score"]
        from PIL import Image

        hits = pipeline.search_images(
            Image.fromarray(astronaut),
            topk=5,
            collection_name="more_images",
            filter_expr='metadata["category"] == "urban"',
        )
        assert [h["id"] for h in hits] == ["urban"]
