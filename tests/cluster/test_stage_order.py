"""Stages arrive in order, each once, and progress never goes back (issue 26, item 1).

The first job on a fresh cluster used to show COMPOSITING, ENCODING and STORING
twice: its completion was the first use of the COMPLETE script, Redis answered
NOSCRIPT, and the whole pipeline, progress update included, ran again. The
tiny model hides it (its job ends within the node's hold, so no progress write
comes before the completion and both scripts are missing together), and so
does any earlier job (the scripts are loaded by then): hence a real-model job,
the first one its cluster runs.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from cutout import AsyncClient
from cutout.v1 import jobs_pb2
from services.local.cluster import LocalCluster
from tests.support.cluster import KEYS

REMOVE_BACKGROUND = [
    jobs_pb2.STAGE_QUEUED,
    jobs_pb2.STAGE_DECODING,
    jobs_pb2.STAGE_INFERENCE,
    jobs_pb2.STAGE_COMPOSITING,
    jobs_pb2.STAGE_ENCODING,
    jobs_pb2.STAGE_STORING,
    jobs_pb2.STAGE_DONE,
]


def stage_runs(stages: list[int]) -> list[int]:
    """The stages with each run of repeats (a stage's percent moving on) as one."""
    runs: list[int] = []
    for stage in stages:
        if not runs or runs[-1] != stage:
            runs.append(stage)
    return runs


def names(stages: list[int]) -> list[str]:
    return [jobs_pb2.Stage.Name(s) for s in stages]


async def test_the_first_job_on_a_fresh_cluster_reports_each_stage_once_in_order(
    make_cluster: Callable[..., LocalCluster],
    real_model_dir: Path,
    photos: dict[str, bytes],
) -> None:
    cluster = make_cluster(real_model_dir, nodes=1)
    async with AsyncClient(cluster.gateway_address, KEYS["vendor-a"]) as client:
        job = await client.submit(photos["astronaut"])  # the cluster's first job
        seen = [event.job async for event in client.watch(job.name)]
    trace = [(jobs_pb2.Stage.Name(j.stage), j.progress_percent, j.attempt) for j in seen]
    assert seen[-1].state == jobs_pb2.JOB_STATE_SUCCEEDED, trace
    assert seen[-1].attempt == 1, trace
    assert names(stage_runs([j.stage for j in seen])) == names(REMOVE_BACKGROUND), trace
    progress = [j.progress_percent for j in seen]
    assert progress == sorted(progress), f"progress went backwards: {trace}"
    assert progress[-1] == 100, trace
