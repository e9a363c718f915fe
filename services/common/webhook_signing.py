"""Standard Webhooks signatures (https://www.standardwebhooks.com): what Cutout sends.

    webhook-id:         the delivery's id, the same on every retry
    webhook-timestamp:  seconds since the epoch, when this attempt was signed
    webhook-signature:  "v1,<base64 HMAC-SHA256>" per valid secret, space-separated

The HMAC key is the secret's bytes (base64 after "whsec_"); the signed content is
"{id}.{timestamp}.{body}". Receivers verify with any Standard Webhooks library
(`standardwebhooks` on PyPI, npm `standardwebhooks`) or the few lines docs/webhooks.md shows.
"""

from __future__ import annotations

import base64
import hashlib
import hmac

PREFIX = "whsec_"


def key_of(secret: str) -> bytes:
    return base64.b64decode(secret.removeprefix(PREFIX))


def signature(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    content = f"{message_id}.{timestamp}.".encode() + body
    digest = hmac.new(key_of(secret), content, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def headers(
    secrets: tuple[str, ...], message_id: str, timestamp: int, body: bytes
) -> dict[str, str]:
    return {
        "webhook-id": message_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": " ".join(signature(s, message_id, timestamp, body) for s in secrets),
        "content-type": "application/json",
    }
