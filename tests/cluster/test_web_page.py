"""The web page (clients/web) in a real browser against a live cluster through Envoy.

Chromium is Debian's (`make install` installs it with apt), driven by
playwright-core from clients/web/test/page.test.ts; the page is built from its
sources first and served by services/local/webpage.py, which points it at Envoy
(gRPC-Web, CORS). What the browser test checks is in that file's tests; the
screenshots are left in this test's temporary folder and their paths printed.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from services.common.config import PROJECT_ROOT
from services.local.cluster import LocalCluster
from services.local.webpage import WebPage
from tests.support.cluster import KEYS, add_vendor
from tests.support.npm import run_npm

WEB = PROJECT_ROOT / "clients" / "web"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")


def npm(*args: str, env: dict[str, str] | None = None, timeout: float = 400) -> str:
    return run_npm(WEB, *args, env=env, timeout=timeout)


def test_web_page_is_strict_and_lint_clean() -> None:
    npm("run", "typecheck")
    npm("run", "lint")


def test_web_page_in_chromium_through_envoy(
    make_cluster: Callable[..., LocalCluster],
    tiny_model_dir: Path,
    photos: dict[str, bytes],
    tmp_path: Path,
) -> None:
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"no browser at {CHROMIUM}: run `make install` (apt-get install chromium)")
    paths = []
    for name in ("astronaut", "chelsea", "coffee"):
        path = tmp_path / f"{name}.jpg"
        path.write_bytes(photos[name])
        paths.append(str(path))
    notes = tmp_path / "notes.txt"
    notes.write_text("a shopping list, not a photo\n")
    artifacts = tmp_path / "artifacts"

    cluster = make_cluster(tiny_model_dir, envoy=True, gateways=2)
    limited = add_vendor(cluster.redis_url, "vendor-limited", "requests=1/4")
    page = WebPage(f"http://{cluster.public_address}").start()
    try:
        output = npm(
            "test",
            env={
                "CUTOUT_WEB_URL": page.url,
                "CUTOUT_TEST_KEY": KEYS["vendor-a"],
                "CUTOUT_TEST_KEY_LIMITED": limited,
                "CUTOUT_TEST_PHOTOS": os.pathsep.join(paths),
                "CUTOUT_TEST_NOT_IMAGE": str(notes),
                "CUTOUT_TEST_ARTIFACTS": str(artifacts),
                "CHROMIUM": CHROMIUM,
            },
        )
    finally:
        page.stop()
    print(output)
    assert "# fail 0" in output, output
    for shot in ("page.png", "rate-limited.png"):
        assert (artifacts / shot).stat().st_size > 10_000, f"no screenshot {shot}"
        print(f"screenshot: {artifacts / shot}")
