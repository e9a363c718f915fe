"""The services' settings as the tests read them."""

from __future__ import annotations

import re

import pytest

from services.common.config import PROJECT_ROOT
from services.common.internal_auth import new_token
from services.gateway.settings import GatewaySettings

SETTINGS = sorted((PROJECT_ROOT / "services").glob("*/settings.py"))


def known_variables() -> set[str]:
    """Every CUTOUT_ variable a service reads."""
    names: set[str] = set()
    common = PROJECT_ROOT / "services" / "common"
    for path in [
        *SETTINGS,
        common / "config.py",
        common / "internal_auth.py",
        common / "webhook_policy.py",
    ]:
        names |= set(re.findall(r'"(CUTOUT_[A-Z0-9_]+)"', path.read_text()))
    return names


def default_gateway_settings(monkeypatch: pytest.MonkeyPatch) -> GatewaySettings:
    """The gateway's settings with its request and image limits at their defaults."""
    for name in ("CUTOUT_GATEWAY_MAX_MESSAGE_BYTES", "CUTOUT_MAX_IMAGE_BYTES"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CUTOUT_INTERNAL_TOKEN", new_token())
    return GatewaySettings.from_env()
