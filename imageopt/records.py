"""The system of record: stores, jobs, items and every item's history.

Every status change goes through :func:`transition`, which checks it against
the rules in :mod:`imageopt.status`, stores what the database's schema allows
(see :mod:`imageopt.schema`), and writes the item and its history row in one
transaction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from imageopt.errors import InvalidRequestError, NotFoundError
from imageopt.schema import SchemaState
from imageopt.status import (
    ItemStatus,
    check_transition,
    derive_job_status,
    logical_status,
)

# Columns a transition may set besides the status; anything else is refused.
_ITEM_FIELDS = frozenset({"prediction_id", "bytes_in", "bytes_out", "output", "error"})


@dataclass(frozen=True)
class Transition:
    """One status change as it was written."""

    item_id: int
    from_status: ItemStatus
    to_status: ItemStatus
    stored_status: ItemStatus


def ensure_store(conn: psycopg.Connection, name: str, *, weight: int = 1) -> int:
    """The id of the store called ``name``, created with ``weight`` if new."""
    if not name.strip():
        msg = "a store needs a name that is not blank"
        raise InvalidRequestError(msg)

    row = conn.execute(
        """
        INSERT INTO stores (name, weight) VALUES (%s, %s)
        ON CONFLICT (name) DO UPDATE SET name = EXCLUDED.name
        RETURNING id
        """,
        (name, weight),
    ).fetchone()

    return row[0]


def create_job(
    conn: psycopg.Connection,
    store_id: int,
    sources: list[str],
    params: dict[str, Any],
) -> int:
    """Create a job of one item per source, all PENDING; return the job id."""
    with conn.transaction():
        (job_id,) = conn.execute(
            "INSERT INTO jobs (store_id, params) VALUES (%s, %s) RETURNING id",
            (store_id, Jsonb(params)),
        ).fetchone()
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO items (job_id, source) VALUES (%s, %s)",
                [(job_id, source) for source in sources],
            )
            # History starts at creation so a store sees every step.
            cur.execute(
                """
                INSERT INTO item_history (item_id, from_status, to_status, reason)
                SELECT id, NULL, 'PENDING', 'submitted' FROM items WHERE job_id = %s
                """,
                (job_id,),
            )

    return job_id


def transition(
    conn: psycopg.Connection,
    schema: SchemaState,
    item_id: int,
    target: ItemStatus,
    *,
    reason: str,
    **fields: Any,
) -> Transition:
    """Move an item to ``target``, writing the item and its history together.

    ``fields`` sets item columns in the same transaction: ``prediction_id``
    (required when entering PROCESSING), ``bytes_in``, ``bytes_out``,
    ``output``, ``error``. Raises :class:`IllegalTransitionError` for a change
    the status rules refuse, and :class:`NotFoundError` for an unknown item.
    """
    unknown = set(fields) - _ITEM_FIELDS
    if unknown:
        msg = f"item {item_id}: cannot set {', '.join(sorted(unknown))}"
        raise InvalidRequestError(msg)
    if target is ItemStatus.PROCESSING and not fields.get("prediction_id"):
        msg = f"item {item_id}: PROCESSING is written with its prediction id"
        raise InvalidRequestError(msg)

    stored = schema.stored_item_status(target)
    if stored is not target:
        version = schema.version
        reason = f"{reason} ({target} stored as {stored}: schema version {version})"

    with conn.transaction():
        row = conn.execute(
            "SELECT status, prediction_id FROM items WHERE id = %s FOR UPDATE",
            (item_id,),
        ).fetchone()
        if row is None:
            msg = f"there is no item {item_id}"
            raise NotFoundError(msg)

        current = logical_status(row[0], row[1])
        check_transition(item_id, current, target)

        assignments = [sql.SQL("status = %s"), sql.SQL("updated_at = now()")]
        values: list[Any] = [stored]
        for column, value in fields.items():
            assignments.append(sql.SQL("{} = %s").format(sql.Identifier(column)))
            values.append(value)
        conn.execute(
            sql.SQL("UPDATE items SET {} WHERE id = %s").format(
                sql.SQL(", ").join(assignments)
            ),
            [*values, item_id],
        )
        conn.execute(
            "INSERT INTO item_history (item_id, from_status, to_status, reason)"
            " VALUES (%s, %s, %s, %s)",
            (item_id, row[0], stored, reason),
        )

    return Transition(item_id, current, target, stored)


def item_history(conn: psycopg.Connection, item_id: int) -> list[tuple]:
    """An item's history, oldest first: (from, to, at, reason) rows."""
    return conn.execute(
        "SELECT from_status, to_status, at, reason FROM item_history"
        " WHERE item_id = %s ORDER BY at, id",
        (item_id,),
    ).fetchall()


def refresh_job_status(
    conn: psycopg.Connection, schema: SchemaState, job_id: int
) -> str:
    """Derive the job's status from its items, store it, and return it."""
    rows = conn.execute(
        "SELECT status, prediction_id FROM items WHERE job_id = %s", (job_id,)
    ).fetchall()
    status = derive_job_status(logical_status(s, p) for s, p in rows)
    stored = schema.stored_job_status(status)
    conn.execute(
        "UPDATE jobs SET status = %s, updated_at = now() WHERE id = %s",
        (stored, job_id),
    )

    return stored
