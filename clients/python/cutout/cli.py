"""The `cutout` command: submit images, follow and fetch jobs (operators: `cutout-admin`)."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from cutout.client import DEFAULT_ADDR, FACE_MODES, FORMATS, AsyncClient, build_submission
from cutout.errors import CutoutError
from cutout.v1 import jobs_pb2, webhooks_pb2

# soft_wrap: a line is never broken at 80 columns when output goes to a file or a pipe.
# Messages (stderr) use markup for colour, so what comes from users and servers in them is
# escaped (`https://[fd00::1]/x` is not markup); data lines (stdout) take no markup at all.
console = Console(stderr=True, highlight=False, soft_wrap=True)
out = Console(markup=False, highlight=False, soft_wrap=True)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}
STATES = {
    "queued": jobs_pb2.JOB_STATE_QUEUED,
    "running": jobs_pb2.JOB_STATE_RUNNING,
    "succeeded": jobs_pb2.JOB_STATE_SUCCEEDED,
    "failed": jobs_pb2.JOB_STATE_FAILED,
    "cancelled": jobs_pb2.JOB_STATE_CANCELLED,
}


def state_name(state: int) -> str:
    return jobs_pb2.JobState.Name(state).removeprefix("JOB_STATE_").lower()  # type: ignore[arg-type]


def stage_name(stage: int) -> str:
    return jobs_pb2.Stage.Name(stage).removeprefix("STAGE_").lower()  # type: ignore[arg-type]


def tls_of(args: argparse.Namespace) -> bool | str | None:
    """--tls-ca, --tls, or None (the client then reads CUTOUT_TLS_CA / CUTOUT_TLS)."""
    return args.tls_ca or (True if args.tls else None)


def describe(job: jobs_pb2.Job) -> str:
    parts = [job.name, state_name(job.state), f"{stage_name(job.stage)} {job.progress_percent}%"]
    if job.state == jobs_pb2.JOB_STATE_QUEUED and job.queue_position:
        parts.append(f"position {job.queue_position}")
        if job.HasField("estimated_wait"):
            parts.append(f"eta {job.estimated_wait.ToTimedelta().total_seconds():.0f}s")
    if job.node:
        parts.append(f"node {job.node}")
    if job.HasField("result"):
        r = job.result
        parts.append(f"{r.content_type} {r.width_px}x{r.height_px} {r.size_bytes} bytes")
        if r.HasField("subject_box"):
            b = r.subject_box
            parts.append(f"subject {b.width_px}x{b.height_px} at {b.x_px},{b.y_px}")
    if job.HasField("error"):
        parts.append(f"error: {job.error.message}")
    return "  ".join(parts)


def print_rows(header: list[str], rows: list[list[str]]) -> None:
    """A table on a terminal; tab-separated lines when piped, so names are never cut."""
    if out.is_terminal:
        table = Table(*header)
        for row in rows:
            table.add_row(*row)
        out.print(table)
    else:
        for row in rows:
            print("\t".join(row))


def expand_inputs(inputs: Sequence[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Files and URLs as given; a folder stands for the images directly inside it.

    Returns (inputs, skipped): what a folder holds besides images is skipped, each with why.
    """
    found: list[str] = []
    skipped: list[tuple[str, str]] = []
    for item in inputs:
        path = Path(item)
        if item.startswith(("https://", "http://")) or not path.is_dir():
            found.append(item)
            continue
        for entry in sorted(path.iterdir()):
            if entry.is_dir():
                skipped.append((str(entry), "a folder (folders are not searched recursively)"))
            elif entry.suffix.lower() in IMAGE_SUFFIXES:
                found.append(str(entry))
            else:
                suffix = entry.suffix or "no suffix"
                skipped.append((str(entry), f"not an image file ({suffix})"))
    return found, skipped


def refused(item: str, why: object, violations: Sequence[tuple[str, str]] = ()) -> None:
    console.print(f"[red]refused[/red] {escape(item)}: {escape(str(why))}")
    for field, what in violations:
        console.print(f"    {escape(field)}: {escape(what)}")


# --- commands -------------------------------------------------------------------


