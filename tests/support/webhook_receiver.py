"""An HTTPS webhook receiver on 127.0.0.1, in a thread of this process: it answers each path
from a script ("500", "410", "hang", ...), then 200, and keeps what it received.
tests/cluster/test_webhooks.py and bench/webhooks.py point schedulers at it."""

from __future__ import annotations

import asyncio
import ssl
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float


@dataclass
class Receiver:
    """An HTTPS server on 127.0.0.1 that answers each path from a script, then 200."""

    port: int = 0
    scripts: dict[str, list[str]] = field(default_factory=dict)  # path -> "500", "hang", ...
    got: list[Received] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    hang_s: float = 5.0
    arrived: dict[str, threading.Event] = field(default_factory=dict)

    def url(self, path: str) -> str:
        return f"https://127.0.0.1:{self.port}/{path}"

    def on(self, path: str) -> list[Received]:
        with self.lock:
            return [r for r in self.got if r.path == path]

    async def handle(self, request: web.Request) -> web.Response:
        path = request.path.lstrip("/")
        body = await request.read()
        with self.lock:
            self.got.append(Received(path, dict(request.headers), body, time.monotonic()))
            script = self.scripts.get(path, [])
            action = script.pop(0) if script else "200"
            event = self.arrived.get(path)
        if event is not None:
            event.set()
        if action == "hang":
            await asyncio.sleep(self.hang_s)
            action = "200"
        return web.Response(status=int(action), text="x" * 100_000)  # a large answer: capped


def _serve(receiver: Receiver, context: ssl.SSLContext, ready: threading.Event) -> None:
    loop = asyncio.new_event_loop()
    app = web.Application()
    app.router.add_post("/{tail:.*}", receiver.handle)
    runner = web.AppRunner(app)
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    loop.run_until_complete(site.start())
    receiver.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    ready.set()
    loop.run_forever()


def start_receiver(tls: Path) -> Receiver:
    """The receiver on a free loopback port, serving HTTPS with tls's certificate."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tls / "gateway.pem", tls / "gateway.key")
    found = Receiver()
    ready = threading.Event()
    threading.Thread(target=_serve, args=(found, context, ready), daemon=True).start()
    assert ready.wait(10)
    return found
