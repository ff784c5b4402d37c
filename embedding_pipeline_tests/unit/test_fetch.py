"""Reading item bytes safely: the address policy, retries, size and time limits, content sniffing, odd files."""

import ipaddress
import json
import os
import socket
import struct
import time
import zlib

import numpy as np
import pytest

from embedding_pipeline.settings import ConfigError, SourceSettings, load_settings
from embedding_pipeline.sources import fetch
from embedding_pipeline.sources.addresses import AddressPolicy, parse_entry
from embedding_pipeline.sources.drops import Drop, is_complete
from embedding_pipeline.sources.fetch import FetchError, UrlFetcher, read_local
from embedding_pipeline.sources.items import check_image, collect_items
from embedding_pipeline.sources.sniff import sniff
from embedding_pipeline_tests.http_servers import HTML_404, TestServer
from embedding_pipeline_tests.images import encode

PNG = encode(np.tile(np.arange(40, dtype=np.uint8)[:, None, None] * 6, (1, 30, 3)))


@pytest.fixture()
def files(tmp_path):
    folder = tmp_path / "served"
    folder.mkdir()
    (folder / "a.png").write_bytes(PNG)
    return folder


@pytest.fixture()
def server(files):
    with TestServer(files) as s:
        yield s


def _fetch(url, **settings):
    fetcher = UrlFetcher(SourceSettings(**{"fetch_timeout_s": 2, "fetch_retries": 0, **settings}))
    try:
        return fetcher.get(url)
    finally:
        fetcher.close()


def _error(url, **settings):
    with pytest.raises(FetchError) as info:
        _fetch(url, **settings)
    return info.value


# --- the address policy -----------------------------------------------------------------------------------------


def _allows(policy, address, port=80):
    return policy.allows(ipaddress.ip_address(address), port)


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "::1",
        "10.1.2.3",
        "192.168.0.10",
        "172.16.5.5",
        "169.254.169.254",
        "fe80::1",
        "100.64.0.1",
        "0.0.0.0",
        "::",
        "224.0.0.1",
        "ff02::1",
        "240.0.0.1",
        "::ffff:127.0.0.1",
        "::ffff:169.254.169.254",
        "2002:7f00:1::1",
        "fd00::1",
        "fec0::1",
    ],
)
def test_non_public_addresses_are_refused_by_default(address):
    assert not _allows(AddressPolicy(), address)
    assert _allows(AddressPolicy(allow_all=True), address)


@pytest.mark.parametrize("address", ["8.8.8.8", "93.184.216.34", "2001:4860:4860::8888", "::ffff:8.8.8.8"])
def test_public_addresses_are_allowed(address):
    assert _allows(AddressPolicy(), address)


def test_allowlist_entries_with_and_without_ports():
    policy = AddressPolicy.from_settings(False, ["127.0.0.1:8080", "10.0.0.0/8", "[::1]:9000", "[fd00::/8]:443"])
    assert _allows(policy, "127.0.0.1", 8080) and not _allows(policy, "127.0.0.1", 8081)
    assert _allows(policy, "::ffff:127.0.0.1", 8080)  # IPv4-mapped IPv6 is the IPv4 address
    assert _allows(policy, "10.200.3.4", 1) and _allows(policy, "::ffff:10.0.0.1", 22)
    assert _allows(policy, "11.0.0.1", 80)  # public anyway
    assert _allows(policy, "::1", 9000) and not _allows(policy, "::1", 8080)
    assert _allows(policy, "fd12::5", 443) and not _allows(policy, "fd12::5", 80)
    assert not _allows(policy, "192.168.1.1", 8080) and not _allows(policy, "169.254.169.254", 80)


@pytest.mark.parametrize("entry", ["localhost", "10.0.0.1/8", "127.0.0.1:0", "127.0.0.1:99999", "[::1]:x", "1.2.3"])
def test_bad_allowlist_entries_are_config_errors_naming_them(tmp_path, entry):
    with pytest.raises(ValueError, match="bad allow-list entry"):
        parse_entry(entry)
    config = tmp_path / "c.yaml"
    config.write_text(f"sources:\n  private_allowlist: [{json.dumps(entry)}]\n")
    with pytest.raises(ConfigError, match=f"private_allowlist.*{entry[:5]}"):
        load_settings(config, environ={})


def test_loopback_url_refused_by_default_with_host_and_address(server):
    err = _error(server.url("/files/a.png"))
    assert err.kind == "refused_address"
    assert "127.0.0.1" in str(err) and "non-public" in str(err)
    assert server.requests("/files/a.png") == 0