def _submission(
    args: argparse.Namespace, item: str, record: tuple[str, str] | None = None
) -> jobs_pb2.JobSubmission:
    return build_submission(
        item,
        op=args.op,
        model=args.model,
        output_format=args.format,
        mask_only=args.mask_only,
        background=args.background,
        mode=args.mode,
        crop_to_subject=args.crop,
        margin=args.margin,
        alpha_matting=args.alpha_matting,
        resize=args.resize,
        width=args.width,
        height=args.height,
        quality=args.quality,
        priority=args.priority,
        record=record,
        webhook_url=args.webhook,
    )


async def cmd_submit(args: argparse.Namespace) -> int:
    inputs, skipped = expand_inputs(args.inputs)
    for item, why in skipped:
        console.print(f"[yellow]skipped[/yellow] {escape(item)}: {escape(why)}")
    if not inputs:
        console.print("[red]nothing to submit[/red]: no image files found")
        return 2
    if args.batch or any(Path(i).is_dir() for i in args.inputs):
        return await submit_as_batches(args, inputs)
    record = None
    if args.record:
        project, _, record_id = args.record.partition("/")
        if not project or not record_id or len(inputs) != 1:
            console.print("[red]--record[/red] takes PROJECT/RECORD and exactly one image")
            return 2
        record = (project, record_id)
    async with AsyncClient(args.addr, args.api_key, tls=tls_of(args)) as client:
        jobs: list[tuple[str, jobs_pb2.Job]] = []
        failed = 0
        for item in inputs:
            try:
                job = (await client.submit_submission(_submission(args, item, record))).job
            except (CutoutError, OSError, ValueError) as exc:
                if isinstance(exc, CutoutError) and exc.code == grpc.StatusCode.UNAVAILABLE:
                    raise  # the cluster, not this image: stop and say so once
                refused(item, exc, getattr(exc, "violations", []))
                failed += 1
                continue
            jobs.append((item, job))
            if not args.wait:
                out.print(f"{job.name}\t{item}")
        if args.wait and jobs:
            failed += await follow(client, jobs, Path(args.out))
    return 1 if failed else 0


MAX_BATCH = 1000
# A batch is one request: the gateway takes at most its image limit (20 MiB by default) plus
# 1 MiB for the rest, so a folder's inline images go in batches of at most this many bytes.
MAX_BATCH_BYTES = 20 * 1024 * 1024


def bars() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        console=console,
    )


async def submit_as_batches(args: argparse.Namespace, inputs: list[str]) -> int:
    """A folder: one SubmitBatch per 1,000 images or 20 MiB of them, one progress bar each."""
    if args.record:
        console.print("[red]--record[/red] takes exactly one image, not a folder")
        return 2
    failed = 0
    async with AsyncClient(args.addr, args.api_key, tls=tls_of(args)) as client:

        async def send(chunk: list[str], subs: list[jobs_pb2.JobSubmission]) -> int:
            lost = 0
            reply = await client.submit_batch(subs, webhook_url=args.webhook)
            jobs: list[tuple[str, jobs_pb2.Job]] = []
            for outcome in reply.outcomes:
                item = chunk[outcome.index]
                if outcome.HasField("job"):
                    jobs.append((item, outcome.job))
                else:
                    lost += 1
                    refused(item, outcome.error.message)
            out.print(f"{reply.batch}\t{len(jobs)} of {len(chunk)} images accepted")
            if args.wait and jobs:
                lost += await follow_batch(client, reply.batch, jobs, Path(args.out))
            return lost

        chunk: list[str] = []
        subs: list[jobs_pb2.JobSubmission] = []
        size = 0
        for item in inputs:
            try:
                sub = _submission(args, item)
            except (OSError, ValueError) as exc:
                refused(item, exc)
                failed += 1
                continue
            if subs and (len(subs) == MAX_BATCH or size + sub.ByteSize() > MAX_BATCH_BYTES):
                failed += await send(chunk, subs)
                chunk, subs, size = [], [], 0
            chunk.append(item)
            subs.append(sub)
            size += sub.ByteSize()
        if subs:
            failed += await send(chunk, subs)
    return 1 if failed else 0


