"""Reading an item's bytes: local files confined to allowed roots, URLs fetched with limits.

Both paths raise :class:`FetchError` with a short, specific message; callers record it per item.
"""

from __future__ import annotations

import ipaddress
import socket
from pathlib import Path
from urllib.parse import urlsplit

from embedding_pipeline.settings import SourceSettings


class FetchError(Exception):
    """An item's bytes could not be read; the message is meant for the per-item error column."""


def read_local(path: str | Path, roots: list[Path], max_bytes: int) -> bytes:
    resolved = Path(path).resolve()  # follows symlinks, so a link out of the roots is caught below
    if not any(resolved.is_relative_to(root.resolve()) for root in roots):
        raise FetchError(f"path outside the allowed roots: {path}")
    try:
        size = resolved.stat().st_size
        if size > max_bytes:
            raise FetchError(f"file too large: {size} bytes > {max_bytes}")
        return resolved.read_bytes()
    except FileNotFoundError:
        raise FetchError(f"file not found: {path}") from None
    except IsADirectoryError:
        raise FetchError(f"is a directory: {path}") from None
    except OSError as exc:
        raise FetchError(f"cannot read {path}: {exc.strerror}") from None


def _check_host(url: str, allow_private: bool) -> None:
    host = urlsplit(url).hostname
    if not host:
        raise FetchError(f"URL has no host: {url}")
    if allow_private:
        return
    try:
        infos = socket.getaddrinfo(host, None)
    except socket.gaierror as exc:
        raise FetchError(f"cannot resolve {host}: {exc.strerror}") from None
    for info in infos:
        addr = ipaddress.ip_address(info[4][0])
        if addr.is_loopback or addr.is_private or addr.is_link_local or addr.is_reserved or addr.is_multicast:
            raise FetchError(f"refused: {host} resolves to a non-public address ({addr})")


class UrlFetcher:
    """A requests session with retries/backoff; one per thread (sessions are not thread-safe)."""

    def __init__(self, settings: SourceSettings):
        import requests
        from requests.adapters import HTTPAdapter
        from urllib3.util.retry import Retry

        self.settings = settings
        retry = Retry(
            total=settings.fetch_retries,
            backoff_factor=0.5,
            status_forcelist=(429, 500, 502, 503, 504),
            allowed_methods=("GET",),
            raise_on_status=False,
        )
        self.session = requests.Session()
        self.session.max_redirects = 5
        adapter = HTTPAdapter(max_retries=retry)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)

    def get(self, url: str) -> bytes:
        import requests

        _check_host(url, self.settings.allow_private_urls)
        limit = self.settings.max_image_bytes
        timeout = self.settings.fetch_timeout_s
        try:
            with self.session.get(url, stream=True, timeout=(timeout, timeout)) as resp:
                if resp.status_code != 200:
                    raise FetchError(f"HTTP {resp.status_code} from {url}")
                chunks, total = [], 0
                for chunk in resp.iter_content(64 * 1024):
                    total += len(chunk)
                    if total > limit:
                        raise FetchError(f"download larger than {limit} bytes: {url}")
                    chunks.append(chunk)
                return b"".join(chunks)
        except requests.RequestException as exc:
            raise FetchError(f"download failed for {url}: {type(exc).__name__}") from None

    def close(self) -> None:
        self.session.close()
