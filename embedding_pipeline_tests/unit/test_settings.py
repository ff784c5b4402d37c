import pytest

from embedding_pipeline.settings import ConfigError, load_settings


def test_defaults_bind_loopback(tmp_path):
    s = load_settings(environ={"EMBEDDING_PIPELINE_HOME": str(tmp_path)})
    assert s.triton.is_local and s.milvus.is_local
    assert s.dagster.webserver_host == "127.0.0.1"
    assert s.paths.root == tmp_path.resolve()
    assert s.drops == tmp_path.resolve() / "drops"


def test_yaml_then_env_precedence(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("triton:\n  url: 10.0.0.5:8000\n  model_name: from_yaml\nmilvus:\n  index_type: FLAT\n")
    s = load_settings(cfg, environ={"TRITON_MODEL_NAME": "from_env"})
    assert s.triton.url == "10.0.0.5:8000" and not s.triton.is_local
    assert s.triton.model_name == "from_env"
    assert s.milvus.index_type == "FLAT"


def test_seed_host_port_form():
    s = load_settings(environ={"MILVUS_HOST": "milvus.internal", "MILVUS_PORT": "19530", "MILVUS_EMBEDDING_DIM": "512"})
    assert s.milvus.uri == "http://milvus.internal:19530"
    assert s.milvus.embedding_dim == 512
    s = load_settings(environ={"MILVUS_HOST": "a", "MILVUS_URI": "http://b:1"})
    assert s.milvus.uri == "http://b:1"


@pytest.mark.parametrize(
    "yaml_text, env, needle",
    [
        ("milvus:\n  index_type: ANNOY\n", {}, "milvus.index_type"),
        ("triton:\n  urll: x\n", {}, "triton.urll"),
        ("", {"MILVUS_EMBEDDING_DIM": "many"}, "milvus.embedding_dim"),
        ("- a list\n", {}, "mapping"),
        ("triton: [unclosed\n", {}, "not valid YAML"),
        ("preprocess:\n  image_size: 300\n  resize_size: 256\n", {}, "resize_size"),
    ],
)
def test_bad_config_names_the_key(tmp_path, yaml_text, env, needle):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml_text)
    with pytest.raises(ConfigError, match=needle):
        load_settings(cfg, environ=env)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_settings(tmp_path / "nope.yaml", environ={})
