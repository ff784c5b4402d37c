"""The one settings model: defaults < YAML file < environment variables.

The YAML file is ``$EMBEDDING_PIPELINE_CONFIG`` if set, else ``embedding_pipeline.yaml`` in the working directory
if present. Environment variables use the originally specified names (``TRITON_URL``, ``MILVUS_URI``/``MILVUS_HOST`` +
``MILVUS_PORT``, ...; full table: docs/configuration.md). Every consumer — Dagster resources, the CLI, the Python
search API, the service launcher — reads settings from here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar, Literal, Mapping
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from embedding_pipeline.runtime.objects import (
    ObjectError,
    ObjectPath,
    ObjectStore,
    StoreConfig,
    is_object_uri,
    split_uri,
)
from embedding_pipeline.runtime.state import StatePaths, state_home

CONFIG_ENV = "EMBEDDING_PIPELINE_CONFIG"
DEFAULT_CONFIG_FILE = "embedding_pipeline.yaml"


class ConfigError(ValueError):
    """The configuration (YAML file or environment) is invalid; the message says which key and why."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _ServerAddress:
    """Host, port and locality of a section whose server is named by one URL field (``_address_field``)."""

    _address_field: ClassVar[str]

    @property
    def host(self) -> str:
        return _host_port(getattr(self, self._address_field))[0]

    @property
    def port(self) -> int:
        return _host_port(getattr(self, self._address_field))[1]

    @property
    def is_local(self) -> bool:
        """A loopback address means the pipeline starts and stops the bundled server itself."""
        return self.host in _LOOPBACK


class TritonSettings(_Section, _ServerAddress):
    _address_field: ClassVar[str] = "url"

    url: str = Field("127.0.0.1:18000", description="Triton HTTP endpoint, host:port (TRITON_URL).")
    model_name: str = Field("image_embedder", description="Model to call (TRITON_MODEL_NAME).")
    model_version: str = Field("", description="Model version; empty means the server's latest.")
    timeout_s: float = Field(60.0, gt=0, description="Network timeout per request, seconds.")
    ready_timeout_s: float = Field(60.0, gt=0, description="How long to wait for server + model readiness.")
    grpc_port: int = Field(18001, description="gRPC port of the locally started server.")
    metrics_port: int = Field(18002, description="Metrics port of the locally started server.")
    max_batch_size: int = Field(32, ge=1, le=1024, description="max_batch_size of the generated model.")
    protocol: Literal["http", "grpc"] = Field(
        "http", description="Wire protocol (TRITON_PROTOCOL); gRPC talks to the same host on grpc_port."
    )
    concurrency: int = Field(2, ge=1, le=64, description="Inference requests in flight (TRITON_CONCURRENCY).")
    retries: int = Field(3, ge=0, le=20, description="Retries on connection errors and 5xx/unavailable.")
    retry_backoff_s: float = Field(0.5, ge=0, description="First retry delay; doubles per attempt.")
    shared_memory: Literal["auto", "on", "off"] = Field(
        "auto", description="Triton system shared memory: auto uses it for a server on this host, else the wire."
    )
    model_path: Path | None = Field(
        None,
        description="Your own ONNX model for the locally started server (TRITON_MODEL_PATH); default model if unset.",
    )


