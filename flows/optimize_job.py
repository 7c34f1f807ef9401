"""The ``optimize-job`` flow: every image of a job through the prediction API.

For each item a ``create-prediction`` task claims it and creates its
prediction; then a ``poll-prediction`` task looks at the prediction, retrying
with a growing delay while it runs (each wait shows in the item's task history
in the Prefect UI), and copies the output into storage when it succeeds. The
rules that keep images and money safe live in :mod:`imageopt.pipeline`; this
module orchestrates them:

1. hold the job, so that two runs of it never work at once;
2. settle the items a dead run left half-created, before creating anything;
3. poll the items whose predictions exist, then create the pending ones,
   keeping a bounded window of items in flight;
4. report the job's status, a table and a summary as Prefect artifacts.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.context import get_run_context
from prefect.runtime import flow_run as current_flow_run
from prefect.runtime import task_run as current_task_run
from prefect.states import Cancelled, State
from pydantic import BaseModel, ConfigDict, Field, field_validator

from imageopt import pipeline
from imageopt.admission import Admission
from imageopt.db import Database
from imageopt.errors import (
    InvalidRequestError,
    PredictionPendingError,
    ProviderUnavailableError,
)
from imageopt.jobs import (
    Item,
    display_name,
    get_item,
    is_url,
    items_of,
    job_lock,
    load_job,
    status_counts,
    submit,
)
from imageopt.optimizer import OptimizeOptions
from imageopt.provider import ProviderClient
from imageopt.records import refresh_job_status
from imageopt.schema import SchemaCheck
from imageopt.settings import get_settings
from imageopt.status import ItemStatus, JobStatus, logical_status
from imageopt.storage import load_storage
from imageopt.window import (
    Done,
    PrunedThreadPoolTaskRunner,
    Window,
    forget_assets,
    forget_results,
)

CREATE_TAG = "imageopt-create-prediction"

# Delays between polls of an unfinished prediction; the last one repeats.
# With POLL_RETRIES they cover over an hour, longer than the deadline sent
# with each create, after which the provider cancels the prediction itself.
POLL_DELAYS = [1, 2, 3, 5, 8, 13, 20, 30]
POLL_RETRIES = 130

# Pending items are read from the database this many at a time.
PAGE_SIZE = 100

# How often, in seconds, the flow updates its progress and looks for a
# cancel request.
CHECK_INTERVAL = 2.0

# Table artifacts beyond this many rows are cut, saying so: the summary and
# `imageopt status` have every item.
TABLE_ROWS = 1000

# The runtime of each flow run in this process, shared with its tasks' threads.
_runtimes: dict[UUID, pipeline.Runtime] = {}


def _rt() -> pipeline.Runtime:
    flow_run_id = get_run_context().task_run.flow_run_id
    try:
        return _runtimes[flow_run_id]
    except KeyError:
        msg = "imageopt's tasks run inside the optimize-job flow"
        raise RuntimeError(msg) from None


def _item_task_name(stage: str):
    def name() -> str:
        item: Item = current_task_run.parameters["item"]
        return f"{stage} {item.id} {item.filename}"

    return name


@task(
    name="create-prediction",
    task_run_name=_item_task_name("create-prediction"),
    tags=[CREATE_TAG],
    cache_policy=NO_CACHE,
    persist_result=False,
)
def create_prediction(item: Item) -> tuple[str, float] | None:
    """Claim the item and create its prediction: its id and when it was made."""
    prediction_id = pipeline.create_prediction(_rt(), item)
    if prediction_id is None:
        return None
    return prediction_id, time.time()


def _poll_again(task, task_run, state) -> bool:
    """Retry a poll that found the prediction unfinished or the provider away."""
    return isinstance(state.data, PredictionPendingError | ProviderUnavailableError)


@task(
    name="poll-prediction",
    task_run_name=_item_task_name("poll-prediction"),
    retries=POLL_RETRIES,
    retry_delay_seconds=POLL_DELAYS,
    retry_condition_fn=_poll_again,
    cache_policy=NO_CACHE,
    persist_result=False,
)
def poll_prediction(
    item: Item, prediction_id: str, created_at: float | None = None
) -> pipeline.Outcome:
    """Poll the prediction until it has ended, then store its output."""
    rt = _rt()
    # Prefect has linked this poll to its create by now.
    forget_results(prediction_id, created_at)
    if current_task_run.run_count <= 1 and created_at is not None:
        # Timed for when the prediction should be done, so that most items
        # need no retry at all.
        return pipeline.first_poll(rt, item.id, prediction_id, created_at)

    return pipeline.poll_prediction(rt, item.id, prediction_id)


def _job_of(flow_run) -> int:
    """The job a flow run works on: its parameter, or its name once created."""
    job_id = flow_run.parameters.get("job_id")
    if job_id is not None:
        return int(job_id)
    return int(flow_run.name.removeprefix("job-"))


def _on_cancellation(flow, flow_run, state) -> None:
    """Canceled from Prefect: cancel the job's predictions and items."""
    settings = get_settings()
    with (
        Database.from_settings(settings, max_size=2) as db,
        ProviderClient.from_settings(settings) as provider,
    ):
        pipeline.cancel_job(
            db,
            provider,
            SchemaCheck(),
            _job_of(flow_run),
            "canceled with its flow run",
        )


