"""Apply the SQL migrations in services/scheduler/migrations to a MySQL/MariaDB database.

    python -m services.scheduler.migrate [--if-configured] [mysql://USER[:PASSWORD]@HOST[:PORT]/DB]

The URL defaults to CUTOUT_MYSQL_URL; --if-configured exits quietly when
there is none (the Kubernetes init container). Applied versions are kept in
`schema_migrations`; a named lock lets several replicas run this at once.
Running it again applies nothing.
"""

from __future__ import annotations

import asyncio
import os
import sys
import warnings
from importlib import resources

import pymysql

from services.scheduler.records import MysqlTarget

LOCK = "cutout_schema_migrations"


def migrations() -> list[tuple[str, str]]:
    """(version, sql) for every migration, in order."""
    files = resources.files("services.scheduler.migrations")
    found = sorted(f.name for f in files.iterdir() if f.name.endswith(".sql"))
    return [(name.removesuffix(".sql"), files.joinpath(name).read_text()) for name in found]


def split_statements(sql: str) -> list[str]:
    lines = [line for line in sql.splitlines() if not line.lstrip().startswith("--")]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]


async def migrate(target: MysqlTarget) -> list[str]:
    """Apply what is missing; return the versions applied now."""
    conn = await target.connect(True, 10.0)
    applied: list[str] = []
    try:
        async with conn.cursor() as cur:
            await cur.execute("SELECT GET_LOCK(%s, 60)", (LOCK,))
            (locked,) = await cur.fetchone()
            if locked != 1:
                raise RuntimeError("another migration has held the lock for 60 s")
            await cur.execute("SHOW TABLES LIKE 'schema_migrations'")
            if not await cur.fetchall():
                await cur.execute(
                    "CREATE TABLE schema_migrations ("
                    " version VARCHAR(128) NOT NULL PRIMARY KEY,"
                    " applied_at TIMESTAMP(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6))"
                )
            await cur.execute("SELECT version FROM schema_migrations")
            done = {row[0] for row in await cur.fetchall()}
            for version, sql in migrations():
                if version in done:
                    continue
                with warnings.catch_warnings():
                    # "IF NOT EXISTS" notes on an old system's existing table are expected.
                    warnings.simplefilter("ignore", pymysql.Warning)
                    for statement in split_statements(sql):
                        await cur.execute(statement)
                await cur.execute("INSERT INTO schema_migrations (version) VALUES (%s)", (version,))
                applied.append(version)
            await cur.execute("SELECT RELEASE_LOCK(%s)", (LOCK,))
    finally:
        conn.close()
    return applied


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    optional = "--if-configured" in args
    args = [a for a in args if a != "--if-configured"]
    url = args[0] if args else os.environ.get("CUTOUT_MYSQL_URL", "")
    if not url and optional:
        print("CUTOUT_MYSQL_URL is not set: no records database to migrate")
        return 0
    if not url:
        print("usage: python -m services.scheduler.migrate mysql://USER@HOST/DB", file=sys.stderr)
        print("       (or set CUTOUT_MYSQL_URL)", file=sys.stderr)
        return 2
    try:
        target = MysqlTarget.from_url(url)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    applied = asyncio.run(migrate(target))
    print(f"{target!r}: applied {', '.join(applied) if applied else 'nothing (up to date)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
