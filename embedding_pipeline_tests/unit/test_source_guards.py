"""Hostile input stays inside its item: symlinked drops, broad roots, odd drop names, formats outside the
allow-list, and 16-bit images that would cost gigabytes of float64 temporaries."""

import io
import os
import tracemalloc

import numpy as np
import pytest
from PIL import Image

from embedding_pipeline.preprocess.decode import DecodeOptions, Geometry, decode
from embedding_pipeline.settings import SourceSettings
from embedding_pipeline.sources.drops import DROP_NAME, find_drop, scan
from embedding_pipeline.sources.fetch import FetchError
from embedding_pipeline.sources.items import check_image


def test_a_symlinked_drop_is_refused(tmp_path):
    drops = tmp_path / "drops"
    drops.mkdir()
    (drops / "evil").symlink_to("/")
    (drops / "fine").mkdir()
    found, invalid = scan(drops)
    assert [d.name for d in found] == ["fine"] and invalid == ["evil"]
    with pytest.raises(PermissionError, match="symbolic link"):
        find_drop(drops, "evil")


@pytest.mark.parametrize("name", ["cats\n", "a/b", ".hidden", "x" * 129, ""])
def test_drop_names_are_matched_whole(name):
    assert not DROP_NAME.match(name)


@pytest.mark.parametrize("root", ["/", "/home", "/tmp/.."])
def test_allowed_roots_that_open_the_whole_machine_are_refused(root):
    with pytest.raises(ValueError, match="too broad"):
        SourceSettings(allowed_roots=[root])


def test_allowed_roots_are_kept_as_real_paths(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    assert SourceSettings(allowed_roots=[tmp_path / "link"]).allowed_roots == [(tmp_path / "real").resolve()]


def test_an_eps_header_is_not_an_image_and_never_reaches_ghostscript():
    eps = b"\xc5\xd0\xd3\xc6" + b"\x20\x00\x00\x00" + b"\x10\x00\x00\x00" + b"\x00" * 20 + b"%!PS-Adobe-3.0 EPSF-3.0\n"
    with pytest.raises(FetchError) as err:
        check_image(eps)
    assert err.value.kind == "not_image"
    # A format Pillow knows but the allow-list leaves out (TGA) is refused the same way.
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="TGA")
    with pytest.raises(FetchError) as err:
        check_image(buf.getvalue())
    assert err.value.kind == "not_image"


def test_a_16_bit_image_decodes_without_float64_temporaries():
    side = 2048
    img = Image.fromarray(np.random.default_rng(0).integers(0, 65535, (side, side), dtype=np.uint16))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    tracemalloc.start()
    try:
        pixels, _ = decode(buf.getvalue(), Geometry(224, 224), DecodeOptions())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert pixels.dtype == np.uint8 and pixels.ndim == 3
    # One float32 copy is 4 bytes a pixel; the float64 path held ~3 arrays of 8 bytes a pixel (24+).
    assert peak < 12 * side * side, f"peak {peak / 1e6:.0f} MB for a {side}x{side} 16-bit image"


def test_the_state_directory_is_private(tmp_path):
    import stat

    from embedding_pipeline.runtime.state import private_state_dir

    new = private_state_dir(tmp_path / "home")
    assert stat.S_IMODE(new.stat().st_mode) == 0o700
    (tmp_path / "open").mkdir(mode=0o755)
    assert stat.S_IMODE(private_state_dir(tmp_path / "open").stat().st_mode) == 0o700


def test_a_manifest_that_is_a_fifo_is_refused_at_once(tmp_path):
    from embedding_pipeline.sources.drops import Drop
    from embedding_pipeline.sources.manifest import list_entries

    fifo = tmp_path / "drop.jsonl"
    os.mkfifo(fifo)
    with pytest.raises(FetchError) as err:
        list_entries(Drop("drop.jsonl", fifo))
    assert err.value.kind == "not_a_file"
    # Inside a folder drop, a FIFO named like a manifest is an item that fails, never a blocked read.
    folder = tmp_path / "folder"
    folder.mkdir()
    os.mkfifo(folder / "rows.jsonl")
    assert [e.uri for e in list_entries(Drop("folder", folder))] == [str(folder / "rows.jsonl")]


def test_an_unreadable_manifest_fails_the_listing_instead_of_emptying_the_drop(tmp_path, monkeypatch):
    import errno

    from embedding_pipeline.sources import manifest as manifest_module
    from embedding_pipeline.sources.drops import Drop
    from embedding_pipeline.sources.manifest import list_entries

    folder = tmp_path / "drop"
    folder.mkdir()
    (folder / "rows.csv").write_text("uri,id\na.jpg,a\n")
    (folder / "more.jsonl").write_text('{"uri": "b.jpg", "id": "b"}\n')
    assert sorted(e.id for e in list_entries(Drop("drop", folder))) == ["a", "b"]

    def failing_disk(path, *args):  # noqa: ANN001, ANN002 - a fake: the disk answers EIO for every manifest
        raise OSError(errno.EIO, "Input/output error", str(path))

    monkeypatch.setattr(manifest_module, "open_regular", failing_disk)
    with pytest.raises(OSError):
        list_entries(Drop("drop", folder))


def test_ids_are_measured_in_bytes_and_a_nul_is_refused_per_item(tmp_path):
    import json

    from embedding_pipeline.sources.drops import Drop
    from embedding_pipeline.sources.manifest import list_entries

    rows = [
        {"id": "é" * 300, "uri": "a.jpg"},
        {"id": "a\0b", "uri": "b.jpg"},
        {"id": "O'Brien\n", "uri": "c.jpg"},
        {"id": "é" * 256, "uri": "d.jpg"},
    ]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    entries = list_entries(Drop("m.jsonl", manifest))
    assert [(e.error_kind, bool(e.error)) for e in entries] == [
        ("bad_row", True),
        ("bad_row", True),
        ("", False),
        ("", False),
    ]
    assert "bytes" in entries[0].error and "NUL" in entries[1].error
