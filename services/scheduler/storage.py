"""Where results are kept. Local directory by default; more backends plug in here."""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Protocol

CHUNK = 1024 * 1024
_SAFE_KEY = re.compile(r"^[A-Za-z0-9_-]{1,64}/[0-9a-f]{32}\.[a-z]{3,4}$")


class ResultStore(Protocol):
    """A backend that keeps job outputs."""

    async def put(self, key: str, data: bytes, content_type: str) -> str:
        """Store data under key (overwriting) and return its URI."""
        ...

    def read(self, uri: str) -> AsyncIterator[bytes]:
        """Yield the stored bytes in chunks of at most 1 MiB."""
        ...

    async def delete(self, uri: str) -> None:
        """Remove a stored output (retention); a missing one is not an error."""
        ...


class LocalResultStore:
    """Files under one directory: `<root>/<vendor>/<job_id>.<ext>`, URI `local:<key>`."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, key: str) -> Path:
        # Keys are built from validated vendor ids and hex job ids; refuse
        # anything else rather than trust it near the filesystem.
        if not _SAFE_KEY.match(key):
            raise ValueError(f"unsafe storage key {key!r}")
        return self.root / key

    async def put(self, key: str, data: bytes, content_type: str) -> str:
        path = self._path(key)
        await asyncio.to_thread(_write_atomically, path, data)
        return "local:" + key

    async def delete(self, uri: str) -> None:
        if not uri.startswith("local:"):
            return  # not ours (stored by another backend)
        path = self._path(uri.removeprefix("local:"))
        await asyncio.to_thread(path.unlink, missing_ok=True)

    async def read(self, uri: str) -> AsyncIterator[bytes]:
        path = self._path(uri.removeprefix("local:"))
        f = await asyncio.to_thread(path.open, "rb")
        try:
            while chunk := await asyncio.to_thread(f.read, CHUNK):
                yield chunk
        finally:
            f.close()


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
