"""Where results are kept: a local directory by default, Cloudinary per vendor.

`ResultStores` picks the backend for each vendor (CUTOUT_STORAGE and
CUTOUT_VENDOR_STORAGE) and routes reads and deletes by the URI a result
carries: `local:<vendor>/<job>.<ext>` or the https URL a remote store gave.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Protocol

from services.common.errors import FailedPrecondition, Unavailable
from services.common.identity import ID_CHARS
from services.scheduler.group_commit import GroupCommit

CHUNK = 1024 * 1024
_SAFE_KEY = re.compile(rf"^{ID_CHARS}/[0-9a-f]{{32}}\.[a-z]{{3,4}}$")  # <vendor>/<job>.<ext>


class StorageError(Unavailable):
    """A backend could not store or delete an output (for now, or for good): the caller
    keeps the output locally and tries again later; never the job's fault."""


class ResultElsewhere(FailedPrecondition):
    """A result this store does not serve: its URI (a remote store's URL) is where to
    download it."""


class ResultStore(Protocol):
    """A backend that keeps job outputs."""

    async def put(self, key: str, data: bytes, content_type: str, folder: str = "") -> str:
        """Store data under key `<vendor>/<job_id>.<ext>` (overwriting) and return its URI.

        folder: the vendor's project, for backends that file outputs by project.
        """
        ...

    def read(self, uri: str) -> AsyncIterator[bytes]:
        """Yield the stored bytes in chunks of at most 1 MiB."""
        ...

    async def delete(self, uri: str) -> None:
        """Remove a stored output (retention); a missing one is not an error."""
        ...


class LocalResultStore:
    """Files under one directory: `<root>/<vendor>/<job_id>.<ext>`, URI `local:<key>`.

    An output is on disk (fsynced, renamed into place, its directory fsynced)
    before put returns, so a job is never SUCCEEDED without its file. Outputs
    that arrive together are written in one thread hop (a group commit): one
    hop each was about a third of a busy scheduler's CPU (bench/scale.py).
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self._writes: GroupCommit[tuple[Path, bytes], None] = GroupCommit(self._write_many)
        self._dirs: set[Path] = set()  # made already: no mkdir per output

    def _path(self, key: str) -> Path:
        # Keys are built from validated vendor ids and hex job ids; refuse
        # anything else rather than trust it near the filesystem.
        if not _SAFE_KEY.match(key):
            raise ValueError(f"unsafe storage key {key!r}")
        return self.root / key

    async def put(self, key: str, data: bytes, content_type: str, folder: str = "") -> str:
        path = self._path(key)
        await self._writes.commit((path, data))
        return "local:" + key

    async def _write_many(self, items: Sequence[tuple[Path, bytes]]) -> list[OSError | None]:
        return await asyncio.to_thread(_write_all, items, self._dirs)

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


def _write_all(items: Sequence[tuple[Path, bytes]], made: set[Path]) -> list[OSError | None]:
    """Write each file atomically (temporary name, fsync, rename), then fsync each
    directory written to, so the renames are durable too; an error per file."""
    results: list[OSError | None] = []
    dirs: set[Path] = set()
    for path, data in items:
        try:
            if path.parent not in made:
                path.parent.mkdir(parents=True, exist_ok=True)
                made.add(path.parent)
            try:
                _write_atomically(path, data)
            except FileNotFoundError:  # its folder was removed under us: make it again
                path.parent.mkdir(parents=True, exist_ok=True)
                _write_atomically(path, data)
            dirs.add(path.parent)
            results.append(None)
        except OSError as exc:
            made.discard(path.parent)
            results.append(exc)
    for folder in dirs:
        try:
            fd = os.open(folder, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:  # the files are written; their names may not survive a crash
            results = [
                exc if r is None and p.parent == folder else r
                for (p, _), r in zip(items, results, strict=True)
            ]
    return results


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


class ResultStores:
    """The local store plus any remote ones, and which vendor uses which.

    The local store is always there: it is the default, where GetResult
    streams from, and where an output waits when its remote upload fails
    (the delivery loop uploads it later).
    """

    def __init__(
        self,
        local: LocalResultStore,
        remote: ResultStore | None = None,
        default: str = "local",
        by_vendor: dict[str, str] | None = None,
    ) -> None:
        self.local = local
        self.remote = remote
        self.default = default
        self.by_vendor = by_vendor or {}

    def backend_of(self, vendor: str) -> str:
        return self.by_vendor.get(vendor, self.default)

    def remote_for(self, vendor: str) -> ResultStore | None:
        """The remote store this vendor's outputs belong in, or None for local."""
        return self.remote if self.backend_of(vendor) != "local" else None

    async def read(self, uri: str) -> AsyncIterator[bytes]:
        if not uri.startswith("local:"):
            raise ResultElsewhere(f"this result is not kept here: download it from {uri}")
        async for chunk in self.local.read(uri):
            yield chunk

    async def delete(self, uri: str) -> None:
        if uri.startswith("local:"):
            await self.local.delete(uri)
        elif self.remote is not None:
            await self.remote.delete(uri)
