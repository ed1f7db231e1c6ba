"""Image URLs in /v1/embeddings: off by default, and when on, refused unless allow-listed and public (SSRF).
No real network: the only server is a loopback one, each refusal is checked to happen before any connection
(the loopback server counts its requests), and DNS answers come from an injected resolver."""

from __future__ import annotations

import asyncio
import base64
import http.server
import ipaddress
import shutil
import ssl
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from service.settings import Settings
from service.urlfetch import FetchPolicy, UrlFetcher, UrlRefusedError, address_is_public
from tests.service.conftest import LiveServer, serve


class ImageHost:
    """A loopback HTTP server: /img.png -> the image, /big -> more than the cap, /to?u=URL -> 302 to URL."""

    def __init__(self, image: bytes, tls: ssl.SSLContext | None = None) -> None:
        self.requests: list[str] = []
        host = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                host.requests.append(self.path)
                if self.path.startswith("/to?u="):
                    self.send_response(302)
                    self.send_header("Location", self.path[len("/to?u=") :])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = {"/img.png": image, "/big": b"\x89PNG" + bytes(5000)}.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                if self.path != "/big":  # /big streams without a length: the byte cap must catch it as it arrives
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def image(asset_bytes: dict[str, bytes]) -> bytes:
    return next(b for n, b in sorted(asset_bytes.items()) if n.endswith(".png"))


@pytest.fixture
def host(image: bytes) -> Iterator[ImageHost]:
    h = ImageHost(image)
    yield h
    h.close()


def policy(**kw: object) -> FetchPolicy:
    base: dict[str, object] = {"allow_hosts": ("images.test", "*.cdn.test", "127.0.0.1"), "max_bytes": 4096}
    return FetchPolicy(**(base | kw))  # type: ignore[arg-type]


def resolver(table: dict[str, list[str]]):  # type: ignore[no-untyped-def]
    async def resolve(name: str, port: int) -> list[str]:
        if name not in table:
            raise OSError(f"no such host {name}")
        return table[name]

    return resolve


def refused(fetcher: UrlFetcher, url: str) -> UrlRefusedError:
    with pytest.raises(UrlRefusedError) as exc:
        asyncio.run(fetcher.fetch(url, 0))
    return exc.value


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "169.254.169.254",
        "100.64.0.1",
        "0.0.0.0",
        "::1",
        "fe80::1",
        "fc00::1",
        "::ffff:127.0.0.1",
        "64:ff9b::a00:1",
        "224.0.0.1",
        "240.0.0.1",
    ],
)
def test_non_public_addresses_are_refused(address: str) -> None:
    assert not address_is_public(ipaddress.ip_address(address))


def test_public_addresses_and_exempt_networks() -> None:
    assert address_is_public(ipaddress.ip_address("93.184.216.34"))
    assert address_is_public(ipaddress.ip_address("2606:2800:220:1::1"))
    exempt = (ipaddress.ip_network("10.1.0.0/16"),)
    assert address_is_public(ipaddress.ip_address("10.1.2.3"), exempt)
    assert not address_is_public(ipaddress.ip_address("10.2.0.1"), exempt)


def test_refusals_happen_before_any_connection(host: ImageHost) -> None:
    loop_url = f"http://127.0.0.1:{host.port}/img.png"
    table = {
        "images.test": ["127.0.0.1"],  # an allow-listed name pointing at loopback
        "a.cdn.test": ["93.184.216.34", "10.0.0.5"],  # one bad address among good ones (every address is checked)
        "b.cdn.test": ["::ffff:169.254.169.254"],
    }
    fetcher = UrlFetcher(policy(), resolve=resolver(table))
    assert refused(fetcher, loop_url).code == "url_private_address"  # allow-listed literal, but loopback
    assert refused(fetcher, f"http://images.test:{host.port}/img.png").code == "url_private_address"
    assert refused(fetcher, "https://a.cdn.test/x.png").code == "url_private_address"
    assert refused(fetcher, "http://b.cdn.test/x.png").code == "url_private_address"
    assert refused(fetcher, f"http://localhost:{host.port}/img.png").code == "url_not_allowed"  # not on the list
    assert refused(fetcher, "http://evil.test/x.png").code == "url_not_allowed"
    assert refused(fetcher, "http://cdn.test.evil.test/x.png").code == "url_not_allowed"
    assert refused(fetcher, "ftp://images.test/x.png").code == "url_not_allowed"
    assert refused(fetcher, "http://user:pw@images.test/x.png").code == "url_not_allowed"
    assert refused(fetcher, "http://[::1]/x.png").code == "url_not_allowed"
    assert refused(fetcher, "http://c.cdn.test/x.png").code == "url_fetch_failed"  # does not resolve
    assert host.requests == []  # nothing reached the loopback server


