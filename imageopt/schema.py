"""The schema check every writer goes through before it writes a status.

Code and database do not always move together: a process may start on a
database whose migrations have not run yet. Rather than send a status the
database's enum lacks (``invalid input value for enum item_status``), writers
ask a :class:`SchemaCheck` which value to store:

- below :data:`OLDEST_SUPPORTED_VERSION` nothing is written, and the error
  says which version is there, which is needed and what to run;
- on a database whose ``item_status`` lacks ``PROCESSING`` (version 1), the
  check runs in compatibility mode: ``PROCESSING`` is stored as ``RUNNING``
  (the saved prediction id tells the two phases apart), and ``CANCELED`` as
  ``FAILED`` with the reason saying it was canceled. One WARNING says so;
- the check is refreshed at the start of each job or batch, so once the
  migration lands a running process stores ``PROCESSING`` from its next job
  on, without a restart.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import psycopg

from imageopt.errors import SchemaTooOldError
from imageopt.migrate import current_version
from imageopt.status import ItemStatus, JobStatus

logger = logging.getLogger(__name__)

OLDEST_SUPPORTED_VERSION = 1

# What to store when the database's enum lacks a value, and the migration
# that brings the value.
_ITEM_FALLBACKS = {
    ItemStatus.PROCESSING: ItemStatus.RUNNING,
    ItemStatus.CANCELED: ItemStatus.FAILED,
}
_JOB_FALLBACKS = {JobStatus.CANCELED: JobStatus.FAILED}


@dataclass(frozen=True)
class SchemaState:
    """What one look at the database found."""

    version: int
    item_statuses: frozenset[str]
    job_statuses: frozenset[str]

    @property
    def missing_statuses(self) -> list[str]:
        """Statuses this code uses that the database's enums lack."""
        missing = [s for s in ItemStatus if s not in self.item_statuses]
        missing += [f"job {s}" for s in JobStatus if s not in self.job_statuses]
        return missing

    @property
    def compatibility_mode(self) -> bool:
        return bool(self.missing_statuses)

    def stored_item_status(self, status: ItemStatus) -> ItemStatus:
        """The value to write for ``status`` on this database."""
        if status in self.item_statuses:
            return status
        return _ITEM_FALLBACKS[status]

    def stored_job_status(self, status: JobStatus) -> JobStatus:
        if status in self.job_statuses:
            return status
        return _JOB_FALLBACKS[status]


def read_schema_state(conn: psycopg.Connection) -> SchemaState:
    """Look at the database's migration version and its status enums."""
    version = current_version(conn)
    rows = conn.execute(
        """
        SELECT t.typname, e.enumlabel
        FROM pg_enum e JOIN pg_type t ON t.oid = e.enumtypid
        WHERE t.typname IN ('item_status', 'job_status')
          AND t.typnamespace = 'public'::regnamespace
        """
    ).fetchall()
    labels = {"item_status": set(), "job_status": set()}
    for type_name, label in rows:
        labels[type_name].add(label)

    return SchemaState(
        version=version,
        item_statuses=frozenset(labels["item_status"]),
        job_statuses=frozenset(labels["job_status"]),
    )


class SchemaCheck:
    """The schema state a process writes against, refreshed at each job or batch.

    It warns once when it enters compatibility mode and once more (at INFO)
    when it leaves it, never on every write.
    """

    def __init__(self) -> None:
        self._state: SchemaState | None = None

    @property
    def state(self) -> SchemaState:
        if self._state is None:
            msg = "SchemaCheck.refresh() must run before the first write"
            raise RuntimeError(msg)
        return self._state

    def refresh(self, conn: psycopg.Connection) -> SchemaState:
        """Read the schema again; raise :class:`SchemaTooOldError` if unusable."""
        state = read_schema_state(conn)
        if state.version < OLDEST_SUPPORTED_VERSION:
            raise SchemaTooOldError(state.version, OLDEST_SUPPORTED_VERSION)

        previous, self._state = self._state, state
        was_compatible = previous is not None and previous.compatibility_mode
        if state.compatibility_mode and not was_compatible:
            logger.warning(
                "the database schema is at version %s and lacks the statuses %s: "
                "running in compatibility mode, writing RUNNING for PROCESSING "
                "(the saved prediction id tells the phases apart) and FAILED for "
                "CANCELED (the reason says canceled); run `imageopt migrate` to "
                "bring the schema up to date, no restart needed",
                state.version,
                ", ".join(state.missing_statuses),
            )
        elif was_compatible and not state.compatibility_mode:
            logger.info(
                "the database schema is now at version %s: compatibility mode "
                "ends, every status is written as it is",
                state.version,
            )

        return state
