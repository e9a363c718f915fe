"""Wires the gateway together: key table, scheduler channel, interceptors, gRPC server."""

from __future__ import annotations

import logging

import grpc
import redis.asyncio as aioredis

from cutout.v1 import cutout_service_pb2
from services.common import serving
from services.common.fetch import Fetcher, FetchPolicy
from services.common.interceptors import ErrorMapping
from services.common.metrics import RpcMetrics
from services.common.metrics import serve as serve_metrics
from services.gateway.auth import Authenticator, KeyTable, VendorAuth, parse_key_entries
from services.gateway.enqueue_batcher import EnqueueBatcher
from services.gateway.intake import Limits
from services.gateway.ratelimit import RateLimiter
from services.gateway.relay import SERVICE, Relay
from services.gateway.settings import GatewaySettings
from services.gateway.submit_api import SERVED_HERE, SubmitServicer
from services.gateway.vendors import VendorRegistry
from services.internal.v1 import scheduler_service_pb2_grpc as spb_grpc

log = logging.getLogger(__name__)
SERVICE_NAME = SERVICE.full_name
# Responses and the link to the scheduler are not bounded by the request limit (which follows
# the image limit); the scheduler bounds what it takes and sends itself (its
# CUTOUT_MAX_MESSAGE_BYTES).
INTERNAL_MESSAGE_BYTES = 64 * serving.MiB
# Each client stream's receive window, fixed: gRPC refuses a request over the message limit on
# its length prefix, but reads what the window let the client send meanwhile; with BDP probing
# the window grows with the link (to tens of MiB on loopback), so a refused 60 MB body could
# still be read in good part. 4 MiB in flight still uploads 40 MB/s at a 100 ms round trip.
STREAM_WINDOW_BYTES = 4 * serving.MiB


class GatewayServer:
    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        static = KeyTable(parse_key_entries(settings.api_keys))
        self.channel = grpc.aio.insecure_channel(
            settings.scheduler,
            options=[
                ("grpc.max_send_message_length", INTERNAL_MESSAGE_BYTES),
                ("grpc.max_receive_message_length", INTERNAL_MESSAGE_BYTES),
            ],
        )
        self.redis = aioredis.Redis(
            connection_pool=aioredis.BlockingConnectionPool.from_url(
                settings.redis_url, max_connections=64, timeout=20
            )
        )
        limiter = RateLimiter(self.redis, settings.key_prefix, settings.rate_limits)
        registry = VendorRegistry(self.redis, settings.key_prefix)
        keys = Authenticator(static, registry, settings.auth_cache_s)
        scheduler = spb_grpc.SchedulerServiceStub(self.channel)
        token = settings.internal_token
        # Concurrent submits (and a batch's items) reach the scheduler together.
        enqueuer = EnqueueBatcher(
            lambda request: scheduler.EnqueueJobs(
                request, timeout=settings.scheduler_timeout_s, metadata=token.metadata()
            )
        )
        servicer = SubmitServicer(
            keys,
            enqueuer,
            Limits(settings.max_image_bytes, settings.max_pixels, tuple(settings.models)),
            settings.max_batch,
            limiter,
            Fetcher(
                FetchPolicy(
                    max_bytes=settings.max_image_bytes,
                    timeout_s=settings.url_timeout_s,
                    max_redirects=settings.url_max_redirects,
                    allow_http=settings.url_allow_http,
                    allow_hosts=frozenset(settings.url_allow_hosts),
                    fetches_per_vendor=settings.url_fetches_per_vendor,
                    fetches=settings.url_fetches,
                )
            ),
            settings.webhooks,
        )
        self.server = grpc.aio.server(
            options=[
                *serving.server_options(settings.max_message_bytes, INTERNAL_MESSAGE_BYTES),
                ("grpc.http2.bdp_probe", 0),
                ("grpc.http2.lookahead_bytes", STREAM_WINDOW_BYTES),
            ],
            # Outermost first: metrics see every outcome; ErrorMapping turns what
            # the handlers and VendorAuth raise into statuses.
            interceptors=[RpcMetrics(), ErrorMapping(), VendorAuth(keys)],
        )
        relay = Relay(self.channel, token, settings.scheduler_timeout_s)
        handlers = {
            "SubmitJob": grpc.unary_unary_rpc_method_handler(
                servicer.SubmitJob,
                cutout_service_pb2.SubmitJobRequest.FromString,
                cutout_service_pb2.SubmitJobResponse.SerializeToString,
            ),
            "SubmitBatch": grpc.unary_unary_rpc_method_handler(
                servicer.SubmitBatch,
                cutout_service_pb2.SubmitBatchRequest.FromString,
                cutout_service_pb2.SubmitBatchResponse.SerializeToString,
            ),
            **relay.handlers(SERVED_HERE),
        }
        self.server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),)
        )
        self.health = serving.add_health_and_reflection(self.server, [SERVICE_NAME])
        self.port = 0
        self.metrics_port = 0

    async def start(self) -> None:
        await self.redis.ping()  # fail fast, with the URL in the error, if Redis is not there
        self.metrics_port = serve_metrics(self.settings.metrics_listen)
        tls = serving.tls_credentials(self.settings.tls_cert, self.settings.tls_key)
        self.port = serving.bind(self.server, self.settings.listen, tls)
        await self.server.start()
        await serving.set_serving(self.health, [SERVICE_NAME], True)
        serving.write_ready_file(self.settings.ready_file, self.port)
        log.info(
            "gateway serving",
            extra={
                "tls": tls is not None,
                "port": self.port,
                "metrics_port": self.metrics_port,
                "scheduler": self.settings.scheduler,
            },
        )

    async def stop(self) -> None:
        await serving.set_serving(self.health, [SERVICE_NAME], False)
        await self.server.stop(grace=5.0)
        await self.channel.close(None)
        await self.redis.aclose()
