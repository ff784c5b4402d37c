"""A standard Triton model repository for one ONNX model, in two flavours generated from the same file.

* ``python``: ``<repo>/<model>/config.pbtxt``, ``<repo>/<model>/1/model.py`` (a copy of
  :mod:`embedding_pipeline.serving.triton_python_model`, which runs the file with ONNX Runtime) and
  ``<repo>/<model>/1/model.onnx``. Runs on the bundled server, which has only the python backend.
* ``onnxruntime``: ``config.pbtxt`` with ``platform: "onnxruntime_onnx"`` and ``<repo>/<model>/1/model.onnx``, for
  the ONNX Runtime backend of NVIDIA's Triton containers: GPU instances (or CPU), dynamic batching with preferred
  batch sizes, optionally TensorRT.

Tensor names, types and shapes come from the model (its sidecar, or the ONNX file inspected with ONNX Runtime in
the serving environment), never from constants here. Files are rewritten only when their content changes, so a
running server that polls the repository sees no spurious updates.
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

PYTHON, ONNXRUNTIME = "python", "onnxruntime"
FLAVOURS = (PYTHON, ONNXRUNTIME)
# What the preprocessing can produce (see preprocess/spec.py) and what the client can turn into float32 vectors.
IMAGE_DATATYPES = ("UINT8", "FP32", "FP16")
EMBEDDING_DATATYPES = ("FP16", "FP32", "FP64")
TENSORRT_PRECISIONS = ("FP32", "FP16")

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
    """Read tensor specs from an ONNX file with ONNX Runtime run by ``python`` (the pipeline has no ``onnx``).

    Raises :class:`RepositoryError` naming the file if it is missing or not a model ONNX Runtime can load.
    """
    if not onnx_path.is_file():
        raise RepositoryError(f"ONNX model {onnx_path} does not exist (or is not a file)")
    result = subprocess.run(
        [str(python), "-I", "-c", _INSPECT, str(onnx_path)], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        # The last line of the traceback is ONNX Runtime's own reason ("Protobuf parsing failed", ...).
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        reason = lines[-1] if lines else f"exit code {result.returncode}"
        raise RepositoryError(f"{onnx_path} is not an ONNX model that ONNX Runtime can load: {reason}")
    raw = json.loads(result.stdout)

    def convert(items: list[dict[str, Any]]) -> tuple[TensorSpec, ...]:
        return tuple(TensorSpec(i["name"], ort_type_to_triton(i["type"]), tuple(i["shape"])) for i in items)

    try:
        return ModelSpec(convert(raw["inputs"]), convert(raw["outputs"]))
    except RepositoryError as exc:
        raise RepositoryError(f"model {onnx_path}: {exc}") from None


def check_image_embedder(spec: ModelSpec, source: Path | str, max_batch_size: int) -> None:
    """Raise :class:`RepositoryError` naming ``source`` unless the pipeline can feed this model and read its output.

    The pipeline sends one batched image tensor (UINT8/FP32/FP16, NCHW or NHWC with 3 channels) and reads the
    first output as the embedding (a fixed number of float values per image).
    """
    what = f"model {source}"
    if max_batch_size < 1:
        raise RepositoryError(f"{what}: the pipeline sends batches, so max_batch_size must be >= 1")
    if len(spec.inputs) != 1:
        names = ", ".join(repr(t.name) for t in spec.inputs) or "none"
        raise RepositoryError(
            f"{what} takes {len(spec.inputs)} inputs ({names}); an image embedding model must take exactly one "
            "image tensor"
        )
    image = spec.inputs[0]
    if image.datatype not in IMAGE_DATATYPES:
        raise RepositoryError(
            f"{what}: input {image.name!r} is {image.datatype}; the preprocessing produces {', '.join(IMAGE_DATATYPES)}"
        )
    if len(image.shape) != 4 or 3 not in (image.shape[1], image.shape[3]):
        raise RepositoryError(
            f"{what}: input {image.name!r} has shape {list(image.shape)}; an image model takes "
            "[batch, 3, height, width] (NCHW) or [batch, height, width, 3] (NHWC)"
        )
    if not spec.outputs:
        raise RepositoryError(f"{what} has no output")
    for tensor in (image, spec.outputs[0]):
        if not tensor.shape or tensor.shape[0] != -1:
            raise RepositoryError(
                f"{what}: {tensor.name!r} has a fixed batch dimension ({list(tensor.shape)}); with batching on "
                "the first dimension must be dynamic: export the model with a dynamic batch axis "
                "(e.g. torch.onnx.export(..., dynamic_axes={name: {0: 'batch'}}))"
            )
    embedding = spec.outputs[0]
    if embedding.datatype not in EMBEDDING_DATATYPES:
        raise RepositoryError(
            f"{what}: its first output {embedding.name!r} is {embedding.datatype}; the embedding must be a float "
            f"tensor ({', '.join(EMBEDDING_DATATYPES)})"
        )
    if len(embedding.shape) < 2 or any(d < 1 for d in embedding.shape[1:]):
        raise RepositoryError(
            f"{what}: its first output {embedding.name!r} has shape {list(embedding.shape)}; the embedding needs "
            "a fixed size per image, e.g. [batch, 512]"
        )


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


def _tensors(spec: ModelSpec, max_batch_size: int) -> list[str]:
    if max_batch_size < 0:
        raise RepositoryError("max_batch_size must be >= 0")
    return [
        f"max_batch_size: {max_batch_size}",
        "input [\n" + ",\n".join(_tensor_block(t, max_batch_size) for t in spec.inputs) + "\n]",
        "output [\n" + ",\n".join(_tensor_block(t, max_batch_size) for t in spec.outputs) + "\n]",
    ]


def _instances(kind: str, count: int) -> str:
    if count < 1:
        raise RepositoryError(f"the instance count must be >= 1, not {count}")
    return f"instance_group [\n  {{\n    kind: {kind}\n    count: {count}\n  }}\n]"


def _parameter(key: str, value: str) -> str:
    return f'parameters {{\n  key: "{key}"\n  value: {{ string_value: {json.dumps(value)} }}\n}}'


def render_config(
    model_name: str,
    spec: ModelSpec,
    max_batch_size: int = 32,
    intra_op_threads: int = 2,
    inter_op_threads: int = 1,
    parameters: Mapping[str, str] | None = None,
    instances: int = 1,
) -> str:
    """config.pbtxt of the ``python`` flavour. Defaults are the best of a tuning grid on 2 cores: one instance,
    ORT 2 + 1 threads."""
    params = {"intra_op_num_threads": str(intra_op_threads), "inter_op_num_threads": str(inter_op_threads)}
    params.update({key: str(value) for key, value in (parameters or {}).items()})
    lines = [f'name: "{model_name}"', 'backend: "python"', *_tensors(spec, max_batch_size)]
    if max_batch_size > 0:
        # No added delay: Triton still merges requests that queue while the model is busy.
        lines.append("dynamic_batching {\n  max_queue_delay_microseconds: 0\n}")
    # ONNX Runtime runs on the CPU inside the python backend. On 2 cores a second instance oversubscribes the CPU
    # that ORT's two threads already use, hence one by default.
    lines.append(_instances("KIND_CPU", instances))
    lines.extend(_parameter(key, value) for key, value in params.items())
    return "\n".join(lines) + "\n"


def preferred_batch_sizes(max_batch_size: int) -> list[int]:
    """Quarter, half and full ``max_batch_size`` (e.g. 8, 16, 32): batch sizes the scheduler aims for."""
    return sorted({size for size in (max_batch_size // 4, max_batch_size // 2, max_batch_size) if size > 0})


def render_onnxruntime_config(
    model_name: str,
    spec: ModelSpec,
    max_batch_size: int = 32,
    instances: int = 1,
    gpu: bool = True,
    accelerator: str | None = None,
    tensorrt_precision: str = "FP16",
    queue_delay_us: int = 100,
    parameters: Mapping[str, str] | None = None,
) -> str:
    """config.pbtxt of the ``onnxruntime`` flavour, for the ONNX Runtime backend of NVIDIA's Triton containers.

    ``accelerator="tensorrt"`` lets ONNX Runtime hand the graph to TensorRT (``tensorrt_precision`` FP16 or FP32),
    with the CUDA execution provider for what TensorRT cannot run; without it the CUDA provider runs everything.
    """
    if accelerator not in (None, "tensorrt"):
        raise RepositoryError(f"unknown execution accelerator {accelerator!r}; the choice is 'tensorrt' or none")
    if accelerator and not gpu:
        raise RepositoryError("TensorRT runs on GPU instances only: drop the CPU instance kind or the accelerator")
    if tensorrt_precision not in TENSORRT_PRECISIONS:
        raise RepositoryError(f"TensorRT precision must be one of {', '.join(TENSORRT_PRECISIONS)}")
    lines = [f'name: "{model_name}"', 'platform: "onnxruntime_onnx"', *_tensors(spec, max_batch_size)]
    if max_batch_size > 0:
        # A short wait lets concurrent requests fill a larger batch; on a GPU that is worth far more than 100 us.
        sizes = ", ".join(str(size) for size in preferred_batch_sizes(max_batch_size))
        lines.append(
            f"dynamic_batching {{\n  preferred_batch_size: [ {sizes} ]\n"
            f"  max_queue_delay_microseconds: {queue_delay_us}\n}}"
        )
    lines.append(_instances("KIND_GPU" if gpu else "KIND_CPU", instances))
    if accelerator == "tensorrt":
        lines.append(
            "optimization {\n  execution_accelerators {\n    gpu_execution_accelerator: [\n      {\n"
            '        name: "tensorrt"\n'
            f'        parameters {{ key: "precision_mode" value: "{tensorrt_precision}" }}\n'
            '        parameters { key: "max_workspace_size_bytes" value: "1073741824" }\n'
            "      }\n    ]\n  }\n}"
        )
    # The ONNX Runtime backend reads only the parameter keys it knows; these record where the model came from.
    lines.extend(_parameter(key, str(value)) for key, value in (parameters or {}).items())
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
    *,
    flavour: str = PYTHON,
    instances: int = 1,
    gpu: bool = True,
    accelerator: str | None = None,
    tensorrt_precision: str = "FP16",
) -> bool:
    """Write ``<repo>/<model_name>`` for ``onnx_path`` in the given flavour; returns True if any file changed.

    ``intra_op_threads``/``inter_op_threads`` apply to the ``python`` flavour (always CPU); ``gpu``,
    ``accelerator`` and ``tensorrt_precision`` to the ``onnxruntime`` flavour.
    """
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", model_name) or model_name in {".", ".."}:
        raise RepositoryError(f"invalid model name {model_name!r}")
    if flavour not in FLAVOURS:
        raise RepositoryError(f"unknown repository flavour {flavour!r}; choose one of {', '.join(FLAVOURS)}")
    if not spec.inputs or not spec.outputs:
        raise RepositoryError("the model must have at least one input and one output")
    if flavour == PYTHON:
        config = render_config(
            model_name, spec, max_batch_size, intra_op_threads, inter_op_threads, parameters, instances
        )
    else:
        config = render_onnxruntime_config(
            model_name, spec, max_batch_size, instances, gpu, accelerator, tensorrt_precision, parameters=parameters
        )
    model_dir = repo / model_name
    version_dir = model_dir / "1"
    version_dir.mkdir(parents=True, exist_ok=True)
    changed = _copy_if_changed(onnx_path, version_dir / "model.onnx")
    script = version_dir / "model.py"
    if flavour == PYTHON:
        changed |= _copy_if_changed(MODEL_TEMPLATE, script)
    elif script.exists():
        # Left over from the python flavour: the ONNX Runtime backend does not need it.
        script.unlink()
        changed = True
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
