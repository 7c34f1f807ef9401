"""The design of the system imageopt replaces, as a baseline: one asyncio worker.

No Prefect: one process picks pending items fairly across stores from
PostgreSQL and works on up to ``--concurrency`` of them at once, each
through the same steps as imageopt's pipeline, on the same tables:

1. claim: PENDING -> RUNNING, with its history row;
2. create the prediction, then RUNNING -> PROCESSING with its id;
3. poll every ``--poll-interval`` seconds until the prediction has ended;
4. download the output into ``IMAGEOPT_HOME/outputs``, at the path the
   pipeline would use, then PROCESSING -> COMPLETED with its sizes (or
   FAILED with the reason).

Each status change updates the item and appends to ``item_history`` in one
transaction, as :func:`imageopt.records.transition` does (without its legality
check: the conditional update only moves an item from the status expected).

The fair pick: pending items are read a page at a time in weighted
round-robin order across the stores that have any (a store of weight 2 gets
two turns for each of a weight-1 store's), and handed to the workers through
a queue no longer than the number of workers.

It runs against whatever ``IMAGEOPT_DATABASE_URL`` and
``IMAGEOPT_PROVIDER_URL`` name, until no item is pending or in flight, and
prints one JSON line of counts; ``bench/ceiling.py`` runs it side by side with
the Prefect flow::

    python -m bench.baseline --concurrency 100
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import mimetypes
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from psycopg import sql
from psycopg_pool import AsyncConnectionPool

from imageopt.storage import output_path

TERMINAL = {"succeeded", "failed", "canceled", "aborted"}
PAGE_SIZE = 100
CREATE_PATH = "/v1/models/imageopt/optimize/predictions"

PICK = """
SELECT id, source, job_id, store, params FROM (
    SELECT i.id, i.source, i.job_id, s.name AS store, j.params, s.weight, s.id AS sid,
           row_number() OVER (PARTITION BY s.id ORDER BY i.id) AS turn
    FROM items i
    JOIN jobs j ON j.id = i.job_id
    JOIN stores s ON s.id = j.store_id
    WHERE i.status = 'PENDING' AND NOT (i.id = ANY(%(queued)s))
) pending
WHERE turn <= %(page)s
ORDER BY turn::float8 / weight, sid
LIMIT %(page)s
"""


@dataclass(frozen=True)
class Item:
    id: int
    source: str
    job_id: int
    store: str
    params: dict[str, Any]


class Worker:
    """The old system's worker: a feeder, a queue and ``concurrency`` tasks."""

    def __init__(
        self,
        pool: AsyncConnectionPool,
        http: httpx.AsyncClient,
        outputs: Path,
        concurrency: int,
        poll_interval: float,
    ) -> None:
        self.pool = pool
        self.http = http
        self.outputs = outputs
        self.concurrency = concurrency
        self.poll_interval = poll_interval
        self.queue: asyncio.Queue[Item | None] = asyncio.Queue(concurrency)
        self.queued: set[int] = set()
        self.counts = {"completed": 0, "failed": 0, "skipped": 0}

    async def run(self) -> dict[str, int]:
        workers = [asyncio.create_task(self._work()) for _ in range(self.concurrency)]
        await self._feed()
        for _ in workers:
            await self.queue.put(None)
        await asyncio.gather(*workers)

        return self.counts

    async def _feed(self) -> None:
        """Put pending items on the queue, fairly across stores, until none is left."""
        while True:
            async with self.pool.connection() as conn:
                rows = await (
                    await conn.execute(
                        PICK, {"queued": list(self.queued), "page": PAGE_SIZE}
                    )
                ).fetchall()
            if not rows:
                return
            for row in rows:
                self.queued.add(row[0])
                await self.queue.put(Item(*row))

    async def _work(self) -> None:
        while (item := await self.queue.get()) is not None:
            try:
                outcome = await self._process(item)
            except (httpx.HTTPError, OSError, KeyError, ValueError) as exc:
                # The worker carries on with the next item, as the old one did.
                why = f"{type(exc).__name__}: {exc}"
                outcome = await self._fail(item, ("RUNNING", "PROCESSING"), why)
            self.counts[outcome] += 1

    async def _process(self, item: Item) -> str:
        claimed = await self._move(
            item.id, "PENDING", "RUNNING", "creating the prediction"
        )
        self.queued.discard(item.id)
        if not claimed:
            return "skipped"

        body = {"input": {"image": _data_uri(Path(item.source)), **item.params}}
        response = await self._send(
            "POST", CREATE_PATH, json=body, headers={"Cancel-After": "30m"}
        )
        if response.status_code != 201:
            return await self._fail(
                item, "RUNNING", f"create answered {response.status_code}"
            )
        prediction = response.json()
        await self._move(
            item.id,
            "RUNNING",
            "PROCESSING",
            f"prediction {prediction['id']} created",
            prediction_id=prediction["id"],
        )

        while prediction["status"] not in TERMINAL:
            await asyncio.sleep(self.poll_interval)
            response = await self._send("GET", f"/v1/predictions/{prediction['id']}")
            if response.status_code == 200:
                prediction = response.json()
        if prediction["status"] != "succeeded":
            why = f"prediction {prediction['id']} {prediction['status']}"
            return await self._fail(item, "PROCESSING", why)

        return await self._store(item, prediction)

    async def _store(self, item: Item, prediction: dict[str, Any]) -> str:
        output = prediction["output"]
        response = await self._send("GET", output["image"])
        if response.status_code != 200:
            why = f"output of {prediction['id']} answered {response.status_code}"
            return await self._fail(item, "PROCESSING", why)

        path = self.outputs / output_path(
            item.store, item.job_id, item.id, item.source, output["format"]
        )
        await asyncio.to_thread(_write, path, response.content)
        await self._move(
            item.id,
            "PROCESSING",
            "COMPLETED",
            f"stored {len(response.content):,} bytes at {path}",
            bytes_in=output.get("bytes_in"),
            bytes_out=len(response.content),
            output=str(path),
        )

        return "completed"

    async def _send(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        """One request; a 429 is waited out and sent again (nothing was done)."""
        while True:
            response = await self.http.request(method, url, **kwargs)
            if response.status_code != 429:
                return response
            await asyncio.sleep(float(response.headers.get("Retry-After", "1")))

    async def _fail(
        self, item: Item, current: str | tuple[str, ...], reason: str
    ) -> str:
        await self._move(item.id, current, "FAILED", reason, error=reason)

        return "failed"

    async def _move(
        self,
        item_id: int,
        current: str | tuple[str, ...],
        target: str,
        reason: str,
        **fields: Any,
    ) -> bool:
        """Move an item from ``current`` (a status, or any of several) to
        ``target``, with its history row; False if it was not there."""
        expected = [current] if isinstance(current, str) else list(current)
        assignments = [sql.SQL("status = %s"), sql.SQL("updated_at = now()")]
        values: list[Any] = [target]
        for column, value in fields.items():
            assignments.append(sql.SQL("{} = %s").format(sql.Identifier(column)))
            values.append(value)
        update = sql.SQL(
            "WITH old AS (SELECT id, status FROM items"
            " WHERE id = %s AND status::text = ANY(%s) FOR UPDATE)"
            " UPDATE items SET {} FROM old WHERE items.id = old.id"
            " RETURNING old.status"
        ).format(sql.SQL(", ").join(assignments))
        async with self.pool.connection() as conn, conn.transaction():
            cursor = await conn.execute(update, [item_id, expected, *values])
            row = await cursor.fetchone()
            if row is None:
                return False
            await conn.execute(
                "INSERT INTO item_history (item_id, from_status, to_status, reason)"
                " VALUES (%s, %s, %s, %s)",
                (item_id, row[0], target, reason),
            )

        return True


def _data_uri(path: Path) -> str:
    mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"

    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


async def _main(args: argparse.Namespace) -> dict[str, Any]:
    began = time.monotonic()
    pool = AsyncConnectionPool(
        os.environ["IMAGEOPT_DATABASE_URL"],
        min_size=4,
        max_size=8,
        kwargs={"autocommit": True},
        open=False,
    )
    await pool.open(wait=True)
    limits = httpx.Limits(
        max_connections=args.concurrency, max_keepalive_connections=args.concurrency
    )
    try:
        async with httpx.AsyncClient(
            base_url=os.environ["IMAGEOPT_PROVIDER_URL"], limits=limits, timeout=30
        ) as http:
            outputs = Path(os.environ["IMAGEOPT_HOME"]) / "outputs"
            worker = Worker(pool, http, outputs, args.concurrency, args.poll_interval)
            counts = await worker.run()
    finally:
        await pool.close()

    return {**counts, "seconds": round(time.monotonic() - began, 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.baseline", description=__doc__
    )
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--poll-interval", type=float, default=0.5)
    args = parser.parse_args(argv)
    print(json.dumps(asyncio.run(_main(args))), flush=True)

    return 0


if __name__ == "__main__":
    sys.exit(main())
