"""The model the local Triton serves: the default one, or the user's own ONNX file (``triton.model_path``).

The default model is a cached ONNX file exported once in the ``model-build`` environment. The export (torch, a few
hundred MB of environment) happens only when the cached file is missing, its sidecar does not match it, or the
export script's version changed; afterwards only ``model.onnx`` + its JSON sidecar are used, by ONNX Runtime
inside Triton.

A user's model is served as it is: its tensor specs are read by inspecting it with ONNX Runtime in the serving
environment, and it is checked to be something the pipeline can feed (one batched image input) and read (a
fixed-size float output), so a bad file fails here with its name rather than as a puzzling server error.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from embedding_pipeline.runtime.environments import ensure_env, file_lock, progress
from embedding_pipeline.runtime.state import StatePaths
from embedding_pipeline.serving import build_model
from embedding_pipeline.serving.repository import ModelSpec, RepositoryError, check_image_embedder, inspect_onnx

DEFAULT_MODEL_DIR = "efficientnet_lite0_uint8"
BUILD_SCRIPT = Path(build_model.__file__)


class ModelBuildError(RuntimeError):
    """The model export failed; the message carries the tail of its log."""


def default_model_path(paths: StatePaths) -> Path:
    return paths.models / DEFAULT_MODEL_DIR / "model.onnx"


def sidecar_path(onnx_path: Path) -> Path:
    return onnx_path.with_name(onnx_path.name + ".json")


def read_sidecar(onnx_path: Path) -> dict[str, Any] | None:
    """The JSON description written next to an exported model (name, version, tensor specs, sha256), or None."""
    try:
        data = json.loads(sidecar_path(onnx_path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def is_current(onnx_path: Path) -> bool:
    """True if the cached export exists, is intact, and was made by the current export script version."""
    info = read_sidecar(onnx_path)
    if info is None or info.get("version") != build_model.MODEL_VERSION or not onnx_path.is_file():
        return False
    return info.get("sha256") == file_sha256(onnx_path)


def ensure_default_model(paths: StatePaths) -> Path:
    """Path of the default model's ONNX file, exporting it first if the cache does not hold a current one."""
    target = default_model_path(paths)
    if is_current(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(target.parent / ".build.lock"):
        if not is_current(target):
            _export(paths, target)
    return target


def _export(paths: StatePaths, target: Path) -> None:
    python = ensure_env(paths, "model-build")
    paths.logs.mkdir(parents=True, exist_ok=True)
    log_file = paths.logs / "model-build.log"
    started = time.monotonic()
    progress(f"exporting the default model to {target} (log: {log_file})")
    with open(log_file, "w") as out:
        # -I keeps the caller's PYTHONPATH and current directory (this package) out of the build environment.
        code = subprocess.call(
            [str(python), "-I", str(BUILD_SCRIPT), "--output", str(target)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    if code != 0 or not is_current(target):
        tail = "\n".join(log_file.read_text(errors="replace").splitlines()[-25:])
        raise ModelBuildError(
            f"exporting the default model failed (exit code {code}). Last lines of {log_file}:\n{tail}"
        )
    progress(f"model exported in {time.monotonic() - started:.0f} s")


@dataclass(frozen=True)
class ModelArtifact:
    """An ONNX file to serve: its tensor specs, its content hash, and the ``parameters`` recorded in config.pbtxt
    (which say what is being served, so a running server can be checked against the configured file)."""

    path: Path
    spec: ModelSpec
    sha256: str
    parameters: dict[str, str] = field(default_factory=dict)


def default_artifact(paths: StatePaths) -> ModelArtifact:
    """The default model (exported first if needed), described by its sidecar."""
    onnx_path = ensure_default_model(paths)
    sidecar = read_sidecar(onnx_path) or {}
    sha256 = str(sidecar["sha256"])
    return ModelArtifact(
        onnx_path,
        ModelSpec.from_dict(sidecar),
        sha256,
        {"artifact_version": str(sidecar["version"]), "artifact_sha256": sha256},
    )


MODEL_PATH_SETTING = "triton.model_path (TRITON_MODEL_PATH)"


def user_model_file(model_path: Path, origin: str = MODEL_PATH_SETTING) -> Path:
    """``model_path`` made absolute; raises naming where it came from and the file if there is no such file."""
    path = Path(model_path).expanduser().resolve()
    if not path.is_file():
        raise RepositoryError(f"{origin} is {model_path}, but {path} does not exist or is not a file")
    return path


def user_artifact(paths: StatePaths, model_path: Path, origin: str = MODEL_PATH_SETTING) -> ModelArtifact:
    """The user's ONNX file, inspected with ONNX Runtime in the serving environment (built first if needed)."""
    path = user_model_file(model_path, origin)
    sha256 = file_sha256(path)
    spec = inspect_onnx(path, ensure_env(paths, "serving"))
    return ModelArtifact(path, spec, sha256, {"artifact_source": str(path), "artifact_sha256": sha256})


def model_artifact(
    paths: StatePaths, model_path: Path | None, max_batch_size: int, origin: str = MODEL_PATH_SETTING
) -> ModelArtifact:
    """The model to serve — ``model_path`` if given, else the default — checked to suit the pipeline. ``origin``
    names where ``model_path`` came from, for the error message if the file is missing."""
    artifact = user_artifact(paths, model_path, origin) if model_path else default_artifact(paths)
    check_image_embedder(artifact.spec, artifact.path, max_batch_size)
    return artifact


def configured_sha256(paths: StatePaths, model_path: Path | None) -> str:
    """The content hash of the model that should be served, without inspecting it (cheap enough to ask often)."""
    if model_path:
        return file_sha256(user_model_file(model_path))
    return str((read_sidecar(ensure_default_model(paths)) or {}).get("sha256", ""))
