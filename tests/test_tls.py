"""TLS on the public port: a client that trusts the CA gets in; plaintext and strangers do not."""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from cutout import AsyncClient, CutoutError
from cutout.v1 import jobs_pb2
from services.local.cluster import LocalCluster
from tests.conftest import KEYS


def make_ca(folder: Path, name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    (folder / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key, cert


def make_server_cert(
    folder: Path, ca_key: ec.EllipticCurvePrivateKey, ca: x509.Certificate
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gateway")]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    (folder / "gateway.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "gateway.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


async def test_gateway_serves_tls_when_a_certificate_is_configured(
    make_cluster,
    tiny_model_dir: Path,
    tmp_path: Path,
    photos: dict[str, bytes],  # type: ignore[no-untyped-def]
) -> None:
    ca_key, ca = make_ca(tmp_path, "ca")
    make_ca(tmp_path, "stranger")
    make_server_cert(tmp_path, ca_key, ca)
    cluster: LocalCluster = make_cluster(
        tiny_model_dir,
        nodes=1,
        CUTOUT_TLS_CERT=str(tmp_path / "gateway.pem"),
        CUTOUT_TLS_KEY=str(tmp_path / "gateway.key"),
    )
    addr, key = cluster.gateway_address, KEYS["vendor-a"]
    async with AsyncClient(addr, key, tls=str(tmp_path / "ca.pem")) as client:
        job = await client.submit(photos["coffee_small"])
        async for event in client.watch(job.name):
            last = event.job
        assert last.state == jobs_pb2.JOB_STATE_SUCCEEDED
    for tls in (False, str(tmp_path / "stranger.pem")):  # plaintext, or a CA it does not know
        async with AsyncClient(addr, key, tls=tls, timeout_s=3) as client:
            with pytest.raises(CutoutError) as err:
                await client.stats()
        # The handshake fails, so the call never reaches the service (the client's
        # retry policy may turn UNAVAILABLE into running out its deadline).
        assert err.value.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def test_half_a_tls_pair_is_a_settings_error(tmp_path: Path) -> None:
    from services.common.config import SettingsError
    from services.common.serving import tls_credentials

    assert tls_credentials("", "") is None
    with pytest.raises(SettingsError, match="must be set together"):
        tls_credentials(str(tmp_path / "cert.pem"), "")
    with pytest.raises(SettingsError, match="cannot read"):
        tls_credentials(str(tmp_path / "cert.pem"), str(tmp_path / "key.pem"))
