"""What the sweep looks for in the database, each minute.

The ``sweep`` flow (``flows/sweep.py``) keeps jobs moving when an event was
missed or a run died. From the database it needs two answers:

- which jobs still have items to work on, and whether a live flow run holds
  each one: a run holds its job's advisory lock for as long as its process
  lives (see :func:`imageopt.jobs.job_lock`), so a free lock on an unfinished
  job means nobody is working on it;
- which predictions have outlived the deadline sent with their create: the
  provider should have canceled them itself; the sweep cancels them again, and
  the job's next run settles their items from what the provider then says.

The sweep never changes an item's status itself: only the flow does, by the
rules in :mod:`imageopt.pipeline`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import psycopg

from imageopt.errors import ProviderError
from imageopt.jobs import job_is_held
from imageopt.provider import ProviderClient
from imageopt.status import FINAL_STATUSES, JobStatus

logger = logging.getLogger(__name__)

# Past the deadline by this much, the provider has had every chance to cancel
# a prediction itself.
DEADLINE_GRACE_SECONDS = 60.0

_FINAL = [str(status) for status in FINAL_STATUSES]
_OPEN_JOB = [str(JobStatus.SUBMITTED), str(JobStatus.RUNNING)]


@dataclass(frozen=True)
class OpenJob:
    """A job with items still to finish, and whether a live run holds it."""

    id: int
    store: str
    unfinished: int
    held: bool


@dataclass(frozen=True)
class OverduePrediction:
    item_id: int
    job_id: int
    prediction_id: str
    waited_seconds: float


def open_jobs(conn: psycopg.Connection) -> list[OpenJob]:
    """Jobs submitted or running, oldest first, with their unfinished items.

    A job whose items have all ended is open here only until its status is
    refreshed: a run that died just before doing so leaves one like that.
    """
    rows = conn.execute(
        "SELECT j.id, s.name, (SELECT count(*) FROM items i WHERE i.job_id = j.id"
        " AND i.status::text <> ALL (%s)) FROM jobs j"
        " JOIN stores s ON s.id = j.store_id"
        " WHERE j.status::text = ANY (%s) ORDER BY j.id",
        (_FINAL, _OPEN_JOB),
    ).fetchall()
    return [
        OpenJob(job_id, store, unfinished, job_is_held(conn, job_id))
        for job_id, store, unfinished in rows
    ]


def overdue_predictions(
    conn: psycopg.Connection,
    deadline_seconds: float,
    grace_seconds: float = DEADLINE_GRACE_SECONDS,
) -> list[OverduePrediction]:
    """Unfinished items whose prediction is older than the deadline and grace.

    An item's ``updated_at`` is when its prediction id was saved: nothing
    changes it again until the item ends.
    """
    rows = conn.execute(
        "SELECT i.id, i.job_id, i.prediction_id,"
        " extract(epoch FROM now() - i.updated_at)::float8"
        " FROM items i JOIN jobs j ON j.id = i.job_id"
        " WHERE j.status::text = ANY (%s) AND i.prediction_id IS NOT NULL"
        " AND i.status::text <> ALL (%s)"
        " AND i.updated_at < now() - make_interval(secs => %s)"
        " ORDER BY i.id",
        (_OPEN_JOB, _FINAL, deadline_seconds + grace_seconds),
    ).fetchall()
    return [OverduePrediction(*row) for row in rows]


def cancel_overdue(
    provider: ProviderClient, overdue: list[OverduePrediction]
) -> list[dict]:
    """Cancel each overdue prediction; what was canceled, for the report.

    One that cannot be canceled now is logged and tried again next sweep.
    """
    canceled = []
    for prediction in overdue:
        try:
            provider.cancel(prediction.prediction_id)
        except ProviderError as exc:
            logger.warning(
                "item %s: could not cancel prediction %s, past its deadline: %s",
                prediction.item_id,
                prediction.prediction_id,
                exc,
            )
            continue
        canceled.append(
            {
                "item": prediction.item_id,
                "job": prediction.job_id,
                "prediction": prediction.prediction_id,
                "waited_seconds": round(prediction.waited_seconds),
            }
        )
    return canceled
