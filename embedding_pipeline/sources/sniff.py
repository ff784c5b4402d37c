"""What a file's bytes are, judged by their content only.

File extensions and ``Content-Type`` headers are routinely wrong (an error page saved as ``photo.jpg``, a server
that calls everything ``image/jpeg``), so neither is ever consulted. :func:`sniff` reads the leading bytes and
either names an image format or says specifically what the bytes are instead; Pillow's header parse then has the
last word on anything that looks like an image.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from embedding_pipeline.sources.statuses import ErrorKind

# (format, test on the leading bytes). Order matters only where signatures share a prefix.
_SIGNATURES: list[tuple[str, object]] = [
    ("JPEG", lambda b: b[:3] == b"\xff\xd8\xff"),
    ("PNG", lambda b: b[:8] == b"\x89PNG\r\n\x1a\n"),
    ("GIF", lambda b: b[:6] in (b"GIF87a", b"GIF89a")),
    ("WEBP", lambda b: b[:4] == b"RIFF" and b[8:12] == b"WEBP"),
    ("BMP", lambda b: b[:2] == b"BM"),
    ("TIFF", lambda b: b[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")),
    ("ICO", lambda b: b[:4] in (b"\x00\x00\x01\x00", b"\x00\x00\x02\x00")),
    ("PNM", lambda b: re.match(rb"P[1-7][\s#]", b[:3]) is not None),
    ("JPEG2000", lambda b: b[:12] == b"\x00\x00\x00\x0cjP  \r\n\x87\n" or b[:4] == b"\xff\x4f\xff\x51"),
    ("QOI", lambda b: b[:4] == b"qoif"),
    ("PSD", lambda b: b[:4] == b"8BPS"),
    ("DDS", lambda b: b[:4] == b"DDS "),
]

# ISO base media files (``....ftyp<brand>``) hold HEIF/AVIF stills but also videos; the brand says which.
# The only Pillow formats ever opened (Pillow's own names; PNM files are its "PPM" plugin). Pillow would otherwise
# try every plugin on unknown bytes: EPS, for one, runs Ghostscript where it is installed.
PIL_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF", "ICO", "PPM", "JPEG2000", "QOI", "PSD", "DDS", "AVIF")

_HEIC_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"hevm", b"hevs", b"mif1", b"msf1"}
_AVIF_BRANDS = {b"avif", b"avis"}

_BOMS = (b"\xef\xbb\xbf", b"\xff\xfe", b"\xfe\xff")
_HTML_STARTS = (b"<!doctype html", b"<html", b"<head", b"<body")
_SAMPLE = 1024


@dataclass(frozen=True)
class Sniffed:
    """Either ``format`` (an image format name) or ``kind`` + ``reason`` (why it is not a usable image).

    ``format`` is ``""`` and ``kind`` is ``""`` for unrecognised binary data: Pillow decides those.
    """

    format: str = ""
    kind: str = ""
    reason: str = ""


def sniff(data: bytes) -> Sniffed:
    if not data:
        return Sniffed(kind=ErrorKind.EMPTY_FILE, reason="empty file (0 bytes)")
    head = data[:_SAMPLE]
    for name, test in _SIGNATURES:
        if test(head):  # type: ignore[operator]
            return Sniffed(format=name)
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in _HEIC_BRANDS:
            return Sniffed(kind=ErrorKind.NOT_IMAGE, reason="unsupported image format heic")
        if brand in _AVIF_BRANDS:
            from PIL import features

            # Pillow decodes AVIF when built with libavif (its wheels are); otherwise say why it is refused.
            if features.check("avif"):
                return Sniffed(format="AVIF")
            return Sniffed(kind=ErrorKind.NOT_IMAGE, reason="unsupported image format avif (Pillow built without AVIF)")
        label = brand.decode("ascii", "replace")
        return Sniffed(kind=ErrorKind.NOT_IMAGE, reason=f"ISO media file (brand {label!r}), not an image")
    text = _strip_text_start(head)
    lowered = text[:64].lower()
    if lowered.startswith(_HTML_STARTS):
        return Sniffed(kind=ErrorKind.NOT_IMAGE, reason="HTML page, not an image")
    if lowered.startswith(b"<svg") or (lowered.startswith(b"<?xml") and b"<svg" in text.lower()):
        return Sniffed(kind=ErrorKind.NOT_IMAGE, reason="unsupported image format svg")
    if head.startswith(b"%PDF-"):
        return Sniffed(kind=ErrorKind.NOT_IMAGE, reason="PDF document, not an image")
    if _mostly_printable(head):
        return Sniffed(kind=ErrorKind.NOT_IMAGE, reason="text, not an image")
    return Sniffed()


def _strip_text_start(head: bytes) -> bytes:
    for bom in _BOMS:
        if head.startswith(bom):
            head = head[len(bom) :]
            break
    return head.lstrip(b" \t\r\n\x0c\x00")


def _mostly_printable(head: bytes) -> bool:
    """UTF-8 text (a trailing cut-off character allowed) with almost no control bytes."""
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:
        # A multi-byte character cut by the sample boundary is still text.
        if exc.start < len(head) - 3:
            return False
        text = head[: exc.start].decode("utf-8")
    if not text:
        return False
    controls = sum(1 for ch in text if ord(ch) < 32 and ch not in "\t\n\r\x0c")
    return controls <= len(text) // 100
