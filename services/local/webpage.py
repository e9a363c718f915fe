"""The web page (clients/web/dist) served on loopback, for `cutout-admin up` and the tests.

The page has no server of its own: it talks gRPC-Web to Envoy, and these are
static files. This server only hands them out, plus `/config.json`, which tells
the page where Envoy is. A thread in the caller's process; no other routes.

    python -m services.local.webpage --api http://127.0.0.1:8080 [--port 8000]
"""

from __future__ import annotations

import argparse
import json
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from services.common.config import PROJECT_ROOT

DIST = PROJECT_ROOT / "clients" / "web" / "dist"


class _Handler(SimpleHTTPRequestHandler):
    def __init__(self, *args: Any, api_url: str, **kwargs: Any) -> None:
        self.api_url = api_url
        super().__init__(*args, **kwargs)

    def do_GET(self) -> None:
        if urlsplit(self.path).path == "/config.json":
            body = json.dumps({"api": self.api_url}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        super().do_GET()

    def end_headers(self) -> None:
        # The page holds an API key: it runs only its own script, talks only to the
        # API, and shows images only from blob: URLs it made.
        origin = "{0.scheme}://{0.netloc}".format(urlsplit(self.api_url))
        self.send_header(
            "Content-Security-Policy",
            f"default-src 'self'; connect-src 'self' {origin}; img-src 'self' blob:; "
            "object-src 'none'; base-uri 'none'; frame-ancestors 'none'",
        )
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Cache-Control", "no-cache")
        super().end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass  # one line per file on the console of `cutout-admin up` would drown its summary


class WebPage:
    """The page's files on http://host:port/, telling it the API is at `api_url`."""

    def __init__(
        self, api_url: str, host: str = "127.0.0.1", port: int = 0, root: Path = DIST
    ) -> None:
        if not (root / "index.html").is_file():
            raise FileNotFoundError(
                f"{root / 'index.html'} is missing: build the page with `make install` "
                "(npm run build in clients/web)"
            )
        handler = partial(_Handler, directory=str(root), api_url=api_url)
        self._server = ThreadingHTTPServer((host, port), handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}/"

    def start(self) -> WebPage:
        """Serve from a daemon thread; returns at once."""
        self._thread.start()
        return self

    def serve(self) -> None:
        """Serve in this thread until interrupted."""
        try:
            self._server.serve_forever()
        finally:
            self._server.server_close()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--api", required=True, help="Envoy's URL, e.g. http://127.0.0.1:8080")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    page = WebPage(args.api, args.host, args.port)
    print(f"Cutout web page at {page.url} (API {args.api}); Ctrl-C stops it", flush=True)
    try:
        page.serve()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
