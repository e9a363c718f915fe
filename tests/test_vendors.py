"""The vendor registry: `cutout-admin vendors` on a real cluster, hashed keys, limits, weights."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
import redis.asyncio as aioredis

from cutout import AsyncClient, CutoutError
from cutout.v1 import jobs_pb2
from services.gateway.auth import hash_key
from services.gateway.vendors import RegistryError, VendorRegistry
from services.local.cluster import LocalCluster
from services.local.redis import RedisServer
from services.scheduler.keys import Keys
from services.scheduler.store import Store


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


async def test_rotation_grace_keeps_the_old_key_for_a_while(
    redis_server: Callable[..., RedisServer],
) -> None:
    redis = aioredis.from_url(redis_server().url)
    registry = VendorRegistry(redis, "g:")
    old = await registry.add("acme")
    new = await registry.rotate("acme", grace_s=1)
    newest = await registry.rotate("acme", grace_s=3600)  # must not extend old's 1 s
    assert (await registry.lookup(hash_key(old))) is not None
    assert (await registry.lookup(hash_key(new))) is not None
    await asyncio.sleep(1.1)
    assert (await registry.lookup(hash_key(old))) is None
    assert (await registry.lookup(hash_key(new))) is not None  # its hour is not over
    assert (await registry.lookup(hash_key(newest))) is not None
    assert (await registry.get("acme")).keys == 2
    with pytest.raises(RegistryError, match="use 1-64 characters"):
        await registry.add("no spaces please")
    with pytest.raises(RegistryError, match="not name=LIMIT/SECONDS"):
        await registry.add("beta", limits="requests=lots")
    await redis.aclose()


async def test_registry_weight_and_queue_cap_reach_the_scheduler_scripts(
    redis_server: Callable[..., RedisServer],
) -> None:
    redis = aioredis.from_url(redis_server().url)
    registry = VendorRegistry(redis, "w:")
    await registry.add("gold", weight=3)
    await registry.add("basic")
    store = Store(redis, Keys("w:"))
    sub = jobs_pb2.JobSubmission()
    sub.operation.remove_background.model = "tiny"
    for _ in range(40):
        for vendor in ("gold", "basic"):
            await store.submissions.enqueue(vendor, sub, b"image", 1_000_000)
    served = []
    while (claim := await store.claims.claim("node", 10_000)) is not None:
        served.append(claim.vendor)
    assert served[:40].count("gold") == 30 and served[:40].count("basic") == 10

    await registry.update("basic", max_queued=2)
    for _ in range(2):
        await store.submissions.enqueue("basic", sub, b"image", 1_000_000)
    with pytest.raises(Exception, match="vendor basic already has 2 jobs waiting"):
        await store.submissions.enqueue("basic", sub, b"image", 1_000_000)
    await redis.aclose()


async def test_a_registry_from_before_vendor_policy_keeps_its_weights_and_caps(
    redis_server: Callable[..., RedisServer],
) -> None:
    """Weight and cap used to live in the registry's own hash; the scheduler adopts them."""
    redis = aioredis.from_url(redis_server().url)
    registry = VendorRegistry(redis, "old:")
    await registry.add("gold")
    await registry.add("basic")
    await registry.add("newer")
    # As the registry wrote them before: in vendor:{id} (and no policy key at all).
    await redis.delete("old:vendor_policy:gold", "old:vendor_policy:basic")
    await redis.hset("old:vendor:gold", mapping={"weight": 3, "max_queued": 0})
    await redis.hset("old:vendor:basic", mapping={"weight": 1, "max_queued": 2})
    await redis.hset("old:vendor:newer", "weight", 7)  # set since through the policy:
    await registry.update("newer", weight=2)  # the newer value wins

    store = Store(redis, Keys("old:"))
    await store.start()
    assert (await registry.get("gold")).weight == 3
    assert (await registry.get("newer")).weight == 2
    assert not await redis.hexists("old:vendor:gold", "weight")  # moved, not copied
    await store.start()  # idempotent
    sub = jobs_pb2.JobSubmission()
    sub.operation.remove_background.model = "tiny"
    for _ in range(8):
        await store.submissions.enqueue("gold", sub, b"image", 1_000_000)
    for _ in range(2):
        await store.submissions.enqueue("basic", sub, b"image", 1_000_000)
    with pytest.raises(Exception, match="vendor basic already has 2 jobs waiting"):
        await store.submissions.enqueue("basic", sub, b"image", 1_000_000)
    served = [c.vendor for c in [await store.claims.claim("node", 10_000) for _ in range(4)] if c]
    assert served == ["gold", "gold", "gold", "basic"]
    await redis.aclose()


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
