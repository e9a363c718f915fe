"""Per-vendor quotas on a real redis-server: one image takes from all its quotas or from none.
Quotas at a real gateway: tests/cluster/test_rate_limits.py."""

from __future__ import annotations

from collections.abc import Callable

import redis.asyncio as aioredis

from services.gateway.ratelimit import Quota, RateLimiter
from services.local.redis import RedisServer


async def test_one_image_takes_from_all_its_quotas_or_from_none(
    redis_server: Callable[..., RedisServer],
) -> None:
    """A refusal by one quota (say `requests`) must not use up another (the operation's)."""
    client = aioredis.from_url(redis_server().url)
    limiter = RateLimiter(client, "t:", {})
    op, req = Quota(5, 3600), Quota(1, 3600)
    first = await limiter.take_all("v", [("op", op), ("requests", req)])
    assert [d.allowed for d in first] == [True, True]
    assert first[0].remaining == 4 and first[1].remaining == 0
    second = await limiter.take_all("v", [("op", op), ("requests", req)])
    assert [d.allowed for d in second] == [True, False]  # `op` had room, `requests` had none
    assert 3500 < second[1].retry_after_s <= 3600
    # Nothing was taken from `op` by the refused image: 4 of its 5 are still there.
    assert (await limiter.take("v", "op", 10, op)).admitted == 4
    await client.aclose()