class MilvusSettings(_Section, _ServerAddress):
    _address_field: ClassVar[str] = "uri"

    uri: str = Field("http://127.0.0.1:19540", description="Milvus URI (MILVUS_URI, or MILVUS_HOST + MILVUS_PORT).")
    token: str = Field("", description="Token or user:password (MILVUS_TOKEN).")
    db_name: str = Field("", description="Database name; empty means the server's default.")
    collection: str = Field("image_embeddings", description="Collection name (MILVUS_COLLECTION).")
    embedding_dim: int | None = Field(
        None, description="Expected vector dimension (MILVUS_EMBEDDING_DIM); checked against the model's."
    )
    index_type: Literal["FLAT", "IVF_FLAT", "HNSW"] = "HNSW"
    metric_type: Literal["COSINE", "IP", "L2"] = "COSINE"
    index_params: dict[str, Any] = Field(default_factory=lambda: {"M": 16, "efConstruction": 256})
    search_params: dict[str, Any] = Field(default_factory=lambda: {"ef": 64})
    insert_batch_size: int = Field(1000, ge=1, description="Rows per upsert call.")
    user: str = Field("", description="User name (MILVUS_USER); with password, an alternative to the token.")
    password: str = Field("", description="Password (MILVUS_PASSWORD).")
    secure: bool = Field(False, description="Use TLS to the server (MILVUS_SECURE); https:// URIs imply it.")
    ca_pem_path: str = Field("", description="CA certificate to verify the server with (MILVUS_CA_PEM_PATH).")
    server_name: str = Field("", description="TLS server name when it differs from the URI's host.")
    consistency_level: Literal["Strong", "Session", "Bounded", "Eventually"] = Field(
        "Session", description="Collection consistency level (MILVUS_CONSISTENCY_LEVEL)."
    )
    filter_fields: dict[str, Literal["VARCHAR", "INT64", "DOUBLE", "BOOL"]] = Field(
        default_factory=dict,
        description="Metadata keys stored as typed, indexed scalar fields so filters on them are fast.",
    )
    lite_memtable_mb: int = Field(
        256,
        ge=16,
        le=65536,
        description="The embedded milvus-lite server keeps up to this many MiB of new rows in memory before it "
        "writes them as a segment (the pipeline also writes at the end of each drop). Larger: fewer, bigger segments, "
        "each indexed once; smaller: less memory while a big drop is written.",
    )


class SourceSettings(_Section):
    allowed_roots: list[Path] = Field(
        default_factory=list, description="Folders manifests may point into, besides the drop itself."
    )
    allowed_prefixes: list[str] = Field(
        default_factory=list,
        description="s3://bucket/prefix locations manifests may point into, besides the drop's own prefix.",
    )
    max_image_bytes: int = Field(50 * 1024 * 1024, ge=1024, description="Larger files and downloads are refused.")
    fetch_timeout_s: float = Field(20.0, gt=0, description="Connect/read timeout for URL downloads.")
    fetch_deadline_s: float = Field(
        300.0, gt=0, description="Wall-clock limit for one download, body included (a trickling server)."
    )
    fetch_retries: int = Field(3, ge=0, description="Retries on connection errors, read timeouts, 429 and 5xx.")
    fetch_workers: int = Field(4, ge=1, le=64, description="Downloads in flight.")
    allow_private_urls: bool = Field(
        False,
        description="Allow URLs to any address, including loopback/private/link-local ones (trusted intranets only).",
    )
    private_allowlist: list[str] = Field(
        default_factory=list,
        description="Non-public addresses URLs may reach anyway: IPs or CIDR networks, each optionally with a port "
        "('127.0.0.1:8080', '[::1]:8080', '10.0.0.0/8').",
    )
    fetch_proxy: str = Field(
        "",
        description="HTTP(S) proxy for URL downloads (environment proxy variables are ignored). With a proxy, the "
        "address policy is applied to the target host's own DNS answer before each request.",
    )

    @field_validator("allowed_roots")
    @classmethod
    def _roots(cls, value: list[Path]) -> list[Path]:
        checked = []
        for root in value:
            real = Path(os.path.realpath(Path(root).expanduser()))
            if not real.is_absolute() or real == Path(real.anchor) or len(real.parts) < 3:
                # "/", "/home", "/tmp": a manifest could then read nearly any file on the machine.
                raise ValueError(f"sources.allowed_roots: {root} is too broad; name a folder at least two levels deep")
            checked.append(real)
        return checked

    @field_validator("allowed_prefixes")
    @classmethod
    def _prefixes(cls, value: list[str]) -> list[str]:
        for prefix in value:
            try:
                bucket, key = split_uri(prefix)
            except ObjectError as exc:
                raise ValueError(f"sources.allowed_prefixes: {exc}") from None
        return [p.rstrip("/") for p in value]

    @field_validator("private_allowlist")
    @classmethod
    def _valid_allowlist(cls, entries: list[str]) -> list[str]:
        from embedding_pipeline.runtime.addresses import parse_entry

        for entry in entries:
            parse_entry(entry)  # raises ValueError naming the entry
        return [e.strip() for e in entries]

    @field_validator("fetch_proxy")
    @classmethod
    def _valid_proxy(cls, value: str) -> str:
        parts = urlsplit(value)
        if value and (parts.scheme not in ("http", "https") or not parts.hostname):
            raise ValueError(f"fetch_proxy must be an http:// or https:// URL with a host, not {value!r}")
        return value


