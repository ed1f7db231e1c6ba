"""/docs and /redoc work on an air-gapped host: the pages reference only this server, and every asset answers."""

from __future__ import annotations

import re

import pytest

from service.backends.fake_backend import FakeBackend
from service.settings import Settings
from tests.service.conftest import serve

# src="...", href="...", and the JS url: '...' / spec-url that point Swagger UI / ReDoc at the spec.
_URLS = re.compile(r"""(?:src|href|spec-url)\s*=\s*["']([^"']+)["']|\burl:\s*["']([^"']+)["']""")


def _referenced(html: str) -> list[str]:
    return [a or b for a, b in _URLS.findall(html)]


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_reference_only_local_assets_that_answer(live: list, page: str) -> None:
    server = serve(Settings(max_batch_size=4), FakeBackend())
    live.append(server)
    with server.client() as client:
        r = client.get(page)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        urls = _referenced(r.text)
        assert any(u.endswith(".js") for u in urls), urls  # the page does load its UI from somewhere
        remote = [u for u in urls if re.match(r"^(https?:)?//", u)]
        assert not remote, f"{page} loads {remote} from outside this server"
        assert "fonts.googleapis.com" not in r.text and "cdn.jsdelivr.net" not in r.text
        for url in urls:
            asset = client.get(url)
            assert asset.status_code == 200 and asset.content, url
            if url.endswith(".js"):
                assert "javascript" in asset.headers["content-type"] and len(asset.content) > 100_000, url
        assert client.get("/docs/oauth2-redirect").status_code == 200
