"""Jobs and their items: submitting, reading back, and what a run works on.

A job is one store's batch of images; an item is one image of it, whose
source is an http(s) URL or the path of a local file. Local files are read
where the flow runs, so a flow on another machine needs them on a shared path.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import psycopg
from PIL import Image, UnidentifiedImageError

from imageopt.errors import InvalidRequestError, NotFoundError
from imageopt.optimizer import (
    READABLE,
    READABLE_NAMES,
    OptimizeOptions,
    describe_start,
)
from imageopt.records import create_job, ensure_store, transition
from imageopt.schema import SchemaState
from imageopt.status import ItemStatus, logical_status

IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".avif", ".gif", ".bmp", ".tif", ".tiff"}
)


@dataclass(frozen=True)
class Job:
    id: int
    store: str
    store_id: int
    status: str
    params: dict[str, Any]

    @property
    def options(self) -> OptimizeOptions:
        return OptimizeOptions(**self.params)


@dataclass(frozen=True)
class Item:
    id: int
    job_id: int
    source: str
    status: ItemStatus
    prediction_id: str | None

    @property
    def filename(self) -> str:
        """The source's last path segment, for people and task names."""
        return display_name(self.source)


def display_name(source: str) -> str:
    path = urlsplit(source).path if is_url(source) else source
    return PurePosixPath(path.rstrip("/")).name or source


def is_url(source: str) -> bool:
    return urlsplit(source).scheme in ("http", "https")


def expand_sources(arguments: Iterable[str]) -> Iterator[str]:
    """Each image source an argument names.

    An argument is an http(s) URL, an image file, a folder (its image files,
    sorted, not recursing), or ``@list.txt`` with one source a line.
    """
    for argument in arguments:
        if argument.startswith("@"):
            yield from _sources_in_list(Path(argument[1:]))
        elif is_url(argument):
            yield argument
        else:
            yield from _sources_at_path(Path(argument))


def _sources_in_list(path: Path) -> Iterator[str]:
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        msg = f"cannot read the source list {path}: {exc.strerror}"
        raise InvalidRequestError(msg) from exc
    for line in lines:
        line = line.strip()
        if line and not line.startswith("#"):
            yield from expand_sources([line])


def _sources_at_path(path: Path) -> Iterator[str]:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        yield from (str(p.absolute()) for p in files)
    elif path.exists():
        yield str(path.absolute())
    else:
        msg = (
            f"no such file or folder: {path} (a source is an image file, a "
            "folder, an http(s) URL or @list.txt)"
        )
        raise InvalidRequestError(msg)


def local_file_problem(path: Path, max_bytes: int) -> str | None:
    """Why a local file cannot be optimized, or None when it looks like an image.

    Only the header is read: this is a cheap check at submission that spares
    a paid prediction for a file that is certainly broken. Damage deeper in
    the file is found by the optimizer.
    """
    try:
        size = path.stat().st_size
    except OSError as exc:
        return f"cannot read {path.name}: {exc.strerror}"
    if size == 0:
        return f"{path.name} is empty (0 bytes): export or upload the image again"
    if size > max_bytes:
        return (
            f"{path.name} is {size:,} bytes, over the limit of {max_bytes:,}: "
            "send a smaller file"
        )
    try:
        # The formats the optimizer reads, so that what passes here is what
        # the provider's optimizer can open.
        with Image.open(path, formats=READABLE) as image:
            image.size  # noqa: B018 - reading the header is the check
    except UnidentifiedImageError:
        return (
            f"{path.name} is not an image imageopt can read "
            f"({_describe_file_start(path)}): upload a {READABLE_NAMES} file"
        )
    except (OSError, Image.DecompressionBombError) as exc:
        return f"{path.name} cannot be read as an image: {exc}"

    return None


def _describe_file_start(path: Path) -> str:
    try:
        with path.open("rb") as file:
            return describe_start(file.read(512))
    except OSError as exc:
        return f"cannot read it: {exc.strerror}"


def submit(
    conn: psycopg.Connection,
    schema: SchemaState,
    store: str,
    sources: list[str],
    options: OptimizeOptions,
    *,
    max_input_bytes: int,
) -> int:
    """Create the store if new, the job and one item per source; return the job id.

    A local file that is certainly not a readable image still becomes an
    item, failed at once with the reason, so the rest of the job goes ahead.
    """
    if not sources:
        msg = f"a job for store {store!r} needs at least one image"
        raise InvalidRequestError(msg)

    store_id = ensure_store(conn, store)
    params = options.model_dump(exclude_none=True)
    job_id = create_job(conn, store_id, sources, params)

    problems = {
        source: problem
        for source in sources
        if not is_url(source)
        and (problem := local_file_problem(Path(source), max_input_bytes))
    }
    if problems:
        for item in items_of(conn, job_id):
            if item.source in problems:
                transition(
                    conn,
                    schema,
                    item.id,
                    ItemStatus.FAILED,
                    reason=problems[item.source],
                    error=problems[item.source],
                )

    return job_id


