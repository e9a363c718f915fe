"""Restarts the local cluster's service processes when they exit, as a process manager would.

One thread polls each watched process. A process that exits while the cluster
is up (a crash, a SIGKILL, an exit at start) is started again after a delay
that doubles with each exit in a row (`Backoff`: 0.5 s up to 30 s by default)
and starts over once the process has stayed up `stable_s`. Every exit and
restart is a line in <workdir>/logs/supervisor.log and is echoed (to the
console of `cutout-admin up`); a service that exits `alarm_after` times in a
row is reported once as one that keeps dying, with the end of its log, and
is still retried, its delay growing to the longest, never in a tight loop.

`stop()` ends the watch before the cluster stops its processes, so a stop
never looks like a crash.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

Echo = Callable[[str], None]


class Watched(Protocol):
    """What the supervisor needs of a service (services.local.cluster.Service)."""

    name: str
    log_path: Path

    @property
    def address(self) -> str: ...

    def exit_code(self) -> int | None: ...

    def pid(self) -> int | None: ...


@dataclass(frozen=True)
class Backoff:
    """When to restart a process that exited.

    Attributes:
        initial_s: delay before the first restart after an exit.
        max_s: longest delay; each exit in a row doubles the previous one up to it.
        stable_s: a process up this long counts as healthy: its next exit starts
            from `initial_s` again.
        alarm_after: exits in a row after which the service is reported as one that
            keeps dying.
    """

    initial_s: float = 0.5
    max_s: float = 30.0
    stable_s: float = 60.0
    alarm_after: int = 5

    def delay(self, exits_in_a_row: int) -> float:
        return float(min(self.max_s, self.initial_s * 2 ** max(0, exits_in_a_row - 1)))


@dataclass
class _Watch:
    svc: Watched
    restart: Callable[[], None]
    started_at: float
    exits_in_a_row: int = 0
    restarts: int = 0
    restart_at: float | None = None
    last_exit: str = ""


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


class Supervisor:
    def __init__(
        self,
        log_path: Path,
        backoff: Backoff | None = None,
        echo: Echo | None = None,
        poll_s: float = 0.1,
    ) -> None:
        self.log_path = log_path
        self.backoff = backoff or Backoff()
        self.echo = echo
        self.poll_s = poll_s
        self._watches: list[_Watch] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def watch(self, svc: Watched, restart: Callable[[], None]) -> None:
        """Restart `svc` with `restart()` whenever its process has exited."""
        with self._lock:
            self._watches.append(_Watch(svc, restart, time.monotonic()))

    def start(self) -> Supervisor:
        self._log(f"supervising {', '.join(w.svc.name for w in self._watches)}")
        self._thread = threading.Thread(target=self._run, name="supervisor", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop watching; returns once no restart can happen any more."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            self._log("stopped supervising")

    def restarts(self, name: str) -> int:
        """Restarts of service `name` so far."""
        with self._lock:
            return sum(w.restarts for w in self._watches if w.svc.name == name)

    def failing(self) -> list[str]:
        """Services that exited `alarm_after` times in a row and have not stayed up since."""
        with self._lock:
            return [
                w.svc.name for w in self._watches if w.exits_in_a_row >= self.backoff.alarm_after
            ]

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            with self._lock:
                for watch in self._watches:
                    if self._stop.is_set():
                        return
                    self._check(watch, time.monotonic())

    def _check(self, watch: _Watch, now: float) -> None:
        svc = watch.svc
        if watch.restart_at is None:
            code = svc.exit_code()
            if code is None:
                if watch.exits_in_a_row and now - watch.started_at >= self.backoff.stable_s:
                    watch.exits_in_a_row = 0
                    self._log(f"{svc.name} has stayed up {self.backoff.stable_s:.0f}s: healthy")
                return
            uptime = now - watch.started_at
            if uptime >= self.backoff.stable_s:
                watch.exits_in_a_row = 0
            watch.exits_in_a_row += 1
            delay = self.backoff.delay(watch.exits_in_a_row)
            watch.restart_at = now + delay
            watch.last_exit = describe_exit(code)
            self._log(
                f"{svc.name} ({svc.address}) {watch.last_exit} after {uptime:.1f}s up; "
                f"restarting in {delay:.1f}s (exit {watch.exits_in_a_row} in a row)"
            )
            if watch.exits_in_a_row == self.backoff.alarm_after:
                self._log(
                    f"{svc.name} KEEPS DYING: {watch.exits_in_a_row} exits in a row, none up "
                    f"{self.backoff.stable_s:.0f}s; last: {watch.last_exit}; still retried, "
                    f"delays growing to {self.backoff.max_s:.1f}s; "
                    f"see {svc.log_path}, which ends:\n{_tail(svc.log_path)}"
                )
        elif now >= watch.restart_at:
            watch.restart_at = None
            watch.started_at = now
            watch.restarts += 1
            try:
                watch.restart()
            except Exception as exc:  # reported; the dead process is then retried
                self._log(f"{svc.name} could not be started again: {exc}")
                return
            self._log(f"{svc.name} restarted on {svc.address} (pid {svc.pid()})")

    def _log(self, message: str) -> None:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("a") as f:
            f.write(f"{stamp} {message}\n")
        if self.echo is not None:
            self.echo(f"supervisor: {message}")


def _tail(path: Path, lines: int = 8) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "  (no log)"
    return "\n".join(f"  | {line}" for line in text.splitlines()[-lines:])