def test_allowlisted_ip_and_port_is_fetched_and_other_ports_are_not(server):
    assert _fetch(server.url("/files/a.png"), private_allowlist=[f"127.0.0.1:{server.port}"]) == PNG
    assert _fetch(server.url("/files/a.png"), private_allowlist=["127.0.0.0/8"]) == PNG
    err = _error(server.url("/files/a.png"), private_allowlist=[f"127.0.0.1:{server.port + 1}"])
    assert err.kind == "refused_address"
    assert _fetch(server.url("/files/a.png"), allow_private_urls=True) == PNG


def test_ipv4_mapped_ipv6_literal_is_judged_as_ipv4(server):
    url = f"http://[::ffff:127.0.0.1]:{server.port}/files/a.png"
    assert _error(url).kind == "refused_address"


@pytest.mark.parametrize("host", ["169.254.169.254", "100.64.0.1", "[fd00::1]", "0.0.0.0"])
def test_refused_without_a_connection_attempt(monkeypatch, host):
    import urllib3.util.connection

    attempts = []

    def record(*args, **kwargs):
        attempts.append(args)
        raise OSError("no connections in this test")

    monkeypatch.setattr(urllib3.util.connection, "create_connection", record)
    monkeypatch.setattr(socket, "create_connection", record)
    err = _error(f"http://{host}/latest/meta-data/", fetch_retries=3)
    assert err.kind == "refused_address" and host.strip("[]") in str(err)
    assert attempts == []


def test_redirect_hop_into_a_refused_address_is_refused(server, files):
    with TestServer(files, url_host="localhost") as private:
        target = private.url("/files/a.png")
        err = _error(server.url(f"/redirect?to={target}"), private_allowlist=[f"127.0.0.1:{server.port}"])
        assert err.kind == "refused_address" and "localhost" in str(err)
        assert private.requests("/files/a.png") == 0
        # The same hop to an allowed address is followed.
        target = server.url("/files/a.png")
        assert _fetch(server.url(f"/redirect?to={target}"), private_allowlist=[f"127.0.0.1:{server.port}"]) == PNG


def test_connection_goes_to_the_checked_address_not_a_second_lookup(monkeypatch, server):
    """DNS rebinding: the name resolves once per connection, and that checked answer is what is connected to."""
    real = socket.getaddrinfo
    answers = []

    def rebinding(host, *args, **kwargs):
        if host == "images.example":
            # First answer: the allow-listed test server; any later lookup would get a metadata address.
            address = "127.0.0.1" if not answers else "169.254.169.254"
            answers.append(address)
            return real(address, *args, **kwargs)
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    url = f"http://images.example:{server.port}/files/a.png"
    assert _fetch(url, private_allowlist=[f"127.0.0.1:{server.port}"]) == PNG
    assert answers == ["127.0.0.1"]
    assert server.last_host == f"images.example:{server.port}"  # the Host header keeps the name