class NewJob(BaseModel):
    """A job to create and run at once: what a store's backend sends by API."""

    model_config = ConfigDict(extra="forbid")

    store: str = Field(min_length=1, max_length=200, description="the store's name")
    images: list[str] = Field(
        min_length=1, description="http(s) URLs of the images to optimize"
    )
    options: OptimizeOptions = Field(default_factory=OptimizeOptions)

    @field_validator("images")
    @classmethod
    def _urls_only(cls, images: list[str]) -> list[str]:
        local = [image for image in images if not is_url(image)]
        if local:
            msg = (
                f"{len(local)} image(s) are not http(s) URLs, first {local[0]!r}: "
                "a job sent to a deployment names its images by URL"
            )
            raise ValueError(msg)
        return images


def _flow_run_name() -> str:
    parameters = current_flow_run.parameters
    if parameters.get("job_id") is not None:
        return f"job-{parameters['job_id']}"
    new_job = parameters["new_job"]
    store = new_job.store if isinstance(new_job, NewJob) else new_job["store"]
    # Renamed job-<id> as soon as the job exists.
    return f"new-job-{store}"


@flow(
    name="optimize-job",
    flow_run_name=_flow_run_name,
    task_runner=PrunedThreadPoolTaskRunner(max_workers=get_settings().max_in_flight),
    on_cancellation=[_on_cancellation],
    log_prints=False,
)
def optimize_job(
    job_id: int | None = None,
    new_job: NewJob | None = None,
    output: str | None = None,
) -> dict[str, Any] | State:
    """Optimize every image of a job; running it again resumes it.

    Give either ``job_id``, a submitted job, or ``new_job``, a store and its
    image URLs, to create the job first. ``output`` is a folder to store
    outputs in, instead of the configured storage. Returns the job's summary,
    or a Cancelled state carrying it when the job was canceled during the run.
    """
    if (job_id is None) == (new_job is None):
        msg = "optimize-job takes either job_id or new_job, not both or neither"
        raise InvalidRequestError(msg)

    logger = get_run_logger()
    flow_run_id = get_run_context().flow_run.id
    # Prefect logs every task's end and every retry at INFO, and sends each
    # line to the API: two to a dozen lines an item that say nothing the task
    # states in the UI do not, at a cost the server pays per line. Warnings
    # and errors still go through; the flow logs each item's outcome itself.
    logging.getLogger("prefect.task_runs").setLevel(logging.WARNING)
    settings = get_settings()
    db = Database.from_settings(settings, max_size=8).open()
    provider = ProviderClient.from_settings(settings)
    admission = None
    try:
        if new_job is not None:
            job_id = _create_job(db, new_job, settings, logger)
        with db.connection() as conn:
            job = load_job(conn, job_id)
        storage = load_storage(output, settings)
        admission = Admission.open(db, settings)
        rt = pipeline.Runtime(db, provider, storage, settings, job, admission)
        _runtimes[flow_run_id] = rt

        def waiting() -> None:
            logger.info("job %s is being run elsewhere; waiting for that run", job_id)

        with job_lock(db.conninfo, job_id, on_wait=waiting):
            return _run(rt, logger)
    finally:
        _runtimes.pop(flow_run_id, None)
        if admission is not None:
            admission.close()
        provider.close()
        db.close()