def load_job(conn: psycopg.Connection, job_id: int) -> Job:
    row = conn.execute(
        "SELECT j.id, s.name, s.id, j.status, j.params FROM jobs j"
        " JOIN stores s ON s.id = j.store_id WHERE j.id = %s",
        (job_id,),
    ).fetchone()
    if row is None:
        msg = f"there is no job {job_id}: check the number `imageopt submit` printed"
        raise NotFoundError(msg)

    return Job(*row)


def get_item(conn: psycopg.Connection, item_id: int) -> Item:
    row = conn.execute(
        "SELECT id, job_id, source, status, prediction_id FROM items WHERE id = %s",
        (item_id,),
    ).fetchone()
    if row is None:
        msg = f"there is no item {item_id}"
        raise NotFoundError(msg)

    return _item(row)


def _item(row: tuple) -> Item:
    id, job_id, source, status, prediction_id = row
    return Item(
        id, job_id, source, logical_status(status, prediction_id), prediction_id
    )


def items_of(
    conn: psycopg.Connection,
    job_id: int,
    *,
    statuses: Iterable[str] | None = None,
    after_id: int = 0,
    limit: int | None = None,
) -> list[Item]:
    """A job's items in id order, optionally only those stored with ``statuses``."""
    query = (
        "SELECT id, job_id, source, status, prediction_id FROM items"
        " WHERE job_id = %s AND id > %s"
    )
    params: list[Any] = [job_id, after_id]
    if statuses is not None:
        query += " AND status::text = ANY(%s)"
        params.append(list(statuses))
    query += " ORDER BY id"
    if limit is not None:
        query += " LIMIT %s"
        params.append(limit)

    return [_item(row) for row in conn.execute(query, params).fetchall()]


def status_counts(conn: psycopg.Connection, job_id: int) -> dict[str, int]:
    rows = conn.execute(
        "SELECT status::text, prediction_id IS NOT NULL, count(*) FROM items"
        " WHERE job_id = %s GROUP BY 1, 2",
        (job_id,),
    ).fetchall()
    counts = {status: 0 for status in ItemStatus}
    for stored, has_prediction, count in rows:
        status = logical_status(stored, "x" if has_prediction else None)
        counts[status] += count
    return {str(k): v for k, v in counts.items()}


def job_report(conn: psycopg.Connection, job_id: int) -> dict[str, Any]:
    """The job and every item, as ``imageopt status --json`` prints them."""
    job = load_job(conn, job_id)
    keys = ("id", "source", "status", "prediction_id")
    keys += ("bytes_in", "bytes_out", "output", "error")
    rows = conn.execute(
        "SELECT id, source, status::text, prediction_id, bytes_in, bytes_out,"
        " output, error FROM items WHERE job_id = %s ORDER BY id",
        (job_id,),
    ).fetchall()
    items = []
    for row in rows:
        item = dict(zip(keys, row, strict=True))
        item["status"] = str(logical_status(item["status"], item["prediction_id"]))
        items.append(item)

    return {
        "job": {
            "id": job.id,
            "store": job.store,
            "status": job.status,
            "params": job.params,
            "counts": status_counts(conn, job_id),
        },
        "items": items,
    }


def dumps(report: dict[str, Any]) -> str:
    return json.dumps(report, ensure_ascii=False, indent=2)


# The first key of the two-part advisory lock a flow run holds on its job;
# any fixed number works, as long as nothing else in the database uses it.
_JOB_LOCK_CLASS = 0x696D6A62


@contextmanager
def job_lock(conninfo: str, job_id: int, on_wait: Callable[[], None]) -> Iterator[None]:
    """Hold the job for one flow run at a time, on a connection of its own.

    A second run of the same job waits here (calling ``on_wait`` first) until
    the first ends; if the first run's process dies, PostgreSQL drops its
    connection and with it the lock, so a restarted run takes over at once.

    Known gap: when that connection is lost while the run goes on (PostgreSQL
    restarted, the backend terminated), the lock goes with it unnoticed, and a
    second run started meanwhile would not wait. Claims stay single (each is a
    checked transition), but the second run could settle an item the first is
    still creating and create it again. Taking the lock again once the
    database is back would close the gap.
    """
    with psycopg.connect(conninfo, autocommit=True) as conn:
        key = _job_lock_key(job_id)
        (taken,) = conn.execute("SELECT pg_try_advisory_lock(%s, %s)", key).fetchone()
        if not taken:
            on_wait()
            conn.execute("SELECT pg_advisory_lock(%s, %s)", key)
        yield


def job_is_held(conn: psycopg.Connection, job_id: int) -> bool:
    """Whether a live flow run holds the job (see :func:`job_lock`)."""
    (held,) = conn.execute(
        "SELECT EXISTS (SELECT FROM pg_locks WHERE locktype = 'advisory'"
        " AND granted AND database = (SELECT oid FROM pg_database"
        " WHERE datname = current_database())"
        " AND classid = %s::bigint::oid AND objid = %s::bigint::oid"
        " AND objsubid = 2)",
        _job_lock_key(job_id),
    ).fetchone()
    return held


def _job_lock_key(job_id: int) -> tuple[int, int]:
    return (_JOB_LOCK_CLASS, job_id % 2**31)
