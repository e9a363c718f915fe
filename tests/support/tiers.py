"""What a tier may start, checked while its tests run.

tests/unit starts nothing; tests/store may start redis-server and mariadbd, nothing
else. Their conftest.py files hold `keep_to(tier, programs)` around each test module: a
subprocess of any other program, or a gRPC server, fails the test at once, naming the
tier it belongs in (tests/cluster, which may start anything).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import grpc
import grpc.aio
import pytest

REDIS = frozenset({"redis-server"})
MARIADB = frozenset({"mariadbd", "mariadb-install-db"})


def _program(args: Any, executable: Any) -> str:
    first = executable or (args.split()[0] if isinstance(args, str | bytes) else args[0])
    return os.path.basename(os.fsdecode(first))


@contextmanager
def keep_to(tier: str, programs: frozenset[str] = frozenset()) -> Iterator[None]:
    """Within: only `programs` may be started as subprocesses, and no gRPC server at all."""
    execute = subprocess.Popen._execute_child  # type: ignore[attr-defined]

    def checked(self: subprocess.Popen[Any], args: Any, executable: Any, *rest: Any) -> None:
        program = _program(args, executable)
        if program not in programs:
            pytest.fail(
                f"a test in tests/{tier} started {program!r}: "
                f"tests/{tier} may start only {sorted(programs) or 'no process'}; "
                "move the test to tests/cluster",
                pytrace=False,
            )
        execute(self, args, executable, *rest)

    def no_server(*args: Any, **kwargs: Any) -> Any:
        pytest.fail(
            f"a test in tests/{tier} started a gRPC server; move it to tests/cluster",
            pytrace=False,
        )

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(subprocess.Popen, "_execute_child", checked)
        patch.setattr(grpc, "server", no_server)
        patch.setattr(grpc.aio, "server", no_server)
        yield
