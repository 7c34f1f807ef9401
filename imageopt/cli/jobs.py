"""``imageopt submit``, ``run``, ``status`` and ``cancel``: a job's life."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
from collections.abc import Iterator

from pydantic import ValidationError

from imageopt.cli import EXIT_FAILED, EXIT_OK, EXIT_UNFINISHED
from imageopt.cli.progress import JobProgress
from imageopt.db import Database, database_url
from imageopt.errors import InvalidRequestError
from imageopt.jobs import (
    dumps,
    expand_sources,
    job_report,
    load_job,
    status_counts,
    submit,
)
from imageopt.optimizer import FORMATS, OptimizeOptions
from imageopt.schema import SchemaCheck
from imageopt.services import wait_for_history
from imageopt.settings import Settings, get_settings
from imageopt.status import ItemStatus

logger = logging.getLogger(__name__)

SUBMITTED_EVENT = "imageopt.job.submitted"


def register(commands: argparse._SubParsersAction) -> None:
    submit_cmd = commands.add_parser(
        "submit",
        help="create a job from images, folders, URLs or a list",
        description=(
            "Create a job of one item per image and print its id on the last "
            "line. A SOURCE is an image file, a folder of images, an http(s) "
            "URL, or @FILE with one source a line. A file that is not a "
            "readable image becomes an item that fails with the reason."
        ),
    )
    submit_cmd.add_argument("sources", nargs="+", metavar="SOURCE")
    submit_cmd.add_argument("--store", required=True, help="the store's name")
    submit_cmd.add_argument(
        "--format",
        choices=FORMATS,
        help="default: IMAGEOPT_DEFAULT_FORMAT or the optimizer block's, else auto",
    )
    submit_cmd.add_argument(
        "--quality",
        type=int,
        help="1 to 100; default: IMAGEOPT_DEFAULT_QUALITY or the optimizer "
        "block's, else 80",
    )
    submit_cmd.add_argument("--max-width", type=int, metavar="PIXELS")
    submit_cmd.add_argument("--max-height", type=int, metavar="PIXELS")
    submit_cmd.set_defaults(handler=_submit)

    run_cmd = commands.add_parser(
        "run",
        help="run a job's flow in this process until every item has ended",
        description=(
            "Run the optimize-job flow for JOB here. Without PREFECT_API_URL a "
            "local Prefect server is started for the run; without "
            "IMAGEOPT_PROVIDER_URL, the built-in provider. Exits 0 when every "
            "item has ended (completed or failed), 1 otherwise."
        ),
    )
    run_cmd.add_argument("job", type=int, metavar="JOB")
    run_cmd.add_argument("--output", metavar="DIR", help="store outputs in this folder")
    run_cmd.set_defaults(handler=_run)

    status_cmd = commands.add_parser("status", help="show a job and its items")
    status_cmd.add_argument("job", type=int, metavar="JOB")
    status_cmd.add_argument("--json", action="store_true", help="print JSON")
    status_cmd.set_defaults(handler=_status)

    cancel_cmd = commands.add_parser(
        "cancel",
        help="cancel a job: its predictions in flight and its unfinished items",
    )
    cancel_cmd.add_argument("job", type=int, metavar="JOB")
    cancel_cmd.set_defaults(handler=_cancel)


def _options(args: argparse.Namespace, settings: Settings) -> OptimizeOptions:
    try:
        return OptimizeOptions(
            format=args.format or settings.default_format,
            quality=settings.default_quality if args.quality is None else args.quality,
            max_width=args.max_width,
            max_height=args.max_height,
        )
    except ValidationError as exc:
        problems = "; ".join(
            f"--{'-'.join(str(p) for p in e['loc']).replace('_', '-')}: {e['msg']}"
            for e in exc.errors()
        )
        raise InvalidRequestError(f"invalid options: {problems}") from exc


def _submit(args: argparse.Namespace) -> int:
    settings = get_settings()
    options = _options(args, settings)
    sources = list(expand_sources(args.sources))
    with Database(database_url(settings), max_size=1) as db, db.connection() as conn:
        schema = SchemaCheck().refresh(conn)
        job_id = submit(
            conn,
            schema,
            args.store,
            sources,
            options,
            max_input_bytes=settings.max_input_bytes,
        )
        failed = status_counts(conn, job_id)[ItemStatus.FAILED]

    if failed:
        print(f"{failed} of {len(sources)} item(s) failed at submission; see status")
    if not _emit_submitted(job_id, args.store):
        print(
            "no Prefect API configured (PREFECT_API_URL): no event sent; "
            f"run the job with `imageopt run {job_id}`"
        )
    print(job_id)

    return EXIT_OK


def _emit_submitted(job_id: int, store: str) -> bool:
    """Tell Prefect a job is waiting; True if an API was there to hear it."""
    from prefect.events import emit_event
    from prefect.events.worker import EventsWorker
    from prefect.settings import PREFECT_API_URL

    # Without an API Prefect would start a throwaway one just for this event.
    if not PREFECT_API_URL.value():
        return False
    event = emit_event(
        event=SUBMITTED_EVENT,
        resource={"prefect.resource.id": f"imageopt.job.{job_id}"},
        payload={"job_id": job_id, "store": store},
    )
    if event is None:
        return False
    EventsWorker.drain_all(timeout=10)
    return True


def _run(args: argparse.Namespace) -> int:
    return run_here(args.job, args.output)


def run_here(job_id: int, output: str | None) -> int:
    """Run the job's flow in this process; its exit code.

    0 when every item completed, 1 when every item ended but some failed or
    were canceled, 3 when items are left unfinished (run it again).
    """
    settings = get_settings()
    url = database_url(settings)
    with Database(url, max_size=1) as db, db.connection() as conn:
        load_job(conn, job_id)  # an unknown job is refused before anything starts
    with _local_services(url, settings.home), _environ(IMAGEOPT_DATABASE_URL=url):
        from flows.optimize_job import optimize_job

        with JobProgress(url, job_id):
            state = optimize_job(job_id=job_id, output=output, return_state=True)
        waited = wait_for_history(state.state_details.flow_run_id)
        logger.debug("the Prefect server recorded the history %.1f s later", waited)

    with Database(url, max_size=1) as db, db.connection() as conn:
        counts = status_counts(conn, job_id)
    unfinished = sum(n for s, n in counts.items() if not ItemStatus(s).is_final)
    print(f"job {job_id}: {_counts_line(counts)}")
    if unfinished or state.is_crashed():
        print(f"{unfinished} item(s) not ended: run `imageopt run {job_id}` again")
        return EXIT_UNFINISHED
    if counts[ItemStatus.FAILED] or counts[ItemStatus.CANCELED]:
        print(f"see why with `imageopt report {job_id}`")
        return EXIT_FAILED

    return EXIT_OK


def _counts_line(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {s.lower()}" for s, n in counts.items() if n)


@contextlib.contextmanager
def _local_services(database: str, home) -> Iterator[None]:
    """Start a Prefect API and a provider here when none is configured."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from imageopt.services import (
        PrefectServerProcess,
        ProviderProcess,
        flush_to_prefect,
    )

    with contextlib.ExitStack() as stack:
        if not PREFECT_API_URL.value():
            print("no PREFECT_API_URL: starting a local Prefect server")
            server = PrefectServerProcess(database, home=home / "prefect")
            stack.callback(server.stop)
            stack.enter_context(temporary_settings({PREFECT_API_URL: server.url}))
            stack.callback(flush_to_prefect)
        if not get_settings().provider_url:
            print("no IMAGEOPT_PROVIDER_URL: starting the built-in provider")
            provider = ProviderProcess()
            stack.callback(provider.stop)
            stack.enter_context(_environ(IMAGEOPT_PROVIDER_URL=provider.url))
        yield


