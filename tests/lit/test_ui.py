"""The /ui search page in a real headless Chromium (Debian's, driven by Playwright; no browser download): load the
page, enter the API key, search by text and by image, see thumbnails, ids and scores. A screenshot is written to
$AIM_TEST_ARTIFACTS (default: pytest's temporary directory) and its path logged."""

from __future__ import annotations

import base64
import io
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from service.settings import Settings
from tests.lit.conftest import caption, fashion_pairs
from tests.service.conftest import LiveServer, serve

logger = logging.getLogger(__name__)

CHROMIUM = next((p for p in ("/usr/bin/chromium", shutil.which("chromium") or "") if p and Path(p).exists()), None)
KEY = "ui-test-key"


def _thumb(path: Path) -> str:
    img = Image.open(path).convert("RGB")
    img.thumbnail((48, 48))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def ui_server(lit_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    index = tmp_path_factory.mktemp("ui-index") / "index"
    live = serve(Settings(model=str(lit_folder), index_path=str(index), api_keys=[KEY], auth_scope="all"))
    pairs = fashion_pairs()
    body = {
        "ids": [c for c, _ in pairs],
        "images": [base64.b64encode(p.read_bytes()).decode() for _, p in pairs],
        "metadata": [{"caption": caption(c), "thumbnail": _thumb(p)} for c, p in pairs],
    }
    with live.client(headers={"Authorization": f"Bearer {KEY}"}) as c:
        assert c.post("/index/items", json=body).status_code == 200
    yield live
    live.stop()


def test_page_is_static_and_can_be_turned_off(ui_server: LiveServer, lit_folder: Path) -> None:
    with ui_server.client() as c:  # no key: the page itself is public, the API is not
        page = c.get("/ui")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        assert "script-src 'self'" in page.headers["content-security-policy"]
        assert "http" not in page.text.replace('"/ui/', "")  # nothing from a CDN: every asset is ours
        assert c.get("/ui/app.js").status_code == 200
        assert c.post("/search", json={"text": "bag"}).status_code == 401
    off = serve(Settings(model=str(lit_folder), ui_enabled=False))
    try:
        assert httpx.get(off.url + "/ui").status_code == 404
    finally:
        off.stop()


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium here (apt-get install chromium): browser test skipped")
def test_search_page_in_headless_chromium(ui_server: LiveServer, tmp_path_factory: pytest.TempPathFactory) -> None:
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    out = Path(os.environ.get("AIM_TEST_ARTIFACTS") or tmp_path_factory.mktemp("ui-artifacts"))
    out.mkdir(parents=True, exist_ok=True)
    _, coat_path = next(p for p in fashion_pairs() if p[0] == "coat")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 800})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(ui_server.url + "/ui")
            # Without the key the service answers 401 and the page says so.
            page.fill("#query", caption("bag"))
            page.click("#go")
            page.wait_for_selector("#status.error")
            assert "401" in page.inner_text("#status")
            # With the key: results with thumbnails, ids and scores, the captioned image first.
            page.fill("#key", KEY)
            page.dispatch_event("#key", "change")
            page.click("#go")
            page.wait_for_selector("#results li.hit")
            first = page.locator("#results li.hit").first
            assert first.locator(".id").inner_text() == "bag"
            assert first.locator("img").get_attribute("src").startswith("data:image/jpeg;base64,")
            assert float(first.locator(".score").inner_text().split()[1]) > 0.9
            assert "a photo of a bag" in first.locator(".meta").inner_text()
            assert page.locator("#results li.hit").count() == 8
            assert first.locator("img").evaluate("img => img.complete && img.naturalWidth > 0")
            shot = out / "ui-text-search.png"
            page.screenshot(path=str(shot), full_page=True)
            logger.info("search page screenshot: %s", shot)
            # Search by image: the file input (what a drop feeds) with the coat's PNG finds the coat itself.
            page.set_input_files("#file", str(coat_path))
            page.wait_for_selector("#results li.hit:first-child .id:text-is('coat')")
            assert float(page.locator("#results li.hit .score").first.inner_text().split()[1]) > 0.999
            assert errors == []
        finally:
            browser.close()
    assert shot.stat().st_size > 10_000
