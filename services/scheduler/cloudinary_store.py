"""Results stored in Cloudinary through the official SDK.

Uploads are signed with the account's API secret, go into the folder
`<vendor>/<project>` and use the job id as `public_id` with `overwrite`, so a
retried upload replaces the first instead of adding a copy. The SDK is
synchronous (urllib3): every call runs in a worker thread, never on the
event loop.

The account comes from `CLOUDINARY_URL`
(`cloudinary://<api_key>:<api_secret>@<cloud_name>`); an `upload_prefix`
query parameter points the SDK at another API host (the tests' stand-in).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import cloudinary.exceptions
import cloudinary.uploader

from services.scheduler.storage import ResultElsewhere, StorageError

_PUBLIC_ID = re.compile(r"/image/upload/(?:v\d+/)?(?P<id>[A-Za-z0-9_/-]+)\.[a-z]{3,4}$")


@dataclass(frozen=True)
class CloudinaryAccount:
    cloud_name: str
    api_key: str
    api_secret: str
    upload_prefix: str = ""

    @classmethod
    def from_url(cls, url: str) -> CloudinaryAccount:
        """Parse a CLOUDINARY_URL; ValueError says what is wrong (never echoing the secret)."""
        parts = urlsplit(url)
        if parts.scheme != "cloudinary" or not parts.hostname:
            raise ValueError("CLOUDINARY_URL must look like cloudinary://KEY:SECRET@CLOUD_NAME")
        if not parts.username or not parts.password:
            raise ValueError("CLOUDINARY_URL lacks the API key or secret")
        prefix = parse_qs(parts.query).get("upload_prefix", [""])[0]
        return cls(parts.hostname, unquote(parts.username), unquote(parts.password), prefix)

    def options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {
            "cloud_name": self.cloud_name,
            "api_key": self.api_key,
            "api_secret": self.api_secret,
        }
        if self.upload_prefix:
            opts["upload_prefix"] = self.upload_prefix
        return opts

    def __repr__(self) -> str:  # never print the secret
        return f"CloudinaryAccount(cloud_name={self.cloud_name!r})"


def public_id_from_url(url: str) -> str | None:
    """`<vendor>/<project>/<job_id>` from a delivery URL the upload returned."""
    m = _PUBLIC_ID.search(urlsplit(url).path)
    return m.group("id") if m else None


class CloudinaryResultStore:
    """Keys are `<vendor>/<job_id>.<ext>`; `folder` adds the project between them."""

    def __init__(self, account: CloudinaryAccount, timeout_s: float = 30.0) -> None:
        self.account = account
        self.timeout_s = timeout_s

    async def put(self, key: str, data: bytes, content_type: str, folder: str = "") -> str:
        vendor, _, name = key.partition("/")
        job_id = name.split(".", 1)[0]
        target = f"{vendor}/{folder}" if folder else vendor
        try:
            reply = await asyncio.to_thread(
                cloudinary.uploader.upload,
                data,
                public_id=job_id,
                folder=target,
                overwrite=True,
                invalidate=True,
                resource_type="image",
                timeout=self.timeout_s,
                **self.account.options(),
            )
        except (cloudinary.exceptions.Error, OSError) as exc:
            raise StorageError(f"cloudinary upload of {target}/{job_id} failed: {exc}") from exc
        url = reply.get("secure_url")
        if not isinstance(url, str) or not url.startswith("https://"):
            raise StorageError(f"cloudinary upload of {target}/{job_id} returned no secure_url")
        return url

    async def delete(self, uri: str) -> None:
        public_id = public_id_from_url(uri)
        if public_id is None:
            return  # not a Cloudinary delivery URL: not ours
        try:
            await asyncio.to_thread(
                cloudinary.uploader.destroy,
                public_id,
                resource_type="image",
                invalidate=True,
                timeout=self.timeout_s,
                **self.account.options(),
            )
        except (cloudinary.exceptions.Error, OSError) as exc:
            raise StorageError(f"cloudinary delete of {public_id} failed: {exc}") from exc

    async def read(self, uri: str) -> AsyncIterator[bytes]:
        raise ResultElsewhere(f"this result is served by Cloudinary: download it from {uri}")
        yield b""  # pragma: no cover - makes this an async generator
