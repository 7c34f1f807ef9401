"""The work done for one item: create its prediction, poll it, store the output.

These functions hold the rules that keep images and money safe; the Prefect
flow in ``flows/optimize_job.py`` only orchestrates them:

- an item is claimed (``PENDING`` → ``RUNNING``) before its create request is
  sent, and its prediction id is written in the same transaction that makes
  it ``PROCESSING``, so a crash leaves either a claimed item with no id
  (reconciled with the provider before anything is created again) or an
  item with its id (polled, never created again);
- a create is sent again only when the provider provably did not make the
  prediction: it refused the connection, throttled, or :func:`reconcile`
  found no prediction with the item's input;
- the output is copied into storage when the prediction succeeds, before its
  URL expires, to a path fixed by the item, so a second copy overwrites.
"""

from __future__ import annotations

import base64
import logging
import math
import mimetypes
import random
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prefect.filesystems import WritableFileSystem

from imageopt.admission import Admission
from imageopt.db import Database
from imageopt.errors import (
    CreateOutcomeUnknownError,
    IllegalTransitionError,
    ImageError,
    PredictionNotFoundError,
    PredictionPendingError,
    ProviderError,
    ProviderUnavailableError,
    RejectedError,
    ThrottledError,
)
from imageopt.jobs import Item, Job, get_item, is_url, items_of
from imageopt.provider import Prediction, PredictionStatus, ProviderClient
from imageopt.records import refresh_job_status, transition
from imageopt.schema import SchemaCheck
from imageopt.settings import Settings
from imageopt.status import ItemStatus, JobStatus
from imageopt.storage import location, output_path

logger = logging.getLogger(__name__)

# How long a create keeps trying while the provider is unreachable before the
# item fails; long enough to ride out a restart of the provider.
CREATE_UNAVAILABLE_BUDGET = 300.0

# After a create's answer was lost, the prediction may take a moment to show
# up in the provider's list; look this many times before creating again.
RECONCILE_ATTEMPTS = 3
RECONCILE_PAUSE = 1.0

# How often the poll that finds out how long predictions take looks at its
# prediction, inside one try (see first_poll).
SCOUT_INTERVAL = 0.5


