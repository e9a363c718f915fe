"""The gateway's Prometheus metrics (RPC counts and latency come from services.common.metrics)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

RATE_LIMIT_REFUSALS = Counter(
    "cutout_rate_limit_refusals_total",
    "Requests or batch items refused by a rate limit, by quota",
    ["quota"],
)
BATCH_SIZE = Histogram(
    "cutout_batch_size",
    "Items per SubmitBatch call",
    buckets=(1, 5, 10, 25, 50, 100, 250, 500, 1000),
)
BATCH_ITEMS = Counter(
    "cutout_batch_items_total", "Batch items by outcome: accepted, rejected", ["outcome"]
)