def test_https_connects_to_the_checked_address_and_verifies_the_name(tmp_path, monkeypatch, files):
    """TLS still checks the certificate against the URL's host name while the socket goes to the pinned address."""
    import shutil
    import ssl
    import subprocess

    openssl = shutil.which("openssl")
    if openssl is None:
        from embedding_pipeline_tests.system import missing

        missing("needs the openssl command to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=images.example",
            "-addext",
            "subjectAltName=DNS:images.example",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    real = socket.getaddrinfo

    def resolve(host, *args, **kwargs):
        return real("127.0.0.1" if host == "images.example" else host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    with TestServer(files, url_host="images.example", tls=context) as tls_server:
        fetcher = UrlFetcher(SourceSettings(fetch_retries=0, private_allowlist=[f"127.0.0.1:{tls_server.port}"]))
        fetcher.session.verify = str(cert)
        try:
            assert fetcher.get(tls_server.url("/files/a.png")) == PNG
            # The same server by address: the certificate does not name 127.0.0.1, so verification fails.
            with pytest.raises(FetchError) as info:
                fetcher.get(f"https://127.0.0.1:{tls_server.port}/files/a.png")
            assert info.value.kind == "connection_error" and "TLS" in str(info.value)
        finally:
            fetcher.close()
        # Over TLS too, one deadline covers headers trickled a byte at a time (the socket is wrapped by then).
        slow = UrlFetcher(
            SourceSettings(
                fetch_retries=0,
                fetch_deadline_s=0.5,
                fetch_timeout_s=1,
                private_allowlist=[f"127.0.0.1:{tls_server.port}"],
            )
        )
        slow.session.verify = str(cert)
        try:
            started = time.monotonic()
            with pytest.raises(FetchError) as info:
                slow.get(tls_server.url("/trickle-headers/400/0.05"))
            assert info.value.kind == "timeout" and time.monotonic() - started < 2
        finally:
            slow.close()


def test_a_kept_alive_connection_is_under_the_next_downloads_deadline(server):
    fetcher = UrlFetcher(
        SourceSettings(
            fetch_retries=0, fetch_deadline_s=0.5, fetch_timeout_s=1, private_allowlist=[f"127.0.0.1:{server.port}"]
        )
    )
    try:
        assert fetcher.get(server.url("/files/a.png")) == PNG  # leaves its connection in the pool
        started = time.monotonic()
        with pytest.raises(FetchError) as info:
            fetcher.get(server.url("/trickle-headers/400/0.05"))  # reuses it
        assert info.value.kind == "timeout" and time.monotonic() - started < 2
    finally:
        fetcher.close()


def test_environment_proxies_are_ignored(monkeypatch, server):
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")
    assert _fetch(server.url("/files/a.png"), private_allowlist=[f"127.0.0.1:{server.port}"]) == PNG


def test_explicit_proxy_checks_the_target_address_first(server):
    proxy = {"fetch_proxy": server.base_url}  # the test server serves absolute-form requests like a proxy
    target = f"http://127.0.0.1:{server.port}/files/a.png"
    assert _error(target, **proxy).kind == "refused_address"
    assert _error("http://169.254.169.254/latest/", **proxy).kind == "refused_address"
    assert server.requests(target) == 0
    assert _fetch(target, private_allowlist=[f"127.0.0.1:{server.port}"], **proxy) == PNG
    assert server.requests(target) == 1  # it went through the proxy, in absolute form


# --- URLs: schemes, statuses, retries, limits -------------------------------------------------------------------


@pytest.mark.parametrize("url", ["ftp://example.com/a.jpg", "file:///etc/hostname", "http:///a.jpg", "http://h:99999/"])
def test_bad_urls(url):
    assert _error(url).kind == "bad_url"


def test_redirect_to_another_scheme_is_a_bad_url(server):
    err = _error(server.url("/redirect?to=file:///etc/hostname"), private_allowlist=["127.0.0.1"])
    assert err.kind == "bad_url" and "file" in str(err)


def test_http_errors_and_retries(server):
    allow = {"private_allowlist": [f"127.0.0.1:{server.port}"]}
    err = _error(server.url("/status/404"), fetch_retries=2, **allow)
    assert err.kind == "http_error" and "404" in str(err)
    assert server.requests("/status/404") == 1  # a 404 is final
    err = _error(server.url("/status/503"), fetch_retries=1, **allow)
    assert err.kind == "http_unavailable" and "503" in str(err)
    assert server.requests("/status/503") == 2
    assert _fetch(server.url("/flaky/2/a.png"), fetch_retries=2, **allow) == PNG
    assert server.requests("/flaky/2/a.png") == 3


def test_retry_after_is_capped(monkeypatch, server):
    assert fetch._Retry(retry_after_max=fetch.RETRY_AFTER_CAP_S).parse_retry_after("86400") == fetch.RETRY_AFTER_CAP_S
    monkeypatch.setattr(fetch, "RETRY_AFTER_CAP_S", 0.2)
    start = time.monotonic()
    data = _fetch(server.url("/retry-after/1/3600/a.png"), fetch_retries=2, private_allowlist=["127.0.0.1"])
    assert data == PNG and time.monotonic() - start < 3
    assert server.requests("/retry-after/1/3600/a.png") == 2


def test_redirect_loop(server):
    err = _error(server.url("/loop"), private_allowlist=["127.0.0.1"])
    assert err.kind == "too_many_redirects"
    assert server.requests("/loop") == fetch.MAX_REDIRECTS + 1


def test_size_limits(server):
    allow = {"private_allowlist": ["127.0.0.1"], "max_image_bytes": 100_000}
    assert _error(server.url("/big/150000"), **allow).kind == "too_large"
    start = time.monotonic()
    err = _error(server.url("/declared-big"), **allow)
    assert err.kind == "too_large" and "1000000000" in str(err)
    assert time.monotonic() - start < 1
    assert len(_fetch(server.url("/big/90000"), **allow)) == 90000


def test_timeouts(server):
    allow = {"private_allowlist": ["127.0.0.1"]}
    start = time.monotonic()
    err = _error(server.url("/slow/3"), fetch_timeout_s=0.3, **allow)
    assert err.kind == "timeout" and time.monotonic() - start < 2
    # A server that keeps sending a byte now and then never trips the read timeout; the deadline stops it.
    start = time.monotonic()
    err = _error(server.url("/trickle/1000/0.05"), fetch_deadline_s=0.5, **allow)
    assert err.kind == "timeout" and time.monotonic() - start < 2
    # Headers trickled a byte at a time: the same one deadline covers them (it once held a worker unbounded).
    start = time.monotonic()
    err = _error(server.url("/trickle-headers/400/0.05"), fetch_deadline_s=0.5, fetch_timeout_s=1, **allow)
    assert err.kind == "timeout" and "longer than 0.5 s" in str(err) and time.monotonic() - start < 2
    # Retries and redirects do not start the clock again.
    start = time.monotonic()
    err = _error(server.url("/slow/0.4"), fetch_deadline_s=0.6, fetch_timeout_s=0.3, fetch_retries=3, **allow)
    assert err.kind == "timeout" and time.monotonic() - start < 2


def test_unreachable_and_unresolvable_hosts(monkeypatch):
    # A closed port on loopback, allowed by the policy: connection refused.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert _error(f"http://127.0.0.1:{port}/a.png", private_allowlist=["127.0.0.1"]).kind == "connection_error"
    err = _error("http://no-such-host.invalid/a.png")
    assert err.kind == "connection_error" and "resolve" in str(err)


# --- content sniffing -------------------------------------------------------------------------------------------

_RGB = np.full((8, 8, 3), 90, dtype=np.uint8)


@pytest.mark.parametrize(
    "fmt, name, kwargs",
    [
        ("JPEG", "JPEG", {}),
        ("PNG", "PNG", {}),
        ("GIF", "GIF", {}),
        ("WEBP", "WEBP", {}),
        ("BMP", "BMP", {}),
        ("TIFF", "TIFF", {}),
        ("ICO", "ICO", {}),
        ("PPM", "PNM", {}),
    ],
)
def test_sniff_image_formats(fmt, name, kwargs):
    data = encode(_RGB, fmt, **kwargs)
    assert sniff(data).format == name and not sniff(data).kind
    assert check_image(data)


@pytest.mark.parametrize(
    "data, kind, reason",
    [
        (b"", "empty_file", "empty file"),
        (HTML_404, "not_image", "HTML page, not an image"),
        (b"\xef\xbb\xbf  \n<!DOCTYPE HTML PUBLIC>", "not_image", "HTML page, not an image"),
        (b"\r\n<HTML><body>oops</body></HTML>", "not_image", "HTML page, not an image"),
        (b"<head><title>x</title></head>", "not_image", "HTML page, not an image"),
        (b"<body>Access denied</body>", "not_image", "HTML page, not an image"),
        (b"Access denied\n", "not_image", "text, not an image"),
        ('{"error": "no such key — ünïcode"}'.encode(), "not_image", "text, not an image"),
        (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic", "not_image", "unsupported image format heic"),
        (b"<svg xmlns='http://www.w3.org/2000/svg'/>", "not_image", "unsupported image format svg"),
        (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n", "not_image", "PDF document, not an image"),
    ],
)
def test_sniff_reasons(data, kind, reason):
    found = sniff(data)
    assert (found.kind, found.reason.startswith(reason)) == (kind, True)
    with pytest.raises(FetchError) as info:
        check_image(data)
    assert info.value.kind == kind and str(info.value) == found.reason


def test_unknown_binary_and_broken_headers_are_not_images():
    noise = bytes(np.random.default_rng(0).integers(0, 256, 512, dtype=np.uint8))
    assert sniff(noise) == sniff(noise).__class__()  # nothing recognised: Pillow decides
    with pytest.raises(FetchError, match="unrecognised format") as info:
        check_image(noise)
    assert info.value.kind == "not_image"
    with pytest.raises(FetchError, match="PNG") as info:
        check_image(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    assert info.value.kind == "not_image"


def test_decompression_bomb_header_passes_the_manifest_stage():
    """Its size is decoding's call (too_many_pixels), not a reason to say the file is no image."""

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", 60000, 60000, 8, 0, 0, 0, 0))
    # Only the start of the pixel data: the header alone declares 3.6 Gpx.
    assert check_image(b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", zlib.compress(bytes(1000)))) == "PNG"


def test_content_type_and_extension_are_ignored(server, tmp_path):
    drop = tmp_path / "drop"
    drop.mkdir()
    rows = [{"id": "png-as-jpeg", "uri": server.url("/files/a.png")}, {"id": "html", "uri": server.url("/html")}]
    (drop / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    settings = SourceSettings(private_allowlist=[f"127.0.0.1:{server.port}"])
    ok, html = collect_items(Drop("drop", drop), settings, tmp_path / "blobs")
    assert ok.status == "ok" and ok.size == len(PNG)
    assert (html.status, html.error_kind, html.error) == ("failed", "not_image", "HTML page, not an image")


# --- local files ------------------------------------------------------------------------------------------------


def test_local_file_kinds(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (root / "a.png").write_bytes(PNG)
    (root / "dir").mkdir()
    (tmp_path / "outside.png").write_bytes(PNG)
    (root / "out-link.png").symlink_to(tmp_path / "outside.png")
    (root / "in-link.png").symlink_to(root / "a.png")
    roots = [root]

    def kind(path, max_bytes=10_000):
        with pytest.raises(FetchError) as info:
            read_local(path, roots, max_bytes)
        return info.value.kind

    assert read_local(root / "a.png", roots, 10_000) == PNG
    assert read_local(root / "in-link.png", roots, 10_000) == PNG
    assert kind(root / "missing.png") == "not_found"
    assert kind(root / ".." / "outside.png") == "outside_roots"
    assert kind(root / "out-link.png") == "outside_roots"
    assert kind(root / "dir") == "not_a_file"
    assert kind(root / "a.png", max_bytes=len(PNG) - 1) == "too_large"


def test_fifo_is_not_a_file_and_never_blocks(tmp_path):
    drop = tmp_path / "drop"
    drop.mkdir()
    os.mkfifo(drop / "pipe.jpg")
    os.mkfifo(drop / "manifest.jsonl")  # a manifest name must not make the walk open it either
    start = time.monotonic()
    items = {i.uri.rsplit("/", 1)[-1]: i for i in collect_items(Drop("drop", drop), SourceSettings(), tmp_path / "b")}
    assert time.monotonic() - start < 5
    assert {name: (i.status, i.error_kind) for name, i in items.items()} == {
        "pipe.jpg": ("failed", "not_a_file"),
        "manifest.jsonl": ("failed", "not_a_file"),
    }
    assert "FIFO" in items["pipe.jpg"].error


def test_symlink_loops_in_a_folder_drop_do_not_hang(tmp_path):
    drop = tmp_path / "drop"
    (drop / "sub").mkdir(parents=True)
    (drop / "a.png").write_bytes(PNG)
    (drop / "sub" / "back").symlink_to(drop)  # a folder link pointing at its own ancestor
    (drop / "self.jpg").symlink_to(drop / "self.jpg")  # a file link pointing at itself
    (drop / "dangling.jpg").symlink_to(tmp_path / "nowhere.jpg")
    start = time.monotonic()
    items = {i.uri.rsplit("/", 1)[-1]: i for i in collect_items(Drop("drop", drop), SourceSettings(), tmp_path / "b")}
    assert is_complete(Drop("drop", drop), settle_s=0)
    assert time.monotonic() - start < 5
    assert set(items) == {"a.png", "self.jpg", "dangling.jpg"}  # the folder link is not entered
    assert items["a.png"].status == "ok"
    assert items["self.jpg"].error_kind == "unreadable"
    assert items["dangling.jpg"].error_kind in ("not_found", "outside_roots")


def test_fetch_error_keeps_message_and_kind():
    err = FetchError("timeout", "timed out after 2 s: http://x/")
    assert (err.kind, str(err)) == ("timeout", "timed out after 2 s: http://x/")
    import pickle

    again = pickle.loads(pickle.dumps(err))
    assert (again.kind, str(again)) == (err.kind, str(err))


def test_avif_is_accepted_when_pillow_decodes_it():
    import io

    from PIL import Image, features

    if not features.check("avif"):
        pytest.skip("this Pillow build has no AVIF codec")
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(buf, format="AVIF")
    assert sniff(buf.getvalue()).format == "AVIF"
    check_image(buf.getvalue())  # no error
