"""TLS settings: half a certificate pair is a settings error. TLS on a real gateway:
tests/cluster/test_tls.py."""

from __future__ import annotations

from pathlib import Path

import pytest


def test_half_a_tls_pair_is_a_settings_error(tmp_path: Path) -> None:
    from services.common.config import SettingsError
    from services.common.serving import tls_credentials

    assert tls_credentials("", "") is None
    with pytest.raises(SettingsError, match="must be set together"):
        tls_credentials(str(tmp_path / "cert.pem"), "")
    with pytest.raises(SettingsError, match="cannot read"):
        tls_credentials(str(tmp_path / "cert.pem"), str(tmp_path / "key.pem"))
