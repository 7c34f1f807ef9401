"""Fairness: a store that submits late, behind another's backlog.

Store A submits 2,000 items and its job starts (``imageopt run``, a process
of its own); ten seconds after A's first create, store B submits 50 items and
its job starts in a second process. Both stores have weight 1. The provider
allows 240 creates a minute and 3,000 reads (``--create-limit 240``), which
admission also paces to (``IMAGEOPT_CREATES_PER_MINUTE=240``), and takes
``lognormal:1:0.3`` to predict (median 1 s). At that rate A alone would take
over eight minutes, so its items wait for the whole of B's run: the window in
which the two share the provider is B's whole life. Once B's items have all
ended, both processes are stopped (A's backlog is of no further interest).

Why 240 and not Replicate's 600: on a busy two-core machine one flow process
does not reach 600 items a minute (see ``bench/ceiling.py``). A store whose
flow cannot keep up does not wait at admission, and the other store rightly
gets the capacity it leaves; the rate must sit below what A's flow can do
for both stores to be waiting, which is what this measures.

Each round, one line:

- ``late_store_seconds``: from B's submission (its items' ``submitted``
  history rows) to B's last item completed;
- ``late_store_fair_seconds``: what B would take at exactly its weighted share
  of the provider's create rate (here half of 240 a minute) plus the median
  latency for its last prediction: ``50 / 2 + 1`` = 26 s;
- ``late_store_start_seconds``: from B's submission to its first create: the
  start of its process and flow run, and its first grant;
- ``late_store_create_seconds``: from B's first create to its last;
- ``jain_index``: Jain's fairness index, ``(sum x)^2 / (n * sum x^2)``, over
  each store's creates / its weight between B's first and last create (both
  stores wait throughout): 1.0 is an even share by weight, 0.5 one store
  served alone;
- ``a_creates``, ``b_creates``: the creates of each in that window;
- ``throttled``: 429s the provider answered.

    python -m bench fairness          # 3 rounds
    python -m bench fairness --quick  # 1 round
"""

from __future__ import annotations

import time

import psycopg

from bench.harness import (
    ChildRun,
    Environment,
    environment,
    finish_child,
    imageopt_run,
    prefect_server,
    start_child,
    submit_job,
    tiny_image,
)

A_ITEMS = 2_000
B_ITEMS = 50
STORES = {"Fairness A": 1, "Fairness B": 1}
LATE_BY = 10.0
CREATES_PER_MINUTE = 240
MEDIAN_LATENCY = 1.0
ROUNDS = 3
# How long B may take before the round is given up as broken.
B_TIMEOUT = 300.0

PROVIDER = (
    "--create-limit",
    str(CREATES_PER_MINUTE),
    "--read-limit",
    "3000",
    "--latency",
    f"lognormal:{MEDIAN_LATENCY:g}:0.3",
)
SETTINGS = {"IMAGEOPT_CREATES_PER_MINUTE": str(CREATES_PER_MINUTE)}


def run(quick: bool = False) -> list[dict]:
    results = []
    with prefect_server() as server:
        for round_ in range(1 if quick else ROUNDS):
            with environment(*PROVIDER, server=server) as env:
                measured = _run_round(env)
                throttled = env.provider.stats()["throttled"]
            results.append(
                {
                    "bench": "fairness",
                    "round": round_ + 1,
                    "a_items": A_ITEMS,
                    "b_items": B_ITEMS,
                    "weights": list(STORES.values()),
                    **measured,
                    "throttled": throttled,
                }
            )

    return results


def _run_round(env: Environment) -> dict:
    (store_a, weight_a), (store_b, weight_b) = STORES.items()
    source = str(tiny_image(env.workdir))
    job_a = submit_job(env.conninfo, store_a, [source] * A_ITEMS, format="jpeg")
    _set_weights(env.conninfo)
    runs: list[ChildRun] = []
    try:
        runs.append(_start(env, job_a))
        _wait_for_first_create(env.conninfo, job_a, runs[0])
        time.sleep(LATE_BY)
        job_b = submit_job(env.conninfo, store_b, [source] * B_ITEMS, format="jpeg")
        runs.append(_start(env, job_b))
        _wait_until_ended(env.conninfo, job_b, runs[1])
    finally:
        # The flows are stopped, not finished: timeout 0 stops them now.
        for child in runs:
            finish_child(child, timeout=0)

    return _measure(env.conninfo, job_a, job_b, weight_a, weight_b)