async def follow_batch(
    client: AsyncClient, batch: str, jobs: list[tuple[str, jobs_pb2.Job]], out_dir: Path
) -> int:
    """One progress bar for the whole batch; then save every result; return the failures."""
    with bars() as progress:
        task = progress.add_task(f"{batch[:20]} ({len(jobs)} images)", total=100, status="")
        async for state in client.watch_batch(batch):
            status = (
                f"{state.succeeded} done, {state.running} running, {state.queued} queued"
                + (f", [red]{state.failed} failed[/red]" if state.failed else "")
                + (f", {state.cancelled} cancelled" if state.cancelled else "")
            )
            progress.update(task, completed=state.progress_percent, status=status)
    out_dir.mkdir(parents=True, exist_ok=True)
    failures = 0
    for item, job in jobs:
        final = await client.get(job.name)
        if final.state != jobs_pb2.JOB_STATE_SUCCEEDED:
            failures += 1
            what = f"{escape(item)}: {escape(final.error.message)}"
            console.print(f"[red]{state_name(final.state)}[/red] {what}")
        elif final.result.uri.startswith("https://"):
            out.print(f"{item}\t{final.result.uri}")
        else:
            ext = final.result.content_type.removeprefix("image/").replace("jpeg", "jpg")
            await client.save_result(job.name, out_dir / f"{Path(item).stem}.{ext}")
    saved = len(jobs) - failures
    console.print(f"{batch}: {saved} of {len(jobs)} succeeded; results in {escape(str(out_dir))}")
    return failures


async def cmd_batch(args: argparse.Namespace) -> int:
    async with AsyncClient(args.addr, args.api_key, tls=tls_of(args)) as client:
        if args.batch_action == "cancel":
            reply = await client.cancel_batch(args.name)
            out.print(f"{reply.batch.name}\tcancelled {reply.cancelled}")
            return 0
        async for state in client.watch_batch(args.name):
            out.print(
                f"{state.name}  {state.progress_percent}%  total {state.total}  "
                f"queued {state.queued}  running {state.running}  succeeded {state.succeeded}  "
                f"failed {state.failed}  cancelled {state.cancelled}"
            )
    return 0


async def follow(client: AsyncClient, jobs: list[tuple[str, jobs_pb2.Job]], out_dir: Path) -> int:
    """Live progress bars for every job; save each result; return how many did not succeed."""
    out_dir.mkdir(parents=True, exist_ok=True)
    failures = 0
    with bars() as progress:

        async def one(item: str, job: jobs_pb2.Job) -> None:
            nonlocal failures
            task: TaskID = progress.add_task(
                escape(Path(item).name[:32]), total=100, status="queued"
            )
            final = job
            try:
                async for event in client.watch(job.name):
                    final = event.job
                    status = state_name(final.state)
                    if final.state == jobs_pb2.JOB_STATE_QUEUED and final.queue_position:
                        status += f" #{final.queue_position}"
                        if final.HasField("estimated_wait"):
                            eta = final.estimated_wait.ToTimedelta().total_seconds()
                            status += f" ~{eta:.0f}s"
                    elif final.state == jobs_pb2.JOB_STATE_RUNNING:
                        status = stage_name(final.stage)
                    progress.update(task, completed=final.progress_percent, status=status)
                if final.state != jobs_pb2.JOB_STATE_SUCCEEDED:
                    failures += 1
                    why = escape(final.error.message)
                    progress.update(task, status=f"[red]{state_name(final.state)}: {why}[/red]")
                    return
                if final.result.uri.startswith("https://"):  # kept by Cloudinary
                    progress.update(
                        task, completed=100, status=f"[green]{escape(final.result.uri)}[/green]"
                    )
                    return
                ext = final.result.content_type.removeprefix("image/").replace("jpeg", "jpg")
                target = out_dir / f"{Path(item).stem}.{ext}"
                await client.save_result(job.name, target)
                progress.update(
                    task, completed=100, status=f"[green]saved {escape(str(target))}[/green]"
                )
            except CutoutError as exc:
                failures += 1
                progress.update(task, status=f"[red]{escape(str(exc))}[/red]")

        await asyncio.gather(*(one(item, job) for item, job in jobs))
    return failures


async def cmd_status(args: argparse.Namespace) -> int:
    async with AsyncClient(args.addr, args.api_key, tls=tls_of(args)) as client:
        out.print(describe(await client.get(args.job)))
    return 0


