"""A local stand-in for Cloudinary's Upload API, for the real `cloudinary` SDK to talk to.

It checks what a real account would: the API key, the request signature
(SHA-1 of the sorted parameters and the API secret, computed here
independently of the SDK), a fresh timestamp, and that the file is an image.
It keeps what it receives, honours `overwrite`, fails on demand, and holds
uploads on demand (to make two of them overlap).
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from dataclasses import dataclass, field
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

# Not signed: the file itself, and what identifies the caller or the endpoint.
UNSIGNED = {"file", "api_key", "signature", "resource_type", "cloud_name"}
IMAGE_MAGIC = (b"\x89PNG\r\n\x1a\n", b"RIFF")


def expected_signature(params: dict[str, str], secret: str) -> str:
    pairs = sorted(
        f"{k}={v}".replace("&", "%26") for k, v in params.items() if k not in UNSIGNED and v
    )
    return hashlib.sha1(("&".join(pairs) + secret).encode()).hexdigest()


@dataclass
class Asset:
    data: bytes
    version: int
    folder: str


@dataclass
class Upload:
    """One request as received, whether accepted or not."""

    action: str
    params: dict[str, str]
    size: int
    status: int


@dataclass
class CloudinaryStandIn:
    cloud: str = "cutout-test"
    api_key: str = "123456789012345"
    api_secret: str = "s3cr3t-not-for-logs"
    assets: dict[str, Asset] = field(default_factory=dict)
    requests: list[Upload] = field(default_factory=list)
    fail_next: int = 0  # answer this many uploads with a 500 before working again
    hold: threading.Event | None = None  # when set: uploads wait for it before being answered
    held: int = 0  # uploads waiting on `hold` now
    _server: ThreadingHTTPServer | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        """CLOUDINARY_URL for the SDK: this account, with uploads sent here."""
        assert self._server is not None
        port = self._server.server_address[1]
        return (
            f"cloudinary://{self.api_key}:{self.api_secret}@{self.cloud}"
            f"?upload_prefix=http://127.0.0.1:{port}"
        )

    def start(self) -> CloudinaryStandIn:
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length)
                status, reply = standin.handle(self.path, self.headers["Content-Type"], body)
                data = json.dumps(reply).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    # --- the API ---------------------------------------------------------------

    def handle(self, path: str, content_type: str, body: bytes) -> tuple[int, dict[str, Any]]:
        params, file = _form(content_type, body)
        action = path.rstrip("/").rsplit("/", 1)[-1]
        status, reply = self._answer(path, action, params, file)
        with self._lock:
            self.requests.append(Upload(action, params, len(file or b""), status))
        return status, reply

    def _answer(
        self, path: str, action: str, params: dict[str, str], file: bytes | None
    ) -> tuple[int, dict[str, Any]]:
        if path.rstrip("/") != f"/v1_1/{self.cloud}/image/{action}":
            return 404, _error(f"no such endpoint {path}")
        if params.get("api_key") != self.api_key:
            return 401, _error("Invalid api_key")
        if params.get("signature") != expected_signature(params, self.api_secret):
            return 401, _error("Invalid Signature")
        if abs(time.time() - int(params.get("timestamp", "0"))) > 3600:
            return 400, _error("Stale request")
        if action == "upload":
            return self._upload(params, file)
        if action == "destroy":
            with self._lock:
                gone = self.assets.pop(params.get("public_id", ""), None)
            return 200, {"result": "ok" if gone else "not found"}
        return 404, _error(f"unsupported action {action}")

    def _upload(self, params: dict[str, str], file: bytes | None) -> tuple[int, dict[str, Any]]:
        if self.hold is not None:
            with self._lock:
                self.held += 1
            self.hold.wait(timeout=60)
            with self._lock:
                self.held -= 1
        with self._lock:
            if self.fail_next > 0:
                self.fail_next -= 1
                return 500, _error("General Error (stand-in failing on demand)")
        if not file or not file.startswith(IMAGE_MAGIC):
            return 400, _error("Invalid image file")
        folder = params.get("folder", "")
        public_id = f"{folder}/{params['public_id']}" if folder else params["public_id"]
        overwrite = params.get("overwrite", "true") in ("1", "true")
        with self._lock:
            old = self.assets.get(public_id)
            if old is None or overwrite:
                version = (old.version + 1) if old else 1
                self.assets[public_id] = Asset(file, version, folder)
            asset = self.assets[public_id]
        fmt = "png" if file.startswith(IMAGE_MAGIC[0]) else "webp"
        return 200, {
            "public_id": public_id,
            "version": asset.version,
            "format": fmt,
            "bytes": len(asset.data),
            "resource_type": "image",
            "secure_url": f"https://res.cloudinary.com/{self.cloud}/image/upload/"
            f"v{asset.version}/{public_id}.{fmt}",
        }


def _error(message: str) -> dict[str, Any]:
    return {"error": {"message": message}}


def _form(content_type: str, body: bytes) -> tuple[dict[str, str], bytes | None]:
    """Fields and the uploaded file of a multipart/form-data body."""
    message = BytesParser(policy=HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + body
    )
    params: dict[str, str] = {}
    file: bytes | None = None
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True)
        if name == "file":
            file = payload
        elif isinstance(name, str) and isinstance(payload, bytes):
            params[name] = payload.decode()
    return params, file
