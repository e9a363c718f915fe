"""One public API served where it lives: the gateway relays every public method it does not
serve itself. Calls between real processes and their token: tests/cluster/test_internal_api.py."""

from __future__ import annotations

import grpc

from services.common.internal_auth import InternalToken, new_token
from services.gateway.relay import SERVICE, Relay
from services.gateway.submit_api import SERVED_HERE


async def test_the_gateway_relays_every_public_method_it_does_not_serve() -> None:
    async with grpc.aio.insecure_channel("127.0.0.1:1") as channel:
        relayed = Relay(channel, InternalToken(new_token()), 1.0).handlers(SERVED_HERE)
    assert set(relayed) | set(SERVED_HERE) == {m.name for m in SERVICE.methods}
    assert not set(relayed) & set(SERVED_HERE)
