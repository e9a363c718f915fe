"""Completion webhooks: real HTTPS receiver on loopback (its own CA, trusted through
CUTOUT_WEBHOOK_CA_FILE and reached only through CUTOUT_WEBHOOK_ALLOW_HOSTS), a real
cluster (redis-server, scheduler, node with the tiny model, gateway), signatures
checked with the `standardwebhooks` library from PyPI."""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from google.protobuf import json_format
from PIL import Image
from standardwebhooks.webhooks import Webhook

from cutout import AsyncClient, CutoutError
from cutout.v1 import jobs_pb2, webhooks_pb2
from services.common import webhook_registry
from services.local.cluster import LocalCluster
from tests.support.cluster import KEYS, start_cluster
from tests.support.npm import TS, run_npm
from tests.support.tls import make_tls
from tests.support.webhook_receiver import Received, Receiver, start_receiver

pytestmark = pytest.mark.timeout(300)

A, B, C = KEYS["vendor-a"], KEYS["vendor-b"], KEYS["vendor-c"]
PREFIX = "cutout:"


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tls(tmp_path_factory.mktemp("webhook-tls"))


@pytest.fixture(scope="module")
def receiver(tls: Path) -> Receiver:
    return start_receiver(tls)


def webhook_env(receiver: Receiver, tls: Path) -> dict[str, str]:
    return {
        "CUTOUT_WEBHOOK_ALLOW_HOSTS": f"127.0.0.1:{receiver.port}",
        "CUTOUT_WEBHOOK_CA_FILE": str(tls / "ca.pem"),
        "CUTOUT_WEBHOOK_RETRY_BASE_S": "0.2",
        "CUTOUT_WEBHOOK_TIMEOUT_S": "1.5",
    }


@pytest.fixture(scope="module")
def cluster(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, receiver: Receiver, tls: Path
) -> Iterator[LocalCluster]:
    running = start_cluster(
        tmp_path_factory.mktemp("webhooks"), tiny_model_dir, **webhook_env(receiver, tls)
    )
    try:
        yield running
    finally:
        running.stop()


def png(side: int = 48) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (side, side), (200, 30, 30)).save(buf, "PNG")
    return buf.getvalue()


async def set_endpoint(cluster: LocalCluster, vendor: str, url: str) -> str:
    redis = aioredis.Redis.from_url(cluster.redis_url)
    try:
        await redis.delete(webhook_registry.secrets_key(PREFIX, vendor))
        secret = await webhook_registry.set_endpoint(redis, PREFIX, vendor, url)
    finally:
        await redis.aclose()
    assert secret is not None and secret.startswith("whsec_")
    return secret


async def wait_for(
    receiver: Receiver, path: str, count: int, timeout_s: float = 60
) -> list[Received]:
    deadline = time.monotonic() + timeout_s
    while len(got := receiver.on(path)) < count:
        assert time.monotonic() < deadline, f"{path}: {len(got)} of {count} deliveries arrived"
        await asyncio.sleep(0.05)
    return got


async def wait_delivery(
    client: AsyncClient, name: str, state: int, timeout_s: float = 60
) -> webhooks_pb2.WebhookDelivery:
    deadline = time.monotonic() + timeout_s
    while (d := await client.webhook_delivery(name)).state != state:
        assert time.monotonic() < deadline, f"{name} still {d.state}: {d}"
        await asyncio.sleep(0.05)
    return d


def job_of(received: Received, secret: str | list[str]) -> tuple[str, jobs_pb2.Job]:
    """Verify the signature (every given secret must verify it), parse the job."""
    for s in [secret] if isinstance(secret, str) else secret:
        payload = Webhook(s).verify(received.body, received.headers)
    job = json_format.ParseDict(payload["data"]["job"], jobs_pb2.Job())
    return payload["type"], job


