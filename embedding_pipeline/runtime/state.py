"""Where everything the pipeline keeps on disk lives: one state directory.

Environments, the exported model, the Triton model repository, Milvus data, the Dagster home, drops, Arrow
outputs, logs and pid files are all under ``EMBEDDING_PIPELINE_HOME`` (default ``./.embedding_pipeline``), so a
checkout can be wiped or moved by deleting one folder.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

HOME_ENV = "EMBEDDING_PIPELINE_HOME"
CACHE_ENV = "EMBEDDING_PIPELINE_CACHE"
DEFAULT_HOME = ".embedding_pipeline"


def state_home() -> Path:
    """The state directory, absolute, so child processes started elsewhere agree on it."""
    return Path(os.environ.get(HOME_ENV) or DEFAULT_HOME).expanduser().resolve()


def cache_home(root: Path) -> Path:
    """Rebuildable artefacts (environments, exported models): ``$EMBEDDING_PIPELINE_CACHE`` or ``<home>/cache``.

    Kept apart from data so that tests and throw-away homes can share one set of environments.
    """
    value = os.environ.get(CACHE_ENV)
    return Path(value).expanduser().resolve() if value else root / "cache"


def private_state_dir(root: Path) -> Path:
    """Create the state directory readable by its owner only (0700): it holds the Milvus data, the Dagster
    instance, logs and downloaded images. An existing one is narrowed to 0700 too."""
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    if root.stat().st_mode & 0o077:
        os.chmod(root, 0o700)
    return root


@dataclass(frozen=True)
class StatePaths:
    root: Path

    @classmethod
    def from_env(cls) -> "StatePaths":
        return cls(state_home())

    @property
    def cache(self) -> Path:
        return cache_home(self.root)

    @property
    def envs(self) -> Path:
        """Virtual environments of the model build and of the Triton server."""
        return self.cache / "envs"

    @property
    def models(self) -> Path:
        """Built model artefacts (ONNX files), cached across runs."""
        return self.cache / "models"

    @property
    def triton(self) -> Path:
        return self.root / "triton"

    @property
    def model_repository(self) -> Path:
        return self.triton / "model_repository"

    @property
    def milvus_data(self) -> Path:
        return self.root / "milvus"

    @property
    def dagster_home(self) -> Path:
        return self.root / "dagster_home"

    @property
    def drops(self) -> Path:
        return self.root / "drops"

    @property
    def locks(self) -> Path:
        """Cross-process lock files (kept apart from data, which may live in a bucket)."""
        return self.root / "locks"

    @property
    def data(self) -> Path:
        """Asset outputs (manifests, tensor batches, embeddings), partitioned by drop."""
        return self.root / "data"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def run(self) -> Path:
        """Pid files of the processes the pipeline started."""
        return self.root / "run"

    @property
    def jax_cache(self) -> Path:
        return self.root / "jax_cache"
