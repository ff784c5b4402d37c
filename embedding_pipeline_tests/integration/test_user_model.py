"""The user's own ONNX model (``triton.model_path``) served by the real bundled Triton, end to end.

This module starts its own stack — a fresh state directory, free ports, Triton serving a tiny FP32 NCHW model
built here, milvus-lite — with ``preprocess.mean``/``std`` set, ingests a drop of real photos through the real
Dagster job, and checks the stored vectors against ONNX Runtime run in this process on the tensors the
pipeline's own preprocessor makes. It then swaps the model file (the running server reloads it), switches to a
UINT8 NHWC model, and feeds the server bad files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import yaml

from embedding_pipeline.index.client import ImageIndex
from embedding_pipeline.orchestration import runs
from embedding_pipeline.preprocess.preprocessor import for_model, from_settings
from embedding_pipeline.preprocess.spec import TensorSpec
from embedding_pipeline.retrieval import search
from embedding_pipeline.runtime import processes
from embedding_pipeline.runtime.processes import free_ports
from embedding_pipeline.serving.client import TritonEmbedder
from embedding_pipeline.serving.models import file_sha256
from embedding_pipeline.serving.repository import RepositoryError
from embedding_pipeline.serving.server import PROCESS_NAME, start_triton
from embedding_pipeline.settings import Settings
from embedding_pipeline.sources.samples import load_photo
from embedding_pipeline_tests import tiny_model
from embedding_pipeline_tests.integration.conftest import running_stack, write_config

pytestmark = pytest.mark.integration

MEAN = (0.5, 0.45, 0.4)
STD = (0.25, 0.2, 0.3)
PHOTOS = ["chelsea", "coffee", "astronaut", "rocket", "china", "flower"]
DROP = "own-model-photos"


def _with_model(settings: Settings, model_path: Path) -> Settings:
    return settings.model_copy(update={"triton": settings.triton.model_copy(update={"model_path": model_path})})


@pytest.fixture(scope="module")
def own_stack(tmp_path_factory) -> Iterator[Settings]:
    """Triton serving the tiny FP32 NCHW model, and milvus-lite, in a home of their own; stopped at the end."""
    home = tmp_path_factory.mktemp("own_model_home")
    model = tiny_model.write_fp32_nchw_model(home / "models" / "tiny_fp32_nchw.onnx")
    config = write_config(home)
    data = yaml.safe_load(config.read_text())
    data["triton"]["model_path"] = str(model)
    data["preprocess"] = {"mean": list(MEAN), "std": list(STD)}
    config.write_text(yaml.safe_dump(data))
    with running_stack(home, config) as settings:
        yield settings


@pytest.fixture(scope="module")
def photo_drop(tmp_path_factory) -> Path:
    """A folder of JPEG photos with a manifest giving each its name as id."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("photos") / DROP
    folder.mkdir()
    rows = []
    for name in PHOTOS:
        Image.fromarray(load_photo(name)).convert("RGB").save(folder / f"{name}.jpg", quality=92)
        rows.append({"id": name, "uri": f"{name}.jpg"})
    (folder / "manifest.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder


@pytest.fixture(scope="module")
def ingested(own_stack, photo_drop) -> dict:
    summary = runs.ingest(own_stack, photo_drop, DROP)
    assert summary["success"], summary
    return summary


def _served(settings: Settings) -> TritonEmbedder:
    return TritonEmbedder(settings.triton.url, settings.triton.model_name)


def test_the_server_describes_the_own_model(own_stack):
    with _served(own_stack) as embedder:
        spec = embedder.input_spec()
    assert (spec.name, spec.datatype, spec.shape) == ("image", "FP32", (3, 64, 64))
    assert (spec.output_name, spec.output_dim) == ("embedding", tiny_model.DIM)
    served = own_stack.paths.model_repository / own_stack.triton.model_name / "1" / "model.onnx"
    assert served.read_bytes() == own_stack.triton.model_path.read_bytes()


def test_ingested_vectors_equal_onnxruntime_on_the_pipelines_own_tensors(own_stack, photo_drop, ingested):
    assert (ingested["ok"], ingested["failed"]) == (len(PHOTOS), 0)
    sources = [(photo_drop / f"{name}.jpg").read_bytes() for name in PHOTOS]

    # The tensors the pipeline's preprocessor makes for this model: FP32 NCHW, normalised with the given mean/std.
    prepared = for_model(own_stack, "FP32", (3, 64, 64)).prepare_all(sources)
    assert not any(prepared.errors)
    tensors = prepared.tensors
    assert tensors.dtype == np.float32 and tensors.shape == (len(PHOTOS), 3, 64, 64)
    # The same crop on the 0-1 scale without normalisation (mean 0, std 1), normalised here by hand.
    unit = TensorSpec.from_model_input("FP32", (3, 64, 64), mean=(0.0,), std=(1.0,))
    scaled = from_settings(own_stack, unit).prepare_all(sources).tensors
    mean, std = (np.array(v, np.float32).reshape(1, 3, 1, 1) for v in (MEAN, STD))
    np.testing.assert_allclose(tensors, (scaled - mean) / std, atol=1e-5)
    assert abs(float(scaled.mean()) - 0.5) < 0.3 and abs(float(tensors.mean())) < 2.0  # normalised, not 0-255

    reference = tiny_model.reference_embeddings(own_stack.triton.model_path, tensors)
    with ImageIndex(own_stack.milvus) as index:
        assert index.dimension() == tiny_model.DIM
        stored = index.vectors(PHOTOS)
    assert set(stored) == set(PHOTOS)
    for k, name in enumerate(PHOTOS):
        assert stored[name].shape == (tiny_model.DIM,)
        assert np.max(np.abs(stored[name] - reference[k])) <= 1e-5, name


def test_search_by_an_ingested_image_finds_it_first(own_stack, photo_drop, ingested):
    for name in ("chelsea", "china"):
        hits = search(photo_drop / f"{name}.jpg", top_k=3, settings=own_stack)
        assert hits[0]["id"] == name, hits
        assert hits[0]["score"] > 0.999


def test_a_changed_model_file_is_reloaded_by_the_running_server(own_stack, tmp_path):
    model = own_stack.triton.model_path
    before = processes.read(own_stack.paths.run, PROCESS_NAME)
    batch = np.random.default_rng(3).standard_normal((4, 3, 64, 64)).astype(np.float32)
    try:
        # Same tensors, other projection: the file changes, its tensor specs don't.
        staged = tiny_model.write_fp32_nchw_model(tmp_path / "next.onnx", seed=7)
        os.replace(staged, model)
        start_triton(own_stack)
        assert processes.read(own_stack.paths.run, PROCESS_NAME) == before  # reloaded, not restarted
        with _served(own_stack) as embedder:
            served = embedder.embed(batch)
        np.testing.assert_allclose(served, tiny_model.reference_embeddings(model, batch), atol=1e-5)
        config = (own_stack.paths.model_repository / own_stack.triton.model_name / "config.pbtxt").read_text()
        assert file_sha256(model) in config
    finally:
        os.replace(tiny_model.write_fp32_nchw_model(tmp_path / "back.onnx"), model)
        start_triton(own_stack)


def test_a_uint8_nhwc_model_is_fed_raw_pixels(own_stack, photo_drop, tmp_path):
    nhwc = tiny_model.write_uint8_nhwc_model(tmp_path / "tiny_uint8_nhwc.onnx")
    settings = _with_model(own_stack, nhwc)
    sources = [(photo_drop / f"{name}.jpg").read_bytes() for name in PHOTOS]
    try:
        start_triton(settings)
        with _served(settings) as embedder:
            spec = embedder.input_spec()
            assert (spec.datatype, spec.shape) == ("UINT8", (64, 64, 3))
            prepared = for_model(settings, spec.datatype, spec.shape).prepare_all(sources)
            assert prepared.tensors.dtype == np.uint8 and prepared.tensors.shape == (len(PHOTOS), 64, 64, 3)
            served = embedder.embed(prepared.tensors)
        np.testing.assert_allclose(served, tiny_model.reference_embeddings(nhwc, prepared.tensors), atol=1e-5)
    finally:
        start_triton(own_stack)


def test_bad_model_files_fail_naming_the_file(own_stack, tmp_path):
    not_onnx = tmp_path / "notes.onnx"
    not_onnx.write_text("these are notes, not a model\n")
    two_inputs = tiny_model.write_two_input_model(tmp_path / "two_inputs.onnx")
    fixed_batch = tiny_model.write_fp32_nchw_model(tmp_path / "fixed_batch.onnx", batch=1)
    cases = {
        not_onnx: "is not an ONNX model that ONNX Runtime can load",
        two_inputs: "takes 2 inputs",
        fixed_batch: "fixed batch dimension",
    }
    for path, message in cases.items():
        # A running server keeps its model: the bad file is refused before the repository is touched.
        with pytest.raises(RepositoryError, match=message) as info:
            start_triton(_with_model(own_stack, path))
        assert str(path) in str(info.value)
    with _served(own_stack) as embedder:
        assert embedder.input_spec().output_dim == tiny_model.DIM

    # A server about to start refuses the file too, and nothing is left running.
    port, grpc, metrics = free_ports(3)
    home = tmp_path / "fresh_home"
    fresh = own_stack.model_copy(
        update={
            "home": home,
            "triton": own_stack.triton.model_copy(
                update={
                    "url": f"127.0.0.1:{port}",
                    "grpc_port": grpc,
                    "metrics_port": metrics,
                    "model_path": two_inputs,
                }
            ),
        }
    )
    with pytest.raises(RepositoryError, match=f"{two_inputs} takes 2 inputs"):
        start_triton(fresh)
    assert processes.read(fresh.paths.run, PROCESS_NAME) is None