async def test_a_finished_job_is_posted_once_signed_and_parseable(
    cluster: LocalCluster, receiver: Receiver
) -> None:
    secret = await set_endpoint(cluster, "vendor-a", receiver.url("a"))
    async with AsyncClient(cluster.public_address, A) as client:
        job = await client.submit(png())
        (got,) = await wait_for(receiver, "a", 1)
        event, sent = job_of(got, secret)
        assert event == "job.succeeded"
        assert sent.name == job.name and sent.state == jobs_pb2.JOB_STATE_SUCCEEDED
        assert sent.result.sha256 == (await client.get(job.name)).result.sha256
        message_id = got.headers["webhook-id"]
        name = f"webhookDeliveries/{message_id}"
        delivery = await wait_delivery(client, name, webhooks_pb2.WEBHOOK_DELIVERY_STATE_DELIVERED)
        assert delivery.attempts == 1 and delivery.last_status_code == 200
        assert delivery.subject == job.name and delivery.url == receiver.url("a")
        listed = await client.webhook_deliveries()
        assert name in [d.name for d in listed.deliveries]
        # Delivered means done: nothing of it is due any more, and nothing more came.
        redis = aioredis.Redis.from_url(cluster.redis_url)
        try:
            assert await redis.zscore(PREFIX + "webhooks:due", message_id) is None
        finally:
            await redis.aclose()
        assert len(receiver.on("a")) == 1
        # Another vendor cannot see it.
        async with AsyncClient(cluster.public_address, B) as other:
            with pytest.raises(CutoutError) as refused:
                await other.webhook_delivery(name)
            assert refused.value.code.name == "NOT_FOUND"


async def test_retries_after_500_and_a_timeout_carry_the_same_id(
    cluster: LocalCluster, receiver: Receiver
) -> None:
    secret = await set_endpoint(cluster, "vendor-b", receiver.url("unused"))
    receiver.scripts["flaky"] = ["500", "hang"]
    async with AsyncClient(cluster.public_address, B) as client:
        job = await client.submit(png(), webhook_url=receiver.url("flaky"))
        first, second, third = await wait_for(receiver, "flaky", 3)
        ids = {r.headers["webhook-id"] for r in (first, second, third)}
        assert len(ids) == 1
        for received in (first, second, third):
            assert job_of(received, secret)[1].name == job.name
        assert second.at - first.at >= 0.1  # backed off
        name = f"webhookDeliveries/{ids.pop()}"
        delivery = await wait_delivery(client, name, webhooks_pb2.WEBHOOK_DELIVERY_STATE_DELIVERED)
        assert delivery.attempts == 3
    assert receiver.on("unused") == []  # the job's own URL, not the vendor's


async def test_410_disables_the_endpoint(cluster: LocalCluster, receiver: Receiver) -> None:
    await set_endpoint(cluster, "vendor-c", receiver.url("gone"))
    receiver.scripts["gone"] = ["410"]
    async with AsyncClient(cluster.public_address, C) as client:
        await client.submit(png())
        (got,) = await wait_for(receiver, "gone", 1)
        name = f"webhookDeliveries/{got.headers['webhook-id']}"
        disabled = webhooks_pb2.WEBHOOK_DELIVERY_STATE_ENDPOINT_DISABLED
        await wait_delivery(client, name, disabled)
        redis = aioredis.Redis.from_url(cluster.redis_url)
        try:
            endpoint = await webhook_registry.read(redis, PREFIX, "vendor-c")
        finally:
            await redis.aclose()
        assert not endpoint.active and "410" in endpoint.reason
        job = await client.submit(png())
        async for _ in client.watch(job.name):
            pass
        listed = await client.webhook_deliveries()
        assert [d.name for d in listed.deliveries] == [name]  # nothing queued for a dead URL


