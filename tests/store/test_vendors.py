"""The vendor registry on a real redis-server: key rotation's grace period, weights and queue
caps reaching the scheduler's scripts, registries from before vendor policy."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
import redis.asyncio as aioredis

from cutout.v1 import jobs_pb2
from services.gateway.auth import hash_key
from services.gateway.vendors import RegistryError, VendorRegistry
from services.local.redis import RedisServer
from services.scheduler.keys import Keys
from services.scheduler.store import Store


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
