"""services/local/webpage.py serves the built page, where the API is, and a CSP that keeps the
page to its own script and the API. The page in Chromium: tests/cluster/test_web_page.py."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest

from services.local.webpage import WebPage


def test_webpage_server_serves_the_page_and_where_the_api_is(tmp_path: Path) -> None:
    """services/local/webpage.py: the built files, config.json, and a CSP that keeps the
    key's page to its own script and the API."""
    (tmp_path / "index.html").write_text("<!doctype html><title>t</title>")
    page = WebPage("http://127.0.0.1:8080", root=tmp_path).start()
    try:
        with urllib.request.urlopen(page.url + "config.json", timeout=10) as reply:
            assert json.load(reply) == {"api": "http://127.0.0.1:8080"}
            csp = reply.headers["Content-Security-Policy"]
        assert "connect-src 'self' http://127.0.0.1:8080" in csp
        assert "default-src 'self'" in csp and "img-src 'self' blob:" in csp
        with urllib.request.urlopen(page.url, timeout=10) as reply:
            assert b"<title>t</title>" in reply.read()
    finally:
        page.stop()
    with pytest.raises(FileNotFoundError, match="make install"):
        WebPage("http://127.0.0.1:8080", root=tmp_path / "nothing")