async def cmd_watch(args: argparse.Namespace) -> int:
    async with AsyncClient(args.addr, args.api_key, tls=tls_of(args)) as client:
        job = jobs_pb2.Job()
        async for event in client.watch(args.job):
            job = event.job
            out.print(describe(job))
    return 0 if job.state == jobs_pb2.JOB_STATE_SUCCEEDED else 1


async def cmd_list(args: argparse.Namespace) -> int:
    state = STATES[args.state] if args.state else jobs_pb2.JOB_STATE_UNSPECIFIED
    async with AsyncClient(args.addr, args.api_key, tls=tls_of(args)) as client:
        page = await client.list_jobs(state=state, page_size=args.limit, page_token=args.page_token)
    rows = [
        [
            job.name,
            state_name(job.state),
            stage_name(job.stage),
            f"{job.progress_percent}%",
            job.create_time.ToDatetime().strftime("%Y-%m-%d %H:%M:%S"),
        ]
        for job in page.jobs
    ]
    print_rows(["job", "state", "stage", "progress", "created"], rows)
    if page.next_page_token:
        out.print(f"more: --page-token {page.next_page_token}")
    return 0


async def cmd_cancel(args: argparse.Namespace) -> int:
    async with AsyncClient(args.addr, args.api_key, tls=tls_of(args)) as client:
        out.print(describe(await client.cancel(args.job)))
    return 0


async def cmd_stats(args: argparse.Namespace) -> int:
    async with AsyncClient(args.addr, args.api_key, tls=tls_of(args)) as client:
        s = await client.stats()
    out.print(
        f"queued {s.queued}  running {s.running}  nodes {s.healthy_nodes}  "
        f"capacity {s.capacity}  in flight {s.in_flight}"
    )
    for p in s.by_priority:
        out.print(f"  priority {p.priority}: {p.queued} queued")
    for r in s.runtimes:
        out.print(f"  {r.model}: {r.runtime} {r.device} {r.precision} on {r.nodes} node(s)")
    out.print(
        f"succeeded {s.succeeded}  failed {s.failed}  attempts {s.attempts_started}  "
        f"retries {s.retries}  lease losses {s.lease_losses}  dead-lettered {s.dead_lettered}"
    )
    return 0


async def cmd_result(args: argparse.Namespace) -> int:
    async with AsyncClient(args.addr, args.api_key, tls=tls_of(args)) as client:
        result = await client.save_result(args.job, args.out)
    out.print(
        f"wrote {args.out} ({result.content_type}, "
        f"{result.width_px}x{result.height_px}, {result.size_bytes} bytes)"
    )
    return 0


async def cmd_dlq(args: argparse.Namespace) -> int:
    async with AsyncClient(args.addr, args.api_key, tls=tls_of(args)) as client:
        if args.action == "list":
            page = await client.dead_letters(page_size=args.limit, page_token=args.page_token)
            rows = [
                [
                    job.name,
                    str(job.attempt),
                    job.error.message[:80],
                    job.update_time.ToDatetime().strftime("%Y-%m-%d %H:%M:%S"),
                ]
                for job in page.jobs
            ]
            print_rows(["job", "attempts", "last error", "dead-lettered"], rows)
            if page.next_page_token:
                out.print(f"more: --page-token {page.next_page_token}")
        elif args.action == "show":
            for name in args.jobs:
                job = await client.get(name)
                out.print(describe(job))
                dead = "yes" if job.dead_lettered else "no"
                out.print(f"  attempts {job.attempt}, dead-lettered: {dead}")
        elif args.action == "requeue":
            for name in args.jobs:
                out.print(describe(await client.requeue_dead_letter(name)))
        else:
            if bool(args.jobs) == args.all:
                console.print("[red]purge[/red]: name the jobs to purge, or pass --all")
                return 2
            purged = await client.purge_dead_letters(None if args.all else args.jobs)
            out.print(f"purged {purged} dead letter(s)")
    return 0


def delivery_state(state: webhooks_pb2.WebhookDeliveryState.ValueType) -> str:
    return webhooks_pb2.WebhookDeliveryState.Name(state).removeprefix("WEBHOOK_DELIVERY_STATE_")


