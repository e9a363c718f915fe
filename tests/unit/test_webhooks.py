"""Webhook signatures are the Standard Webhooks scheme: the specification's example, and the
`standardwebhooks` library verifying ours. Deliveries from a real cluster:
tests/cluster/test_webhooks.py."""

from __future__ import annotations

import json
import time

import pytest
from standardwebhooks.webhooks import Webhook

from services.common import webhook_registry

pytestmark = pytest.mark.timeout(300)


def test_signature_is_the_standard_webhooks_scheme() -> None:
    """Our signer against the specification's example and the library's own verifier:
    several secrets, any one verifies."""
    from services.common import webhook_signing

    example = webhook_signing.signature(  # the Standard Webhooks specification's example
        "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        "msg_p5jXN8AQM9LWM0D4loKWxJek",
        1614265330,
        b'{"test": 2432232314}',
    )
    assert example == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="

    one, two = webhook_registry.new_secret(), webhook_registry.new_secret()
    body = json.dumps({"type": "job.succeeded"}).encode()
    headers = webhook_signing.headers((one, two), "msg_x", int(time.time()), body)
    for secret in (one, two):
        assert Webhook(secret).verify(body, headers) == {"type": "job.succeeded"}
    forged = dict(headers, **{"webhook-id": "msg_y"})
    with pytest.raises(Exception, match="signature"):
        Webhook(one).verify(body, forged)
    assert len(headers["webhook-signature"].split(" ")) == 2