def _create_job(db: Database, new_job: NewJob, settings, logger) -> int:
    """Submit ``new_job`` and name this flow run after it."""
    with db.connection() as conn:
        schema = SchemaCheck().refresh(conn)
        job_id = submit(
            conn,
            schema,
            new_job.store,
            new_job.images,
            new_job.options,
            max_input_bytes=settings.max_input_bytes,
        )
    flow_run_id = get_run_context().flow_run.id
    with get_client(sync_client=True) as client:
        client.update_flow_run(flow_run_id, name=f"job-{job_id}")
    logger.info(
        "created job %s for store %r: %s image(s)",
        job_id,
        new_job.store,
        len(new_job.images),
    )
    return job_id


def _run(rt: pipeline.Runtime, logger) -> dict[str, Any] | State:
    began = time.monotonic()
    rt.refresh_schema()

    def start(conn, _again) -> dict[str, int]:
        refresh_job_status(conn, rt.schema.state, rt.job.id)
        return status_counts(conn, rt.job.id)

    counts = rt.db.retrying(f"job {rt.job.id}: reading its items", start)
    logger.info(
        "job %s for store %r: %s items (%s)",
        rt.job.id,
        rt.job.store,
        sum(counts.values()),
        ", ".join(f"{n} {s.lower()}" for s, n in counts.items() if n),
    )

    _settle_interrupted_creates(rt, logger)
    # Only the polls of predictions this run creates are timed.
    if counts["PENDING"] or counts["RUNNING"]:
        learned = pipeline.learn_timing(rt)
        logger.debug(
            "first polls at %.1f s, from %s recent predictions",
            rt.timing.expected(),
            learned,
        )
    progress = _Progress(rt, total=sum(counts.values()))
    window: Window[Item] = Window(rt.settings.max_in_flight)
    for item in _work(rt, logger):
        while not window.has_room and not progress.canceled:
            _handle(rt, window, window.next_done(CHECK_INTERVAL), logger)
            progress.check(logger)
        if progress.check(logger):
            break
        if item.prediction_id:
            window.enter("poll", item, poll_prediction.submit(item, item.prediction_id))
        else:
            window.enter("create", item, create_prediction.submit(item))

    while window.in_flight:
        _handle(rt, window, window.next_done(CHECK_INTERVAL), logger)
        progress.check(logger)
    progress.check(logger, now=True)

    summary = _report(rt, time.monotonic() - began, logger)
    if progress.canceled:
        return Cancelled(message=f"job {rt.job.id} was canceled", data=summary)
    return summary


def _settle_interrupted_creates(rt: pipeline.Runtime, logger) -> None:
    """Items a dead run left RUNNING without a prediction id: find or release."""
    with rt.db.connection() as conn:
        claimed = [
            item
            for item in items_of(conn, rt.job.id, statuses=["RUNNING"])
            if item.prediction_id is None
        ]
        (since,) = conn.execute(
            "SELECT min(updated_at) FROM items WHERE job_id = %s"
            " AND status = 'RUNNING' AND prediction_id IS NULL",
            (rt.job.id,),
        ).fetchone()
    if not claimed:
        return

    logger.info(
        "reconciling %s item(s) whose create was interrupted, before any new create",
        len(claimed),
    )
    for item in claimed:
        pipeline.resume_claimed(rt, item, since)


def _work(rt: pipeline.Runtime, logger) -> Iterator[Item]:
    """Items whose prediction exists first, then pending ones, a page at a time.

    The schema is looked at again for each page, so a migration that lands
    during a long job is used from the next page on.
    """
    yield from (
        item
        for item in _pages(rt, ["RUNNING", "PROCESSING"], logger)
        if item.prediction_id
    )
    yield from _pages(rt, ["PENDING"], logger)


