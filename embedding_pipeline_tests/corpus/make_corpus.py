"""Generate the bad-input corpus: ``python -m embedding_pipeline_tests.corpus.make_corpus``.

Writes, next to this file:

* ``files/`` — good images in awkward formats (16-bit, CMYK, palette + transparency, EXIF orientations, animated,
  1×1, a 20000×20 panorama, a PNG named ``.jpg`` ...) made from real photos bundled in the scikit-image wheel, and
  bad files (truncated, empty, text and HTML named ``.jpg``, a decompression bomb, a corrupted PNG);
* ``manifest.template.jsonl`` — one row per file plus rows for manifest, path and URL failures. ``{server}`` is
  the base URL of an allow-listed test server (:mod:`embedding_pipeline_tests.http_servers`) serving ``files/``
  and ``{private}`` that of a second one reached as ``localhost`` and not allow-listed. A test creates two things
  at run time, because checked in they would be brittle: ``escape-link.jpg``, a symlink to an image outside the
  drop, and ``a-directory/``, an empty folder;
* ``expected.json`` — per case (``metadata.case``; cases, unlike ids, are unique even for the duplicate-id row):
  the row's ``id`` (null where it derives from content), ``manifest_status`` / ``manifest_error_kind`` after the
  manifest stage, and ``status`` / ``error_kind`` after decoding.

The output is deterministic for given library versions; the file names are deterministic everywhere. Every file's
decode-level outcome is checked with Pillow while generating, so the expectations record what Pillow really does.
"""

from __future__ import annotations

import io
import json
import struct
import sys
import zlib
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from embedding_pipeline.sources.samples import load_photo

HERE = Path(__file__).parent
FILES = HERE / "files"
TEMPLATE = HERE / "manifest.template.jsonl"
EXPECTED = HERE / "expected.json"

HTML_404 = (
    b"<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head>\n"
    b"<body><h1>Not Found</h1><p>The requested URL was not found on this server.</p></body></html>\n"
)
# Side of the decompression bomb: 400 Mpx of 1-bit zeros, about 50 KB of PNG.
BOMB_SIDE = 20000
# ``fetch_timeout_s`` in the corpus test is 1 s; this endpoint answers later than that.
SLOW_S = 3
# The corpus test sets ``max_image_bytes`` to 1 MB; this endpoint streams twice that.
BIG_BYTES = 2_000_000

