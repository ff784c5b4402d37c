"""One image handed over by code (search queries, the Python preprocessing API): path, URL, bytes, array or PIL.

Local paths here come from the caller's own code, so they are not confined to the drop roots; URLs still go
through the safe fetcher (timeouts, size limit, address policy).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Union

import numpy as np

from embedding_pipeline.settings import SourceSettings
from embedding_pipeline.sources.fetch import UrlFetcher, read_local
from embedding_pipeline.sources.manifest import is_url

ImageInput = Union[str, Path, bytes, np.ndarray, Any]  # Any: a PIL image


def read_image_input(image: ImageInput, settings: SourceSettings, fetcher: UrlFetcher | None = None) -> bytes:
    """Encoded bytes of ``image``; raises ``FetchError`` with a specific message when it cannot be read."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    if isinstance(image, (str, Path)):
        text = str(image)
        if is_url(text):
            own = fetcher is None
            fetcher = fetcher or UrlFetcher(settings)
            try:
                return fetcher.get(text)
            finally:
                if own:
                    fetcher.close()
        # The caller's own path: any location is fine, but the regular-file and size checks still apply.
        path = Path(text).expanduser()
        return read_local(path, [Path(path.anchor or "/")], settings.max_image_bytes)
    from PIL import Image

    pil = Image.fromarray(np.asarray(image, dtype=np.uint8)) if isinstance(image, np.ndarray) else image
    if not isinstance(pil, Image.Image):
        raise TypeError(f"unsupported image input: {type(image).__name__}")
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    return buf.getvalue()