def _page(job_id: int, statuses: list[str], after: int, conn, _again) -> list[Item]:
    return items_of(conn, job_id, statuses=statuses, after_id=after, limit=PAGE_SIZE)


def _pages(rt: pipeline.Runtime, statuses: list[str], logger) -> Iterator[Item]:
    after = 0
    while True:
        rt.refresh_schema()
        page = rt.db.retrying(
            f"job {rt.job.id}: reading its next items",
            functools.partial(_page, rt.job.id, statuses, after),
        )
        if not page:
            return
        after = page[-1].id
        if statuses == ["PENDING"]:
            logger.info(
                "starting creates for %s item(s), ids %s to %s",
                len(page),
                page[0].id,
                page[-1].id,
            )
        yield from page


def _handle(
    rt: pipeline.Runtime, window: Window[Item], done: Done[Item] | None, logger
) -> None:
    """Move a finished item on: from create to poll, or out of the window."""
    if done is None:
        return

    done.future.wait()  # sets its final state from the finished thread
    forget_assets(done.future.task_run_id)
    item, state = done.subject, done.future.state
    result = done.future.result(raise_on_failure=False)
    if done.stage == "create" and state.is_completed() and result is not None:
        prediction_id, created_at = result
        window.track(
            "poll", item, poll_prediction.submit(item, prediction_id, created_at)
        )
        # The poll is given the pair's parts, and forgets them once started.
        forget_results(result, parts=False)
        return

    forget_results(result)
    window.leave()
    if state.is_completed() and isinstance(result, pipeline.Outcome):
        _log_outcome(result, logger)
    elif isinstance(result, PredictionPendingError):
        why = f"it had not finished after {POLL_RETRIES} polls"
        _log_outcome(pipeline.give_up(rt, item, result.prediction_id, why), logger)
    elif not state.is_completed():
        # Left as it is in the database; the next run picks it up from there.
        logger.error("item %s: %s failed: %s", item.id, done.stage, state.message)
    else:
        current = rt.db.retrying(
            f"item {item.id}: reading it", lambda conn, _again: get_item(conn, item.id)
        )
        if current.status.is_final:
            logger.info("item %s ended %s before its create", item.id, current.status)


def _log_outcome(outcome: pipeline.Outcome, logger) -> None:
    if outcome.status is ItemStatus.COMPLETED:
        logger.info(
            "item %s completed: %s -> %s bytes at %s",
            outcome.item_id,
            outcome.bytes_in if outcome.bytes_in is not None else "?",
            outcome.bytes_out,
            outcome.output,
        )
    else:
        logger.info(
            "item %s %s: %s", outcome.item_id, outcome.status.lower(), outcome.reason
        )


@dataclass
class _Progress:
    """The progress artifact, and the watch for a cancel request."""

    rt: pipeline.Runtime
    total: int
    canceled: bool = False
    _checked_at: float = 0.0
    _artifact_id: Any = field(default=None, init=False)

    def __post_init__(self) -> None:
        self._artifact_id = create_progress_artifact(
            progress=0.0,
            key=f"job-{self.rt.job.id}-progress",
            description=f"Share of the {self.total} items of job {self.rt.job.id} "
            "that have ended",
        )

    def check(self, logger, *, now: bool = False) -> bool:
        """Every few seconds, or ``now``: update progress, act on a cancel request."""
        if not now and time.monotonic() - self._checked_at < CHECK_INTERVAL:
            return self.canceled
        self._checked_at = time.monotonic()

        job_id = self.rt.job.id

        def read(conn, _again) -> tuple[dict[str, int], str]:
            (job_status,) = conn.execute(
                "SELECT status FROM jobs WHERE id = %s", (job_id,)
            ).fetchone()
            return status_counts(conn, job_id), job_status

        counts, job_status = self.rt.db.retrying(f"job {job_id}: progress", read)
        ended = sum(n for s, n in counts.items() if ItemStatus(s).is_final)
        update_progress_artifact(self._artifact_id, 100.0 * ended / max(self.total, 1))

        canceled_status = self.rt.schema.state.stored_job_status(JobStatus.CANCELED)
        if not self.canceled and (
            job_status == canceled_status or _flow_run_cancelling()
        ):
            logger.info("job %s: cancel requested; canceling its items", job_id)
            self.canceled = True
            pipeline.cancel_job(
                self.rt.db,
                self.rt.provider,
                self.rt.schema,
                job_id,
                "canceled on request",
            )

        return self.canceled