async def test_a_batch_notifies_each_job_and_its_completion(
    cluster: LocalCluster, receiver: Receiver
) -> None:
    secret = await set_endpoint(cluster, "vendor-a", receiver.url("a"))
    before = len(receiver.on("batch"))
    async with AsyncClient(cluster.public_address, A) as client:
        subs = [
            jobs_pb2.JobSubmission(image=jobs_pb2.ImageSource(content=png(40 + i)))
            for i in range(3)
        ]
        for sub in subs:
            sub.operation.remove_background.SetInParent()
        reply = await client.submit_batch(subs, webhook_url=receiver.url("batch"))
        got = await wait_for(receiver, "batch", before + 4)
    payloads = [Webhook(secret).verify(r.body, r.headers) for r in got[before:]]
    types = sorted(p["type"] for p in payloads)
    assert types == ["batch.completed", "job.succeeded", "job.succeeded", "job.succeeded"]
    batch = next(p["data"]["batch"] for p in payloads if p["type"] == "batch.completed")
    progress = json_format.ParseDict(batch, jobs_pb2.BatchProgress())
    assert progress.name == reply.batch and progress.done and progress.succeeded == 3


async def test_hostile_webhook_urls_are_refused_at_submit(
    cluster: LocalCluster, receiver: Receiver
) -> None:
    redis = aioredis.Redis.from_url(cluster.redis_url)
    try:
        await redis.delete(webhook_registry.secrets_key(PREFIX, "vendor-c"))
    finally:
        await redis.aclose()
    async with AsyncClient(cluster.public_address, C) as client:  # no signing secret
        with pytest.raises(CutoutError) as refused:
            await client.submit(png(), webhook_url=receiver.url("c"))
        assert refused.value.code.name == "FAILED_PRECONDITION"
        assert "cutout-admin vendors set vendor-c --webhook" in refused.value.message
    await set_endpoint(cluster, "vendor-a", receiver.url("a"))
    async with AsyncClient(cluster.public_address, A) as client:
        for url in (
            "https://169.254.169.254/latest",  # cloud metadata
            "https://10.1.2.3/hook",
            f"http://127.0.0.1:{cluster.redis.port if cluster.redis else 6379}/",  # not https
            "https://127.0.0.1:6379/",  # loopback, not on the allow-list (another port)
            "not a url",
        ):
            with pytest.raises(CutoutError) as refused:
                await client.submit(png(), webhook_url=url)
            assert refused.value.code.name == "INVALID_ARGUMENT"
            assert refused.value.violations[0][0] == "submission.webhook_url", url
        sub = jobs_pb2.JobSubmission(image=jobs_pb2.ImageSource(content=png()))
        sub.operation.remove_background.SetInParent()
        bad = jobs_pb2.JobSubmission()
        bad.CopyFrom(sub)
        bad.webhook_url = "https://192.168.0.1/"
        reply = await client.submit_batch([sub, bad])
        assert reply.outcomes[0].HasField("job")
        assert reply.outcomes[1].error.code == 3  # INVALID_ARGUMENT, that item only
        assert "submissions[1].webhook_url" in reply.outcomes[1].error.message


async def test_a_scheduler_killed_mid_delivery_loses_nothing(
    cluster: LocalCluster, receiver: Receiver
) -> None:
    secret = await set_endpoint(cluster, "vendor-b", receiver.url("unused"))
    receiver.scripts["kill"] = ["hang"]
    receiver.arrived["kill"] = arrived = threading.Event()
    async with AsyncClient(cluster.public_address, B) as client:
        job = await client.submit(png(), webhook_url=receiver.url("kill"))
        assert await asyncio.to_thread(arrived.wait, 60)
        assert cluster.scheduler is not None
        cluster.kill(cluster.scheduler)  # SIGKILL while the POST is in flight
        await asyncio.to_thread(cluster.start_scheduler)
        first, second = await wait_for(receiver, "kill", 2)
        assert first.headers["webhook-id"] == second.headers["webhook-id"]
        assert job_of(second, secret)[1].name == job.name
        name = f"webhookDeliveries/{second.headers['webhook-id']}"
        await wait_delivery(client, name, webhooks_pb2.WEBHOOK_DELIVERY_STATE_DELIVERED)