class PreprocessSettings(_Section):
    image_size: int | tuple[int, int] | None = Field(
        None,
        description="Model input size, pixels (one side, or [height, width]). Default: the model's own input shape; "
        "only needed for models with dynamic spatial dimensions, and must agree with fixed ones.",
    )
    resize_size: int | None = Field(
        None, ge=8, description="Short side before the centre crop, pixels (crop policy); default image_size × 256/224."
    )
    resize_policy: Literal["crop", "pad"] = Field(
        "crop", description="crop: short side to resize_size, centre crop. pad: whole image, letterboxed."
    )
    mean: tuple[float, float, float] = Field(
        (0.485, 0.456, 0.406), description="Per-channel mean on the 0-1 scale (float model inputs only)."
    )
    std: tuple[float, float, float] = Field(
        (0.229, 0.224, 0.225), description="Per-channel std on the 0-1 scale (float model inputs only)."
    )
    pad_color: tuple[int, int, int] = Field((124, 116, 104), description="Fill for the pad policy (RGB 0-255).")
    background: tuple[int, int, int] = Field(
        (255, 255, 255), description="Transparent pixels are composited on this colour (RGB 0-255)."
    )
    max_pixels: int = Field(64_000_000, ge=1, description="Images with more pixels are refused (bomb guard).")
    allow_truncated: bool = Field(False, description="Decode truncated files (padded) instead of failing them.")
    batch_size: int = Field(32, ge=1, le=1024, description="Images per tensor batch (fixed: JAX compiles once).")
    decode_workers: int = Field(2, ge=1, le=64, description="Threads decoding images while the kernel runs.")

    @field_validator("image_size")
    @classmethod
    def _positive_size(cls, value: Any) -> Any:
        sides = (value,) if isinstance(value, int) else value or ()
        if any(not 8 <= side <= 4096 for side in sides):
            raise ValueError("image_size sides must be between 8 and 4096")
        return value

    @field_validator("std")
    @classmethod
    def _positive_std(cls, value: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(v <= 0 for v in value):
            raise ValueError("std values must be > 0")
        return value

    @field_validator("pad_color", "background")
    @classmethod
    def _rgb(cls, value: tuple[int, int, int]) -> tuple[int, int, int]:
        if any(not 0 <= v <= 255 for v in value):
            raise ValueError("colour components must be 0-255")
        return value

    @property
    def size(self) -> tuple[int, int] | None:
        """(height, width) if configured."""
        if self.image_size is None:
            return None
        if isinstance(self.image_size, int):
            return (self.image_size, self.image_size)
        return tuple(self.image_size)  # type: ignore[return-value]

    @model_validator(mode="after")
    def _resize_not_smaller_than_crop(self) -> "PreprocessSettings":
        if self.size is not None and self.resize_size is not None and self.resize_size < min(self.size):
            raise ValueError("resize_size must be >= the short side of image_size")
        return self


class ObjectStoreSettings(_Section):
    """How to reach an S3-compatible store (AWS S3, MinIO, SeaweedFS, Ceph). Every field left empty falls back to
    the standard AWS variables and files (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION,
    AWS_PROFILE, ~/.aws/config), so those variables alone are enough. Credentials are never a setting here."""

    endpoint_url: str = Field("", description="S3 endpoint, e.g. http://127.0.0.1:8333 (default: AWS_ENDPOINT_URL).")
    region: str = Field("", description="Region (default: AWS_REGION / the profile's, else us-east-1).")
    profile: str = Field("", description="Named profile of ~/.aws/config (default: AWS_PROFILE or none).")
    addressing_style: Literal["auto", "path", "virtual"] = Field(
        "auto", description="Bucket addressing; auto means path-style when an endpoint URL is set."
    )
    max_attempts: int = Field(5, ge=1, le=20, description="Attempts per request (botocore's standard retry mode).")
    timeout_s: float = Field(60.0, gt=0, description="Read timeout of one request.")

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint(cls, value: str) -> str:
        parts = urlsplit(value)
        if value and (parts.scheme not in ("http", "https") or not parts.hostname):
            raise ValueError(f"s3.endpoint_url must be an http:// or https:// URL with a host, not {value!r}")
        if parts.username or parts.password:
            # It would be repeated in every per-item error; credentials come from the AWS variables or a profile.
            raise ValueError("s3.endpoint_url must not hold credentials; use AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY")
        return value

    def config(self) -> StoreConfig:
        return StoreConfig(
            endpoint_url=self.endpoint_url or None,
            region=self.region or None,
            profile=self.profile or None,
            addressing_style=self.addressing_style,
            max_attempts=self.max_attempts,
            read_timeout_s=self.timeout_s,
        )


_STORES: dict[StoreConfig, ObjectStore] = {}


def object_store(settings: "ObjectStoreSettings") -> ObjectStore:
    """One client per store configuration in this process (boto3 clients are thread-safe and pool connections)."""
    config = settings.config()
    store = _STORES.get(config)
    if store is None:
        store = _STORES.setdefault(config, ObjectStore(config))
    return store


class DagsterSettings(_Section):
    webserver_host: str = "127.0.0.1"
    webserver_port: int = 13000
    sensor_interval_s: int = Field(5, ge=1, description="How often the drop sensor looks for new drops.")
    drop_settle_s: float = Field(
        10.0, ge=0, description="A folder drop without a _READY marker counts as complete after this long unchanged."
    )
    step_retries: int = Field(
        2, ge=0, le=10, description="Retries of a step that talks to Triton or Milvus (Dagster RetryPolicy)."
    )
    step_retry_delay_s: float = Field(
        2.0, ge=0, description="Delay before a step's first retry; doubles per retry, with jitter."
    )
    shard_items: int = Field(
        20000,
        ge=1,
        description="A drop with more items than this is split into shards of about this size; the preprocess and "
        "embed stages run one step per shard (in parallel in the ingest_drop_sharded job).",
    )
    shard_parallelism: int = Field(
        2, ge=1, le=64, description="Steps the ingest_drop_sharded job runs at once (one process each)."
    )
    rescan_cron: str = Field(
        "0 3 * * *", description="When the rescan_drops schedule (off until started) re-ingests changed drops."
    )


class QualitySettings(_Section):
    unit_norm: bool = Field(
        True,
        description="Store and query with L2-normalised vectors: the model's output is divided by its norm, and a "
        "stored vector whose norm is not 1 fails the blocking norm check. Set false to keep a model's raw vectors "
        "(e.g. for L2 search on magnitudes); then only zero vectors fail.",
    )
    norm_tolerance: float = Field(1e-3, gt=0, lt=1, description="How far from 1 a vector's L2 norm may be.")


# The default cosine similarity above which two images count as near-duplicates, measured with
# `embedding-pipeline bench duplicates` on the default model (docs/operations.md#near-duplicates).
DUPLICATES_COSINE = 0.94


class DuplicatesSettings(_Section):
    threshold: float | None = Field(
        None,
        ge=0.5,
        le=1.0,
        description="Cosine similarity at which two images count as near-duplicates (at least this). Applied in each "
        "collection's metric: the same for IP, the squared distance 2 - 2·cos for L2. Unset: the measured default "
        "for the default model, 0.94 (squared L2 0.12 on unit vectors).",
    )
    top_k: int = Field(
        16, ge=2, le=1024, description="Neighbours searched per image; a larger group still joins through its links."
    )
    batch_size: int = Field(256, ge=1, le=4096, description="Query vectors per search call.")


class ApiSettings(_Section):
    host: str = Field("127.0.0.1", description="Address the HTTP API binds to (embedding-pipeline serve-api).")
    port: int = Field(18080, ge=1, le=65535, description="Port of the HTTP API (API_PORT).")
    max_request_bytes: int = Field(
        20 * 1024 * 1024, ge=1024, description="Larger request bodies (JSON or uploads) are refused with 413."
    )
    max_topk: int = Field(1000, ge=1, le=16384, description="Largest topk a search may ask for.")
    max_window: int = Field(
        5000, ge=1, le=16384, description="Largest offset + topk a search may reach (how deep pages go)."
    )
    max_inputs: int = Field(10_000, ge=1, description="Most inputs one insert request may carry.")
    insert_timeout_s: float = Field(
        600.0, gt=0, le=3600, description="How long an insert with wait=true waits for its run before answering 504."
    )
    max_in_flight: int = Field(
        32, ge=1, le=1024, description="Requests in progress at once; more get 503 'busy' with Retry-After at once."
    )
    max_decodes: int = Field(4, ge=1, le=64, description="Query images decoded at once (each may take ~100 MB).")
    query_batch: int = Field(
        16,
        ge=1,
        le=256,
        description="Concurrent queries answered together at most: one Triton request for their images, one Milvus "
        "search for their vectors (1: each query alone).",
    )
    health_cache_s: float = Field(
        2.0, ge=0, le=60, description="/health answers from a report this old at most (it opens connections)."
    )
    allowed_hosts: list[str] = Field(
        default_factory=lambda: ["127.0.0.1", "localhost", "[::1]"],
        description="Host header values the API answers (a DNS-rebinding page sends its own name): add the names "
        "clients use when serving beyond loopback; '*' allows any.",
    )


class Settings(_Section):
    home: Path = Field(default_factory=state_home, description="State directory (EMBEDDING_PIPELINE_HOME).")
    drops_dir: str | None = Field(
        None,
        description="Drop folder, or an s3://bucket/prefix whose sub-prefixes and manifest objects are drops; "
        "default <home>/drops (EMBEDDING_PIPELINE_DROPS).",
    )
    outputs_uri: str | None = Field(
        None,
        description="Where the stages write their outputs (manifests, tensor batches, embeddings, reports): an "
        "s3://bucket/prefix; default <home>/data (EMBEDDING_PIPELINE_OUTPUTS).",
    )
    s3: ObjectStoreSettings = Field(default_factory=ObjectStoreSettings)
    triton: TritonSettings = Field(default_factory=TritonSettings)
    milvus: MilvusSettings = Field(default_factory=MilvusSettings)
    sources: SourceSettings = Field(default_factory=SourceSettings)
    preprocess: PreprocessSettings = Field(default_factory=PreprocessSettings)
    dagster: DagsterSettings = Field(default_factory=DagsterSettings)
    quality: QualitySettings = Field(default_factory=QualitySettings)
    duplicates: DuplicatesSettings = Field(default_factory=DuplicatesSettings)
    api: ApiSettings = Field(default_factory=ApiSettings)
    # The YAML file these settings were read from (load_settings records it), so that Dagster runs started in this
    # process can be pointed at the same file.
    _config_file: Path | None = PrivateAttr(default=None)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "Settings":
        """The settings of the YAML file ``path`` with the environment applied, exactly as :func:`load_settings`
        reads them (``$EMBEDDING_PIPELINE_CONFIG`` is not consulted: the file named here is the one in effect)."""
        return load_settings(path)

    @property
    def config_file(self) -> Path | None:
        """The YAML file these settings were read from (absolute), or None (defaults and environment only)."""
        return self._config_file

    @property
    def paths(self) -> StatePaths:
        return StatePaths(self.home.expanduser().resolve())

    @field_validator("drops_dir", "outputs_uri")
    @classmethod
    def _location(cls, value: str | None, info: Any) -> str | None:
        if value is None or value == "":
            return None
        value = str(value)
        if is_object_uri(value):
            try:
                split_uri(value)
            except ObjectError as exc:
                raise ValueError(f"{info.field_name}: {exc}") from None
            return value.rstrip("/")
        if info.field_name == "outputs_uri":
            raise ValueError(
                f"outputs_uri must be an s3://bucket/prefix (local outputs live under <home>/data): {value!r}"
            )
        return value

    @model_validator(mode="after")
    def _outputs_apart_from_drops(self) -> "Settings":
        # Outputs inside the drops prefix would be scanned as a drop (and deleting that "drop" would delete every
        # drop's outputs); drops inside the outputs prefix would be written over by the stages.
        if self.drops_dir and self.outputs_uri and is_object_uri(self.drops_dir):
            drops, outputs = (f"{v.rstrip('/')}/".lower()[len("s3://") :] for v in (self.drops_dir, self.outputs_uri))
            if drops.startswith(outputs) or outputs.startswith(drops):
                raise ValueError(
                    f"outputs_uri ({self.outputs_uri}) and drops_dir ({self.drops_dir}) must not contain each other"
                )
        return self

    @property
    def drops(self) -> Path:
        """The local drop folder. Raises ConfigError when drops live in a bucket (see :attr:`drops_location`)."""
        location = self.drops_location
        if isinstance(location, ObjectPath):
            raise ConfigError(f"the drop folder is {location}, in object storage, not a local folder")
        return location

    @property
    def drops_location(self) -> Path | ObjectPath:
        """Where drops land: a local folder or a prefix in a bucket."""
        if self.drops_dir and is_object_uri(self.drops_dir):
            return object_store(self.s3).path(self.drops_dir)
        return Path(self.drops_dir or self.paths.drops).expanduser().resolve()

    @property
    def outputs(self) -> Path | ObjectPath:
        """Where the stages' outputs live: ``<home>/data`` or the ``outputs_uri`` prefix."""
        if self.outputs_uri:
            return object_store(self.s3).path(self.outputs_uri)
        return self.paths.data


# The original specification's configuration names, accepted beside ours.
ServiceConfig = Settings

_LOOPBACK = {"127.0.0.1", "localhost", "::1"}

# Environment variable -> (section, key). Values are parsed by the model's field types.
ENV_VARS: dict[str, tuple[str | None, str]] = {
    "EMBEDDING_PIPELINE_HOME": (None, "home"),
    "EMBEDDING_PIPELINE_DROPS": (None, "drops_dir"),
    "EMBEDDING_PIPELINE_OUTPUTS": (None, "outputs_uri"),
    "TRITON_URL": ("triton", "url"),
    "TRITON_MODEL_NAME": ("triton", "model_name"),
    "TRITON_MODEL_VERSION": ("triton", "model_version"),
    "TRITON_TIMEOUT_S": ("triton", "timeout_s"),
    "TRITON_PROTOCOL": ("triton", "protocol"),
    "TRITON_CONCURRENCY": ("triton", "concurrency"),
    "TRITON_SHARED_MEMORY": ("triton", "shared_memory"),
    "TRITON_MODEL_PATH": ("triton", "model_path"),
    "MILVUS_URI": ("milvus", "uri"),
    "MILVUS_TOKEN": ("milvus", "token"),
    "MILVUS_DB_NAME": ("milvus", "db_name"),
    "MILVUS_USER": ("milvus", "user"),
    "MILVUS_PASSWORD": ("milvus", "password"),
    "MILVUS_SECURE": ("milvus", "secure"),
    "MILVUS_CA_PEM_PATH": ("milvus", "ca_pem_path"),
    "MILVUS_CONSISTENCY_LEVEL": ("milvus", "consistency_level"),
    "MILVUS_COLLECTION": ("milvus", "collection"),
    "MILVUS_EMBEDDING_DIM": ("milvus", "embedding_dim"),
    "MILVUS_INDEX_TYPE": ("milvus", "index_type"),
    "MILVUS_METRIC_TYPE": ("milvus", "metric_type"),
    "PREPROCESS_IMAGE_SIZE": ("preprocess", "image_size"),
    "PREPROCESS_BATCH_SIZE": ("preprocess", "batch_size"),
    "PREPROCESS_RESIZE_POLICY": ("preprocess", "resize_policy"),
    "DAGSTER_WEBSERVER_PORT": ("dagster", "webserver_port"),
    "EMBEDDING_PIPELINE_SHARD_ITEMS": ("dagster", "shard_items"),
    "API_PORT": ("api", "port"),
}


def _host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url if "://" in url else f"//{url}")
    try:
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"invalid port in {url!r}") from exc
    if not parts.hostname:
        raise ConfigError(f"no host in {url!r}")
    default = 443 if parts.scheme == "https" else 80
    return parts.hostname, port or default


