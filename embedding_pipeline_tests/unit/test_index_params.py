"""Index build and search parameters per index type: defaults, overrides and checks (no server)."""

import pytest

from embedding_pipeline.index.params import build_params, check_settings, search_params
from embedding_pipeline.settings import ConfigError, MilvusSettings, load_settings


def milvus(yaml_text: str, tmp_path) -> MilvusSettings:
    path = tmp_path / "c.yaml"
    path.write_text(yaml_text)
    return load_settings(path, environ={}).milvus


@pytest.mark.parametrize(
    "index_type, build, search",
    [
        ("FLAT", {}, {}),
        ("IVF_FLAT", {"nlist": 128}, {"nprobe": 16}),
        ("HNSW", {"M": 16, "efConstruction": 256}, {"ef": 64}),
    ],
)
def test_each_type_gets_its_own_defaults(index_type, build, search, tmp_path):
    s = milvus(f"milvus:\n  index_type: {index_type}\n", tmp_path)
    assert build_params(s) == build
    assert search_params(s) == search


def test_settings_round_tripped_through_a_dump_keep_per_type_defaults():
    # Dagster resources rebuild settings from model_dump(): the HNSW field defaults then look "given".
    s = MilvusSettings.model_validate({**MilvusSettings(index_type="IVF_FLAT").model_dump()})
    assert build_params(s) == {"nlist": 128}
    assert search_params(s) == {"nprobe": 16}


def test_given_values_overlay_the_defaults(tmp_path):
    s = milvus("milvus:\n  index_type: HNSW\n  index_params: {M: 32}\n  search_params: {ef: 200}\n", tmp_path)
    assert build_params(s) == {"M": 32, "efConstruction": 256}
    assert search_params(s) == {"ef": 200}
    s = milvus("milvus:\n  index_type: IVF_FLAT\n  index_params: {nlist: 1024}\n", tmp_path)
    assert build_params(s) == {"nlist": 1024}


def test_per_query_override_and_ef_at_least_top_k(tmp_path):
    s = milvus("milvus:\n  index_type: HNSW\n  search_params: {ef: 100}\n", tmp_path)
    assert search_params(s, {"ef": 300}) == {"ef": 300}
    assert search_params(s, None, top_k=500) == {"ef": 500}
    ivf = milvus("milvus:\n  index_type: IVF_FLAT\n  search_params: {nprobe: 8}\n", tmp_path)
    assert search_params(ivf, {"nprobe": "32"}) == {"nprobe": 32}
    assert search_params(ivf) == {"nprobe": 8}


@pytest.mark.parametrize(
    "yaml_text, needle",
    [
        (
            "index_type: IVF_FLAT\n  index_params: {M: 16}",
            "milvus.index_params: unknown key 'M' for index type IVF_FLAT",
        ),
        ("index_type: HNSW\n  search_params: {nprobe: 4}", "milvus.search_params: unknown key 'nprobe'"),
        ("index_type: FLAT\n  index_params: {nlist: 4}", "(accepted: none)"),
        ("index_type: HNSW\n  index_params: {M: 1}", "milvus.index_params.M must be between 2 and 2048"),
        ("index_type: IVF_FLAT\n  index_params: {nlist: many}", "milvus.index_params.nlist must be an integer"),
        ("index_type: IVF_FLAT\n  search_params: {nprobe: true}", "milvus.search_params.nprobe must be an integer"),
    ],
)
def test_bad_parameters_are_refused_naming_the_key(yaml_text, needle, tmp_path):
    s = milvus(f"milvus:\n  {yaml_text}\n", tmp_path)
    with pytest.raises(ConfigError) as err:
        check_settings(s)
    assert needle in str(err.value)


def test_bad_per_query_parameters_name_the_key(tmp_path):
    s = milvus("milvus:\n  index_type: IVF_FLAT\n", tmp_path)
    with pytest.raises(ConfigError, match="search_params: unknown key 'nprob' for index type IVF_FLAT"):
        search_params(s, {"nprob": 3})


def test_search_parameters_that_would_pin_the_server_are_refused(tmp_path):
    from embedding_pipeline.settings import ConfigError

    hnsw = milvus("milvus:\n  index_type: HNSW\n", tmp_path)
    with pytest.raises(ConfigError, match="ef"):
        search_params(hnsw, {"ef": 2**31 - 1})
    assert search_params(hnsw, {"ef": 32768}) == {"ef": 32768}
    ivf = milvus("milvus:\n  index_type: IVF_FLAT\n", tmp_path)
    with pytest.raises(ConfigError, match="nprobe"):
        search_params(ivf, {"nprobe": 2**31 - 1})