class PredictionTiming:
    """How long recent predictions took, to time the first poll of the next.

    The first poll is made when nine in ten recent predictions had ended
    (the 90th percentile of their durations, ``quantile``). At the median,
    half the first polls found their prediction still running, and each of
    those retries costs the Prefect server two more task-run states to
    record; at the 90th percentile about one in ten does, for a second or so
    more of each item's latency. A flow run starts from the provider's own
    list of recent predictions (:func:`learn_timing`); while it still knows
    nothing, one poll at a time scouts for the others (:func:`first_poll`).
    """

    def __init__(
        self, keep: int = 50, ceiling: float = 60.0, quantile: float = 0.9
    ) -> None:
        self._recent: deque[float] = deque(maxlen=keep)
        self.ceiling = ceiling
        self._quantile = quantile
        self._lock = threading.Lock()
        self._known = threading.Event()
        self._scouting = False

    @property
    def known(self) -> bool:
        """Whether any prediction's duration has been observed."""
        return self._known.is_set()

    def observe(self, prediction: Prediction) -> None:
        if prediction.created_at and prediction.completed_at:
            seconds = (prediction.completed_at - prediction.created_at).total_seconds()
            with self._lock:
                self._recent.append(max(0.0, seconds))
            self._known.set()

    def learn(self, predictions: list[Prediction]) -> None:
        """Observe predictions listed newest first, so the newest are kept."""
        for prediction in reversed(predictions):
            self.observe(prediction)

    def expected(self) -> float:
        """Seconds after its creation by which a prediction is likely done."""
        with self._lock:
            recent = sorted(self._recent)
        if not recent:
            return 0.0
        # The nearest rank: the shortest time by which that share had ended.
        rank = max(0, math.ceil(self._quantile * len(recent)) - 1)
        return min(self.ceiling, recent[rank])

    def take_scout(self) -> bool:
        """Become the one poll that finds out how long predictions take.

        True for one caller at a time, and only while nothing is known; the
        caller gives the part back with :meth:`end_scout`.
        """
        with self._lock:
            if self.known or self._scouting:
                return False
            self._scouting = True
            return True

    def end_scout(self) -> None:
        with self._lock:
            self._scouting = False

    def wait_known(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for a first duration; whether one came."""
        return self._known.wait(timeout)


@dataclass
class Runtime:
    """What a flow run shares among the threads working on its items."""

    db: Database
    provider: ProviderClient
    storage: WritableFileSystem
    settings: Settings
    job: Job
    admission: Admission
    schema: SchemaCheck = field(default_factory=SchemaCheck)
    timing: PredictionTiming = field(default_factory=PredictionTiming)

    def refresh_schema(self) -> None:
        with self.db.connection() as conn:
            self.schema.refresh(conn)


@dataclass(frozen=True)
class Outcome:
    """How an item ended, for logs and the job's report."""

    item_id: int
    status: ItemStatus
    reason: str
    bytes_in: int | None = None
    bytes_out: int | None = None
    output: str | None = None


def _move(
    rt: Runtime, item_id: int, target: ItemStatus, reason: str, **fields: Any
) -> None:
    """Write the item's transition, riding out a lost database connection.

    A transition whose answer was lost may have committed; before writing it
    again, its history row is looked for, so that it is neither lost nor
    refused as illegal the second time.
    """

    def write(conn, again: bool) -> None:
        if again and _written(conn, item_id, reason):
            return
        transition(conn, rt.schema.state, item_id, target, reason=reason, **fields)

    rt.db.retrying(f"item {item_id}: the change to {target}", write)


def _written(conn, item_id: int, reason: str) -> bool:
    """Whether the item's latest history row is this very transition."""
    row = conn.execute(
        "SELECT reason FROM item_history WHERE item_id = %s"
        " ORDER BY at DESC, id DESC LIMIT 1",
        (item_id,),
    ).fetchone()
    # Two transitions in a row never share a reason, since they never share
    # a target. On an old schema transition() appends to the reason how the
    # target was stored, so its start is what identifies it.
    return row is not None and (row[0] or "").startswith(reason)


def _read_item(rt: Runtime, item_id: int) -> Item:
    return rt.db.retrying(
        f"item {item_id}: reading it", lambda conn, _: get_item(conn, item_id)
    )


def fail(rt: Runtime, item_id: int, reason: str) -> Outcome:
    """End an item as FAILED with a reason a person can act on."""
    _move(rt, item_id, ItemStatus.FAILED, reason, error=reason)
    return Outcome(item_id, ItemStatus.FAILED, reason)


# -- create -------------------------------------------------------------------


def provider_input(rt: Runtime, item: Item) -> dict[str, Any]:
    """The prediction input for an item: its image and the job's options.

    A local file travels inline as a data URI, which both Replicate and
    imageopt's own provider accept.
    """
    options = rt.job.options.model_dump(exclude_none=True)
    if is_url(item.source):
        return {"image": item.source, **options}

    path = Path(item.source)
    try:
        data = path.read_bytes()
    except OSError as exc:
        msg = f"cannot read {path}: {exc.strerror}; put the file back and resume"
        raise ImageError(msg) from exc
    if not data:
        msg = f"{path.name} is empty (0 bytes): export or upload the image again"
        raise ImageError(msg)
    if len(data) > rt.settings.max_input_bytes:
        msg = (
            f"{path.name} is {len(data):,} bytes, over the limit of "
            f"{rt.settings.max_input_bytes:,}: send a smaller file"
        )
        raise ImageError(msg)

    mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    encoded = base64.b64encode(data).decode("ascii")
    return {"image": f"data:{mime};base64,{encoded}", **options}


def create_prediction(rt: Runtime, item: Item) -> str | None:
    """Admit, claim and create: the item's new prediction id.

    The item waits for admission while still PENDING, then takes a slot that
    it keeps until its prediction ends. Returns None, giving the slot back,
    when the item ended here (failed, or canceled meanwhile) or was not
    PENDING any more.
    """
    rt.admission.admit_create(rt.job.store_id, item.id)
    prediction_id = None
    try:
        prediction_id = _claim_and_create(rt, item)
    finally:
        if prediction_id is None:
            rt.admission.release(item.id)

    return prediction_id


def _claim_and_create(rt: Runtime, item: Item) -> str | None:
    try:
        _move(rt, item.id, ItemStatus.RUNNING, "creating the prediction")
    except IllegalTransitionError:
        logger.debug("item %s is no longer pending; not creating", item.id)
        return None

    try:
        prediction_input = provider_input(rt, item)
    except ImageError as exc:
        fail(rt, item.id, str(exc))
        return None

    try:
        prediction = _create_once(rt, item, prediction_input)
    except RejectedError as exc:
        fail(
            rt, item.id, f"{item.filename}: the provider refused the prediction: {exc}"
        )
        return None
    except ProviderUnavailableError as exc:
        fail(
            rt,
            item.id,
            f"{item.filename}: the provider could not be reached: {exc}; resubmit",
        )
        return None

    return record_prediction(rt, item, prediction)


def record_prediction(rt: Runtime, item: Item, prediction: Prediction) -> str | None:
    """Write the prediction id with PROCESSING; cancel it if the item ended."""
    try:
        _move(
            rt,
            item.id,
            ItemStatus.PROCESSING,
            f"prediction {prediction.id} created",
            prediction_id=prediction.id,
        )
    except IllegalTransitionError:
        # Canceled while the create was under way: do not pay for the rest.
        logger.info(
            "item %s ended while its prediction %s was being created; canceling it",
            item.id,
            prediction.id,
        )
        _cancel_quietly(rt, prediction.id)
        return None

    return prediction.id


def _create_once(rt: Runtime, item: Item, prediction_input: dict) -> Prediction:
    """Create exactly one prediction for the item, whatever the network does."""
    unavailable_since: float | None = None
    attempt = 0
    while True:
        attempt += 1
        sent_at = datetime.now(UTC)
        try:
            prediction = rt.provider.create(
                prediction_input, cancel_after=rt.settings.prediction_deadline
            )
        except ThrottledError as exc:
            # A 429 means nothing was created: sending again is safe, once
            # admission, slowed down for every process, lets the item go.
            logger.debug(
                "item %s: create throttled for %.1f s", item.id, exc.retry_after
            )
            rt.admission.throttled("create", exc.retry_after)
            rt.admission.admit_create(rt.job.store_id, item.id)
            continue
        except ProviderUnavailableError:
            # The request never reached the provider: safe to send again.
            unavailable_since = unavailable_since or time.monotonic()
            if time.monotonic() - unavailable_since > CREATE_UNAVAILABLE_BUDGET:
                raise
            time.sleep(min(30.0, 0.5 * 2 ** min(attempt, 6)) * random.uniform(0.5, 1))
            continue
        except CreateOutcomeUnknownError:
            found = reconcile(rt, item, prediction_input, since=sent_at)
            if found is not None:
                return found
            logger.info(
                "item %s: the lost create made no prediction; creating again", item.id
            )
            continue

        logger.debug("item %s: prediction %s created", item.id, prediction.id)
        return prediction


def learn_timing(rt: Runtime) -> int:
    """Time the run's first polls from the provider's latest predictions.

    Without this, the first window of a run polls before any of its own
    predictions has ended, and each of those polls retries two or three
    times. It costs one read; a provider that does not answer it leaves the
    timing to be learned from the run's own predictions. Returns how many
    predictions it learned from.
    """
    rt.admission.admit_read(rt.job.store_id)
    try:
        recent = rt.provider.recent_successes()
    except ProviderError as exc:
        logger.debug(
            "job %s: no recent predictions to time polls by: %s", rt.job.id, exc
        )
        return 0

    rt.timing.learn(recent)
    return len(recent)


def reconcile(
    rt: Runtime,
    item: Item,
    prediction_input: dict,
    *,
    since: datetime | None,
    attempts: int = RECONCILE_ATTEMPTS,
) -> Prediction | None:
    """Find the prediction a lost create may have made for this item.

    ``attempts`` looks, RECONCILE_PAUSE apart, give a create whose answer was
    just lost time to show up in the provider's list.
    """

    def read_taken(conn, _again: bool) -> set[str]:
        rows = conn.execute(
            "SELECT prediction_id FROM items WHERE job_id = %s"
            " AND prediction_id IS NOT NULL AND id <> %s",
            (item.job_id, item.id),
        ).fetchall()
        return {pid for (pid,) in rows}

    taken = rt.db.retrying(f"item {item.id}: reading predictions taken", read_taken)
    for attempt in range(attempts):
        if attempt:
            time.sleep(RECONCILE_PAUSE)
        rt.admission.admit_read(rt.job.store_id)
        found = rt.provider.reconcile(prediction_input, since=since, exclude=taken)
        if found is not None:
            logger.info(
                "item %s: found its prediction %s at the provider", item.id, found.id
            )
            return found

    return None


def resume_claimed(rt: Runtime, item: Item, claimed_at: datetime | None) -> str | None:
    """Settle an item a dead run left RUNNING without a prediction id.

    Its create may or may not have reached the provider: look for the
    prediction first, and only when there is none, put the item back to
    PENDING so that it is created like any other.
    """
    try:
        prediction_input = provider_input(rt, item)
    except ImageError as exc:
        fail(rt, item.id, str(exc))
        return None

    # The dead run sent its last create before it died, seconds ago at least:
    # one look is enough, where a lost answer a moment ago needs a few.
    found = reconcile(rt, item, prediction_input, since=claimed_at, attempts=1)
    if found is not None:
        return record_prediction(rt, item, found)

    _move(
        rt,
        item.id,
        ItemStatus.PENDING,
        "resumed: the interrupted create made no prediction",
    )
    return None


# -- poll and store -----------------------------------------------------------


def first_poll(
    rt: Runtime, item_id: int, prediction_id: str, created_at: float
) -> Outcome:
    """The first look at a new prediction, made when it should have ended.

    ``created_at`` is when the create was answered (``time.time()``). While
    the run knows nothing yet of how long predictions take, one poll at a
    time scouts: it looks every ``SCOUT_INTERVAL`` inside its first try until
    its prediction ends, and the other first polls wait for what it learns
    (up to the timing's ceiling). Polled at once instead, a run's first
    window of items each retried two or three times, and each retry costs
    the Prefect server two more task-run states; a scout's looks cost a read
    each and no state. Raises :class:`PredictionPendingError` as
    :func:`poll_prediction` does.
    """
    timing = rt.timing
    until = created_at + timing.ceiling
    while not timing.known and time.time() < until:
        if not timing.take_scout():
            timing.wait_known(SCOUT_INTERVAL)
            continue
        try:
            return _scout(rt, item_id, prediction_id, until)
        finally:
            timing.end_scout()

    wait = timing.expected() - (time.time() - created_at)
    if wait > 0:
        time.sleep(wait)

    return poll_prediction(rt, item_id, prediction_id)


def _scout(rt: Runtime, item_id: int, prediction_id: str, until: float) -> Outcome:
    while True:
        try:
            return poll_prediction(rt, item_id, prediction_id)
        except PredictionPendingError:
            if time.time() + SCOUT_INTERVAL >= until:
                raise
            logger.debug("item %s: scouting, prediction still running", item_id)
        time.sleep(SCOUT_INTERVAL)


def poll_prediction(rt: Runtime, item_id: int, prediction_id: str) -> Outcome:
    """Look at the prediction once; finish the item if it has ended.

    Raises :class:`PredictionPendingError` when it has not ended, so that the
    caller polls again later.
    """
    item = _read_item(rt, item_id)
    if item.status.is_final:
        rt.admission.release(item_id)
        return Outcome(item_id, item.status, "ended elsewhere")

    rt.admission.admit_read(rt.job.store_id)
    try:
        prediction = rt.provider.get(prediction_id)
    except ThrottledError as exc:
        # The client waited out a few 429s already; slow every poller down
        # and let the caller poll again later, as for an outage.
        rt.admission.throttled("read", exc.retry_after)
        msg = f"item {item_id}: polling prediction {prediction_id} was throttled"
        raise ProviderUnavailableError(msg) from exc
    except PredictionNotFoundError:
        outcome = fail(
            rt,
            item_id,
            f"{item.filename}: the provider no longer knows prediction "
            f"{prediction_id}; resubmit",
        )
    else:
        if not prediction.is_terminal:
            raise PredictionPendingError(item_id, prediction_id, prediction.status)
        outcome = finish(rt, item, prediction)

    rt.admission.release(item_id)
    return outcome


def finish(rt: Runtime, item: Item, prediction: Prediction) -> Outcome:
    """End an item from its terminal prediction."""
    rt.timing.observe(prediction)
    status = prediction.status
    if status is PredictionStatus.SUCCEEDED:
        return store_output(rt, item, prediction)
    if status is PredictionStatus.CANCELED:
        if _job_canceled(rt):
            reason = f"prediction {prediction.id} was canceled with job {rt.job.id}"
            _move(rt, item.id, ItemStatus.CANCELED, reason, error=reason)
            return Outcome(item.id, ItemStatus.CANCELED, reason)
        # Nobody here asked for it: the item failed, and is not created again,
        # since a second prediction would be paid for and may hang the same way.
        return fail(
            rt,
            item.id,
            f"{item.filename}: prediction {prediction.id} was canceled by the "
            "provider before it finished: it ran past its deadline of "
            f"{rt.settings.prediction_deadline} (Cancel-After) or was canceled "
            "there; resubmit the image",
        )

    detail = (prediction.error or "no reason given").strip()
    return fail(
        rt, item.id, f"{item.filename}: prediction {prediction.id} {status}: {detail}"
    )


def _job_canceled(rt: Runtime) -> bool:
    """Whether someone canceled the job (its status says so before any item)."""
    canceled = rt.schema.state.stored_job_status(JobStatus.CANCELED)

    def read(conn, _again: bool) -> bool:
        row = conn.execute(
            "SELECT status::text FROM jobs WHERE id = %s", (rt.job.id,)
        ).fetchone()
        return row is not None and row[0] == canceled

    return rt.db.retrying(f"job {rt.job.id}: reading its status", read)


def store_output(rt: Runtime, item: Item, prediction: Prediction) -> Outcome:
    url, details = _output_of(prediction)
    if url is None:
        return fail(
            rt,
            item.id,
            f"{item.filename}: prediction {prediction.id} succeeded without an "
            "output URL",
        )

    try:
        data = rt.provider.download(url)
    except (ThrottledError, ProviderUnavailableError) as exc:
        # Still there, most likely: poll again and copy it then.
        msg = (
            f"item {item.id}: the output of prediction {prediction.id} could not "
            f"be copied for now ({exc})"
        )
        raise ProviderUnavailableError(msg) from exc
    except ProviderError as exc:
        return fail(
            rt,
            item.id,
            f"{item.filename}: the output of prediction {prediction.id} could not "
            f"be copied ({exc}); it may have expired: resubmit the image",
        )

    fmt = details.get("format") or _format_from_url(url)
    path = output_path(rt.job.store, rt.job.id, item.id, item.source, fmt)
    rt.storage.write_path(path, data)
    where = location(rt.storage, path)
    bytes_in = details.get("bytes_in")
    reason = f"stored {len(data):,} bytes at {where}"
    _move(
        rt,
        item.id,
        ItemStatus.COMPLETED,
        reason,
        bytes_in=bytes_in,
        bytes_out=len(data),
        output=where,
    )

    return Outcome(item.id, ItemStatus.COMPLETED, reason, bytes_in, len(data), where)


def _output_of(prediction: Prediction) -> tuple[str | None, dict[str, Any]]:
    """The output file's URL and what else the model said about it.

    Models shape outputs their own way: a URL, a list of URLs, or an object
    (imageopt's own provider answers ``{"image": url, "format": ..., ...}``).
    """
    output = prediction.output
    if isinstance(output, str):
        return output, {}
    if isinstance(output, list) and output and isinstance(output[0], str):
        return output[0], {}
    if isinstance(output, dict):
        url = output.get("image") or output.get("url")
        return (url if isinstance(url, str) else None), output
    return None, {}


def _format_from_url(url: str) -> str:
    suffix = Path(url.split("?", 1)[0]).suffix.lower().lstrip(".")
    return {"jpg": "jpeg"}.get(suffix, suffix) or "bin"


# -- cancel -------------------------------------------------------------------


def give_up(rt: Runtime, item: Item, prediction_id: str, why: str) -> Outcome:
    """Stop waiting for a prediction: cancel it and fail the item."""
    _cancel_quietly(rt, prediction_id)
    rt.admission.release(item.id)
    reason = (
        f"{item.filename}: prediction {prediction_id} was canceled: {why}; "
        "resubmit the image"
    )
    try:
        return fail(rt, item.id, reason)
    except IllegalTransitionError:
        current = _read_item(rt, item.id)
        return Outcome(item.id, current.status, "ended elsewhere")


def _cancel_quietly(rt: Runtime, prediction_id: str) -> None:
    try:
        rt.provider.cancel(prediction_id)
    except ProviderError as exc:
        logger.warning(
            "could not cancel prediction %s (%s); the provider's deadline of %s "
            "will end it",
            prediction_id,
            exc,
            rt.settings.prediction_deadline,
        )


def cancel_job(
    db: Database,
    provider: ProviderClient,
    schema: SchemaCheck,
    job_id: int,
    reason: str,
) -> int:
    """Cancel a job: every unfinished item CANCELED, its prediction canceled.

    Returns how many items were canceled. Safe to run while a flow run works
    on the job: each item's change is checked like any other, and a create
    that finishes afterwards cancels its own prediction.
    """
    with db.connection() as conn:
        state = schema.refresh(conn)
        conn.execute(
            "UPDATE jobs SET status = %s, updated_at = now() WHERE id = %s",
            (state.stored_job_status(JobStatus.CANCELED), job_id),
        )
        open_items = [i for i in items_of(conn, job_id) if not i.status.is_final]

    canceled = 0
    for item in open_items:
        if item.prediction_id:
            try:
                provider.cancel(item.prediction_id)
            except ProviderError as exc:
                logger.warning(
                    "item %s: could not cancel prediction %s (%s)",
                    item.id,
                    item.prediction_id,
                    exc,
                )
        try:
            with db.connection() as conn:
                transition(
                    conn,
                    state,
                    item.id,
                    ItemStatus.CANCELED,
                    reason=reason,
                    error=reason,
                )
        except IllegalTransitionError:
            continue
        canceled += 1

    with db.connection() as conn:
        refresh_job_status(conn, state, job_id)

    return canceled
