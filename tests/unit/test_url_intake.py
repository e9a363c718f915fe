"""Images by URL: hostile addresses refused with a reason, allowed host:port pairs fetched (and
no other port of their host, from an HTTP server in this process), caps kept. Through a real
gateway: tests/cluster/test_url_intake.py."""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from services.common.config import SettingsError
from services.common.errors import CutoutError as ServerError
from services.common.fetch import AllowedHost, Fetcher, FetchPolicy, forbidden
from services.gateway.settings import GatewaySettings


async def fake_dns(host: str, port: int) -> list[str]:
    """Names that resolve somewhere dangerous, as a hostile DNS server would answer."""
    table = {
        "loopback.example": ["127.0.0.1"],
        "mixed.example": ["93.184.215.14", "10.1.2.3"],  # one public, one private
        "v6-mapped.example": ["::ffff:169.254.169.254"],
    }
    if host in table:
        return table[host]
    from services.common.fetch import system_resolve

    return await system_resolve(host, port)


HOSTILE = {
    "http://127.0.0.1/a.jpg": "127.0.0.1 is loopback",
    "http://localhost/a.jpg": "is loopback",
    "http://10.0.0.1/a.jpg": "10.0.0.1 is private",
    "http://169.254.169.254/latest/meta-data/": "169.254.169.254 is link-local",
    "http://[::1]/a.jpg": "::1 is loopback",
    "http://[::ffff:127.0.0.1]/a.jpg": "127.0.0.1 is loopback (inside ::ffff:7f00:1)",
    "http://[64:ff9b::a9fe:a9fe]/": "(inside 64:ff9b::a9fe:a9fe)",  # NAT64 of metadata
    "http://2130706433/a.jpg": "127.0.0.1 is loopback",  # decimal IPv4
    "http://0x7f000001/a.jpg": "127.0.0.1 is loopback",  # hex IPv4
    "http://0/a.jpg": "0.0.0.0 is",
    "http://loopback.example/a.jpg": "host 'loopback.example' resolves to 127.0.0.1 is loopback",
    "http://mixed.example/a.jpg": "10.1.2.3 is private",
    "http://v6-mapped.example/": "169.254.169.254 is link-local",
    "http://[fd00:ec2::254]/": "cloud metadata",
    "http://100.100.100.200/": "cloud metadata",
    "http://user:pw@93.184.215.14/": "credentials in URLs are not accepted",
    "file:///etc/passwd": "only https and http URLs are fetched",
    "gopher://127.0.0.1:6379/_FLUSHALL": "only https and http URLs are fetched",
}


@pytest.mark.parametrize("url", sorted(HOSTILE))
async def test_hostile_urls_are_refused_with_the_reason(url: str) -> None:
    fetcher = Fetcher(FetchPolicy(allow_http=True), resolve=fake_dns)
    with pytest.raises(ServerError) as refused:
        await fetcher.fetch(url, "submission.image.uri")
    err = refused.value
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert HOSTILE[url] in err.message, err.message
    assert err.violations[0].field == "submission.image.uri"


async def test_only_https_by_default() -> None:
    with pytest.raises(ServerError, match="only https URLs are fetched"):
        await Fetcher(FetchPolicy()).fetch("http://93.184.215.14/a.jpg", "uri")


def test_public_addresses_pass_the_check() -> None:
    for address in ("93.184.215.14", "2606:2800:21f:cb07:6820:80da:af6b:8b2c", "8.8.8.8"):
        assert forbidden(ipaddress.ip_address(address)) is None


def allowing(*entries: str, **policy: Any) -> Fetcher:
    allowed = frozenset(AllowedHost.parse(e) for e in entries)
    return Fetcher(FetchPolicy(allow_http=True, allow_hosts=allowed, **policy))


def host_port(url: str) -> str:
    return url.removeprefix("http://").split("/")[0]