# EXIF orientation -> the transpose that *undoes* exif_transpose's, so the stored pixels come out upright.
_STORE_FOR_ORIENTATION = {
    1: None,
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


def _photo(name: str, width: int) -> Image.Image:
    img = Image.fromarray(load_photo(name))
    return img.resize((width, round(img.height * width / img.width)), Image.Resampling.LANCZOS)


def _encode(img: Image.Image, fmt: str, **kwargs: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def _raw_png(width: int, height: int, bit_depth: int, color_type: int, rows: Any) -> bytes:
    """A PNG written by hand (filter type 0), for what Pillow cannot write: 16-bit RGB, a streamed bomb."""
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(b"\0" + row) for row in rows) + comp.flush()
    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def _corrupt_idat(png: bytes) -> bytes:
    """Flip a few bytes early in the first IDAT chunk and fix its CRC, so only the compressed data is broken."""
    at = png.index(b"IDAT")
    length = struct.unpack(">I", png[at - 4 : at])[0]
    data = bytearray(png[at + 4 : at + 4 + length])
    start = len(data) // 10
    for i in range(start, start + 4):
        data[i] ^= 0xFF
    crc = struct.pack(">I", zlib.crc32(b"IDAT" + bytes(data)))
    return png[: at + 4] + bytes(data) + crc + png[at + 8 + length :]


def _exif_jpeg(upright: Image.Image, orientation: int) -> bytes:
    method = _STORE_FOR_ORIENTATION[orientation]
    stored = upright if method is None else upright.transpose(method)
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _encode(stored, "JPEG", quality=95, exif=exif.tobytes())


def _files() -> dict[str, bytes]:
    cat = _photo("chelsea", 160)  # 160x106
    cup = _photo("coffee", 160)  # 160x107
    small = _photo("coffee", 96)
    files: dict[str, bytes] = {}

    files["good-photo.jpg"] = _encode(cat, "JPEG", quality=90)
    files["good-photo.png"] = _encode(cup, "PNG")
    grey16 = (np.asarray(cup.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    files["good-grey16.png"] = _encode(Image.fromarray(grey16), "PNG")
    rgb16 = np.asarray(cat, dtype=np.uint16) * 257
    files["good-rgb16.png"] = _raw_png(cat.width, cat.height, 16, 2, (r.astype(">u2").tobytes() for r in rgb16))
    files["good-cmyk.jpg"] = _encode(cup.convert("CMYK"), "JPEG", quality=90)
    palette = cat.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    files["good-palette-transparent.png"] = _encode(palette, "PNG", transparency=0)
    alpha = Image.linear_gradient("L").resize(cup.size)
    la = cup.convert("L")
    la.putalpha(alpha)
    files["good-la.png"] = _encode(la, "PNG")
    rgba = cat.copy()
    rgba.putalpha(alpha.resize(cat.size))
    files["good-rgba.png"] = _encode(rgba, "PNG")
    frames = [cat, ImageOps.mirror(cat), ImageOps.grayscale(cat).convert("RGB")]
    gif = {"save_all": True, "append_images": frames[1:], "duration": 200, "loop": 0}
    files["good-animated.gif"] = _encode(frames[0], "GIF", **gif)
    files["good-upright.jpg"] = _encode(cat, "JPEG", quality=95)
    for orientation in range(1, 9):
        files[f"good-orientation-{orientation}.jpg"] = _exif_jpeg(cat, orientation)
    files["good-1x1.png"] = _encode(cup.resize((1, 1)), "PNG")
    files["good-panorama.png"] = _encode(cup.resize((20000, 20), Image.Resampling.BILINEAR), "PNG", optimize=True)
    files["good-png-named.jpg"] = _encode(ImageOps.mirror(cat), "PNG")
    files["good-photo.webp"] = _encode(cat, "WEBP", quality=80, method=4)
    files["good-grey.jpg"] = _encode(cup.convert("L"), "JPEG", quality=90)
    files["good-photo.bmp"] = _encode(small, "BMP")
    files["good-photo.tiff"] = _encode(small, "TIFF", compression="tiff_deflate")

    jpeg = _encode(cup, "JPEG", quality=90)
    files["bad-truncated.jpg"] = jpeg[: len(jpeg) * 6 // 10]
    files["bad-empty.jpg"] = b""
    files["bad-text.jpg"] = b"This is a plain text file that someone saved with an image extension.\n"
    files["bad-html.jpg"] = HTML_404
    files["bad-heic.heic"] = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 64
    row = bytes(BOMB_SIDE // 8)
    files["bad-bomb.png"] = _raw_png(BOMB_SIDE, BOMB_SIDE, 1, 0, (row for _ in range(BOMB_SIDE)))
    files["bad-corrupt-idat.png"] = _corrupt_idat(_encode(cup, "PNG"))
    return files


# (case, file name, final status, final error kind); manifest level is ok for every file unless in _MANIFEST_FAILS.
_FILE_CASES: list[tuple[str, str, str, str]] = [
    ("jpeg", "good-photo.jpg", "ok", ""),
    ("png", "good-photo.png", "ok", ""),
    ("png-grey-16bit", "good-grey16.png", "ok", ""),
    ("png-rgb-16bit", "good-rgb16.png", "ok", ""),
    ("jpeg-cmyk", "good-cmyk.jpg", "ok", ""),
    ("png-palette-transparency", "good-palette-transparent.png", "ok", ""),
    ("png-la", "good-la.png", "ok", ""),
    ("png-rgba", "good-rgba.png", "ok", ""),
    ("gif-animated", "good-animated.gif", "ok", ""),
    ("jpeg-upright", "good-upright.jpg", "ok", ""),
    *[(f"jpeg-exif-orientation-{o}", f"good-orientation-{o}.jpg", "ok", "") for o in range(1, 9)],
    ("png-1x1", "good-1x1.png", "ok", ""),
    ("png-panorama-20000x20", "good-panorama.png", "ok", ""),
    ("png-named-jpg", "good-png-named.jpg", "ok", ""),
    ("webp", "good-photo.webp", "ok", ""),
    ("jpeg-grey", "good-grey.jpg", "ok", ""),
    ("bmp", "good-photo.bmp", "ok", ""),
    ("tiff", "good-photo.tiff", "ok", ""),
    ("jpeg-truncated", "bad-truncated.jpg", "failed", "truncated"),
    ("empty-file", "bad-empty.jpg", "failed", "empty_file"),
    ("text-named-jpg", "bad-text.jpg", "failed", "not_image"),
    ("html-named-jpg", "bad-html.jpg", "failed", "not_image"),
    ("heic-unsupported", "bad-heic.heic", "failed", "not_image"),
    ("png-decompression-bomb", "bad-bomb.png", "failed", "too_many_pixels"),
    ("png-corrupt-idat", "bad-corrupt-idat.png", "failed", "decode_error"),
]
_MANIFEST_FAILS = {"empty-file", "text-named-jpg", "html-named-jpg", "heic-unsupported"}

# (case, row without metadata, status, error kind) — failures outside the files themselves, all at manifest level.
_OTHER_CASES: list[tuple[str, dict[str, Any], str, str]] = [
    ("duplicate-id", {"id": "good-photo.jpg", "uri": "good-photo.png"}, "failed", "duplicate_id"),
    ("same-content-no-id-first", {"uri": "good-1x1.png"}, "ok", ""),
    ("same-content-no-id-again", {"uri": "good-1x1.png"}, "skipped", "duplicate"),
    # The case sits in a column of its own here: this row's metadata is the broken part.
    (
        "bad-metadata-json",
        {"id": "bad-metadata", "uri": "good-photo.jpg", "metadata": "{not json", "case": "bad-metadata-json"},
        "failed",
        "bad_metadata",
    ),
    ("missing-uri", {"id": "no-uri"}, "failed", "bad_row"),
    ("missing-file", {"id": "missing-file", "uri": "does-not-exist.jpg"}, "failed", "not_found"),
    ("path-escape", {"id": "path-escape", "uri": "../../../../../etc/hostname"}, "failed", "outside_roots"),
    ("symlink-escape", {"id": "symlink-escape", "uri": "escape-link.jpg"}, "failed", "outside_roots"),
    ("directory", {"id": "directory", "uri": "a-directory"}, "failed", "not_a_file"),
    ("url-404", {"id": "url-404", "uri": "{server}/status/404"}, "failed", "http_error"),
    ("url-500-then-ok", {"id": "url-flaky", "uri": "{server}/flaky/2/good-photo.jpg"}, "ok", ""),
    ("url-timeout", {"id": "url-timeout", "uri": f"{{server}}/slow/{SLOW_S}"}, "failed", "timeout"),
    ("url-redirect-loop", {"id": "url-loop", "uri": "{server}/loop"}, "failed", "too_many_redirects"),
    ("url-oversize-body", {"id": "url-big", "uri": f"{{server}}/big/{BIG_BYTES}"}, "failed", "too_large"),
    ("url-declared-oversize", {"id": "url-declared-big", "uri": "{server}/declared-big"}, "failed", "too_large"),
    ("url-html-as-jpeg", {"id": "url-html", "uri": "{server}/html"}, "failed", "not_image"),
    (
        "url-private-address",
        {"id": "url-private", "uri": "{private}/files/good-photo.jpg"},
        "failed",
        "refused_address",
    ),
    (
        "url-redirect-to-private",
        {"id": "url-redirect-private", "uri": "{server}/redirect?to={private}/files/good-photo.jpg"},
        "failed",
        "refused_address",
    ),
    (
        "url-metadata-service",
        {"id": "url-metadata", "uri": "http://169.254.169.254/latest/meta-data/"},
        "failed",
        "refused_address",
    ),
    ("url-ftp", {"id": "url-ftp", "uri": "ftp://example.com/photo.jpg"}, "failed", "bad_url"),
    ("url-file-scheme", {"id": "url-file", "uri": "file:///etc/hostname"}, "failed", "bad_url"),
    ("url-good", {"id": "url-good", "uri": "{server}/files/good-photo.png"}, "ok", ""),
    ("url-good-listed-twice-1", {"id": "url-twice-1", "uri": "{server}/files/good-photo.webp"}, "ok", ""),
    ("url-good-listed-twice-2", {"id": "url-twice-2", "uri": "{server}/files/good-photo.webp"}, "ok", ""),
]


def template_rows() -> list[dict[str, Any]]:
    rows = []
    for case, name, status, _ in _FILE_CASES:
        category = "good" if status == "ok" else "bad"
        rows.append({"id": name, "uri": name, "metadata": {"category": category, "case": case}})
    for case, row, status, _ in _OTHER_CASES:
        category = "good" if status == "ok" else "bad"
        rows.append({**row, "metadata": row.get("metadata", {"category": category, "case": case})})
    return rows


def case_of(row: dict[str, Any]) -> str:
    """The case of a template row (in ``metadata``, or in a column where the metadata is the broken part)."""
    return row["metadata"]["case"] if isinstance(row.get("metadata"), dict) else row["case"]


def expected() -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for case, name, status, kind in _FILE_CASES:
        at_manifest = case in _MANIFEST_FAILS or status == "ok"
        out[case] = {
            "id": name,
            "manifest_status": status if at_manifest else "ok",
            "manifest_error_kind": kind if at_manifest else "",
            "status": status,
            "error_kind": kind,
        }
    for case, row, status, kind in _OTHER_CASES:
        out[case] = {
            "id": row.get("id"),
            "manifest_status": status,
            "manifest_error_kind": kind,
            "status": status,
            "error_kind": kind,
        }
    return out


def _pillow_outcome(data: bytes) -> str:
    """What Pillow does with a full decode, in the pipeline's words ("" when the image decodes)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
    except Image.DecompressionBombError:
        return "too_many_pixels"
    except Exception as exc:  # noqa: BLE001
        if "truncated" in str(exc).lower() or isinstance(exc, EOFError):
            return "truncated"
        return "decode_error" if data and not isinstance(exc, Image.UnidentifiedImageError) else "not_image"
    return ""


def _check(files: dict[str, bytes]) -> None:
    """Fail loudly if Pillow does not do what the expectations say (files refused by sniffing are not decoded)."""
    upright = np.asarray(Image.open(io.BytesIO(files["good-upright.jpg"])).convert("RGB"), dtype=np.float64)
    for case, name, _status, kind in _FILE_CASES:
        if case in _MANIFEST_FAILS:
            continue
        got = _pillow_outcome(files[name])
        if got != kind:
            raise SystemExit(f"{name}: expected {kind or 'to decode'}, Pillow says {got or 'decodes fine'}")
        if name.startswith("good-orientation-"):
            img = ImageOps.exif_transpose(Image.open(io.BytesIO(files[name]))).convert("RGB")
            diff = np.abs(np.asarray(img, dtype=np.float64) - upright).mean()
            if img.size != (upright.shape[1], upright.shape[0]) or diff > 4:
                raise SystemExit(f"{name}: not upright after applying its EXIF orientation (diff {diff:.1f})")
    with Image.open(io.BytesIO(files["good-animated.gif"])) as gif:
        if gif.n_frames < 2:
            raise SystemExit("good-animated.gif: fewer than 2 frames")
    # The bomb must really inflate to its declared size, not merely claim it.
    bomb = files["bad-bomb.png"]
    at = bomb.index(b"IDAT")
    length = struct.unpack(">I", bomb[at - 4 : at])[0]
    if len(zlib.decompress(bomb[at + 4 : at + 4 + length])) != BOMB_SIDE * (BOMB_SIDE // 8 + 1):
        raise SystemExit("bad-bomb.png does not inflate to its declared size")


def generate(out_dir: Path) -> list[str]:
    """Write the corpus files into ``out_dir``; returns their names."""
    files = _files()
    _check(files)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (out_dir / name).write_bytes(data)
    return sorted(files)


def write_all(files_dir: Path = FILES, template: Path = TEMPLATE, expected_path: Path = EXPECTED) -> None:
    for old in files_dir.glob("*") if files_dir.is_dir() else []:
        old.unlink()
    generate(files_dir)
    template.write_text("".join(json.dumps(r) + "\n" for r in template_rows()))
    expected_path.write_text(json.dumps(expected(), indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    write_all()
    total = sum(p.stat().st_size for p in FILES.iterdir())
    print(f"wrote {len(list(FILES.iterdir()))} files ({total / 1024:.0f} KiB), {TEMPLATE.name}, {EXPECTED.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
