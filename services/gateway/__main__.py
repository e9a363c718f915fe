"""python -m services.gateway"""

from __future__ import annotations

import asyncio

from services.common import logs
from services.common.serving import run_until_signalled
from services.gateway.server import GatewayServer
from services.gateway.settings import GatewaySettings


def main() -> None:
    settings = GatewaySettings.from_env()
    logs.setup("gateway", settings.log_level)
    asyncio.run(serve(settings))


async def serve(settings: GatewaySettings) -> None:
    # gRPC's aio server must be made inside the running event loop.
    server = GatewayServer(settings)
    await run_until_signalled(server.start, server.stop)


if __name__ == "__main__":
    main()