async def test_allowed_host_is_fetched_and_its_redirects_are_checked(image_server: str) -> None:
    fetcher = allowing(host_port(image_server), max_bytes=1 << 20)
    data = await fetcher.fetch(f"{image_server}/to-photo", "uri")
    assert data[:3] == b"\xff\xd8\xff"  # the JPEG, after one redirect
    cases = {
        "/to-private": "10.0.0.1 is private",
        "/loop": "more than 3 redirects",
        "/huge": "exceeds the limit of 1048576 bytes",
        "/missing": "the server answered HTTP 404",
    }
    for path, reason in cases.items():
        with pytest.raises(ServerError, match=reason):
            await fetcher.fetch(image_server + path, "uri")


@pytest.fixture
def trap() -> Iterator[socket.socket]:
    """A listening loopback port nobody should reach: a connection made to it, even one
    closed at once, waits in its accept queue, so `connections` counts it afterwards."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    sock.setblocking(False)
    yield sock
    sock.close()


def connections(sock: socket.socket) -> int:
    count = 0
    while True:
        try:
            conn, _ = sock.accept()
        except BlockingIOError:
            return count
        conn.close()
        count += 1


async def test_an_allowed_host_is_allowed_on_its_port_only_and_no_other_is_ever_dialled(
    image_server: str, trap: socket.socket
) -> None:
    port = trap.getsockname()[1]
    other = f"http://127.0.0.1:{port}/"
    allowed = host_port(image_server)
    fetcher = allowing(allowed)
    for url in (other, f"{image_server}/redirect?to={other}"):  # directly, or redirected
        with pytest.raises(ServerError) as refused:
            await fetcher.fetch(url, "submission.image.uri")
        assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert refused.value.violations[0].field == "submission.image.uri"
        only = allowed.replace(":", " on port ")
        assert f"127.0.0.1 is loopback; refused (the allow-list has it only as {only})" in str(
            refused.value
        )
    assert connections(trap) == 0
    # An entry without a port allows the scheme's default port (80 here) and nothing else.
    with pytest.raises(ServerError, match=re.escape("only as 127.0.0.1 on port 443 (https) or 80")):
        await allowing("127.0.0.1").fetch(f"{image_server}/coffee.jpg", "uri")
    with pytest.raises(ServerError, match="is loopback"):
        await allowing(f"https://127.0.0.1:{port}").fetch(other, "uri")  # http is not https
    assert connections(trap) == 0
    # The trap does count: allowed, the fetcher dials it (and times out: it never answers).
    with pytest.raises(ServerError, match=re.escape("no complete answer within 0.5 s")):
        await allowing(f"127.0.0.1:{port}", timeout_s=0.5).fetch(other, "uri")
    assert connections(trap) == 1


@pytest.mark.parametrize(
    ("entries", "words"),
    [
        ("images.internal:8080,ftp://x", "'ftp://x': the scheme must be https or http"),
        ("images.internal:http", "the port must be a number 1-65535"),
        ("10.0.0.5/images", "expected host:port, or scheme://host:port"),
    ],
)
def test_allow_list_entries_are_checked_at_start(
    monkeypatch: pytest.MonkeyPatch, entries: str, words: str
) -> None:
    monkeypatch.setenv("CUTOUT_URL_ALLOW_HOSTS", entries)
    with pytest.raises(SettingsError, match=f"CUTOUT_URL_ALLOW_HOSTS: .*{words}"):
        GatewaySettings.from_env()


def test_allow_list_entries_parse_into_host_port_and_scheme(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(
        "CUTOUT_URL_ALLOW_HOSTS", "Images.Internal:8080, http://[::1]:81, 10.0.0.5, ::1"
    )
    monkeypatch.setenv("CUTOUT_INTERNAL_TOKEN", "t" * 32)
    assert GatewaySettings.from_env().url_allow_hosts == [
        AllowedHost("images.internal", 8080),
        AllowedHost("::1", 81, "http"),
        AllowedHost("10.0.0.5"),
        AllowedHost("::1"),
    ]