def _env_overrides(environ: dict[str, str]) -> dict[str, Any]:
    data: dict[str, Any] = {}
    for var, (section, key) in ENV_VARS.items():
        value = environ.get(var)
        if value is None or value == "":
            continue
        target = data if section is None else data.setdefault(section, {})
        target[key] = value
    # The original specification's host + port form; MILVUS_URI wins when both are given.
    if "uri" not in data.get("milvus", {}) and environ.get("MILVUS_HOST"):
        port = environ.get("MILVUS_PORT") or "19530"
        data.setdefault("milvus", {})["uri"] = f"http://{environ['MILVUS_HOST']}:{port}"
    return data


def _original_milvus_address(data: dict[str, Any], path: str | Path) -> dict[str, Any]:
    """The original specification's ``milvus.host`` + ``milvus.port`` as our ``milvus.uri`` (the environment's
    ``MILVUS_HOST`` + ``MILVUS_PORT`` work the same way)."""
    milvus = data.get("milvus")
    if not isinstance(milvus, dict) or not ({"host", "port"} & milvus.keys()):
        return data
    if "uri" in milvus:
        raise ConfigError(f"config file {path}: give milvus.uri or milvus.host + milvus.port, not both")
    if "host" not in milvus:
        raise ConfigError(f"config file {path}: milvus.port needs milvus.host (or give milvus.uri)")
    rest = {k: v for k, v in milvus.items() if k not in ("host", "port")}
    rest["uri"] = f"http://{milvus['host']}:{milvus.get('port') or 19530}"
    return {**data, "milvus": rest}


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def config_path(environ: Mapping[str, str] | None = None) -> Path | None:
    """The YAML file in effect: ``$EMBEDDING_PIPELINE_CONFIG``, else ``./embedding_pipeline.yaml`` if present."""
    env: Mapping[str, str] = os.environ if environ is None else environ
    if env.get(CONFIG_ENV):
        return Path(env[CONFIG_ENV])
    return Path(DEFAULT_CONFIG_FILE) if Path(DEFAULT_CONFIG_FILE).is_file() else None


def load_settings(config_file: str | Path | None = None, environ: dict[str, str] | None = None) -> Settings:
    """Read the settings; raises :class:`ConfigError` naming the bad key on invalid input."""
    environ = dict(os.environ if environ is None else environ)
    path = config_file or config_path(environ)
    data: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text()) or {}
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
        data = _original_milvus_address(loaded, path)
    data = _merge(data, _env_overrides(environ))
    try:
        settings = Settings.model_validate(data)
        # Parse the URLs now so a typo fails here, not deep inside a run.
        _host_port(settings.triton.url)
        _host_port(settings.milvus.uri)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"invalid configuration: {problems}") from None
    settings._config_file = Path(path).resolve() if path is not None else None
    return settings
