"""python -m services.inference"""

from __future__ import annotations

import asyncio

from services.common import logs
from services.common.serving import run_until_signalled
from services.inference.recycling import tune_allocator
from services.inference.server import NodeServer
from services.inference.settings import NodeSettings


def main() -> None:
    tune_allocator()  # before any thread starts: see services/inference/recycling.py
    settings = NodeSettings.from_env()
    logs.setup("inference", settings.log_level)
    asyncio.run(serve(settings))


async def serve(settings: NodeSettings) -> None:
    # gRPC's aio server must be made inside the running event loop.
    server = NodeServer(settings)
    await run_until_signalled(server.start, server.stop)


if __name__ == "__main__":
    main()