def test_fetch_redirect_guard_and_caps(host: ImageHost, image: bytes) -> None:
    # The operator exempts loopback for this test only, as for an internal image store.
    exempt = (ipaddress.ip_network("127.0.0.1/32"),)
    hosts = ("127.0.0.1", "169.254.169.254", "10.0.0.1")  # allow-listed, yet refused for their addresses
    fetcher = UrlFetcher(policy(allow_hosts=hosts, exempt_networks=exempt, max_bytes=len(image) + 10))
    base = f"http://127.0.0.1:{host.port}"
    assert asyncio.run(fetcher.fetch(f"{base}/img.png")) == image
    assert asyncio.run(fetcher.fetch(f"{base}/to?u={base}/img.png")) == image  # a redirect within the rules
    for target, code in [
        ("http://169.254.169.254/latest/meta-data/", "url_private_address"),  # metadata endpoint
        ("http://10.0.0.1/x.png", "url_private_address"),
        ("http://evil.test/x.png", "url_not_allowed"),
        ("file:///etc/passwd", "url_not_allowed"),
    ]:
        assert refused(fetcher, f"{base}/to?u={target}").code == code
    assert all(not r.startswith(("/latest", "/x.png")) for r in host.requests)
    loop = f"{base}/to?u={base}/to?u={base}/to?u={base}/to?u={base}/img.png"  # 4 redirects > 3
    assert refused(fetcher, loop).code == "url_too_many_redirects"
    small = UrlFetcher(policy(exempt_networks=exempt, max_bytes=1000))
    too_big = refused(small, f"{base}/big")  # no Content-Length: caught while streaming
    assert too_big.code == "url_too_large" and too_big.http_status == 413
    assert refused(small, f"{base}/img.png").code == "url_too_large"  # Content-Length over the cap
    assert refused(fetcher, f"{base}/missing.png").code == "url_fetch_failed"
    # https goes to the checked address with the name as TLS SNI; a plain-HTTP peer fails the handshake cleanly.
    assert refused(fetcher, f"https://127.0.0.1:{host.port}/img.png").code == "url_fetch_failed"


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a test CA")
def test_https_checks_the_certificate_against_the_name(tmp_path: Path, image: bytes) -> None:
    """The connection goes to the checked address, yet TLS verifies the URL's host name (SNI), so pinning the
    address costs no certificate check."""

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=tmp_path, check=True, capture_output=True)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1", "-subj", "/CN=test-ca")
    openssl("req", *ec, "-keyout", "leaf.key", "-out", "leaf.csr", "-subj", "/CN=images.test")
    (tmp_path / "ext").write_text("subjectAltName=DNS:images.test\n")
    openssl("x509", "-req", "-in", "leaf.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "leaf.pem", "-days", "1", "-extfile", "ext")  # fmt: skip
    server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_tls.load_cert_chain(tmp_path / "leaf.pem", tmp_path / "leaf.key")
    tls_host = ImageHost(image, server_tls)
    try:
        trust = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
        names = resolver({"images.test": ["127.0.0.1"], "other.test": ["127.0.0.1"]})
        exempt = (ipaddress.ip_network("127.0.0.1/32"),)
        rules = policy(allow_hosts=("images.test", "other.test"), exempt_networks=exempt, max_bytes=len(image))
        fetcher = UrlFetcher(rules, resolve=names, verify=trust)
        assert asyncio.run(fetcher.fetch(f"https://images.test:{tls_host.port}/img.png")) == image
        wrong_name = refused(fetcher, f"https://other.test:{tls_host.port}/img.png")  # same address, other name
        assert wrong_name.code == "url_fetch_failed"
        untrusted = UrlFetcher(rules, resolve=names)  # the system's CAs do not know the test CA
        assert refused(untrusted, f"https://images.test:{tls_host.port}/img.png").code == "url_fetch_failed"
        assert tls_host.requests == ["/img.png"]
    finally:
        tls_host.close()


def test_time_cap(host: ImageHost) -> None:
    async def slow(name: str, port: int) -> list[str]:
        await asyncio.sleep(5)
        return ["93.184.216.34"]

    fetcher = UrlFetcher(policy(timeout_s=0.2), resolve=slow)
    with pytest.raises(UrlRefusedError) as exc:
        asyncio.run(fetcher.fetch_all([(0, "http://images.test/x.png")]))
    assert exc.value.code == "url_fetch_timeout"


def test_settings_need_an_allow_list() -> None:
    with pytest.raises(ValueError, match="url_fetch_allow_hosts"):
        Settings(url_fetch=True)
    with pytest.raises(ValueError, match="not a CIDR"):
        Settings(url_fetch_allow_networks="10.0.0.0/8,intranet")


def test_through_v1_embeddings(debug_checkpoint: Path, host: ImageHost, image: bytes, live: list[LiveServer]) -> None:
    base = f"http://127.0.0.1:{host.port}"
    url = f"{base}/img.png"
    common = {"model": str(debug_checkpoint), "max_wait_ms": 2, "golden_check": False}
    live.append(off := serve(Settings(**common)))
    strict = serve(Settings(**common, url_fetch=True, url_fetch_allow_hosts="127.0.0.1"))
    live.append(strict)
    exempt = serve(
        Settings(
            **common,
            url_fetch=True,
            url_fetch_allow_hosts="127.0.0.1,10.9.9.9",
            url_fetch_allow_networks="127.0.0.1/32",
        )
    )
    live.append(exempt)
    body = {"model": "aim-debug", "input": [url]}
    with off.client() as http:
        r = http.post("/v1/embeddings", json=body)
        assert r.status_code == 400 and r.json()["error"]["code"] == "url_fetch_disabled"
    with strict.client() as http:
        r = http.post("/v1/embeddings", json=body)
        assert r.status_code == 400 and r.json()["error"]["code"] == "url_private_address"
        assert r.json()["error"]["param"] == "input[0]"
    assert host.requests == []
    with exempt.client() as http:
        fetched = http.post("/v1/embeddings", json={"model": "aim-debug", "input": [{"image": url}]})
        inline = http.post("/embed", json={"images": [base64.b64encode(image).decode()]})
        redirected = http.post(
            "/v1/embeddings", json={"model": "aim-debug", "input": [f"{base}/to?u=http://10.9.9.9/"]}
        )
    assert fetched.status_code == 200, fetched.text
    np.testing.assert_allclose(fetched.json()["data"][0]["embedding"], inline.json()["embeddings"][0], atol=1e-5)
    assert redirected.status_code == 400 and redirected.json()["error"]["code"] == "url_private_address"
