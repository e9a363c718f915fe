"""`cutout-admin vendors ...`: the vendor registry, for operators (talks to Redis directly)."""

from __future__ import annotations

import argparse
import datetime as dt

import redis.asyncio as aioredis
from rich.console import Console

from cutout.cli import print_rows
from services.common import vendor_policy, webhook_registry
from services.common.errors import CutoutError
from services.common.webhook_policy import WebhookPolicy
from services.gateway.auth import hash_key
from services.gateway.vendors import Vendor, VendorRegistry

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)


def _row(v: Vendor) -> list[str]:
    created = dt.datetime.fromtimestamp(v.created_ms / 1000, dt.UTC).strftime("%Y-%m-%d %H:%M")
    return [
        v.id,
        "active" if v.active else "disabled",
        f"{v.weight:g}",
        v.limits_spec or "(gateway defaults)",
        str(v.max_queued or "(default)"),
        str(v.keys),
        created,
    ]


def _show_key(vendor: str, key: str, what: str) -> None:
    out.print(f"{what} for {vendor} (shown once; Redis keeps only its SHA-256):")
    out.print(key, soft_wrap=True)
    err.print(f"[dim]sha256 {hash_key(key)}[/dim]")


def _show_secret(vendor: str, secret: str) -> None:
    out.print(f"webhook signing secret for {vendor} (shown once; verify deliveries with it):")
    out.print(secret, soft_wrap=True)


async def _check_webhook(url: str) -> None:
    """The SSRF guard of image URLs (CUTOUT_WEBHOOK_ALLOW_HOSTS as the scheduler has it)."""
    await WebhookPolicy.from_env().check(url, "--webhook")


async def _act(registry: VendorRegistry, args: argparse.Namespace) -> None:
    action = args.vendors_action
    if action in ("add", "set") and args.webhook:
        await _check_webhook(args.webhook)
    if action == "add":
        key = await registry.add(args.vendor, args.weight, args.limits, args.max_queued)
        _show_key(args.vendor, key, "API key")
    elif action == "rotate":
        key = await registry.rotate(args.vendor, args.grace)
        _show_key(args.vendor, key, "new API key")
        when = f"in {args.grace} s" if args.grace else "now"
        err.print(f"the vendor's previous keys stop working {when}")
    elif action == "set":
        await registry.update(args.vendor, args.weight, args.limits, args.max_queued)
    elif action == "rotate-webhook-secret":
        _show_secret(args.vendor, await registry.rotate_webhook_secret(args.vendor, args.grace))
        err.print(f"deliveries are signed with the previous secret too for {args.grace} s")
    elif action in ("disable", "enable"):
        await registry.set_active(args.vendor, action == "enable")
    if action in ("add", "set") and args.webhook is not None:
        made = await registry.set_webhook(args.vendor, args.webhook)
        if made:
            _show_secret(args.vendor, made)


async def _table(redis: aioredis.Redis, prefix: str, vendors: list[Vendor]) -> None:
    header = ["vendor", "status", "weight", "rate limits", "max queued", "keys", "created"]
    rows = []
    for v in vendors:
        hook = await webhook_registry.read(redis, prefix, v.id)
        state = hook.url if hook.active else f"{hook.url} (disabled: {hook.reason})"
        rows.append([*_row(v), state if hook.url else "-"])
    print_rows([*header, "webhook"], rows)


async def run(args: argparse.Namespace) -> int:
    redis = aioredis.Redis.from_url(args.redis)
    registry = VendorRegistry(redis, args.prefix)
    try:
        # A registry written before vendor_policy.py kept the policy in its own hash.
        await vendor_policy.adopt_registry_fields(redis, args.prefix)
        await _act(registry, args)
        action = args.vendors_action
        vendors = await registry.list()
        if action != "list":
            vendors = [v for v in vendors if v.id == args.vendor]
        if action in ("list", "set", "disable", "enable"):
            await _table(redis, args.prefix, vendors)
        return 0
    except CutoutError as exc:  # a RegistryError, or a webhook URL refused: the arguments
        err.print(f"[red]{exc}[/red]")
        return 2
    except aioredis.RedisError as exc:
        err.print(f"[red]cannot reach the registry at {args.redis}[/red]: {exc}")
        return 1
    finally:
        await redis.aclose()
