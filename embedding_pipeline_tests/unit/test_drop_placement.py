import pytest

from embedding_pipeline.settings import load_settings
from embedding_pipeline.sources.drops import place_drop


@pytest.fixture
def settings(tmp_path):
    return load_settings(environ={"EMBEDDING_PIPELINE_HOME": str(tmp_path / "home")})


def test_place_drop_copies_folder_and_keeps_existing_drops(settings, tmp_path):
    src = tmp_path / "cats"
    src.mkdir()
    (src / "a.jpg").write_bytes(b"x")
    assert place_drop(settings.drops, src) == "cats"
    assert (settings.drops / "cats" / "a.jpg").read_bytes() == b"x"
    # Already in the drop folder: used where it is.
    assert place_drop(settings.drops, settings.drops / "cats") == "cats"
    with pytest.raises(FileExistsError, match="already exists"):
        place_drop(settings.drops, src)
    assert not [p for p in settings.drops.iterdir() if p.name.startswith(".")]


def test_place_drop_validates_name_and_source(settings, tmp_path):
    manifest = tmp_path / "list.jsonl"
    manifest.write_text("")
    with pytest.raises(ValueError, match="invalid drop name"):
        place_drop(settings.drops, manifest, "../escape")
    with pytest.raises(FileNotFoundError):
        place_drop(settings.drops, tmp_path / "missing")
    assert place_drop(settings.drops, manifest, "renamed.jsonl") == "renamed.jsonl"