def _flow_run_cancelling() -> bool:
    """Whether someone asked Prefect to cancel this flow run."""
    flow_run_id = get_run_context().flow_run.id
    with get_client(sync_client=True) as client:
        state = client.read_flow_run(flow_run_id).state
    return state is not None and (state.is_cancelling() or state.is_cancelled())


def _report(rt: pipeline.Runtime, seconds: float, logger) -> dict[str, Any]:
    """Store the job's status and publish its table and summary artifacts."""
    with rt.db.connection() as conn:
        status = refresh_job_status(conn, rt.schema.state, rt.job.id)
        counts = status_counts(conn, rt.job.id)
        rows = conn.execute(
            "SELECT id, source, status::text, prediction_id, bytes_in, bytes_out,"
            " error FROM items WHERE job_id = %s ORDER BY id LIMIT %s",
            (rt.job.id, TABLE_ROWS),
        ).fetchall()
        (bytes_in, bytes_out) = conn.execute(
            "SELECT coalesce(sum(bytes_in), 0), coalesce(sum(bytes_out), 0)"
            " FROM items WHERE job_id = %s AND status = 'COMPLETED'",
            (rt.job.id,),
        ).fetchone()

    table = [_table_row(row) for row in rows]
    create_table_artifact(
        table=table,
        key=f"job-{rt.job.id}-items",
        description=f"Items of job {rt.job.id}"
        + (f" (the first {TABLE_ROWS})" if len(rows) == TABLE_ROWS else ""),
    )
    done = sum(n for s, n in counts.items() if ItemStatus(s).is_final)
    per_minute = 60.0 * done / seconds if seconds > 0 else 0.0
    summary = {
        "job_id": rt.job.id,
        "store": rt.job.store,
        "status": status,
        "counts": counts,
        "bytes_in": int(bytes_in),
        "bytes_out": int(bytes_out),
        "seconds": round(seconds, 1),
        "items_per_minute": round(per_minute, 1),
    }
    create_markdown_artifact(
        markdown=_summary_markdown(summary),
        key=f"job-{rt.job.id}-summary",
        description=f"Summary of job {rt.job.id}",
    )
    logger.info(
        "job %s %s in %.1f s (%.0f items a minute): %s",
        rt.job.id,
        status.lower(),
        seconds,
        per_minute,
        ", ".join(f"{n} {s.lower()}" for s, n in counts.items() if n),
    )

    return summary


def _table_row(row: tuple) -> dict[str, Any]:
    item_id, source, status, prediction_id, bytes_in, bytes_out, error = row
    saving = (
        f"{100 * (1 - bytes_out / bytes_in):.0f}%" if bytes_in and bytes_out else ""
    )
    return {
        "item": item_id,
        "file": display_name(source),
        "status": str(logical_status(status, prediction_id)),
        "bytes in": bytes_in,
        "bytes out": bytes_out,
        "saving": saving,
        "reason": error or "",
    }


def _summary_markdown(summary: dict[str, Any]) -> str:
    saved = summary["bytes_in"] - summary["bytes_out"]
    share = 100 * saved / summary["bytes_in"] if summary["bytes_in"] else 0
    lines = [
        f"# Job {summary['job_id']} for {summary['store']}: {summary['status']}",
        "",
        "| status | items |",
        "| --- | --- |",
        *(f"| {s} | {n} |" for s, n in summary["counts"].items() if n),
        "",
        f"Saved {saved:,} bytes ({share:.0f}%) over the completed items, in "
        f"{summary['seconds']} s ({summary['items_per_minute']} items a minute).",
    ]
    return "\n".join(lines)
