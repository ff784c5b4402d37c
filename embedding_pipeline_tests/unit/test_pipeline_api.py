"""The original specification's Python API without servers: ServiceConfig.from_yaml and argument checks."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from embedding_pipeline.collection_setup import DimensionMismatch
from embedding_pipeline.pipeline_api import ImageEmbeddingPipeline, _settings_for_runs, check_insert
from embedding_pipeline.runtime.processes import free_ports
from embedding_pipeline.settings import CONFIG_ENV, ConfigError, Settings
from embedding_pipeline.sources.inserts import InputRefused

# The configuration file of the original specification, as it is written there.
ORIGINAL_YAML = """\
triton:
  url: "localhost:8000"
  model_name: "embedding_model"
  protocol: "http"

milvus:
  host: "localhost"
  port: 19530
  embedding_dim: 512
  index_type: "IVF_FLAT"

preprocess:
  image_size: [224, 224]
  batch_size: 32
"""


@pytest.fixture
def clean_env(monkeypatch):
    for var in (CONFIG_ENV, "TRITON_URL", "MILVUS_URI", "MILVUS_HOST", "MILVUS_PORT", "MILVUS_COLLECTION"):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def test_the_package_exports_both_names_lazily():
    import embedding_pipeline

    assert embedding_pipeline.ServiceConfig is Settings
    assert embedding_pipeline.ImageEmbeddingPipeline is ImageEmbeddingPipeline
    assert {"ImageEmbeddingPipeline", "ServiceConfig"} <= set(dir(embedding_pipeline))


def test_from_yaml_reads_the_original_specifications_file(tmp_path: Path, clean_env):
    from embedding_pipeline import ServiceConfig

    path = tmp_path / "config.yaml"
    path.write_text(ORIGINAL_YAML)
    config = ServiceConfig.from_yaml(path)
    assert isinstance(config, Settings)
    assert config.triton.url == "localhost:8000" and config.triton.model_name == "embedding_model"
    assert config.milvus.uri == "http://localhost:19530"  # milvus.host + milvus.port
    assert (config.milvus.embedding_dim, config.milvus.index_type) == (512, "IVF_FLAT")
    assert config.preprocess.size == (224, 224) and config.preprocess.batch_size == 32
    assert config.config_file == path.resolve()


def test_from_yaml_applies_the_environment_and_ignores_the_config_variable(tmp_path: Path, clean_env):
    other = tmp_path / "other.yaml"
    other.write_text("milvus:\n  collection: from_the_variable\n")
    path = tmp_path / "config.yaml"
    path.write_text("milvus:\n  uri: http://127.0.0.1:1234\n  collection: from_the_file\n")
    clean_env.setenv(CONFIG_ENV, str(other))
    clean_env.setenv("TRITON_URL", "127.0.0.1:9999")
    config = Settings.from_yaml(str(path))
    assert config.milvus.collection == "from_the_file"
    assert config.triton.url == "127.0.0.1:9999"  # environment over the file, as load_settings does
    clean_env.setenv("MILVUS_HOST", "10.0.0.5")
    assert Settings.from_yaml(path).milvus.uri == "http://10.0.0.5:19530"


@pytest.mark.parametrize(
    "milvus, message",
    [
        ("  uri: http://a:1\n  host: b\n", "not both"),
        ("  port: 19530\n", "needs milvus.host"),
    ],
)
def test_from_yaml_refuses_ambiguous_milvus_addresses(tmp_path: Path, clean_env, milvus: str, message: str):
    path = tmp_path / "config.yaml"
    path.write_text("milvus:\n" + milvus)
    with pytest.raises(ConfigError, match=message):
        Settings.from_yaml(path)
    with pytest.raises(ConfigError, match="cannot read"):
        Settings.from_yaml(tmp_path / "missing.yaml")


def test_check_insert_names_the_bad_argument():
    assert check_insert([Path("/a.jpg"), " https://e.com/b.jpg "], ["x", "y"], [{"k": 1}, {}]) == (
        ["/a.jpg", "https://e.com/b.jpg"],
        ["x", "y"],
        [{"k": 1}, {}],
    )
    with pytest.raises(TypeError, match="inputs must be a list"):
        check_insert("/a.jpg")
    with pytest.raises(ValueError, match="inputs is empty"):
        check_insert([])
    with pytest.raises(ValueError, match="ids has 1 entries but inputs has 2"):
        check_insert(["/a", "/b"], ["x"])
    with pytest.raises(ValueError, match=r"ids\[1\] repeats ids\[0\]"):
        check_insert(["/a", "/b"], ["x", "x"])
    with pytest.raises(ValueError, match=r"ids\[0\] must be non-empty"):
        check_insert(["/a"], [" "])
    with pytest.raises(TypeError, match=r"metadata\[0\] must be a mapping"):
        check_insert(["/a"], None, ["nature"])
    with pytest.raises(ValueError, match="metadata has 2 entries"):
        check_insert(["/a"], None, [{}, {}])


class FakeModelClient:
    """Stands in for the Triton client: a fixed model label and output dimension."""

    def model_version_label(self) -> str:
        return "image_embedder:1@abc"

    def input_spec(self) -> SimpleNamespace:
        return SimpleNamespace(output_dim=1280)

    def close(self) -> None:
        pass


class FakeModelPipeline(ImageEmbeddingPipeline):
    def _model_client(self):  # noqa: ANN202 - the fake client
        return FakeModelClient()


def test_arguments_are_checked_before_any_server_is_asked(tmp_path: Path):
    settings = Settings(home=tmp_path)
    with FakeModelPipeline(settings, launch="process") as pipeline:
        with pytest.raises(DimensionMismatch) as caught:
            pipeline.create_collection(name="my_images", dim=512, description="My image embeddings")
        assert isinstance(caught.value, ValueError)
        assert "dim 512" in str(caught.value) and "1280-d" in str(caught.value)
        with pytest.raises(ValueError, match="collection name"):
            pipeline.create_collection(name="my images")
        with pytest.raises(ValueError, match="dim must be a positive integer"):
            pipeline.create_collection(name="my_images", dim=0)
        with pytest.raises(ValueError, match="topk must be an integer"):
            pipeline.search_images("/a.jpg", topk=0)
        with pytest.raises(ValueError, match="collection name"):
            pipeline.search_images("/a.jpg", collection_name="1st")
        with pytest.raises(InputRefused) as refused:
            pipeline.insert_images(inputs=["/etc/hostname"])
        assert refused.value.code == "outside_roots" and "sources.allowed_roots" in str(refused.value)
        with pytest.raises(InputRefused, match="must be absolute"):
            pipeline.insert_images(inputs=["photo.jpg"])
    assert not settings.drops.exists() or not any(settings.drops.iterdir())  # nothing was dropped
    with pytest.raises(RuntimeError, match="closed"):
        pipeline.search_images("/a.jpg")
    pipeline.close()  # closing twice is fine
    with pytest.raises(ValueError, match="launch must be one of"):
        ImageEmbeddingPipeline(settings, launch="elsewhere")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="ServiceConfig"):
        ImageEmbeddingPipeline({"milvus": {}})  # type: ignore[arg-type]


def test_inserts_run_here_unless_a_webserver_answers(tmp_path: Path):
    settings = Settings(home=tmp_path)
    (settings.dagster.webserver_port,) = free_ports(1)  # nothing listens there
    assert ImageEmbeddingPipeline(settings)._through_webserver() is False
    assert ImageEmbeddingPipeline(settings, launch="webserver")._through_webserver() is True
    assert ImageEmbeddingPipeline(settings, launch="process")._through_webserver() is False


def test_runs_here_read_the_pipelines_file_or_refuse(tmp_path: Path, clean_env):
    path = tmp_path / "config.yaml"
    path.write_text(f"home: {tmp_path / 'home'}\nmilvus:\n  collection: from_the_file\n")
    config = Settings.from_yaml(path)
    with _settings_for_runs(config):
        assert os.environ[CONFIG_ENV] == str(path.resolve())
    assert CONFIG_ENV not in os.environ
    changed = config.model_copy(update={"milvus": config.milvus.model_copy(update={"collection": "changed"})})
    with pytest.raises(ValueError, match="differ from this pipeline's in milvus"):
        with _settings_for_runs(changed):
            pass
    assert CONFIG_ENV not in os.environ
