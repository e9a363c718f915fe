"""Switches (CUTOUT_REQUIRE_GPU, CUTOUT_URL_ALLOW_HTTP) read 1/0, true/false, yes/no, on/off.

One parser (services/common/config.py env_bool) for every boolean setting; any
other value is an error naming the setting, never off. A node started with a bad
switch: tests/cluster/test_boolean_settings.py."""

from __future__ import annotations

import pytest

from services.common.config import SettingsError, env_bool
from services.common.internal_auth import new_token
from services.gateway.settings import GatewaySettings
from services.inference.settings import NodeSettings

ON = ["1", "true", "TRUE", "True", "yes", "YES", "Yes", "on", "ON", "On", " true "]
OFF = ["0", "false", "FALSE", "False", "no", "NO", "No", "off", "OFF", "Off", " off "]
BAD = ["maybe", "2", "-1", "tru", "y", "n", "enabled", "10", "1.0", "on off"]


@pytest.mark.parametrize("raw", ON)
def test_every_spelling_of_on_in_any_case(raw: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUTOUT_TEST_SWITCH", raw)
    assert env_bool("CUTOUT_TEST_SWITCH", False) is True


@pytest.mark.parametrize("raw", OFF)
def test_every_spelling_of_off_in_any_case(raw: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUTOUT_TEST_SWITCH", raw)
    assert env_bool("CUTOUT_TEST_SWITCH", True) is False


@pytest.mark.parametrize("default", [True, False])
def test_unset_or_empty_is_the_default(default: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUTOUT_TEST_SWITCH", raising=False)
    assert env_bool("CUTOUT_TEST_SWITCH", default) is default
    monkeypatch.setenv("CUTOUT_TEST_SWITCH", "")
    assert env_bool("CUTOUT_TEST_SWITCH", default) is default


@pytest.mark.parametrize("raw", BAD)
def test_any_other_value_is_an_error_naming_the_setting(
    raw: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CUTOUT_TEST_SWITCH", raw)
    with pytest.raises(SettingsError) as caught:
        env_bool("CUTOUT_TEST_SWITCH", False)
    message = str(caught.value)
    assert "CUTOUT_TEST_SWITCH" in message and repr(raw) in message
    for word in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        assert word in message  # it says what would have been accepted


@pytest.fixture
def token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUTOUT_INTERNAL_TOKEN", new_token())


@pytest.mark.usefixtures("token")
@pytest.mark.parametrize(("raw", "expected"), [("true", True), ("On", True), ("no", False)])
def test_the_services_read_their_switches_with_it(
    raw: str, expected: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CUTOUT_REQUIRE_GPU", raw)
    monkeypatch.setenv("CUTOUT_URL_ALLOW_HTTP", raw)
    assert NodeSettings.from_env().require_gpu is expected
    assert GatewaySettings.from_env().url_allow_http is expected


@pytest.mark.usefixtures("token")
def test_a_bad_switch_stops_the_gateway_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUTOUT_URL_ALLOW_HTTP", "sometimes")
    with pytest.raises(SettingsError, match="CUTOUT_URL_ALLOW_HTTP='sometimes'"):
        GatewaySettings.from_env()
