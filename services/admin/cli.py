"""`cutout-admin`: what operators run beside the services, never part of the client.

- `up`: a whole local cluster on embedded defaults until Ctrl-C, Envoy in front of two gateways.
- `vendors ...`: the vendor registry in Redis (keys, limits, weights, caps, webhooks).
- `key VENDOR`: a static API key and its CUTOUT_API_KEYS entry.
- `token`: a fresh internal token (CUTOUT_INTERNAL_TOKEN) for the services.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console

from services.common.config import PROJECT_ROOT
from services.common.internal_auth import new_token
from services.gateway.auth import hash_key, new_key

out = Console(highlight=False, soft_wrap=True)


def cmd_key(args: argparse.Namespace) -> int:
    key = new_key()
    out.print(f"API key (give it to the vendor; it is not stored anywhere): {key}", markup=False)
    out.print(f"gateway entry for CUTOUT_API_KEYS: {args.vendor}:{hash_key(key)}", markup=False)
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    # Plain print: a secret goes to stdout alone, for `$(cutout-admin token)` or a Secret.
    print(new_token())
    return 0


# Where `cutout-admin up` keeps its data (and redis.url) unless given --workdir.
DEFAULT_WORKDIR = PROJECT_ROOT / "var"


def cmd_vendors(args: argparse.Namespace) -> int:
    from services.admin import vendors

    if not args.redis:
        args.redis = local_redis_url(Path(args.workdir) if args.workdir else DEFAULT_WORKDIR)

    return asyncio.run(vendors.run(args))


def cmd_up(args: argparse.Namespace) -> int:
    from services.local.up import run_up

    workdir = Path(args.workdir) if args.workdir else None
    envoy = not args.no_envoy
    gateways = args.gateways if args.gateways is not None else (2 if envoy else 1)
    return run_up(
        args.nodes,
        args.port,
        workdir,
        args.appendfsync,
        envoy,
        gateways,
        args.envoy_admin_port,
        args.web_port,
    )


def local_redis_url(workdir: Path) -> str:
    """The URL `cutout-admin up --workdir WORKDIR` wrote for its embedded Redis, else the
    default Redis on this machine."""
    path = workdir / "redis.url"
    return path.read_text().strip() if path.is_file() else "redis://127.0.0.1:6379/0"


def _vendors_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    v = sub.add_parser(
        "vendors",
        help="manage vendors, their API keys and webhooks (talks to Redis directly)",
        description="The vendor registry every gateway reads: keys (stored hashed), status, "
        "rate limits, fairness weight, cap on waiting jobs, webhook endpoint and signing secrets.",
    )
    v.add_argument(
        "--redis",
        default=os.environ.get("CUTOUT_REDIS_URL", ""),
        help="the cluster's Redis (env CUTOUT_REDIS_URL; default: the one `up` started, "
        "found in WORKDIR/redis.url, else redis://127.0.0.1:6379/0)",
    )
    v.add_argument(
        "--workdir",
        default="",
        help=f"the workdir `up` was given (default {DEFAULT_WORKDIR}, as for `up`)",
    )
    v.add_argument(
        "--prefix",
        default=os.environ.get("CUTOUT_REDIS_PREFIX", "cutout:"),
        help="key prefix (env CUTOUT_REDIS_PREFIX)",
    )
    actions = v.add_subparsers(dest="vendors_action", required=True)
    add = actions.add_parser("add", help="register a vendor and print its first key")
    add.add_argument("vendor")
    change = actions.add_parser("set", help="change a vendor's weight, limits or queue cap")
    change.add_argument("vendor")
    for p, default in ((add, True), (change, False)):
        p.add_argument(
            "--weight",
            type=float,
            default=1.0 if default else None,
            help="fair share relative to others (default 1)",
        )
        p.add_argument(
            "--limits",
            default="" if default else None,
            metavar="NAME=N/SECONDS,...",
            help="own rate limits of requests, remove_background, crop_face, batches "
            "(others keep the gateway's)",
        )
        p.add_argument(
            "--max-queued",
            type=int,
            default=0 if default else None,
            help="most waiting jobs (0: the cluster default)",
        )
        p.add_argument(
            "--webhook",
            default=None,
            metavar="URL",
            help="https URL notified when the vendor's jobs and batches finish ('' removes "
            "it); checked like image URLs; prints the signing secret the first time",
        )
    actions.add_parser("list", help="every vendor (never their keys)")
    rotate = actions.add_parser("rotate", help="issue a new key; old keys stop after --grace")
    rotate.add_argument("vendor")
    rotate.add_argument(
        "--grace", type=int, default=0, help="seconds the old keys keep working (default 0)"
    )
    secret = actions.add_parser(
        "rotate-webhook-secret",
        help="a new webhook signing secret; deliveries carry both until --grace ends",
    )
    secret.add_argument("vendor")
    secret.add_argument(
        "--grace", type=int, default=86400, help="seconds the old secret is still used (1 day)"
    )
    for name, what in (("disable", "refuse every call"), ("enable", "accept calls again")):
        p = actions.add_parser(name, help=f"{what} (keys kept)")
        p.add_argument("vendor")
    v.set_defaults(run=cmd_vendors)


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="cutout-admin",
        description="Operator tools for a Cutout cluster (vendors use `cutout`).",
    )
    sub = top.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="run a local cluster until Ctrl-C")
    up.add_argument("--nodes", type=int, default=2, help="inference nodes (default 2)")
    up.add_argument(
        "--port",
        type=int,
        default=50051,
        help="the public port: Envoy's, or the gateway's with --no-envoy (default 50051)",
    )
    up.add_argument(
        "--no-envoy",
        action="store_true",
        help="no Envoy in front: one gateway serves the public port (gRPC only, no gRPC-Web)",
    )
    up.add_argument(
        "--gateways",
        type=int,
        default=None,
        help="gateway replicas behind Envoy (default 2; 1 with --no-envoy)",
    )
    up.add_argument(
        "--web-port",
        type=int,
        default=8000,
        help="the web page (gRPC-Web through Envoy; default 8000; -1: no page)",
    )
    up.add_argument(
        "--envoy-admin-port",
        type=int,
        default=9901,
        help="Envoy's admin API and /stats/prometheus (default 9901; 0 picks a free port)",
    )
    up.add_argument(
        "--workdir", default="", help=f"data, results and logs (default {DEFAULT_WORKDIR})"
    )
    up.add_argument(
        "--appendfsync",
        choices=["everysec", "always"],
        default="everysec",
        help="AOF fsync policy of the embedded Redis: everysec can lose the last second "
        "of accepted jobs on a power cut, always loses none and is slower (default everysec)",
    )
    up.set_defaults(run=cmd_up)

    k = sub.add_parser("key", help="make a new static API key for a vendor")
    k.add_argument("vendor")
    k.set_defaults(run=cmd_key)

    t = sub.add_parser("token", help="make a new internal token (CUTOUT_INTERNAL_TOKEN)")
    t.set_defaults(run=cmd_token)

    _vendors_parser(sub)
    return top


def main(argv: Sequence[str] | None = None) -> None:
    args = parser().parse_args(argv)
    try:
        code = args.run(args)
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)