@contextlib.contextmanager
def _environ(**values: str) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _status(args: argparse.Namespace) -> int:
    with Database(database_url(), max_size=1) as db, db.connection() as conn:
        report = job_report(conn, args.job)

    if args.json:
        print(dumps(report))
        return EXIT_OK

    job = report["job"]
    counts = _counts_line(job["counts"])
    print(f"job {job['id']} for store {job['store']!r}: {job['status']} ({counts})")
    for item in report["items"]:
        detail = item["output"] or item["error"] or item["prediction_id"] or ""
        print(f"  {item['id']:>8}  {item['status']:<10}  {item['source']}  {detail}")

    return EXIT_OK


def _cancel(args: argparse.Namespace) -> int:
    from imageopt.pipeline import cancel_job
    from imageopt.provider import ProviderClient

    settings = get_settings()
    with Database(database_url(settings), max_size=2) as db:
        with db.connection() as conn:
            load_job(conn, args.job)
        with ProviderClient.from_settings(settings) as provider:
            canceled = cancel_job(
                db, provider, SchemaCheck(), args.job, "canceled on request"
            )
    flow_runs = _cancel_flow_runs(args.job)
    print(
        f"job {args.job}: {canceled} item(s) canceled"
        + (f", {flow_runs} flow run(s) asked to stop" if flow_runs else "")
    )

    return EXIT_OK


def _cancel_flow_runs(job_id: int) -> int:
    """Ask Prefect to cancel the job's running flow runs, if an API is there."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterName,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.settings import PREFECT_API_URL
    from prefect.states import Cancelling

    if not PREFECT_API_URL.value():
        return 0
    active = [StateType.RUNNING, StateType.PENDING, StateType.SCHEDULED]
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                name=FlowRunFilterName(any_=[f"job-{job_id}"]),
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=active)),
            )
        )
        for run in runs:
            client.set_flow_run_state(run.id, Cancelling(), force=True)

    return len(runs)
