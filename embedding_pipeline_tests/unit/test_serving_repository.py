"""The Triton model repository writer: both flavours' configs (parsed with Triton's own protobuf schema), file
layout, idempotence, the checks on what models the pipeline can serve, and the ``model-repository`` command on
small ONNX files built here. No server is started."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from embedding_pipeline.serving.repository import (
    MODEL_TEMPLATE,
    ModelSpec,
    RepositoryError,
    TensorSpec,
    check_image_embedder,
    inspect_onnx,
    ort_type_to_triton,
    preferred_batch_sizes,
    render_config,
    render_onnxruntime_config,
    write_model_repository,
)
from embedding_pipeline_tests import tiny_model

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


# -- the onnxruntime flavour, checked against Triton's own ModelConfig message -----------------------------------


def _parse(text: str):
    """config.pbtxt text parsed into Triton's ``ModelConfig`` protobuf (fails on any field Triton doesn't know)."""
    # A hard dependency (tritonclient[grpc]): imported, never skipped.
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(text, model_config_pb2.ModelConfig()), model_config_pb2


def test_onnxruntime_flavour_config_is_a_valid_gpu_model_config():
    config, pb = _parse(render_onnxruntime_config("tiny", SPEC, max_batch_size=32, instances=2))
    assert config.name == "tiny"
    assert config.platform == "onnxruntime_onnx" and config.backend == ""
    assert config.max_batch_size == 32
    (image,) = config.input
    assert (image.name, image.data_type, list(image.dims)) == ("pixels", pb.TYPE_UINT8, [64, 48, 3])
    (vector,) = config.output
    assert (vector.name, vector.data_type, list(vector.dims)) == ("vector", pb.TYPE_FP32, [16])
    assert list(config.dynamic_batching.preferred_batch_size) == [8, 16, 32]
    assert 0 < config.dynamic_batching.max_queue_delay_microseconds <= 1000
    (group,) = config.instance_group
    assert group.kind == pb.ModelInstanceGroup.KIND_GPU and group.count == 2
    assert not config.optimization.execution_accelerators.gpu_execution_accelerator


def test_onnxruntime_flavour_cpu_and_tensorrt_options():
    config, pb = _parse(render_onnxruntime_config("tiny", SPEC, max_batch_size=8, gpu=False))
    assert config.instance_group[0].kind == pb.ModelInstanceGroup.KIND_CPU
    assert list(config.dynamic_batching.preferred_batch_size) == [2, 4, 8]

    config, _ = _parse(
        render_onnxruntime_config(
            "tiny", SPEC, accelerator="tensorrt", tensorrt_precision="FP32", parameters={"artifact_sha256": "abc"}
        )
    )
    (accelerator,) = config.optimization.execution_accelerators.gpu_execution_accelerator
    assert accelerator.name == "tensorrt"
    assert accelerator.parameters["precision_mode"] == "FP32"
    assert config.parameters["artifact_sha256"].string_value == "abc"

    with pytest.raises(RepositoryError, match="GPU"):
        render_onnxruntime_config("tiny", SPEC, gpu=False, accelerator="tensorrt")
    with pytest.raises(RepositoryError, match="accelerator"):
        render_onnxruntime_config("tiny", SPEC, accelerator="openvino")
    with pytest.raises(RepositoryError, match="instance count"):
        render_onnxruntime_config("tiny", SPEC, instances=0)


def test_python_flavour_config_is_a_valid_model_config():
    config, pb = _parse(render_config("tiny", SPEC, max_batch_size=4, instances=3, parameters={"artifact_sha256": "x"}))
    assert config.backend == "python" and config.platform == ""
    assert config.dynamic_batching.max_queue_delay_microseconds == 0
    assert config.instance_group[0].kind == pb.ModelInstanceGroup.KIND_CPU and config.instance_group[0].count == 3
    assert config.parameters["intra_op_num_threads"].string_value == "2"
    assert config.parameters["artifact_sha256"].string_value == "x"


@pytest.mark.parametrize("max_batch, expected", [(1, [1]), (6, [1, 3, 6]), (32, [8, 16, 32]), (64, [16, 32, 64])])
def test_preferred_batch_sizes_follow_max_batch_size(max_batch, expected):
    assert preferred_batch_sizes(max_batch) == expected


def test_flavours_share_the_onnx_file_and_switch_cleanly(tmp_path, onnx_file):
    repo = tmp_path / "repo"
    write_model_repository(repo, "tiny", onnx_file, SPEC, flavour="python")
    version_dir = repo / "tiny" / "1"
    assert (version_dir / "model.py").is_file()

    assert write_model_repository(repo, "tiny", onnx_file, SPEC, flavour="onnxruntime", gpu=False) is True
    # The ONNX Runtime backend needs only model.onnx in the version folder.
    assert sorted(p.name for p in version_dir.iterdir()) == ["model.onnx"]
    assert (version_dir / "model.onnx").read_bytes() == onnx_file.read_bytes()
    config, pb = _parse((repo / "tiny" / "config.pbtxt").read_text())
    assert config.platform == "onnxruntime_onnx" and config.instance_group[0].kind == pb.ModelInstanceGroup.KIND_CPU
    assert write_model_repository(repo, "tiny", onnx_file, SPEC, flavour="onnxruntime", gpu=False) is False

    with pytest.raises(RepositoryError, match="unknown repository flavour 'tensorflow'"):
        write_model_repository(repo, "tiny", onnx_file, SPEC, flavour="tensorflow")


# -- what the pipeline can serve: checks on the model's tensors ---------------------------------------------------

NCHW = ModelSpec((TensorSpec("image", "FP32", (-1, 3, 64, 64)),), (TensorSpec("embedding", "FP32", (-1, 32)),))


def _with(inputs=None, outputs=None) -> ModelSpec:
    return ModelSpec(tuple(inputs or NCHW.inputs), tuple(outputs or NCHW.outputs))


def test_image_models_in_either_layout_pass():
    check_image_embedder(NCHW, "/models/a.onnx", 32)
    check_image_embedder(_with(inputs=[TensorSpec("x", "UINT8", (-1, -1, -1, 3))]), "/models/b.onnx", 8)


@pytest.mark.parametrize(
    "spec, message",
    [
        (_with(inputs=[NCHW.inputs[0], TensorSpec("mask", "FP32", (-1, 64, 64))]), "takes 2 inputs .'image', 'mask'."),
        (_with(inputs=[TensorSpec("image", "FP32", (1, 3, 64, 64))]), "fixed batch dimension"),
        (_with(outputs=[TensorSpec("embedding", "FP32", (1, 32))]), "fixed batch dimension"),
        (_with(inputs=[TensorSpec("image", "INT64", (-1, 3, 64, 64))]), "INT64"),
        (_with(inputs=[TensorSpec("image", "FP32", (-1, 64, 64))]), r"\[batch, 3, height, width\]"),
        (_with(inputs=[TensorSpec("image", "FP32", (-1, 1, 64, 64))]), "NHWC"),
        (_with(outputs=[TensorSpec("embedding", "FP32", (-1, -1))]), "fixed size per image"),
        (_with(outputs=[TensorSpec("label", "INT64", (-1, 1))]), "float"),
        (ModelSpec(NCHW.inputs, ()), "no output"),
    ],
)
def test_models_the_pipeline_cannot_serve_are_refused_naming_the_file(spec, message):
    with pytest.raises(RepositoryError, match=message) as info:
        check_image_embedder(spec, "/models/mine.onnx", 32)
    assert "/models/mine.onnx" in str(info.value)


def test_batching_is_required():
    with pytest.raises(RepositoryError, match="max_batch_size must be >= 1"):
        check_image_embedder(NCHW, "m.onnx", 0)


# -- real ONNX files: inspection, the user's model, the model-repository command ---------------------------------


@pytest.fixture()
def fake_serving_env(monkeypatch, tmp_path):
    """A fake of the serving environment: this interpreter, which has onnxruntime (test extra), inspects models,
    so no environment is built. The state directory is a temporary one."""
    from embedding_pipeline.serving import models

    monkeypatch.setenv("EMBEDDING_PIPELINE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("TRITON_MODEL_PATH", raising=False)
    monkeypatch.setattr(models, "ensure_env", lambda paths, name: Path(sys.executable))
    return Path(sys.executable)


def test_inspect_reads_the_tensor_specs_of_real_onnx_files(tmp_path):
    nchw = tiny_model.write_fp32_nchw_model(tmp_path / "nchw.onnx")
    nhwc = tiny_model.write_uint8_nhwc_model(tmp_path / "nhwc.onnx", dim=24)
    assert inspect_onnx(nchw, Path(sys.executable)) == ModelSpec(
        (TensorSpec("image", "FP32", (-1, 3, 64, 64)),), (TensorSpec("embedding", "FP32", (-1, 32)),)
    )
    spec = inspect_onnx(nhwc, Path(sys.executable))
    assert spec.inputs[0] == TensorSpec("pixels", "UINT8", (-1, 64, 64, 3))
    assert spec.outputs[0].shape == (-1, 24)


def test_inspect_names_a_file_that_is_not_onnx(tmp_path):
    bogus = tmp_path / "photo.onnx"
    bogus.write_bytes(b"\xff\xd8\xff\xe0 a JPEG, not a model")
    with pytest.raises(RepositoryError, match=r"photo\.onnx is not an ONNX model that ONNX Runtime can load: .+"):
        inspect_onnx(bogus, Path(sys.executable))
    with pytest.raises(RepositoryError, match=r"missing\.onnx does not exist"):
        inspect_onnx(tmp_path / "missing.onnx", Path(sys.executable))


def test_user_model_artifact_is_inspected_checked_and_identified(fake_serving_env, tmp_path):
    from embedding_pipeline.runtime.state import StatePaths
    from embedding_pipeline.serving.models import file_sha256, model_artifact

    paths = StatePaths(tmp_path / "home")
    path = tiny_model.write_fp32_nchw_model(tmp_path / "mine.onnx")
    artifact = model_artifact(paths, path, 32)
    assert artifact.path == path.resolve()
    assert artifact.spec.inputs[0].shape == (-1, 3, 64, 64)
    assert artifact.sha256 == file_sha256(path)
    assert artifact.parameters == {"artifact_source": str(path.resolve()), "artifact_sha256": artifact.sha256}

    two = tiny_model.write_two_input_model(tmp_path / "two.onnx")
    with pytest.raises(RepositoryError, match=r"two\.onnx takes 2 inputs"):
        model_artifact(paths, two, 32)
    fixed = tiny_model.write_fp32_nchw_model(tmp_path / "fixed.onnx", batch=1)
    with pytest.raises(RepositoryError, match=r"fixed\.onnx.*fixed batch dimension"):
        model_artifact(paths, fixed, 32)
    with pytest.raises(RepositoryError, match=r"TRITON_MODEL_PATH.*nowhere\.onnx does not exist"):
        model_artifact(paths, tmp_path / "nowhere.onnx", 32)


def test_model_repository_command_writes_both_flavours(fake_serving_env, tmp_path, capsys):
    from embedding_pipeline import cli

    model = tiny_model.write_uint8_nhwc_model(tmp_path / "mine.onnx")
    out = tmp_path / "repository"
    argv = ["model-repository", str(out), "--model", str(model), "--name", "mine", "--max-batch-size", "16"]
    assert cli.main([*argv, "--flavour", "onnxruntime", "--instances", "2", "--tensorrt"]) == 0
    assert "onnxruntime flavour" in capsys.readouterr().out
    config, pb = _parse((out / "mine" / "config.pbtxt").read_text())
    assert config.platform == "onnxruntime_onnx" and config.max_batch_size == 16
    assert (config.input[0].name, list(config.input[0].dims)) == ("pixels", [64, 64, 3])
    assert (config.output[0].name, list(config.output[0].dims)) == ("embedding", [32])
    assert config.instance_group[0].kind == pb.ModelInstanceGroup.KIND_GPU and config.instance_group[0].count == 2
    (tensorrt,) = config.optimization.execution_accelerators.gpu_execution_accelerator
    assert tensorrt.name == "tensorrt" and tensorrt.parameters["precision_mode"] == "FP16"
    assert (out / "mine" / "1" / "model.onnx").read_bytes() == model.read_bytes()

    assert cli.main([*argv, "--flavour", "python"]) == 0
    config, _ = _parse((out / "mine" / "config.pbtxt").read_text())
    assert config.backend == "python" and (out / "mine" / "1" / "model.py").is_file()


def test_model_repository_command_refuses_a_bad_model_naming_it(fake_serving_env, tmp_path, capsys):
    from embedding_pipeline import cli

    two = tiny_model.write_two_input_model(tmp_path / "two.onnx")
    assert cli.main(["model-repository", str(tmp_path / "out"), "--model", str(two)]) == 2
    assert f"{two} takes 2 inputs" in capsys.readouterr().err
    assert cli.main(["model-repository", str(tmp_path / "out"), "--model", str(tmp_path / "gone.onnx")]) == 2
    assert "--model is" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()

    good = tiny_model.write_fp32_nchw_model(tmp_path / "good.onnx")
    argv = ["model-repository", str(tmp_path / "out"), "--model", str(good), "--flavour", "onnxruntime"]
    assert cli.main([*argv, "--cpu", "--tensorrt"]) == 2
    assert "TensorRT runs on GPU instances only" in capsys.readouterr().err
