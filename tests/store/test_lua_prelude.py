"""The Lua scripts see the same facts as Python: asked of a real redis-server, not of the text."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis

from cutout.v1 import jobs_pb2
from services.common import operations, vendor_policy
from services.common.operations import MAX_PRIORITY
from services.local.redis import RedisServer
from services.scheduler.keys import PATTERNS, PRIORITY_BAND, Keys, fields_of
from services.scheduler.store import lua
from services.scheduler.store.outcomes import OUTCOMES


@pytest.fixture
async def redis(redis_server: Callable[..., RedisServer]) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(redis_server().url)
    yield client
    await client.aclose()


async def run(redis: aioredis.Redis, body: str, *args: Any) -> Any:
    return await lua.load(redis, body)(args=["p:", *args])


async def test_every_key_pattern_builds_the_same_name_in_lua_and_python(
    redis: aioredis.Redis,
) -> None:
    keys = Keys("p:")
    for family, pattern in PATTERNS.items():
        fields = {f: f"<{f}>" for f in fields_of(pattern)}
        if "lane" in fields:
            fields["lane"] = operations.Lane.LIGHT
        got = await run(redis, "return key[ARGV[2]](unpack(ARGV, 3))", family, *fields.values())
        assert got.decode() == keys.of(family, **fields), family
    assert keys.queue("acme", operations.Lane.LIGHT) == "p:light:queue:acme"
    assert keys.of("vendor_policy", vendor="acme") == vendor_policy.key("p:", "acme")


async def test_states_stages_and_outcomes_are_the_python_numbers(redis: aioredis.Redis) -> None:
    expected = {n.removeprefix("JOB_"): v for n, v in jobs_pb2.JobState.items()}
    expected |= dict(jobs_pb2.Stage.items())
    for enum in OUTCOMES:
        expected |= {f"{enum.__name__.upper()}_{m.name}": m.value for m in enum}
    expected |= {"PRIORITY_BAND": PRIORITY_BAND, "MAX_PRIORITY": MAX_PRIORITY}
    names = list(expected)
    # Lua's tostring: these are exact integers on both sides.
    body = "local t = {" + ", ".join(f"tostring({n})" for n in names) + "} return t"
    got = await run(redis, body)
    assert dict(zip(names, [int(g) for g in got], strict=True)) == expected
    lanes = await run(redis, "return LANES")
    assert [lane.decode() for lane in lanes] == list(operations.LANES)
    fields = await run(redis, "return {POLICY_WEIGHT, POLICY_MAX_QUEUED}")
    assert [f.decode() for f in fields] == [vendor_policy.WEIGHT, vendor_policy.MAX_QUEUED]
