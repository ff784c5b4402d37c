"""A standard Triton model repository for one ONNX model served by the python backend.

Layout: ``<repo>/<model>/config.pbtxt``, ``<repo>/<model>/1/model.py`` (a copy of
:mod:`embedding_pipeline.serving.triton_python_model`) and ``<repo>/<model>/1/model.onnx``. Tensor names, types and
shapes come from the model (its sidecar, or the ONNX file inspected with ONNX Runtime in the serving environment),
never from constants here. Files are rewritten only when their content changes, so a running server that polls
the repository sees no spurious updates.
"""

from __future__ import annotations

import filecmp
import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

MODEL_TEMPLATE = Path(__file__).with_name("triton_python_model.py")

# ONNX Runtime element types -> Triton data types (the KServe v2 names).
_ORT_TO_TRITON = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}


class RepositoryError(ValueError):
    """The model cannot be described in a Triton config (e.g. a fixed batch dimension)."""


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output: Triton datatype name (``"UINT8"``) and full shape, -1 for dynamic dims."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TensorSpec":
        return cls(str(data["name"]), str(data["datatype"]).upper(), tuple(int(d) for d in data["shape"]))


@dataclass(frozen=True)
class ModelSpec:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ModelSpec":
        """From ``{"inputs": [{name, datatype, shape}], "outputs": [...]}`` (the model sidecar's format)."""
        return cls(
            tuple(TensorSpec.from_dict(item) for item in data["inputs"]),
            tuple(TensorSpec.from_dict(item) for item in data["outputs"]),
        )


def ort_type_to_triton(ort_type: str) -> str:
    try:
        return _ORT_TO_TRITON[ort_type]
    except KeyError:
        raise RepositoryError(f"ONNX element type {ort_type} has no Triton equivalent") from None


_INSPECT = """
import json, sys
import onnxruntime as ort
s = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
d = lambda t: {"name": t.name, "type": t.type, "shape": [x if isinstance(x, int) else -1 for x in t.shape]}
print(json.dumps({"inputs": [d(t) for t in s.get_inputs()], "outputs": [d(t) for t in s.get_outputs()]}))
"""


def inspect_onnx(onnx_path: Path, python: Path) -> ModelSpec:
    """Read tensor specs from an ONNX file with ONNX Runtime run by ``python`` (the pipeline has no ``onnx``)."""
    result = subprocess.run(
        [str(python), "-I", "-c", _INSPECT, str(onnx_path)], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise RepositoryError(f"cannot inspect {onnx_path} with ONNX Runtime:\n{result.stderr[-2000:]}")
    raw = json.loads(result.stdout)

    def convert(items: list[dict[str, Any]]) -> tuple[TensorSpec, ...]:
        return tuple(TensorSpec(i["name"], ort_type_to_triton(i["type"]), tuple(i["shape"])) for i in items)

    return ModelSpec(convert(raw["inputs"]), convert(raw["outputs"]))


def _config_dims(tensor: TensorSpec, max_batch_size: int) -> tuple[int, ...]:
    if max_batch_size == 0:
        return tensor.shape
    if not tensor.shape or tensor.shape[0] != -1:
        raise RepositoryError(
            f"tensor {tensor.name!r} has shape {list(tensor.shape)}: batching (max_batch_size > 0) needs a dynamic "
            "first dimension; export the model with a dynamic batch axis or use max_batch_size 0"
        )
    return tensor.shape[1:]


def _tensor_block(tensor: TensorSpec, max_batch_size: int) -> str:
    data_type = "TYPE_STRING" if tensor.datatype == "BYTES" else f"TYPE_{tensor.datatype}"
    dims = ", ".join(str(d) for d in _config_dims(tensor, max_batch_size))
    return f'  {{\n    name: "{tensor.name}"\n    data_type: {data_type}\n    dims: [ {dims} ]\n  }}'


def render_config(
    model_name: str,
    spec: ModelSpec,
    max_batch_size: int = 32,
    intra_op_threads: int = 2,
    inter_op_threads: int = 1,
    parameters: Mapping[str, str] | None = None,
) -> str:
    """config.pbtxt text. Defaults are the best of a tuning grid on 2 cores: one instance, ORT 2 + 1 threads."""
    if max_batch_size < 0:
        raise RepositoryError("max_batch_size must be >= 0")
    params = {"intra_op_num_threads": str(intra_op_threads), "inter_op_num_threads": str(inter_op_threads)}
    params.update({key: str(value) for key, value in (parameters or {}).items()})
    lines = [
        f'name: "{model_name}"',
        'backend: "python"',
        f"max_batch_size: {max_batch_size}",
        "input [\n" + ",\n".join(_tensor_block(t, max_batch_size) for t in spec.inputs) + "\n]",
        "output [\n" + ",\n".join(_tensor_block(t, max_batch_size) for t in spec.outputs) + "\n]",
    ]
    if max_batch_size > 0:
        # No added delay: Triton still merges requests that queue while the model is busy.
        lines.append("dynamic_batching {\n  max_queue_delay_microseconds: 0\n}")
    # One instance: on 2 cores a second one oversubscribes the CPU that ORT's two threads already use.
    lines.append("instance_group [\n  {\n    kind: KIND_CPU\n    count: 1\n  }\n]")
    for key, value in params.items():
        lines.append(f'parameters {{\n  key: "{key}"\n  value: {{ string_value: {json.dumps(value)} }}\n}}')
    return "\n".join(lines) + "\n"


def write_model_repository(
    repo: Path,
    model_name: str,
    onnx_path: Path,
    spec: ModelSpec,
    max_batch_size: int = 32,
    intra_op_threads: int = 2,
    inter_op_threads: int = 1,
    parameters: Mapping[str, str] | None = None,
) -> bool:
    """Write ``<repo>/<model_name>`` for ``onnx_path``; returns True if any file changed."""
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", model_name) or model_name in {".", ".."}:
        raise RepositoryError(f"invalid model name {model_name!r}")
    if not spec.inputs or not spec.outputs:
        raise RepositoryError("the model must have at least one input and one output")
    config = render_config(model_name, spec, max_batch_size, intra_op_threads, inter_op_threads, parameters)
    model_dir = repo / model_name
    version_dir = model_dir / "1"
    version_dir.mkdir(parents=True, exist_ok=True)
    changed = _copy_if_changed(onnx_path, version_dir / "model.onnx")
    changed |= _copy_if_changed(MODEL_TEMPLATE, version_dir / "model.py")
    # The config goes last so a polling server never sees a config for files not yet in place.
    changed |= _write_if_changed(model_dir / "config.pbtxt", config)
    return changed


def _write_if_changed(path: Path, text: str) -> bool:
    try:
        if path.read_text() == text:
            return False
    except OSError:
        pass
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return True


def _copy_if_changed(source: Path, target: Path) -> bool:
    if target.is_file() and filecmp.cmp(source, target, shallow=False):
        return False
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.copyfile(source, tmp)
    os.replace(tmp, target)
    return True