def _when(ts: Timestamp) -> str:
    return ts.ToDatetime().strftime("%Y-%m-%d %H:%M:%S") if ts.seconds else "-"


def describe_delivery(d: webhooks_pb2.WebhookDelivery) -> str:
    lines = [
        f"{d.name}  {d.event_type} of {d.subject}",
        f"  to {d.url}",
        f"  {delivery_state(d.state)} after {d.attempts} attempt(s), "
        f"created {_when(d.create_time)}",
    ]
    if d.attempts:
        status = f"HTTP {d.last_status_code}" if d.last_status_code else "no HTTP answer"
        lines.append(f"  last attempt {_when(d.last_attempt_time)}: {status} {d.last_error}")
    if d.state == webhooks_pb2.WEBHOOK_DELIVERY_STATE_PENDING:
        lines.append(f"  next attempt {_when(d.next_attempt_time)}")
    if d.HasField("delivered_time"):
        lines.append(f"  delivered {_when(d.delivered_time)}")
    return "\n".join(lines)


async def cmd_webhooks(args: argparse.Namespace) -> int:
    async with AsyncClient(args.addr, args.api_key, tls=tls_of(args)) as client:
        if args.webhooks_action == "list":
            page = await client.webhook_deliveries(args.limit, args.page_token)
            rows = [
                [
                    d.name.removeprefix("webhookDeliveries/"),
                    d.event_type,
                    d.subject,
                    delivery_state(d.state),
                    str(d.attempts),
                    str(d.last_status_code or "-"),
                    _when(d.create_time),
                ]
                for d in page.deliveries
            ]
            header = ["delivery", "event", "subject", "state", "attempts", "last", "created"]
            print_rows(header, rows)
            if page.next_page_token:
                out.print(f"more: --page-token {page.next_page_token}")
            return 0
        if not args.deliveries:
            console.print(f"[red]{args.webhooks_action}[/red]: name one or more deliveries")
            return 2
        for name in args.deliveries:
            if args.webhooks_action == "show":
                out.print(describe_delivery(await client.webhook_delivery(name)))
            else:
                out.print(describe_delivery(await client.redeliver_webhook(name)))
    return 0


