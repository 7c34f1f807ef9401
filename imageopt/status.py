"""Item and job statuses, and the one table that says which changes are legal.

An item moves ``PENDING`` → ``RUNNING`` (its prediction is being created) →
``PROCESSING`` (the prediction exists; waiting for its result) → one of the
final statuses ``COMPLETED``, ``FAILED`` or ``CANCELED``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from enum import StrEnum

from imageopt.errors import IllegalTransitionError


class ItemStatus(StrEnum):
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    PROCESSING = "PROCESSING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELED = "CANCELED"

    @property
    def is_final(self) -> bool:
        return self in FINAL_STATUSES


class JobStatus(StrEnum):
    SUBMITTED = "SUBMITTED"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELED = "CANCELED"


FINAL_STATUSES = frozenset(
    {ItemStatus.COMPLETED, ItemStatus.FAILED, ItemStatus.CANCELED}
)

TRANSITIONS: dict[ItemStatus, frozenset[ItemStatus]] = {
    ItemStatus.PENDING: frozenset(
        {ItemStatus.RUNNING, ItemStatus.FAILED, ItemStatus.CANCELED}
    ),
    # Back to PENDING only when the create provably never reached the
    # provider (refused connection, throttled): nothing was paid for.
    ItemStatus.RUNNING: frozenset(
        {
            ItemStatus.PENDING,
            ItemStatus.PROCESSING,
            ItemStatus.FAILED,
            ItemStatus.CANCELED,
        }
    ),
    ItemStatus.PROCESSING: frozenset(
        {ItemStatus.COMPLETED, ItemStatus.FAILED, ItemStatus.CANCELED}
    ),
    ItemStatus.COMPLETED: frozenset(),
    ItemStatus.FAILED: frozenset(),
    ItemStatus.CANCELED: frozenset(),
}


def logical_status(stored: str, prediction_id: str | None) -> ItemStatus:
    """The status an item is really in, given what is stored.

    On a database without ``PROCESSING`` (compatibility mode), ``RUNNING``
    with a saved prediction id means the prediction exists: ``PROCESSING``.
    """
    status = ItemStatus(stored)
    if status is ItemStatus.RUNNING and prediction_id is not None:
        return ItemStatus.PROCESSING
    return status


def check_transition(item_id: int, current: ItemStatus, target: ItemStatus) -> None:
    """Refuse, naming the item, a change the table above does not allow."""
    if target in TRANSITIONS[current]:
        return

    allowed = ", ".join(sorted(TRANSITIONS[current])) or "nothing: it has ended"
    msg = (
        f"item {item_id} cannot go from {current} to {target} "
        f"(from {current} it may go to {allowed})"
    )
    raise IllegalTransitionError(msg)


def derive_job_status(statuses: Iterable[ItemStatus]) -> JobStatus:
    """A job's status from its items' statuses.

    Until every item has ended the job is SUBMITTED (nothing started) or
    RUNNING. Then it is CANCELED if any item was canceled, COMPLETED if any
    item completed (one broken image fails its item, not its job; the counts
    say how many failed), and FAILED when not a single item completed.
    """
    counts = Counter(statuses)
    if not counts or counts.keys() == {ItemStatus.PENDING}:
        return JobStatus.SUBMITTED
    if any(not status.is_final for status in counts):
        return JobStatus.RUNNING
    if counts[ItemStatus.CANCELED]:
        return JobStatus.CANCELED
    if counts[ItemStatus.COMPLETED]:
        return JobStatus.COMPLETED

    return JobStatus.FAILED
