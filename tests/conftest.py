"""Fixtures that tests of more than one tier use (docs/architecture.md, "Where to put a new
test"). Each tier's own are in tests/unit, tests/store and tests/cluster/conftest.py; plain
helpers are modules in tests/support.

- tiny_model_dir: a folder with a tiny ONNX model the tests build (fast pipeline tests).
- real_model_dir: the real IS-Net model (CUTOUT_MODEL_DIR, default ../shared/models). Every
  test that uses it is marked `real_model` (minutes of CPU in all): `make test-fast` leaves
  those to `make test`.
- photos: real photos from scikit-image, as JPEG bytes.
- redis_server(): a private redis-server on a free port, with AOF, killable.
- standin: the local Cloudinary stand-in (tests/support/cloudinary_standin.py), in a thread.
- image_server: an HTTP server in this process for URL intake: images, redirects, a big body.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
from aiohttp import web

from services.common.config import default_model_dir
from services.local.redis import RedisServer
from tests.support.cloudinary_standin import CloudinaryStandIn
from tests.support.images import sample_photos
from tests.support.tinymodel import build_tiny_model


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "real_model_dir" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.real_model)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("models")
    build_tiny_model(folder / "tiny.onnx")
    return folder


@pytest.fixture(scope="session")
def real_model_dir() -> Path:
    folder = default_model_dir()
    model = folder / "isnet-general-use.onnx"
    if not model.is_file():
        # Fail, never skip: a suite that silently drops the real model proves nothing.
        pytest.fail(f"real model missing: {model} (set CUTOUT_MODEL_DIR)")
    return folder


@pytest.fixture(scope="session")
def photos() -> dict[str, bytes]:
    """Real photos that ship with scikit-image, as JPEG bytes."""
    return sample_photos()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[Callable[..., RedisServer]]:
    started: list[RedisServer] = []

    def make(appendfsync: str = "everysec") -> RedisServer:
        server = RedisServer(tmp_path / f"redis-{len(started)}", appendfsync=appendfsync)
        server.start()
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


@pytest.fixture
def standin() -> Iterator[CloudinaryStandIn]:
    server = CloudinaryStandIn().start()
    yield server
    server.stop()


@pytest.fixture
async def image_server(photos: dict[str, bytes]) -> AsyncIterator[str]:
    """A loopback HTTP server: images, redirects (one to a private address), a big body."""
    app = web.Application()

    async def photo(request: web.Request) -> web.Response:
        return web.Response(body=photos["coffee"], content_type="image/jpeg")

    async def to_private(request: web.Request) -> web.Response:
        raise web.HTTPFound("http://10.0.0.1/internal.jpg")

    async def to_photo(request: web.Request) -> web.Response:
        raise web.HTTPFound("/coffee.jpg")

    async def loop(request: web.Request) -> web.Response:
        raise web.HTTPFound("/loop")

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPFound(request.query["to"])  # an open redirect, as attackers find them

    async def huge(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        for _ in range(64):  # 4 MiB, no Content-Length: the cap must cut it
            await response.write(b"\0" * 65536)
        return response

    app.add_routes(
        [
            web.get("/coffee.jpg", photo),
            web.get("/to-private", to_private),
            web.get("/to-photo", to_photo),
            web.get("/loop", loop),
            web.get("/redirect", redirect),
            web.get("/huge", huge),
        ]
    )
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()


@pytest.fixture(autouse=True)
def _no_proxy_for_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    # gRPC honours http_proxy; loopback tests must never go through one.
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "grpc_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.delenv("CUTOUT_API_KEY", raising=False)
