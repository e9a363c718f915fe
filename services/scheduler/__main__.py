"""python -m services.scheduler"""

from __future__ import annotations

import asyncio

from services.common import logs
from services.common.serving import run_until_signalled
from services.scheduler.server import SchedulerServer
from services.scheduler.settings import SchedulerSettings


def main() -> None:
    settings = SchedulerSettings.from_env()
    logs.setup("scheduler", settings.log_level)
    asyncio.run(serve(settings))


async def serve(settings: SchedulerSettings) -> None:
    # gRPC's aio server must be made inside the running event loop.
    server = SchedulerServer(settings)
    await run_until_signalled(server.start, server.stop)


if __name__ == "__main__":
    main()
