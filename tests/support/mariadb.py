"""MariaDB for the record tests: the shared server, and private ones.

Most record tests use the shared server on 127.0.0.1:3306 (SHARED; rows() reads
a vendor's data_records there or anywhere else). A test that kills
the database mid-run, or needs a small max_allowed_packet, starts its own
`mariadbd` (the same binary) on a free port with a throw-away data directory,
so the shared server is never disturbed.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

import pymysql

from services.local.redis import free_port
from services.scheduler.records import MysqlTarget, RecordUpdate

SHARED = "mysql://root@127.0.0.1:3306/test"


def rows(url: str, vendor: str) -> dict[str, tuple[str, str, str, str]]:
    """record_id -> (photo_url, processing_status, job_id, processed_at) for one vendor."""
    t = MysqlTarget.from_url(url)
    conn = pymysql.connect(host=t.host, port=t.port, user=t.user, database=t.database)
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT record_id, photo_url, processing_status, job_id, processed_at"
                " FROM data_records WHERE vendor_id = %s",
                (vendor,),
            )
            return {r[0]: (r[1], r[2], r[3], str(r[4])) for r in cur.fetchall()}
    finally:
        conn.close()


def update(vendor: str, record: str, job_id: str, created_ms: int, url: str) -> RecordUpdate:
    """A record update as a job's delivery makes it."""
    return RecordUpdate(
        vendor_id=vendor,
        project_id="proj",
        record_id=record,
        photo_url=url,
        job_id=job_id,
        job_created_ms=created_ms,
        processed_at=datetime.now(UTC),
    )


def _binary(name: str) -> str:
    path = shutil.which(name) or (f"/usr/sbin/{name}" if Path(f"/usr/sbin/{name}").exists() else "")
    if not path:
        raise RuntimeError(f"{name} not found: install MariaDB (apt-get install mariadb-server)")
    return path


class MariaDBServer:
    def __init__(self, workdir: Path, max_allowed_packet: str = "16M") -> None:
        self.workdir = workdir
        self.datadir = workdir / "data"
        self.port = free_port()
        self.max_allowed_packet = max_allowed_packet
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mysql://root@127.0.0.1:{self.port}/test"

    def start(self, timeout_s: float = 30.0) -> None:
        if not self.datadir.exists():
            self.workdir.mkdir(parents=True, exist_ok=True)
            subprocess.run(
                [
                    _binary("mariadb-install-db"),
                    "--no-defaults",
                    f"--datadir={self.datadir}",
                    "--user=root",
                    "--auth-root-authentication-method=normal",
                    "--skip-test-db",
                ],
                check=True,
                capture_output=True,
            )
        with (self.workdir / "mariadbd.log").open("ab") as log:
            self.proc = self._spawn(log)
        self._wait_ready(timeout_s)

    def _spawn(self, log: IO[bytes]) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [
                _binary("mariadbd"),
                "--no-defaults",
                f"--datadir={self.datadir}",
                f"--port={self.port}",
                "--bind-address=127.0.0.1",
                f"--socket={self.workdir / 'mariadbd.sock'}",
                f"--pid-file={self.workdir / 'mariadbd.pid'}",
                "--user=root",
                f"--max-allowed-packet={self.max_allowed_packet}",
                "--innodb-buffer-pool-size=32M",
                "--skip-log-bin",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    def _wait_ready(self, timeout_s: float) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mariadbd exited; see {self.workdir / 'mariadbd.log'}")
            try:
                conn = pymysql.connect(host="127.0.0.1", port=self.port, user="root")
                break
            except pymysql.err.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        with conn.cursor() as cur:
            cur.execute("CREATE DATABASE IF NOT EXISTS test")
        conn.close()

    def kill(self) -> None:
        """SIGKILL, as a crash would; InnoDB recovers committed rows on the next start."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        # the port must be free before a restart binds it again
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) != 0:
                    return
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
