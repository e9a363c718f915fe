"""How webhook URLs are checked and sent: one settings object, read by the scheduler
(which sends), the gateway (which checks a submit's webhook_url) and cutout-admin
(which checks a vendor's endpoint when it is set).

A webhook URL goes through the same guard as image URLs (services/common/fetch.py):
https only, resolved once and pinned, no private, loopback, link-local or metadata
addresses unless its host:port is on CUTOUT_WEBHOOK_ALLOW_HOSTS, no redirects.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from functools import cached_property

from services.common.config import SettingsError, env_float, env_int, env_list, env_str
from services.common.fetch import AllowedHost, Fetcher, FetchPolicy, IPAddress

FIELD = "webhook_url"
MAX_URL = 2048


@dataclass(frozen=True)
class WebhookPolicy:
    """
    Attributes:
        allow_hosts: CUTOUT_WEBHOOK_ALLOW_HOSTS, comma-separated `host:port` (or
            `https://host:port`) exempt from the address check, e.g. a receiver inside the
            cluster network. Same format as CUTOUT_URL_ALLOW_HOSTS, a list of its own.
        timeout_s: CUTOUT_WEBHOOK_TIMEOUT_S (10), one attempt, connect to response.
        retry_base_s: CUTOUT_WEBHOOK_RETRY_BASE_S (5), backoff after the first failed
            attempt; it doubles each time, capped at 1 h, with +/-20% jitter.
        retry_window_s: CUTOUT_WEBHOOK_RETRY_WINDOW_S (86400), how long a delivery is
            retried before it is FAILED (RedeliverWebhook sends it again).
        ca_file: CUTOUT_WEBHOOK_CA_FILE, PEM certificates trusted beside the system's
            (an in-house CA); empty: the system's only.
        concurrency: CUTOUT_WEBHOOK_CONCURRENCY (16), attempts one scheduler makes at once.
    """

    allow_hosts: frozenset[AllowedHost] = field(default_factory=frozenset)
    timeout_s: float = 10.0
    retry_base_s: float = 5.0
    retry_window_s: float = 86400.0
    ca_file: str = ""
    concurrency: int = 16

    @classmethod
    def from_env(cls) -> WebhookPolicy:
        try:
            hosts = frozenset(AllowedHost.parse(e) for e in env_list("CUTOUT_WEBHOOK_ALLOW_HOSTS"))
        except ValueError as exc:
            raise SettingsError(f"CUTOUT_WEBHOOK_ALLOW_HOSTS: {exc}") from exc
        return cls(
            allow_hosts=hosts,
            timeout_s=env_float("CUTOUT_WEBHOOK_TIMEOUT_S", 10.0, minimum=0.1),
            retry_base_s=env_float("CUTOUT_WEBHOOK_RETRY_BASE_S", 5.0, minimum=0.01),
            retry_window_s=env_float("CUTOUT_WEBHOOK_RETRY_WINDOW_S", 86400.0, minimum=1.0),
            ca_file=env_str("CUTOUT_WEBHOOK_CA_FILE", ""),
            concurrency=env_int("CUTOUT_WEBHOOK_CONCURRENCY", 16, minimum=1),
        )

    @cached_property
    def fetcher(self) -> Fetcher:
        """The URL guard, made once (check only: services/scheduler/webhooks.py POSTs)."""
        return Fetcher(
            FetchPolicy(timeout_s=self.timeout_s, max_redirects=0, allow_hosts=self.allow_hosts)
        )

    def ssl_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context()
        if self.ca_file:
            context.load_verify_locations(cafile=self.ca_file)
        return context

    async def check(self, url: str, field_path: str = FIELD) -> tuple[str, int, list[IPAddress]]:
        """(host, port, pinned addresses), or INVALID_ARGUMENT saying why the URL is refused."""
        if len(url) > MAX_URL:
            why = f"longer than {MAX_URL} characters"
            raise self.fetcher.refuse(field_path, url[:64] + "...", why)
        return await self.fetcher.check(url, field_path)
