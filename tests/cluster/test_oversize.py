"""Requests over the gateway's message limit are refused by gRPC itself on their 5-byte length
prefix, having read no more of each than one stream window: concurrent 60 MB submits leave a
real gateway's memory where it was. The limit is the image limit plus an envelope, so an image
of the full image limit is still read and judged by the gateway (docs/configuration.md,
"Request size"). Through Envoy: tests/cluster/test_envoy.py."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from cutout import AsyncClient, CutoutError
from cutout.client import build_submission
from services.common.serving import MiB
from services.gateway.settings import REQUEST_ENVELOPE_BYTES
from services.local.cluster import LocalCluster
from tests.support.cluster import KEYS

MB = 10**6
IMAGE_LIMIT = 20 * MiB  # CUTOUT_MAX_IMAGE_BYTES's default
REQUEST_LIMIT = IMAGE_LIMIT + REQUEST_ENVELOPE_BYTES  # CUTOUT_GATEWAY_MAX_MESSAGE_BYTES's
BODY = 60 * MB  # what issue 26 sent: eight of these took a gateway from 421 to 962 MB
CONCURRENT = 8
# What the gateway's RSS may grow by over those: gRPC reads at most a stream window (4 MiB,
# services/gateway/server.py) of each before refusing it. Less than one body; the old 64 MiB
# limit read all 480 MB (about +750 MB at the peak, +600 MB after).
MAX_GROWTH = 60 * MB


def status_bytes(pid: int, field: str) -> int:
    """A /proc/<pid>/status figure (VmRSS, VmHWM), in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def reset_peak(pid: int) -> None:
    """VmHWM starts again from the current RSS (Linux clear_refs, 5)."""
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")


@pytest.fixture
def gateway_cluster(
    make_cluster: Callable[..., LocalCluster], tiny_model_dir: Path
) -> LocalCluster:
    """Redis, scheduler and one gateway, as processes; no node (jobs only need to queue)."""
    cluster = make_cluster(tiny_model_dir, start=False)
    cluster.start(start_nodes=False)
    return cluster


@pytest.mark.timeout(300)
async def test_oversized_submits_are_refused_before_the_gateway_reads_them(
    gateway_cluster: LocalCluster, photos: dict[str, bytes]
) -> None:
    gateway = gateway_cluster.gateway
    assert gateway is not None and gateway.proc is not None
    pid = gateway.proc.pid
    async with AsyncClient(gateway_cluster.gateway_address, KEYS["vendor-a"]) as client:

        async def oversized() -> tuple[grpc.StatusCode, str, float | None]:
            try:
                await client.submit(bytes(BODY))
            except CutoutError as exc:  # kept no longer: its traceback holds the call
                return exc.code, exc.message, exc.retry_after_s
            raise AssertionError("a 60 MB submit was accepted")

        for _ in range(3):  # warm-up: the accepting and the refusing paths
            await client.submit(photos["coffee_small"])
        await oversized()
        baseline = status_bytes(pid, "VmRSS")
        reset_peak(pid)
        errors = await asyncio.gather(*(oversized() for _ in range(CONCURRENT)))
        peak = status_bytes(pid, "VmHWM")
        after = status_bytes(pid, "VmRSS")
        print(
            f"gateway RSS: baseline {baseline / MB:.0f} MB, peak {peak / MB:.0f} MB, "
            f"after {after / MB:.0f} MB over {CONCURRENT} x {BODY // MB} MB refused submits"
        )
        growth = {"peak": (peak - baseline) / MB, "after": (after - baseline) / MB}
        assert all(g < MAX_GROWTH / MB for g in growth.values()), growth

        # What the caller sees: gRPC's own answer, with both sizes.
        for code, message, retry_after_s in errors:
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, (code, message)
            assert retry_after_s is None  # not a rate limit: retrying cannot help
            sizes = re.search(r"larger than max \((\d+) vs\. (\d+)\)", message)
            assert sizes, message
            assert int(sizes[1]) > BODY and int(sizes[2]) == REQUEST_LIMIT, message

        # A batch is one message too: its inline images share the same bound.
        items = [build_submission(bytes(8 * MB)) for _ in range(3)]
        with pytest.raises(CutoutError) as batch:
            await client.submit_batch(items)
        assert batch.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED, batch.value

        # The gateway still serves; and the bound leaves room for an image of the full image
        # limit with the rest of its request: read whole and judged by the gateway (not an
        # image), as is one byte more (INVALID_ARGUMENT naming the image limit).
        assert (await client.submit(photos["coffee_small"])).name.startswith("jobs/")
        with pytest.raises(CutoutError) as junk:
            await client.submit(bytes(IMAGE_LIMIT))
        assert junk.value.code == grpc.StatusCode.INVALID_ARGUMENT, junk.value
        assert "the limit is" not in junk.value.message
        with pytest.raises(CutoutError) as big:
            await client.submit(bytes(IMAGE_LIMIT + 1))
        assert big.value.code == grpc.StatusCode.INVALID_ARGUMENT, big.value
        assert f"the limit is {IMAGE_LIMIT}" in big.value.message
