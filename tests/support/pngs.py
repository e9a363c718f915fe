"""PNG files built chunk by chunk: bit depths Pillow cannot write, and decompression bombs.

A bomb here is a compressed chunk (zTXt, iTXt or iCCP) whose zlib stream inflates to
`inflated` bytes of zeros; deflate compresses zeros about 1000:1, so 200 MB of text
costs about 200 KB on disk.
"""

from __future__ import annotations

import functools
import struct
import zlib
from collections.abc import Sequence

import numpy as np

SIGNATURE = b"\x89PNG\r\n\x1a\n"
MB = 1_000_000
MiB = 1 << 20


def chunk(cid: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + cid + body + struct.pack(">I", zlib.crc32(cid + body))


def chunks(png: bytes) -> list[tuple[bytes, bytes]]:
    """(type, body) of every chunk, in order."""
    assert png.startswith(SIGNATURE)
    out, pos = [], len(SIGNATURE)
    while pos < len(png):
        (length,) = struct.unpack(">I", png[pos : pos + 4])
        out.append((png[pos + 4 : pos + 8], png[pos + 8 : pos + 8 + length]))
        pos += 12 + length
    return out


def with_chunks(
    png: bytes, before_idat: Sequence[bytes] = (), after_idat: Sequence[bytes] = ()
) -> bytes:
    """The same PNG with extra chunks just before its first IDAT and just before IEND."""
    out = [SIGNATURE]
    seen_idat = False
    for cid, body in chunks(png):
        if cid == b"IDAT" and not seen_idat:
            out += before_idat
            seen_idat = True
        if cid == b"IEND":
            out += after_idat
        out.append(chunk(cid, body))
    return b"".join(out)


@functools.cache
def zeros_deflated(inflated: int) -> bytes:
    """A zlib stream of `inflated` zero bytes, made without holding them all."""
    packer = zlib.compressobj(9)
    block = bytes(MB)
    parts = [packer.compress(block) for _ in range(inflated // MB)]
    parts.append(packer.compress(bytes(inflated % MB)))
    parts.append(packer.flush())
    return b"".join(parts)


def ztxt(inflated: int, keyword: bytes = b"Comment") -> bytes:
    return chunk(b"zTXt", keyword + b"\0\0" + zeros_deflated(inflated))


def itxt(inflated: int, keyword: bytes = b"XML:com.adobe.xmp") -> bytes:
    # keyword, NUL, compressed flag 1, method 0, language tag, NUL, translated keyword, NUL
    return chunk(b"iTXt", keyword + b"\0\1\0" + b"\0" + b"\0" + zeros_deflated(inflated))


def iccp(inflated: int) -> bytes:
    return chunk(b"iCCP", b"ICC Profile\0\0" + zeros_deflated(inflated))


def text(value: bytes, keyword: bytes = b"Comment") -> bytes:
    return chunk(b"tEXt", keyword + b"\0" + value)


COLOR_TYPES = {1: 0, 2: 4, 3: 2, 4: 6}  # samples per pixel -> grey, grey+alpha, RGB, RGBA


def raw_png(samples: np.ndarray, bit_depth: int, extra: Sequence[bytes] = ()) -> bytes:
    """A non-interlaced PNG of integer samples (H x W or H x W x C) at any bit depth the
    format allows for its colour type: 1, 2, 4, 8 or 16 for grey, 8 or 16 otherwise."""
    if samples.ndim == 2:
        samples = samples[..., None]
    height, width, channels = samples.shape
    color_type = COLOR_TYPES[channels]
    assert samples.min() >= 0 and samples.max() < 2**bit_depth
    if bit_depth == 16:
        rows = samples.astype(">u2").reshape(height, -1).view(np.uint8)
    elif bit_depth == 8:
        rows = samples.astype(np.uint8).reshape(height, -1)
    else:  # 1, 2 or 4 bits, grey only: pack pixels into bytes, leftmost in the high bits
        assert channels == 1
        per_byte = 8 // bit_depth
        padded = np.zeros((height, -(-width // per_byte) * per_byte), np.uint8)
        padded[:, :width] = samples[..., 0]
        groups = padded.reshape(height, -1, per_byte)
        shifts = np.arange(per_byte - 1, -1, -1, dtype=np.uint8) * bit_depth
        rows = (groups << shifts).sum(axis=2).astype(np.uint8)
    scanlines = np.concatenate([np.zeros((height, 1), np.uint8), rows], axis=1)  # filter 0
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"".join(
        [
            SIGNATURE,
            chunk(b"IHDR", ihdr),
            *extra,
            chunk(b"IDAT", zlib.compress(scanlines.tobytes())),
            chunk(b"IEND", b""),
        ]
    )