# --- parser ------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="cutout", description="Background removal and face crops on a Cutout cluster."
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--addr",
        default=os.environ.get("CUTOUT_ADDR", DEFAULT_ADDR),
        help="gateway host:port (env CUTOUT_ADDR, default %(default)s)",
    )
    common.add_argument("--api-key", default=None, help="vendor API key (env CUTOUT_API_KEY)")
    common.add_argument(
        "--tls", action="store_true", help="TLS with the system's roots (env CUTOUT_TLS=1)"
    )
    common.add_argument(
        "--tls-ca",
        default="",
        metavar="PEM",
        help="TLS trusting this CA bundle (env CUTOUT_TLS_CA)",
    )
    sub = top.add_subparsers(dest="command", required=True)

    s = sub.add_parser(
        "submit", parents=[common], help="submit images (files, folders or https URLs)"
    )
    s.add_argument("inputs", nargs="+", metavar="FILE|DIR|URL")
    s.add_argument(
        "--batch",
        action="store_true",
        help="submit as one batch (implied by a folder): one progress bar, batch cancel",
    )
    s.add_argument(
        "--op",
        choices=["remove-bg", "crop-face", "transform"],
        default="remove-bg",
        help="remove-bg (default), crop-face (see --mode), or transform: a light resize/convert "
        "job that never waits behind background removals",
    )
    s.add_argument("--model", default="", help="model name (default: the cluster's default)")
    s.add_argument(
        "--mode", choices=sorted(FACE_MODES), default="passport", help="face crop framing"
    )
    s.add_argument("--format", choices=sorted(FORMATS), default="png")
    s.add_argument("--mask-only", action="store_true", help="return the mask instead of the cutout")
    s.add_argument(
        "--background",
        default=None,
        metavar="RRGGBB[AA]",
        help="paint this colour behind the subject",
    )
    s.add_argument("--crop", action="store_true", help="remove-bg: crop to the subject")
    s.add_argument(
        "--margin", type=int, default=0, metavar="PX", help="remove-bg: margin kept by --crop"
    )
    s.add_argument(
        "--alpha-matting", action="store_true", help="remove-bg: refine hair/fur edges (slower)"
    )
    s.add_argument(
        "--resize",
        choices=["fit", "fill"],
        default="",
        help="transform: fit inside or fill the box",
    )
    s.add_argument("--width", type=int, default=0, metavar="PX", help="transform: box width")
    s.add_argument("--height", type=int, default=0, metavar="PX", help="transform: box height")
    s.add_argument(
        "--quality", type=int, default=0, help="transform: JPEG/WebP quality 1-100 (default 85)"
    )
    s.add_argument("--priority", type=int, default=0, help="0-9, higher first within your queue")
    s.add_argument(
        "--record",
        default="",
        metavar="PROJECT/RECORD",
        help="your data_records row to point at the result once it succeeds (one image)",
    )
    s.add_argument(
        "--webhook",
        default="",
        metavar="URL",
        help="https URL notified when each job (and a --batch) finishes, instead of your "
        "registered webhook endpoint",
    )
    s.add_argument("--wait", action="store_true", help="show live progress and save the results")
    s.add_argument("--out", default="out", help="folder for results with --wait (default ./out)")
    s.set_defaults(run=cmd_submit)

    for name, fn, text in [
        ("status", cmd_status, "show a job"),
        ("watch", cmd_watch, "follow a job until it is done"),
        ("cancel", cmd_cancel, "cancel a job"),
    ]:
        p = sub.add_parser(name, parents=[common], help=text)
        p.add_argument("job", help="jobs/<id> or <id>")
        p.set_defaults(run=fn)

    ls = sub.add_parser("list", parents=[common], help="list your jobs, newest first")
    ls.add_argument("--state", choices=sorted(STATES))
    ls.add_argument("--limit", type=int, default=50)
    ls.add_argument("--page-token", default="")
    ls.set_defaults(run=cmd_list)

    st = sub.add_parser("stats", parents=[common], help="queue depth and fleet capacity")
    st.set_defaults(run=cmd_stats)

    r = sub.add_parser("result", parents=[common], help="download a job's output")
    r.add_argument("job")
    r.add_argument("--out", required=True, help="file to write")
    r.set_defaults(run=cmd_result)

    d = sub.add_parser("dlq", parents=[common], help="jobs that failed after all retries")
    d.add_argument("action", choices=["list", "show", "requeue", "purge"])
    d.add_argument("jobs", nargs="*", help="jobs/<id> for show, requeue and purge")
    d.add_argument("--all", action="store_true", help="purge every dead letter")
    d.add_argument("--limit", type=int, default=50)
    d.add_argument("--page-token", default="")
    d.set_defaults(run=cmd_dlq)

    b = sub.add_parser("batch", parents=[common], help="watch or cancel a batch")
    b.add_argument("batch_action", choices=["watch", "cancel"])
    b.add_argument("name", metavar="batches/ID")
    b.set_defaults(run=cmd_batch)

    w = sub.add_parser(
        "webhooks", parents=[common], help="webhook deliveries: list, show, redeliver"
    )
    w.add_argument("webhooks_action", choices=["list", "show", "redeliver"])
    w.add_argument("deliveries", nargs="*", metavar="DELIVERY", help="for show and redeliver")
    w.add_argument("--limit", type=int, default=50)
    w.add_argument("--page-token", default="")
    w.set_defaults(run=cmd_webhooks)

    return top


def main(argv: Sequence[str] | None = None) -> None:
    args = parser().parse_args(argv)
    try:
        code = asyncio.run(args.run(args))
    except CutoutError as exc:
        console.print(f"[red]{exc.code.name}[/red]: {escape(exc.message)}")
        for field, why in exc.violations:
            console.print(f"    {escape(field)}: {escape(why)}")
        if exc.code == grpc.StatusCode.UNAVAILABLE and hasattr(args, "addr"):
            console.print(
                f"cannot reach a Cutout gateway at {escape(args.addr)}: is a cluster running "
                "there? `cutout-admin up` starts one on this machine; otherwise pass --addr "
                "or set CUTOUT_ADDR to the gateway's host:port"
            )
        code = 1
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()
