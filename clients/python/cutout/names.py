"""Resource names shared by the client and the services."""

from __future__ import annotations

import re

JOB_PREFIX = "jobs/"
BATCH_PREFIX = "batches/"
_JOB_ID = re.compile(r"^[0-9a-f]{32}$")


def job_name(job_id: str) -> str:
    return JOB_PREFIX + job_id


def job_id_from_name(name: str) -> str | None:
    """Accept "jobs/<id>" or a bare id; None when it is neither."""
    raw = name[len(JOB_PREFIX) :] if name.startswith(JOB_PREFIX) else name
    return raw if _JOB_ID.match(raw) else None


def batch_id_from_name(name: str) -> str | None:
    """Accept "batches/<id>" or a bare id; None when it is neither."""
    raw = name[len(BATCH_PREFIX) :] if name.startswith(BATCH_PREFIX) else name
    return raw if _JOB_ID.match(raw) else None
