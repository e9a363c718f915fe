"""Node discovery (static and DNS) and progress throttling, without a network."""

from __future__ import annotations

import asyncio

import pytest

from services.common.internal_auth import InternalToken, new_token
from services.internal.v1 import inference_service_pb2 as pb
from services.scheduler.nodes import Node, NodePool, resolve_all, split_entries
from services.scheduler.progress import ProgressThrottle
from services.scheduler.work_link import WorkLink


def with_stream(node: Node, credit: int) -> Node:
    """The node with its Work stream open and `credit` jobs granted on it (no network):
    the scheduler sends a node nothing without one."""
    node.work = WorkLink(node.address, None, (), lambda: None)  # type: ignore[arg-type]
    node.work._received(pb.WorkResponse(credit=pb.WorkCredit(jobs=credit)), asyncio.Queue())
    return node


def test_node_entries_split_into_static_and_dns() -> None:
    static, names = split_entries(["10.0.0.5:50061", "dns:///inference.cutout:50061"])
    assert static == ["10.0.0.5:50061"]
    assert names == [("inference.cutout", 50061)]
    for bad in ("dns:///inference", "dns:///:50061", "dns:///inference:http"):
        with pytest.raises(ValueError, match="dns:///name:port"):
            split_entries([bad])


async def test_real_lookup_of_localhost_gives_loopback_targets() -> None:
    found = await resolve_all("localhost", 50061)
    assert "127.0.0.1:50061" in found
    assert all(t in ("127.0.0.1:50061", "[::1]:50061") for t in found)


async def test_dns_records_come_and_go_and_a_failed_lookup_keeps_the_fleet() -> None:
    records = {"inference": ["10.0.0.1:7", "10.0.0.2:7"]}

    async def resolve(host: str, port: int) -> list[str]:
        if host not in records:
            raise OSError("name does not resolve")
        return records[host]

    token = InternalToken(new_token())
    pool = NodePool(["dns:///inference:7", "10.9.9.9:7"], 0.1, 1 << 20, token, resolve=resolve)
    await pool.refresh_dns()
    assert sorted(n.address for n in pool.nodes) == ["10.0.0.1:7", "10.0.0.2:7", "10.9.9.9:7"]
    first = {n.address: n for n in pool.nodes}

    # A pod replaced: one record goes, one comes. The running job keeps its node.
    first["10.0.0.1:7"].local_in_flight = 1
    first["10.0.0.1:7"].healthy = True
    records["inference"] = ["10.0.0.2:7", "10.0.0.3:7"]
    await pool.refresh_dns()
    assert sorted(n.address for n in pool.nodes) == ["10.0.0.2:7", "10.0.0.3:7", "10.9.9.9:7"]
    assert first["10.0.0.2:7"] in pool.nodes  # the surviving node keeps its channel
    gone = first["10.0.0.1:7"]
    assert not gone.healthy and gone.free == 0  # no new work for the departed node

    # DNS down: keep what we know rather than dropping every node.
    del records["inference"]
    await pool.refresh_dns()
    assert len(pool.nodes) == 3
    await pool.close()


async def test_progress_is_written_at_most_once_an_interval_but_every_stage_lands() -> None:
    written: list[list[tuple[int, int]]] = []

    async def write(updates: list[tuple[int, int]]) -> bool:
        written.append(updates)
        return True

    throttle = ProgressThrottle(write, interval_s=0.1)
    assert await throttle.report(3, 0)  # the claim was written just now: held back
    for i in range(1, 5):  # a burst within the stage: only the latest is kept
        assert await throttle.report(3, i * 10)
    assert await throttle.report(4, 50)  # a new stage joins the same write
    assert written == []
    await asyncio.sleep(0.25)  # flushed at 0.1 s; by 0.25 s the next interval has passed too
    assert written == [[(3, 40), (4, 50)]]  # one write, both stages, in order
    assert await throttle.report(5, 85)  # the interval has passed: written at once
    assert written[-1] == [(5, 85)]
    assert await throttle.report(5, 90)
    assert await throttle.report(6, 95)
    # The attempt finished before the interval: the caller writes these with its end.
    assert throttle.take() == [(5, 90), (6, 95)]
    assert await throttle.report(6, 97)
    await throttle.close()  # the attempt ended: what is pending is dropped
    await asyncio.sleep(0.15)
    assert len(written) == 2


async def test_a_fenced_off_attempt_is_reported_once_known() -> None:
    async def write(updates: list[tuple[int, int]]) -> bool:
        return False  # the job moved on (cancelled, or leased elsewhere)

    throttle = ProgressThrottle(write, interval_s=0.0)
    assert not await throttle.report(3, 10)
    assert not await throttle.report(3, 20)
    await throttle.close()


def test_a_slot_we_free_is_free_at_once_and_other_schedulers_jobs_still_count() -> None:
    """The slot accounting between polls: our own attempts as they start and end, other
    schedulers' as the node last reported them."""
    node = Node("10.0.0.1:7", None, None, None, healthy=True, capacity=4)  # type: ignore[arg-type]
    assert node.free == 0  # no Work stream yet: nothing to send it on
    with_stream(node, credit=100)  # credit to spare: the slots are what limit here
    for _ in range(3):
        node.started(light=False)
    # A poll answers while our 3 run and another scheduler runs 1 there: full.
    node.reported_in_flight, node.local_at_report = 4, node.local_in_flight
    assert node.free == 0
    node.finished(light=False)  # one of ours ends: its slot is free before the next poll
    assert node.free == 1 and node.in_flight == 3
    for _ in range(2):
        node.finished(light=False)
    assert node.free == 3  # the other scheduler's job still holds its slot
    node.refused(light=False)  # the node said it is full (more of theirs since): believe it
    assert node.free == 0


def test_a_streaming_node_gets_jobs_ahead_at_once_for_an_idle_slot_and_in_halves_after() -> None:
    """With a waiting room (prefetch), a node is claimed for as soon as a slot of it
    would sit idle; the waiting room itself is refilled once half of it is free, so
    jobs travel several to a claim instead of one per freed slot."""
    node = Node("10.0.0.1:7", None, None, None, healthy=True, capacity=4)  # type: ignore[arg-type]
    node.prefetch = 4
    with_stream(node, credit=8)
    assert node.work is not None
    assert node.free == 8 and node.claimable(light=False)  # idle slots: claim now
    for _ in range(8):  # 4 running, 4 waiting there
        node.started(light=False)
        assert node.work.reserve(False) is not None
    assert node.free == 0 and not node.claimable(light=False)
    node.finished(light=False)  # a job ends; its credit comes back
    node.work._received(pb.WorkResponse(credit=pb.WorkCredit(jobs=1)), asyncio.Queue())
    # One waiting place free; a waiting job took the freed slot: no claim yet.
    assert node.free == 1 and not node.claimable(light=False)
    node.finished(light=False)
    node.work._received(pb.WorkResponse(credit=pb.WorkCredit(jobs=1)), asyncio.Queue())
    assert node.free == 2 and node.claimable(light=False)  # half the room: one claim for 2
    for _ in range(6):  # every job ends: slots idle, a claim at once whatever the room
        node.finished(light=False)
    assert node.idle_slots(light=False) == 4 and node.claimable(light=False)
    plain = Node("10.0.0.2:7", None, None, None, healthy=True, capacity=4)  # type: ignore[arg-type]
    with_stream(plain, credit=4)
    plain.started(light=False)
    assert plain.free == 3 and plain.claimable(light=False)  # no waiting room: any free slot