def _set_weights(conninfo: str) -> None:
    with psycopg.connect(conninfo, autocommit=True) as conn:
        for store, weight in STORES.items():
            conn.execute(
                "INSERT INTO stores (name, weight) VALUES (%s, %s)"
                " ON CONFLICT (name) DO UPDATE SET weight = EXCLUDED.weight",
                (store, weight),
            )


def _start(env: Environment, job_id: int) -> ChildRun:
    log = env.workdir / f"run-{job_id}.log"

    return start_child(imageopt_run(job_id), env.env(**SETTINGS), log)


def _wait_for_first_create(conninfo: str, job_id: int, child: ChildRun) -> None:
    query = (
        "SELECT 1 FROM item_history h JOIN items i ON i.id = h.item_id"
        " WHERE i.job_id = %s AND h.to_status = 'RUNNING' LIMIT 1"
    )
    _poll(conninfo, query, job_id, child, f"job {job_id}'s first create")


def _wait_until_ended(conninfo: str, job_id: int, child: ChildRun) -> None:
    query = (
        "SELECT 1 WHERE NOT EXISTS (SELECT 1 FROM items WHERE job_id = %s"
        " AND status::text IN ('PENDING', 'RUNNING', 'PROCESSING'))"
    )
    _poll(conninfo, query, job_id, child, f"job {job_id}'s last item")


def _poll(conninfo: str, query: str, job_id: int, child: ChildRun, what: str) -> None:
    deadline = time.monotonic() + B_TIMEOUT
    with psycopg.connect(conninfo, autocommit=True) as conn:
        while conn.execute(query, (job_id,)).fetchone() is None:
            if child.process is not None and child.process.poll() is not None:
                msg = f"the run of job {job_id} exited before {what}:\n{child.tail()}"
                raise RuntimeError(msg)
            if time.monotonic() > deadline:
                msg = f"no {what} within {B_TIMEOUT:.0f} s:\n{child.tail()}"
                raise RuntimeError(msg)
            time.sleep(0.2)


def _measure(
    conninfo: str, job_a: int, job_b: int, weight_a: int, weight_b: int
) -> dict:
    with psycopg.connect(conninfo) as conn:
        rows = conn.execute(
            """
            SELECT i.job_id, h.to_status::text, h.from_status::text,
                   extract(epoch FROM h.at)::float8
            FROM item_history h JOIN items i ON i.id = h.item_id
            WHERE i.job_id = ANY(%s)
            """,
            ([job_a, job_b],),
        ).fetchall()

    def times(job: int, to: str, old: str | None = None) -> list[float]:
        return sorted(
            at
            for job_id, new, was, at in rows
            if job_id == job and new == to and (old is None or was == old)
        )

    b_submitted = times(job_b, "PENDING")
    b_creates = times(job_b, "RUNNING", "PENDING")
    b_completed = times(job_b, "COMPLETED")
    a_creates = times(job_a, "RUNNING", "PENDING")
    first, last = b_creates[0], b_creates[-1]
    a_share = sum(1 for at in a_creates if first <= at <= last)
    b_share = len(b_creates)
    fair = B_ITEMS / (CREATES_PER_MINUTE / 60 * weight_b / (weight_a + weight_b))

    return {
        "b_completed": len(b_completed),
        "late_store_seconds": round(b_completed[-1] - b_submitted[0], 1),
        "late_store_fair_seconds": round(fair + MEDIAN_LATENCY, 1),
        "late_store_start_seconds": round(first - b_submitted[0], 1),
        "late_store_create_seconds": round(last - first, 1),
        "jain_index": _jain([a_share / weight_a, b_share / weight_b]),
        "a_creates": a_share,
        "b_creates": b_share,
    }


def _jain(shares: list[float]) -> float | None:
    squares = sum(x * x for x in shares)
    if not squares:
        return None

    return round(sum(shares) ** 2 / (len(shares) * squares), 3)
