"""Vendor identity from `authorization: Bearer <key>` metadata.

Keys are configured as SHA-256 hashes (CUTOUT_API_KEYS="vendor:hexdigest,..."),
so neither the configuration nor a log line ever holds a usable key.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Iterable

import grpc

from services.common.errors import CutoutError

VENDOR_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return "ck_" + secrets.token_urlsafe(32)


def parse_key_entries(entries: Iterable[str]) -> dict[str, str]:
    """["vendor:sha256hex", ...] -> {sha256hex: vendor}; errors name the bad entry's position."""
    table: dict[str, str] = {}
    for i, entry in enumerate(entries):
        vendor, _, digest = entry.partition(":")
        if not VENDOR_ID.match(vendor) or not _HEX64.match(digest):
            raise ValueError(
                f"CUTOUT_API_KEYS entry {i + 1} is not 'vendor:<64 hex sha256 of the key>'"
            )
        table[digest] = vendor
    return table


class KeyTable:
    def __init__(self, by_hash: dict[str, str]) -> None:
        self.by_hash = by_hash

    def vendor_for(self, metadata: Iterable[tuple[str, str | bytes]]) -> str:
        """The caller's vendor id, or UNAUTHENTICATED with a message saying what to send."""
        header = ""
        for key, value in metadata:
            if key == "authorization":
                header = value if isinstance(value, str) else value.decode(errors="replace")
                break
        scheme, _, token = header.partition(" ")
        if not header:
            raise CutoutError(
                "missing credentials: send metadata 'authorization: Bearer <api key>'",
                grpc.StatusCode.UNAUTHENTICATED,
            )
        if scheme.lower() != "bearer" or not token.strip():
            raise CutoutError(
                "malformed authorization metadata: expected 'Bearer <api key>'",
                grpc.StatusCode.UNAUTHENTICATED,
            )
        vendor = self.by_hash.get(hash_key(token.strip()))
        if vendor is None:
            raise CutoutError("unknown or revoked API key", grpc.StatusCode.UNAUTHENTICATED)
        return vendor
