"""The vendor registry: `cutout-admin vendors` on a real cluster, hashed keys, limits, weights."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
import redis.asyncio as aioredis

from cutout import AsyncClient, CutoutError
from services.gateway.auth import hash_key
from services.local.cluster import LocalCluster
from services.local.redis import RedisServer


def cutout(redis_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.admin", "vendors", "--redis", redis_url, *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def new_vendor(redis_url: str, *args: str) -> str:
    done = cutout(redis_url, "add", *args)
    assert done.returncode == 0, done.stderr
    key = done.stdout.strip().splitlines()[-1]
    assert key.startswith("ck_")
    return key


async def refused(addr: str, key: str, image: bytes) -> CutoutError:
    async with AsyncClient(addr, key, rate_limit_wait_s=0) as client:
        with pytest.raises(CutoutError) as err:
            await client.submit(image)
    return err.value


async def all_redis_bytes(url: str) -> bytes:
    """Every key name and value in Redis, concatenated: where a leaked key would show."""
    redis = aioredis.from_url(url)
    chunks: list[bytes] = []
    async for name in redis.scan_iter(count=1000):
        chunks.append(name)
        kind = (await redis.type(name)).decode()
        if kind == "string":
            chunks.append(await redis.get(name) or b"")
        elif kind == "hash":
            for k, v in (await redis.hgetall(name)).items():
                chunks += [k, v]
        elif kind == "set":
            chunks += list(await redis.smembers(name))
    await redis.aclose()
    return b"\n".join(chunks)


async def test_vendor_lifecycle_through_the_cli_and_the_gateway(
    make_cluster,
    tiny_model_dir: Path,
    photos: dict[str, bytes],  # type: ignore[no-untyped-def]
) -> None:
    cluster: LocalCluster = make_cluster(tiny_model_dir, nodes=1, CUTOUT_AUTH_CACHE_S="0")
    url, addr, image = cluster.redis_url, cluster.gateway_address, photos["coffee_small"]
    key = new_vendor(url, "acme", "--limits", "requests=3/3600", "--weight", "2")
    assert cutout(url, "add", "acme").returncode == 2  # no duplicate vendors

    async with AsyncClient(addr, key) as client:
        job = await client.submit(image)
        names = [j.name for j in (await client.list_jobs()).jobs]
        assert job.name in names
    # Keys are stored hashed: the key itself is nowhere in Redis, its SHA-256 is.
    dump = await all_redis_bytes(url)
    assert key.encode() not in dump and hash_key(key).encode() in dump

    # The vendor's own limit (3 per hour) applies, not the cluster's generous one.
    async with AsyncClient(addr, key) as client:
        await client.submit(image)
        await client.submit(image)
    err = await refused(addr, key, image)
    assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "requests" in err.message

    listed = cutout(url, "list")
    assert listed.returncode == 0 and "acme" in listed.stdout and "requests=3/3600" in listed.stdout
    assert key not in listed.stdout + listed.stderr

    # Rotation: the new key works at once, the old one no more.
    rotated = cutout(url, "rotate", "acme")
    assert rotated.returncode == 0, rotated.stderr
    new_key = rotated.stdout.strip().splitlines()[-1]
    assert (await refused(addr, key, image)).code == grpc.StatusCode.UNAUTHENTICATED
    assert cutout(url, "set", "acme", "--limits", "requests=100/3600").returncode == 0
    async with AsyncClient(addr, new_key) as client:
        await client.submit(image)

    # Disabled: a clear PERMISSION_DENIED; enabled again: back in business.
    assert cutout(url, "disable", "acme").returncode == 0
    err = await refused(addr, new_key, image)
    assert err.code == grpc.StatusCode.PERMISSION_DENIED and "disabled" in err.message
    assert cutout(url, "enable", "acme").returncode == 0
    async with AsyncClient(addr, new_key) as client:
        await client.submit(image)

    unknown = cutout(url, "disable", "nobody")
    assert unknown.returncode == 2 and "no vendor 'nobody'" in unknown.stderr


async def test_vendors_finds_the_redis_that_up_started_from_any_directory(
    tmp_path: Path, redis_server: Callable[..., RedisServer]
) -> None:
    """`up --workdir W` writes W/redis.url; `vendors --workdir W` reads it there, whatever the
    current directory (it once read ./var/redis.url and silently used another Redis)."""
    server = redis_server()
    workdir = tmp_path / "cluster"
    workdir.mkdir()
    (workdir / "redis.url").write_text(server.url + "\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = subprocess.run(
        [sys.executable, "-m", "services.admin", "vendors", "--workdir", str(workdir),
         "add", "acme"],
        capture_output=True, text=True, timeout=60, cwd=elsewhere,
        env={k: v for k, v in os.environ.items() if k != "CUTOUT_REDIS_URL"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    registry = aioredis.from_url(server.url)
    try:
        assert [k async for k in registry.scan_iter(match="*acme*")], "not in up's Redis"
    finally:
        await registry.aclose()