async def test_redeliver_and_secret_rotation_from_the_command_lines(
    cluster: LocalCluster, receiver: Receiver, tls: Path
) -> None:
    env = {
        **os.environ,
        "CUTOUT_REDIS_URL": cluster.redis_url,
        "CUTOUT_ADDR": cluster.public_address,
        "CUTOUT_API_KEY": A,
        **webhook_env(receiver, tls),
    }
    bin_dir = Path(sys.executable).parent

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(bin_dir / args[0]), *args[1:]], env=env, capture_output=True, text=True, timeout=60
        )

    assert run("cutout-admin", "vendors", "add", "hooked").returncode == 0
    refused = run("cutout-admin", "vendors", "set", "hooked", "--webhook", "https://10.0.0.1/x")
    assert refused.returncode == 2 and "10.0.0.1" in refused.stderr + refused.stdout
    made = run("cutout-admin", "vendors", "set", "hooked", "--webhook", receiver.url("cli"))
    assert made.returncode == 0, made.stderr
    (old,) = [w for w in made.stdout.split() if w.startswith("whsec_")]
    listed = run("cutout-admin", "vendors", "list")
    assert receiver.url("cli") in listed.stdout
    rotated = run("cutout-admin", "vendors", "rotate-webhook-secret", "hooked", "--grace", "600")
    (new,) = [w for w in rotated.stdout.split() if w.startswith("whsec_")]
    assert new != old
    redis = aioredis.Redis.from_url(cluster.redis_url)
    try:
        endpoint = await webhook_registry.read(redis, PREFIX, "hooked")
    finally:
        await redis.aclose()
    assert endpoint.secrets == (new, old)  # both sign during the grace period

    # vendor-a's delivery, redelivered with `cutout webhooks redeliver`: the same id again.
    secret = await set_endpoint(cluster, "vendor-a", receiver.url("again"))
    async with AsyncClient(cluster.public_address, A) as client:
        await client.submit(png())
        (first,) = await wait_for(receiver, "again", 1)
        message_id = first.headers["webhook-id"]
        await wait_delivery(
            client, f"webhookDeliveries/{message_id}", webhooks_pb2.WEBHOOK_DELIVERY_STATE_DELIVERED
        )
    shown = run("cutout", "webhooks", "list")
    assert shown.returncode == 0 and message_id in shown.stdout, shown.stdout + shown.stderr
    again = run("cutout", "webhooks", "redeliver", message_id)
    assert again.returncode == 0, again.stderr
    _, second = await wait_for(receiver, "again", 2)
    assert second.headers["webhook-id"] == message_id
    job_of(second, secret)
    detail = run("cutout", "webhooks", "show", message_id)
    assert "DELIVERED" in detail.stdout or "PENDING" in detail.stdout, detail.stdout


async def test_the_typescript_client_verifies_a_real_delivery(
    cluster: LocalCluster, receiver: Receiver, tmp_path: Path
) -> None:
    """cutout-client's verifyWebhook (clients/ts/src/webhooks.ts), in Node, on what a
    scheduler really sent: what docs/webhooks.md tells TypeScript users to run."""
    secret = await set_endpoint(cluster, "vendor-a", receiver.url("ts"))
    async with AsyncClient(cluster.public_address, A) as client:
        job = await client.submit(png())
        (got,) = await wait_for(receiver, "ts", 1)
    (tmp_path / "delivery.json").write_text(
        json.dumps({"secret": secret, "headers": got.headers, "body": got.body.decode()})
    )
    run_npm(TS, "run", "build")
    script = (
        "import { readFileSync } from 'node:fs';"
        f"import {{ verifyWebhook }} from '{TS.as_posix()}/dist/src/index.js';"
        "const d = JSON.parse(readFileSync(process.argv[1], 'utf8'));"
        "const e = await verifyWebhook(d.secret, d.headers, new TextEncoder().encode(d.body));"
        "const o = e.job.outcome;"
        "console.log(JSON.stringify({type: e.type, name: e.job.name, outcome: o.case,"
        " sha: o.value.sha256}));"
    )
    done = subprocess.run(
        ["node", "--input-type=module", "-e", script, str(tmp_path / "delivery.json")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert seen["type"] == "job.succeeded" and seen["name"] == job.name
    assert seen["outcome"] == "result"
    assert seen["sha"] == json.loads(got.body)["data"]["job"]["result"]["sha256"]
