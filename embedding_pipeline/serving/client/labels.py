"""Model labels stored with every vector, and finding the served model that built a collection."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from embedding_pipeline.serving.client.embedder import TritonEmbedder, _parameter
from embedding_pipeline.serving.client.errors import TritonClientError

if TYPE_CHECKING:
    from embedding_pipeline.serving.client.transport import _Transport
    from embedding_pipeline.settings import TritonSettings

_LABEL = re.compile(r"(?P<name>[^:@]+):(?P<version>[^@]*)(?:@(?P<artifact>[0-9a-fA-F]+))?")


@dataclass(frozen=True)
class ModelLabel:
    """A model label as stored with every vector: ``<name>:<version>`` plus ``@<12 hex>`` of the served file."""

    name: str
    version: str
    artifact: str = ""

    @classmethod
    def parse(cls, label: str) -> "ModelLabel":
        match = _LABEL.fullmatch(label.strip())
        if not match:
            raise ValueError(f"not a model label: {label!r} (expected <name>:<version>[@<sha256 prefix>])")
        version = match.group("version")
        return cls(match.group("name"), "" if version == "?" else version, (match.group("artifact") or "").lower())


def same_model(a: str, b: str) -> bool:
    """Whether two labels name the same model: the same file when both record one (whatever name serves it),
    else the same name and version."""
    la, lb = ModelLabel.parse(a), ModelLabel.parse(b)
    if la.artifact and lb.artifact:
        return la.artifact == lb.artifact
    return (la.name, la.version) == (lb.name, lb.version)


def _config_reader(name: str, version: str) -> Callable[["_Transport"], dict[str, Any]]:
    """``transport.config(name, version)`` as an action for ``TritonEmbedder._call``, bound to these values."""
    return lambda t: t.config(name, version)


def embedder_for_label(triton: "TritonSettings", label: str) -> TritonEmbedder:
    """A client for the model that ``label`` names, as Triton at ``triton.url`` serves it; the caller closes it.

    The configured model when it is that model; else any ready model whose config records the same file
    (``artifact_sha256``: the bundled server keeps a replaced model loaded as ``<model_name>_<sha12>`` while a
    collection still uses it); else, for a label without a file hash, that name and version as they are (keep
    the old version served with Triton's version policy). Raises :class:`TritonClientError` saying which model is
    missing and what the server has.
    """
    wanted = ModelLabel.parse(label)
    embedder = TritonEmbedder.from_settings(triton)
    to_close: TritonEmbedder | None = embedder
    try:
        embedder.wait_ready()
        if same_model(embedder.model_version_label(), label):
            to_close = None  # the configured model: handed to the caller, not closed here
            return embedder
        index = embedder._call(lambda t: t.repository_index(), "listing the model repository")
        ready = [e for e in index if str(e.get("state", "")).upper() == "READY" and e.get("name")]
        for entry in ready:
            name, version = str(entry["name"]), str(entry.get("version", ""))
            if wanted.artifact:
                config = embedder._call(_config_reader(name, version), f"reading the config of {name!r}")
                if not _parameter(config, "artifact_sha256").lower().startswith(wanted.artifact):
                    continue
            elif (name, version) != (wanted.name, wanted.version or version):
                continue
            return TritonEmbedder.from_settings(
                triton.model_copy(update={"model_name": name, "model_version": version})
            )
        served = ", ".join(sorted({str(e["name"]) for e in ready})) or "no ready model"
    finally:
        if to_close is not None:
            to_close.close()
    raise TritonClientError(
        f"the collection search uses was built by model {label}, which Triton at {triton.url} does not "
        f"serve (ready: {served}). Serve that model again, or re-embed every drop with the current model and "
        "switch search to its collection (embedding-pipeline reembed, then embedding-pipeline models switch)"
    )
