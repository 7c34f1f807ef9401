"""What jobs achieved: the figures ``imageopt report`` prints.

A job's summary counts its items by status and adds up the bytes before and
after over the completed ones; ``predictions`` is how many predictions were
made for it, which is what the provider bills. An item's row adds how long it
took, from its submission to its final status, read from its history.
"""

from __future__ import annotations

from typing import Any

import psycopg

from imageopt.jobs import display_name, load_job
from imageopt.status import logical_status

SUMMARY_KEYS = (
    "job",
    "store",
    "status",
    "items",
    "completed",
    "failed",
    "canceled",
    "unfinished",
    "predictions",
    "bytes_in",
    "bytes_out",
    "saving",
    "submitted_at",
    "seconds",
)

ITEM_KEYS = (
    "item",
    "file",
    "status",
    "prediction_id",
    "bytes_in",
    "bytes_out",
    "saving",
    "seconds",
    "output",
    "reason",
)

_SUMMARY = """
SELECT j.id, s.name, j.status::text, count(i.id),
       count(*) FILTER (WHERE i.status::text = 'COMPLETED'),
       count(*) FILTER (WHERE i.status::text = 'FAILED'),
       count(*) FILTER (WHERE i.status::text = 'CANCELED'),
       count(*) FILTER (WHERE i.status::text IN ('PENDING', 'RUNNING', 'PROCESSING')),
       count(i.prediction_id),
       coalesce(sum(i.bytes_in) FILTER (WHERE i.status::text = 'COMPLETED'),
                0)::bigint,
       coalesce(sum(i.bytes_out) FILTER (WHERE i.status::text = 'COMPLETED'),
                0)::bigint,
       j.created_at,
       extract(epoch FROM max(i.updated_at) - j.created_at)::float8
FROM jobs j
JOIN stores s ON s.id = j.store_id
LEFT JOIN items i ON i.job_id = j.id
WHERE (%(job)s::bigint IS NULL OR j.id = %(job)s)
  AND (%(store)s::text IS NULL OR s.name = %(store)s)
GROUP BY j.id, s.name
ORDER BY j.id DESC
LIMIT %(limit)s
"""


def job_summaries(
    conn: psycopg.Connection, *, store: str | None = None, limit: int = 20
) -> list[dict[str, Any]]:
    """The latest ``limit`` jobs, of ``store`` if given, newest first."""
    return _summaries(conn, job=None, store=store, limit=limit)


def job_summary(conn: psycopg.Connection, job_id: int) -> dict[str, Any]:
    load_job(conn, job_id)  # an unknown job is refused with a clear message
    (summary,) = _summaries(conn, job=job_id, store=None, limit=1)
    return summary


def _summaries(conn: psycopg.Connection, **where: Any) -> list[dict[str, Any]]:
    summaries = []
    for row in conn.execute(_SUMMARY, where).fetchall():
        summary = dict(zip(SUMMARY_KEYS[:11] + SUMMARY_KEYS[12:], row, strict=True))
        summary["saving"] = saving(summary["bytes_in"], summary["bytes_out"])
        summary["submitted_at"] = summary["submitted_at"].isoformat(timespec="seconds")
        summary["seconds"] = round(summary["seconds"] or 0.0, 1)
        summaries.append({key: summary[key] for key in SUMMARY_KEYS})
    return summaries


def item_rows(conn: psycopg.Connection, job_id: int) -> list[dict[str, Any]]:
    """Every item of the job with its outcome and how long it took."""
    rows = conn.execute(
        "SELECT i.id, i.source, i.status::text, i.prediction_id, i.bytes_in,"
        " i.bytes_out, extract(epoch FROM i.updated_at - i.created_at)::float8,"
        " i.output, i.error FROM items i WHERE i.job_id = %s ORDER BY i.id",
        (job_id,),
    ).fetchall()
    items = []
    for item_id, source, status, prediction_id, bytes_in, bytes_out, *rest in rows:
        seconds, output, error = rest
        final = logical_status(status, prediction_id)
        items.append(
            {
                "item": item_id,
                "file": display_name(source),
                "status": str(final),
                "prediction_id": prediction_id or "",
                "bytes_in": bytes_in or "",
                "bytes_out": bytes_out or "",
                "saving": saving(bytes_in, bytes_out),
                "seconds": round(seconds, 1) if final.is_final else "",
                "output": output or "",
                "reason": error or "",
            }
        )
    return items


def saving(before: int | None, after: int | None) -> str:
    """The share of ``before`` saved, as text: ``"91.3%"``; empty if unknown."""
    if not before or after is None:
        return ""
    return f"{100 * (1 - after / before):.1f}%"
