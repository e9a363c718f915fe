"""Wires the scheduler together: Redis, job store, node pool, dispatcher, gRPC server."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import grpc
import redis.asyncio as aioredis

from cutout.v1 import cutout_service_pb2_grpc as public_grpc
from services.common import serving
from services.common.interceptors import ErrorMapping
from services.common.internal_auth import InternalAuth
from services.common.metrics import RpcMetrics
from services.common.metrics import serve as serve_metrics
from services.internal.v1 import scheduler_service_pb2_grpc as internal_grpc
from services.scheduler.cloudinary_store import CloudinaryAccount, CloudinaryResultStore
from services.scheduler.delivery import Deliverer
from services.scheduler.dispatcher import Dispatcher
from services.scheduler.enqueue_api import SchedulerServicer
from services.scheduler.keys import Keys
from services.scheduler.metrics import QueueGauges
from services.scheduler.nodes import NodePool
from services.scheduler.public_api import CutoutServicer
from services.scheduler.records import MysqlTarget, RecordWriter
from services.scheduler.settings import SchedulerSettings
from services.scheduler.storage import LocalResultStore, ResultStores
from services.scheduler.store import Admission, Fairness, Retention, RetryPolicy, Store
from services.scheduler.stream_caps import StreamCaps
from services.scheduler.webhooks import WebhookSender

log = logging.getLogger(__name__)
# The public API's reads, watches and cancellations, and the internal enqueue API.
SERVICE_NAMES = ["cutout.v1.CutoutService", "cutout.internal.v1.SchedulerService"]
# Redis CLIENT SETNAME of the scheduler's connections: -rpc, -dispatch, -rpc-watch.
CLIENT_NAME = "cutout-scheduler"


class SchedulerServer:
    def __init__(self, settings: SchedulerSettings) -> None:
        self.settings = settings
        # Bounded pools that wait for a free connection instead of failing a burst
        # (enqueues arrive in EnqueueJobs calls of up to 64 jobs, several at once).
        # The RPCs share one; dispatch (claims, progress, lease renewals, completions,
        # the reaper, deliveries) has its own, so no flood of calls can make running
        # jobs lose their leases. Watch streams use neither: the store's watch hub
        # reads every watched job on one connection of its own. Each pool names its
        # connections, so `CLIENT LIST` tells an operator who holds what.
        self.redis = aioredis.Redis(
            connection_pool=aioredis.BlockingConnectionPool.from_url(
                settings.redis_url,
                max_connections=settings.redis_connections,
                timeout=20,
                client_name=f"{CLIENT_NAME}-rpc",
            )
        )
        self.work_redis = aioredis.Redis(
            connection_pool=aioredis.BlockingConnectionPool.from_url(
                settings.redis_url,
                max_connections=settings.redis_work_connections,
                timeout=20,
                client_name=f"{CLIENT_NAME}-dispatch",
            )
        )
        self.pool = NodePool(
            settings.nodes,
            settings.node_poll_s,
            settings.max_message_bytes,
            settings.internal_token,
            dns_interval_s=settings.node_dns_s,
        )

        def store_on(redis: aioredis.Redis) -> Store:
            return Store(
                redis,
                Keys(settings.key_prefix),
                Retention(finished_s=settings.retention_s),
                RetryPolicy(max_retries=settings.max_retries, base_delay_ms=settings.retry_base_ms),
                Fairness(
                    quantum_milli=round(settings.quantum_mp * 1000),
                    weights=settings.vendor_weights,
                ),
                Admission(
                    max_queued_per_vendor=settings.max_queued_per_vendor,
                    max_queued=settings.max_queued,
                ),
                fleet_capacity=lambda lane: self.pool.capacity(lane.light),
            )

        self.store = store_on(self.redis)  # what the RPCs read and change
        self.work_store = store_on(self.work_redis)  # what dispatch and delivery change
        remote = None
        if settings.uses_cloudinary():
            remote = CloudinaryResultStore(
                CloudinaryAccount.from_url(settings.cloudinary_url), settings.storage_timeout_s
            )
        local = LocalResultStore(settings.storage_dir)
        results = ResultStores(local, remote, settings.storage, settings.vendor_storage)
        self.writer = (
            RecordWriter(MysqlTarget.from_url(settings.mysql_url)) if settings.mysql_url else None
        )
        self.deliverer = Deliverer(
            self.work_store.outbox,
            self.work_store.blobs,
            results,
            self.writer,
            settings.delivery_retry_ms,
        )
        self.webhooks = WebhookSender(self.work_store, settings.webhooks)
        self.gauges = QueueGauges(self.store.stats, self.pool)
        self.dispatcher = Dispatcher(
            self.work_store,
            self.pool,
            results,
            settings.dispatch_policy(),
            on_delivery=self.deliverer.wake.set,
            on_finished=self.webhooks.wake.set,
        )
        self.server = grpc.aio.server(
            options=serving.server_options(settings.max_message_bytes),
            # Outermost first: metrics see every outcome, ErrorMapping turns what
            # the handlers (and InternalAuth) raise into statuses.
            interceptors=[RpcMetrics(), ErrorMapping(), InternalAuth(settings.internal_token)],
        )
        public_grpc.add_CutoutServiceServicer_to_server(
            CutoutServicer(
                self.store,
                self.pool,
                results,
                StreamCaps(settings.watch_streams_per_vendor, settings.watch_streams),
            ),
            self.server,
        )
        internal_grpc.add_SchedulerServiceServicer_to_server(
            SchedulerServicer(self.store, records=self.writer is not None), self.server
        )
        self.health = serving.add_health_and_reflection(self.server, SERVICE_NAMES)
        self.port = 0
        self.metrics_port = 0
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        await self.redis.ping()  # fail fast, with the URL in the error, if Redis is not there
        await self.store.start()
        self.metrics_port = serve_metrics(self.settings.metrics_listen)
        self.port = serving.bind(self.server, self.settings.listen)
        await self.server.start()
        await serving.set_serving(self.health, SERVICE_NAMES, True)
        self._tasks = [
            asyncio.create_task(self.pool.run()),
            asyncio.create_task(self.dispatcher.run()),
            asyncio.create_task(self.dispatcher.upkeep.reap_forever()),
            asyncio.create_task(self.dispatcher.upkeep.keep_leases_forever()),
            asyncio.create_task(
                self.dispatcher.upkeep.sweep_forever(
                    min(30.0, max(0.5, self.settings.retention_s / 4))
                )
            ),
            asyncio.create_task(self.deliverer.run_forever()),
            asyncio.create_task(self.webhooks.run_forever()),
            asyncio.create_task(self.gauges.refresh_forever(self.settings.metrics_interval_s)),
        ]
        serving.write_ready_file(self.settings.ready_file, self.port)
        log.info(
            "scheduler serving",
            extra={
                "port": self.port,
                "metrics_port": self.metrics_port,
                "nodes": self.settings.nodes,
                "storage": self.settings.storage,
                "records": self.writer is not None,
            },
        )

    async def stop(self) -> None:
        await serving.set_serving(self.health, SERVICE_NAMES, False)
        await self.dispatcher.drain(self.settings.grace_s)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.server.stop(grace=2.0)
        await self.pool.close()
        if self.writer is not None:
            await self.writer.close()
        await self.redis.aclose(close_connection_pool=True)
        await self.work_redis.aclose(close_connection_pool=True)
