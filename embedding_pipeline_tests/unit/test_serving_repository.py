"""The Triton model repository writer: config content, file layout, idempotence. No server, no ONNX needed."""

from __future__ import annotations

import os

import pytest

from embedding_pipeline.serving.repository import (
    MODEL_TEMPLATE,
    ModelSpec,
    RepositoryError,
    TensorSpec,
    ort_type_to_triton,
    render_config,
    write_model_repository,
)

SPEC = ModelSpec(
    inputs=(TensorSpec("pixels", "UINT8", (-1, 64, 48, 3)),),
    outputs=(TensorSpec("vector", "FP32", (-1, 16)),),
)


@pytest.fixture()
def onnx_file(tmp_path):
    path = tmp_path / "source" / "model.onnx"
    path.parent.mkdir()
    path.write_bytes(b"not really onnx, the writer only copies it")
    return path


def test_config_has_the_model_fields():
    text = render_config("tiny", SPEC, max_batch_size=8, intra_op_threads=3, inter_op_threads=1)
    assert 'name: "tiny"' in text
    assert 'backend: "python"' in text
    assert "max_batch_size: 8" in text
    assert 'name: "pixels"\n    data_type: TYPE_UINT8\n    dims: [ 64, 48, 3 ]' in text
    assert 'name: "vector"\n    data_type: TYPE_FP32\n    dims: [ 16 ]' in text
    assert "dynamic_batching {\n  max_queue_delay_microseconds: 0\n}" in text
    assert "kind: KIND_CPU" in text and "count: 1" in text
    assert 'key: "intra_op_num_threads"\n  value: { string_value: "3" }' in text
    assert 'key: "inter_op_num_threads"\n  value: { string_value: "1" }' in text


def test_extra_parameters_and_no_batching():
    text = render_config("tiny", SPEC, max_batch_size=0, parameters={"artifact_version": "v7"})
    assert "max_batch_size: 0" in text
    # Without batching the batch dimension is part of dims, and there is nothing to batch dynamically.
    assert "dims: [ -1, 64, 48, 3 ]" in text
    assert "dynamic_batching" not in text
    assert 'key: "artifact_version"\n  value: { string_value: "v7" }' in text


def test_fixed_batch_dimension_is_rejected_when_batching():
    fixed = ModelSpec((TensorSpec("x", "FP32", (1, 4)),), (TensorSpec("y", "FP32", (1, 2)),))
    with pytest.raises(RepositoryError, match="dynamic first dimension"):
        render_config("m", fixed, max_batch_size=4)


def test_layout_and_idempotence(tmp_path, onnx_file):
    repo = tmp_path / "repo"
    assert write_model_repository(repo, "tiny", onnx_file, SPEC, max_batch_size=4) is True
    model_dir = repo / "tiny"
    assert (model_dir / "1" / "model.onnx").read_bytes() == onnx_file.read_bytes()
    assert (model_dir / "1" / "model.py").read_text() == MODEL_TEMPLATE.read_text()
    assert "max_batch_size: 4" in (model_dir / "config.pbtxt").read_text()

    files = [model_dir / "config.pbtxt", model_dir / "1" / "model.py", model_dir / "1" / "model.onnx"]
    before = {f: os.stat(f).st_mtime_ns for f in files}
    assert write_model_repository(repo, "tiny", onnx_file, SPEC, max_batch_size=4) is False
    assert {f: os.stat(f).st_mtime_ns for f in files} == before

    # A changed setting rewrites the config only.
    assert write_model_repository(repo, "tiny", onnx_file, SPEC, max_batch_size=16) is True
    assert "max_batch_size: 16" in (model_dir / "config.pbtxt").read_text()
    assert os.stat(model_dir / "1" / "model.onnx").st_mtime_ns == before[model_dir / "1" / "model.onnx"]

    # A changed model file is copied again.
    onnx_file.write_bytes(b"a new export")
    assert write_model_repository(repo, "tiny", onnx_file, SPEC, max_batch_size=16) is True
    assert (model_dir / "1" / "model.onnx").read_bytes() == b"a new export"
    assert not [p for p in model_dir.rglob(".*.tmp")]


def test_spec_from_sidecar_dict():
    spec = ModelSpec.from_dict(
        {
            "inputs": [{"name": "image", "datatype": "uint8", "shape": [-1, 224, 224, 3]}],
            "outputs": [{"name": "embedding", "datatype": "FP32", "shape": [-1, 1280]}],
        }
    )
    assert spec.inputs[0] == TensorSpec("image", "UINT8", (-1, 224, 224, 3))
    assert spec.outputs[0].shape == (-1, 1280)


@pytest.mark.parametrize("name", ["", "a/b", "..", "x y"])
def test_bad_model_names_are_rejected(tmp_path, onnx_file, name):
    with pytest.raises(RepositoryError, match="invalid model name"):
        write_model_repository(tmp_path / "repo", name, onnx_file, SPEC)


def test_onnx_types_map_to_triton_names():
    assert ort_type_to_triton("tensor(uint8)") == "UINT8"
    assert ort_type_to_triton("tensor(float)") == "FP32"
    assert ort_type_to_triton("tensor(string)") == "BYTES"
    with pytest.raises(RepositoryError):
        ort_type_to_triton("seq(tensor(float))")
