"""What the scripts answer (and what a retry is charged), as enums: Python compares
members, Lua uses the same numbers.

Every member is also a Lua constant in the scripts' prelude, named
CLASS_MEMBER (`RETRIED_DEAD_LETTERED`, `ENQUEUED_VENDOR_FULL`, ...), see lua.py.
"""

from __future__ import annotations

from enum import IntEnum

from services.common.errors import CutoutError


class Enqueued(IntEnum):
    """ENQUEUE, per job."""

    DEDUPLICATED = 0  # an idempotency key named an existing job: that job is the answer
    NEW = 1
    VENDOR_FULL = -1  # the vendor's cap on waiting jobs
    CLUSTER_FULL = -2  # the cluster's cap on waiting jobs


class Fence(IntEnum):
    """PROGRESS, COMPLETE, FAIL: did the attempt still hold its job?"""

    LOST = 0  # the job moved on (cancelled, re-leased, finished): nothing changed
    HELD = 1


class Retried(IntEnum):
    """RETRY."""

    FENCED = 0  # the job moved on: nothing changed
    RETRYING = 1  # backing off before the next attempt
    DEAD_LETTERED = 2  # out of retries: FAILED, input kept
    REQUEUED = 3  # refunded: back in its queue at once, attempt not counted


class Charge(IntEnum):
    """RETRY, REAP: whose fault a lost attempt was, so whether it uses up a retry."""

    COUNTED = 0  # the job's or its node's (node error or crash, deadline): one retry used
    REFUNDED = 1  # refused before any work (node full, draining): requeued at once, not counted
    FREE = 2  # the cluster's own (scheduler or Redis restart, lease lost): not counted

    @classmethod
    def of(cls, error: CutoutError) -> Charge:
        """The charge of an attempt that `error` ended, as its kind says (errors.py)."""
        if not error.started:
            return cls.REFUNDED
        return cls.COUNTED if error.charged else cls.FREE


class Cancelled(IntEnum):
    """CANCEL."""

    NOT_FOUND = -1  # no such job, or another vendor's
    ALREADY_DONE = 0
    CANCELLED = 1


class Requeued(IntEnum):
    """REQUEUE_DEAD."""

    NOT_FOUND = -1  # not the vendor's dead letter
    INPUT_GONE = -2  # purged or expired: nothing to run
    REQUEUED = 1


class Switched(IntEnum):
    """SWITCH_RESULT (a delivery's upload replacing the job's result)."""

    GONE = -1  # the job expired
    MOVED_ON = 0  # the result is no longer the one the deliverer read (another one won)
    SWITCHED = 1


OUTCOMES: tuple[type[IntEnum], ...] = (
    Enqueued,
    Fence,
    Retried,
    Charge,
    Cancelled,
    Requeued,
    Switched,
)
