"""A node's recycling policy, and the RSS it reads. A node recycling its sessions under load:
tests/cluster/test_recycling.py."""

from __future__ import annotations

import mmap

from services.inference.recycling import RecyclePolicy, rss_bytes

MB = 2**20


def test_policy_recycles_past_the_limit_and_does_not_thrash() -> None:
    policy = RecyclePolicy(500 * MB)
    assert not policy.due(400 * MB)
    assert policy.due(600 * MB)
    policy.recycled(600 * MB, 550 * MB)  # could not get under the limit
    assert not policy.due(600 * MB)  # not again until it really grows
    assert policy.due(700 * MB)
    policy.recycled(700 * MB, 300 * MB)
    assert not policy.due(450 * MB) and policy.due(520 * MB)
    assert policy.recycles == 2
    assert not RecyclePolicy(0).due(10**12)  # 0 = off


def test_rss_is_this_process_resident_memory() -> None:
    # Fresh anonymous pages (not the heap, which may reuse what earlier tests freed).
    block = mmap.mmap(-1, 64 * MB)
    try:
        before = rss_bytes()
        block[::4096] = b"x" * len(block[::4096])  # touch every page
        assert rss_bytes() - before >= 48 * MB
    finally:
        block.close()
