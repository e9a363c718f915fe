"""Gateway settings, all from environment variables."""

from __future__ import annotations

from dataclasses import dataclass

from services.common.config import SettingsError, env_bool, env_float, env_int, env_list, env_str
from services.common.fetch import AllowedHost
from services.common.internal_auth import InternalToken
from services.common.serving import MiB
from services.common.webhook_policy import WebhookPolicy
from services.gateway.ratelimit import Quota, parse_quotas


def _allowed_hosts(entries: list[str]) -> list[AllowedHost]:
    try:
        return [AllowedHost.parse(entry) for entry in entries]
    except ValueError as exc:
        raise SettingsError(f"CUTOUT_URL_ALLOW_HOSTS: {exc}") from exc


def _quotas(spec: str) -> dict[str, Quota]:
    try:
        return parse_quotas(spec)
    except ValueError as exc:
        raise SettingsError(f"CUTOUT_RATE_LIMITS: {exc}") from exc


# What a request may carry besides its image bytes: the operation, URLs, client key, record
# and protobuf framing take a few KiB (a 1000-item batch of long URLs under 5 MiB).
REQUEST_ENVELOPE_BYTES = MiB


@dataclass(frozen=True)
class GatewaySettings:
    """
    Attributes:
        listen: CUTOUT_GATEWAY_LISTEN, host:port of the public API (port 0 picks one).
        scheduler: CUTOUT_SCHEDULER_ADDR, host:port of a scheduler (or a load-balanced name).
        api_keys: CUTOUT_API_KEYS, comma-separated "vendor:<sha256 hex of the key>": static keys
            beside the vendor registry in Redis (`cutout-admin vendors ...`).
        auth_cache_s: CUTOUT_AUTH_CACHE_S, how long a registry answer about a key is reused;
            a disabled vendor or a revoked key stops working within this time.
        tls_cert: CUTOUT_TLS_CERT, PEM certificate chain for the public port (empty: plaintext).
        tls_key: CUTOUT_TLS_KEY, PEM private key of that certificate.
        models: CUTOUT_MODELS, model names the nodes serve; the first is the default.
        max_image_bytes: CUTOUT_MAX_IMAGE_BYTES, largest inline image (default 20 MiB).
        max_pixels: CUTOUT_MAX_PIXELS, largest image by header dimensions (default 40 MP).
        max_batch: CUTOUT_MAX_BATCH, most items in one SubmitBatch.
        max_message_bytes: CUTOUT_GATEWAY_MAX_MESSAGE_BYTES, the largest request gRPC reads
            (default max_image_bytes + REQUEST_ENVELOPE_BYTES); a larger one is refused with
            RESOURCE_EXHAUSTED on its length prefix, before its body is read.
        scheduler_timeout_s: CUTOUT_SCHEDULER_TIMEOUT_S, deadline of unary calls to the scheduler.
        url_allow_http: CUTOUT_URL_ALLOW_HTTP, on (1/true/yes/on) also fetches http:// image
            URLs (https only by default).
        url_allow_hosts: CUTOUT_URL_ALLOW_HOSTS, comma-separated `host:port` (or
            `scheme://host:port`) of internal image servers you trust: URLs to that host on
            that port skip the public-address check. An entry without a port allows only the
            scheme's default port (443 for https, 80 for http), never the host's other ports.
        url_timeout_s: CUTOUT_URL_TIMEOUT_S, time for a whole URL fetch, redirects and the
            wait for a fetch slot included.
        url_fetches_per_vendor: CUTOUT_URL_FETCHES_PER_VENDOR, URL fetches one vendor may have
            running on this gateway; a single submit beyond it is refused at once with
            RESOURCE_EXHAUSTED and RetryInfo (a batch's URL items wait for one instead).
        url_fetches: CUTOUT_URL_FETCHES, URL fetches this gateway runs at once, all vendors
            together; a submit that gets none before its fetch deadline is RESOURCE_EXHAUSTED.
        url_max_redirects: CUTOUT_URL_MAX_REDIRECTS, redirects followed (each re-checked).
        redis_url: CUTOUT_REDIS_URL, the Redis holding rate-limit state (the scheduler's).
        key_prefix: CUTOUT_REDIS_PREFIX, prefix of every Redis key.
        rate_limits: CUTOUT_RATE_LIMITS, per-vendor quotas "name=LIMIT/SECONDS,...": requests
            (every image submitted), remove_background, crop_face, batches; unnamed ones keep
            the defaults requests=50/900, remove_background=30/3600, crop_face=30/3600,
            batches=10/3600.
        metrics_listen: CUTOUT_METRICS_LISTEN, host:port of the Prometheus /metrics endpoint
            (empty: off).
        ready_file: CUTOUT_READY_FILE, file to write the bound port to once serving.
        log_level: CUTOUT_LOG_LEVEL.
        webhooks: CUTOUT_WEBHOOK_ALLOW_HOSTS and the other CUTOUT_WEBHOOK_* settings
            (services/common/webhook_policy.py): how a submit's webhook_url is checked.
        internal_token: CUTOUT_INTERNAL_TOKEN (required) and CUTOUT_INTERNAL_TOKENS_ACCEPTED:
            the shared secret of calls between the services (services/common/internal_auth.py).
    """

    listen: str
    scheduler: str
    api_keys: list[str]
    auth_cache_s: float
    tls_cert: str
    tls_key: str
    models: list[str]
    max_image_bytes: int
    max_pixels: int
    max_batch: int
    max_message_bytes: int
    scheduler_timeout_s: float
    url_allow_http: bool
    url_allow_hosts: list[AllowedHost]
    url_timeout_s: float
    url_fetches_per_vendor: int
    url_fetches: int
    url_max_redirects: int
    redis_url: str
    key_prefix: str
    rate_limits: dict[str, Quota]
    metrics_listen: str
    ready_file: str
    internal_token: InternalToken
    webhooks: WebhookPolicy
    log_level: str

    @classmethod
    def from_env(cls) -> GatewaySettings:
        max_image_bytes = env_int("CUTOUT_MAX_IMAGE_BYTES", 20 * MiB, minimum=1)
        return cls(
            listen=env_str("CUTOUT_GATEWAY_LISTEN", "127.0.0.1:50051"),
            scheduler=env_str("CUTOUT_SCHEDULER_ADDR", "127.0.0.1:50052"),
            api_keys=env_list("CUTOUT_API_KEYS"),
            auth_cache_s=env_float("CUTOUT_AUTH_CACHE_S", 2.0, minimum=0.0),
            tls_cert=env_str("CUTOUT_TLS_CERT", ""),
            tls_key=env_str("CUTOUT_TLS_KEY", ""),
            models=env_list("CUTOUT_MODELS", "isnet-general-use"),
            max_image_bytes=max_image_bytes,
            max_pixels=env_int("CUTOUT_MAX_PIXELS", 40_000_000, minimum=1),
            max_batch=env_int("CUTOUT_MAX_BATCH", 1000, minimum=1),
            max_message_bytes=env_int(
                "CUTOUT_GATEWAY_MAX_MESSAGE_BYTES",
                max_image_bytes + REQUEST_ENVELOPE_BYTES,
                minimum=MiB,
            ),
            scheduler_timeout_s=env_float("CUTOUT_SCHEDULER_TIMEOUT_S", 10.0, minimum=0.1),
            url_allow_http=env_bool("CUTOUT_URL_ALLOW_HTTP", False),
            url_allow_hosts=_allowed_hosts(env_list("CUTOUT_URL_ALLOW_HOSTS")),
            url_timeout_s=env_float("CUTOUT_URL_TIMEOUT_S", 10.0, minimum=0.1),
            url_fetches_per_vendor=env_int("CUTOUT_URL_FETCHES_PER_VENDOR", 4, minimum=1),
            url_fetches=env_int("CUTOUT_URL_FETCHES", 16, minimum=1),
            url_max_redirects=env_int("CUTOUT_URL_MAX_REDIRECTS", 3, minimum=0),
            redis_url=env_str("CUTOUT_REDIS_URL", "redis://127.0.0.1:6379/0"),
            key_prefix=env_str("CUTOUT_REDIS_PREFIX", "cutout:"),
            rate_limits=_quotas(env_str("CUTOUT_RATE_LIMITS", "")),
            metrics_listen=env_str("CUTOUT_METRICS_LISTEN", "0.0.0.0:9101"),
            ready_file=env_str("CUTOUT_READY_FILE", ""),
            log_level=env_str("CUTOUT_LOG_LEVEL", "INFO"),
            internal_token=InternalToken.from_env(),
            webhooks=WebhookPolicy.from_env(),
        )
