"""Authentication of calls between Cutout's own services.

The scheduler's and the nodes' ports must not answer whoever reaches them on
the network: a call naming any vendor id would otherwise read that vendor's
jobs. Every internal call therefore carries a shared secret,
`x-cutout-internal-token`, which only the gateway and the scheduler hold
(Kubernetes: one Secret; `cutout-admin up`: a random one per cluster).
Receivers compare it in constant time against the tokens they accept and
answer UNAUTHENTICATED otherwise; only health checks and reflection are open.

Rotation without downtime: add the new token to CUTOUT_INTERNAL_TOKENS_ACCEPTED
on every receiver (rolling restart), switch CUTOUT_INTERNAL_TOKEN to it
everywhere, then drop the old one from the accepted list.

The vendor a relayed public call is for travels beside it as `x-cutout-vendor`,
set by the gateway from the API key it checked; a receiver believes it only
from a caller that presented a valid token.
"""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass

from services.common.config import SettingsError, env_list, env_str
from services.common.errors import Unauthenticated
from services.common.identity import ID_RULE, VENDOR_ID, set_vendor
from services.common.interceptors import Context, Handler, HandlerInterceptor, around

TOKEN_HEADER = "x-cutout-internal-token"
VENDOR_HEADER = "x-cutout-vendor"
MIN_TOKEN_CHARS = 16
PUBLIC_SERVICE = "/cutout.v1.CutoutService/"


def new_token() -> str:
    return secrets.token_urlsafe(32)


@dataclass(frozen=True)
class InternalToken:
    """The token this process sends, and the ones it accepts (the current one included).

    Attributes:
        current: CUTOUT_INTERNAL_TOKEN, sent on every internal call and accepted.
        also_accepted: CUTOUT_INTERNAL_TOKENS_ACCEPTED, accepted too (during a rotation).
    """

    current: str
    also_accepted: tuple[str, ...] = ()

    @classmethod
    def from_env(cls) -> InternalToken:
        current = env_str("CUTOUT_INTERNAL_TOKEN", "")
        if not current:
            raise SettingsError(
                "CUTOUT_INTERNAL_TOKEN is not set: calls between Cutout's services must be "
                "authenticated. Give the gateway, scheduler and nodes the same secret "
                "(`python -m services.admin token` makes one)"
            )
        tokens = cls(current, tuple(env_list("CUTOUT_INTERNAL_TOKENS_ACCEPTED")))
        for token in (tokens.current, *tokens.also_accepted):
            if len(token) < MIN_TOKEN_CHARS:
                raise SettingsError(
                    f"internal tokens must be at least {MIN_TOKEN_CHARS} characters "
                    "(CUTOUT_INTERNAL_TOKEN, CUTOUT_INTERNAL_TOKENS_ACCEPTED)"
                )
        return tokens

    def metadata(self, vendor: str = "") -> tuple[tuple[str, str], ...]:
        """Metadata for an internal call, on behalf of vendor when given."""
        if vendor:
            return ((TOKEN_HEADER, self.current), (VENDOR_HEADER, vendor))
        return ((TOKEN_HEADER, self.current),)

    def accepts(self, presented: str) -> bool:
        # Every candidate is compared, so the time taken says nothing about which matched.
        ok = False
        for token in (self.current, *self.also_accepted):
            ok |= hmac.compare_digest(presented.encode(), token.encode())
        return ok


def _value(context: Context, key: str) -> str:
    for k, v in context.invocation_metadata() or ():
        if k == key:
            return v if isinstance(v, str) else v.decode(errors="replace")
    return ""


class InternalAuth(HandlerInterceptor):
    """Refuses internal calls without a valid token; sets the vendor of relayed public calls."""

    def __init__(self, tokens: InternalToken) -> None:
        self.tokens = tokens

    def wrap(self, handler: Handler, method: str) -> Handler:
        public = method.startswith(PUBLIC_SERVICE)

        async def check(context: Context) -> None:
            if not self.tokens.accepts(_value(context, TOKEN_HEADER)):
                raise Unauthenticated(
                    f"{method} is internal to the cluster: call it with a valid "
                    f"{TOKEN_HEADER} (vendors call the gateway instead)"
                )
            if public:
                vendor = _value(context, VENDOR_HEADER)
                if not VENDOR_ID.match(vendor):
                    raise Unauthenticated(f"a relayed public call needs {VENDOR_HEADER}: {ID_RULE}")
                set_vendor(vendor)

        return around(handler, check)
