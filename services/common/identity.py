"""Who a call is for: the vendor, set once per call by an interceptor.

On the gateway the authentication interceptor sets it from the API key; on
the scheduler the internal-auth interceptor sets it from the `x-cutout-vendor`
metadata the gateway sent (trusted only with a valid internal token). Each
gRPC call runs in its own task, so the value never leaks between calls.
"""

from __future__ import annotations

import re
from contextvars import ContextVar

from services.common.errors import Unauthenticated

# A vendor id (also a record's and a project's): what the gateway, the scheduler and
# cutout-admin accept, and what a result's storage key starts with.
ID_CHARS = r"[A-Za-z0-9_-]{1,64}"
VENDOR_ID = re.compile(rf"^{ID_CHARS}$")
ID_RULE = "1-64 characters of [A-Za-z0-9_-]"
_VENDOR: ContextVar[str] = ContextVar("cutout_vendor")


def set_vendor(vendor: str) -> None:
    _VENDOR.set(vendor)


def current_vendor() -> str:
    """The calling vendor; an error if no interceptor authenticated one."""
    try:
        return _VENDOR.get()
    except LookupError:
        # A wiring bug, never a caller's mistake: fail the call, not the process.
        raise Unauthenticated("no authenticated vendor for this call") from None
