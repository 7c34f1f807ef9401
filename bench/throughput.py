"""Throughput: three stores' jobs at once, against a provider at Replicate's limits.

N items (1,800; 150 with ``--quick``) are split into three jobs, one per store,
submitted together; three ``imageopt run JOB`` processes, one per job, start
together and share the database, so admission paces them as one. The provider
allows 600 creates and 3,000 reads a minute (its burst: 10 s of each) and
takes ``lognormal:3:0.3`` to predict (median 3 s). The same run is made twice,
each on a fresh database, Prefect server and provider:

- ``pacing: "admission"``: ``IMAGEOPT_CREATES_PER_MINUTE=600``, the rest of
  admission's settings at their defaults (3,000 reads a minute, 100
  predictions in flight, a burst of 3 s);
- ``pacing: "tag"``: admission effectively off (a million creates and reads a
  minute, 300 in flight: predictions in flight stay near rate x latency,
  about 40, so that bound never binds) and a Prefect tag concurrency limit of
  10 on ``imageopt-create-prediction`` instead. A create task runs for well
  under 0.1 s here (Prefect recorded a median of 0.05 s; the claim and the
  request within it take about 0.01 s), so 10 at once would allow over 100
  creates a second, ten times the 600 a minute the provider takes: what
  paces the run is how Prefect hands the slots out (a task that finds the
  limit full waits the server's Retry-After, up to 10 s). The tag run stops
  after ``TAG_BUDGET`` seconds (30 quick, 300 full) and then reports the
  items it finished in that time, with ``partial: true``.

Both runs share one Prefect server (the tag limit is made only for the
second); each has its own database and provider.

Each line is measured from the database afterwards (each item's history):

- ``items_per_minute``: items completed / the time from the first create
  (an item's PENDING -> RUNNING) to the last completion, or to the end of
  the budget for a partial run;
- ``utilization``: creates a minute between the first and last tenth of the
  creates (the steady part; the slope of a line fitted through their times),
  / 600;
- ``p50_item_seconds``, ``p95_item_seconds``: from an item's first RUNNING to
  its COMPLETED;
- ``throttled`` and ``creates``: the provider's own counters (``/_stats``);
- ``seconds``: the three processes' wall time, from their start to the last
  one's exit (their start-up and their wait for the history included);
- ``history_lag_seconds``: from the last completion until the three
  processes had exited. ``imageopt run`` ends once the Prefect server has
  recorded every task run of its flow run, or after waiting 300 s for it;
  ``unrecorded_task_runs`` counts those still unfinished on the server then.
  Neither is measured for a partial run, whose flow runs were stopped;
- ``server_cpu_ms_per_item``: the Prefect server's CPU time (every process
  of it) from the three processes' start to their exit, / items;
- ``states_per_item``: the task-run states the server holds for the three
  flow runs, read through the API as the UI reads them, / items (six when
  no poll retried; not measured for a partial run).

    python -m bench throughput          # 1,800 items each way
    python -m bench throughput --quick  # 150 items; the tag run stops at 30 s
"""

from __future__ import annotations

import contextlib
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import psycopg

from bench.harness import (
    Environment,
    PrefectServer,
    environment,
    prefect_server,
    states_per_item,
    submit_job,
    tiny_image,
    unrecorded_task_runs,
)
from flows.optimize_job import CREATE_TAG

ITEMS = 1_800
QUICK_ITEMS = 150
STORES = ("Throughput A", "Throughput B", "Throughput C")
CREATES_PER_MINUTE = 600
TAG_LIMIT = 10
TAG_BUDGET = {True: 30.0, False: 300.0}

PROVIDER = (
    "--create-limit",
    str(CREATES_PER_MINUTE),
    "--read-limit",
    "3000",
    "--latency",
    "lognormal:3:0.3",
)

PACINGS = {
    "admission": {"IMAGEOPT_CREATES_PER_MINUTE": str(CREATES_PER_MINUTE)},
    "tag": {
        "IMAGEOPT_CREATES_PER_MINUTE": "1000000",
        "IMAGEOPT_READS_PER_MINUTE": "1000000",
        "IMAGEOPT_MAX_IN_FLIGHT": "300",
    },
}


def run(quick: bool = False) -> list[dict]:
    items = QUICK_ITEMS if quick else ITEMS
    results = []
    with prefect_server() as server:
        for pacing, settings in PACINGS.items():
            results.append(_run_paced(server, pacing, settings, items, quick))

    return results


def _run_paced(
    server: PrefectServer,
    pacing: str,
    settings: dict[str, str],
    items: int,
    quick: bool,
) -> dict:
    """One run, paced by admission or by a Prefect tag limit."""
    budget = TAG_BUDGET[quick] if pacing == "tag" else None
    with contextlib.ExitStack() as stack:
        env = stack.enter_context(environment(*PROVIDER, server=server))
        if pacing == "tag":
            stack.enter_context(_creates_limited_by_tag(env, TAG_LIMIT))
        job_ids = _submit_jobs(env, items)
        server_cpu = server.cpu_seconds()
        since = datetime.now(UTC)
        runs = _run_jobs(env, job_ids, settings, budget)
        server_cpu = server.cpu_seconds() - server_cpu
        stats = env.provider.stats()
        measured = _measure(env.conninfo, job_ids, runs)
        # A stopped run's history is not complete: neither figure would mean
        # anything.
        unrecorded = states = None
        if not runs.partial:
            unrecorded = unrecorded_task_runs(env.server, job_ids, since)
            states = states_per_item(env.server.url, job_ids, items, since)
    result = {
        "bench": "throughput",
        "pacing": pacing,
        "items": items,
        **measured,
        "server_cpu_ms_per_item": round(1000 * server_cpu / items, 1),
        "states_per_item": states,
        "throttled": stats["throttled"],
        "creates": stats["creates"],
        "seconds": round(runs.seconds, 1),
        "unrecorded_task_runs": unrecorded,
        "partial": runs.partial,
    }
    if pacing == "tag":
        result["tag_limit"] = TAG_LIMIT
        result["budget_seconds"] = budget

    return result


@contextlib.contextmanager
def _creates_limited_by_tag(env: Environment, limit: int) -> Iterator[None]:
    """A Prefect tag limit on creates, removed afterwards: the server may be
    shared with other benchmarks."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with (
        temporary_settings({PREFECT_API_URL: env.prefect_url}),
        get_client(sync_client=True) as client,
    ):
        client.create_concurrency_limit(tag=CREATE_TAG, concurrency_limit=limit)
        try:
            yield
        finally:
            client.delete_concurrency_limit_by_tag(tag=CREATE_TAG)


def _submit_jobs(env: Environment, items: int) -> list[int]:
    """One job a store, the items split evenly."""
    source = str(tiny_image(env.workdir))
    sizes = [items // len(STORES)] * len(STORES)
    sizes[0] += items - sum(sizes)

    return [
        submit_job(env.conninfo, store, [source] * size, format="jpeg")
        for store, size in zip(STORES, sizes, strict=True)
    ]


@dataclass
class Runs:
    """Three ``imageopt run`` processes, from start to end or to the budget."""

    seconds: float
    # Wall-clock time (the database's clock too) when they ended or were stopped.
    ended_at: float
    partial: bool


def _run_jobs(
    env: Environment,
    job_ids: list[int],
    settings: dict[str, str],
    budget: float | None,
) -> Runs:
    """Run every job at once, each in its own process; stop them after ``budget``."""
    began = time.monotonic()
    processes = []
    for job_id in job_ids:
        log = env.workdir / f"run-{job_id}.log"
        with log.open("w") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "imageopt", "run", str(job_id)],
                env={**env.env(), "IMAGEOPT_HOME": str(env.workdir), **settings},
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        processes.append((process, log))

    partial = False
    for process, _ in processes:
        left = None if budget is None else max(0.0, began + budget - time.monotonic())
        try:
            process.wait(left)
        except subprocess.TimeoutExpired:
            partial = True
            break
    ended_at = time.time()
    seconds = time.monotonic() - began
    if partial:
        for process, _ in processes:
            _stop(process)

    for (process, log), job_id in zip(processes, job_ids, strict=True):
        if not partial and process.returncode != 0:
            tail = _tail(log)
            raise RuntimeError(f"the run of job {job_id} failed:\n{tail}")

    return Runs(seconds=seconds, ended_at=ended_at, partial=partial)


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _tail(log: Path, chars: int = 3000) -> str:
    return log.read_text(errors="replace")[-chars:]


def _measure(conninfo: str, job_ids: list[int], runs: Runs) -> dict:
    """Rates and item times from the items' history."""
    with psycopg.connect(conninfo) as conn:
        rows = conn.execute(
            """
            SELECT h.item_id, h.from_status::text, h.to_status::text,
                   extract(epoch FROM h.at)::float8
            FROM item_history h JOIN items i ON i.id = h.item_id
            WHERE i.job_id = ANY(%s)
            ORDER BY h.at
            """,
            (job_ids,),
        ).fetchall()

    creates = sorted(
        at for _, old, new, at in rows if (old, new) == ("PENDING", "RUNNING")
    )
    started: dict[int, float] = {}
    completed: dict[int, float] = {}
    for item_id, _, new, at in rows:
        if new == "RUNNING":
            started.setdefault(item_id, at)
        elif new == "COMPLETED":
            completed[item_id] = at
    item_seconds = sorted(at - started[item_id] for item_id, at in completed.items())

    last = max(completed.values(), default=0.0)
    end = runs.ended_at if runs.partial else last
    span = end - creates[0] if creates else 0.0

    return {
        "completed": len(completed),
        "items_per_minute": round(60.0 * len(completed) / span, 1) if span else 0.0,
        "utilization": _utilization(creates),
        "p50_item_seconds": _percentile(item_seconds, 50),
        "p95_item_seconds": _percentile(item_seconds, 95),
        "history_lag_seconds": None if runs.partial else round(runs.ended_at - last, 1),
    }


def _utilization(creates: list[float]) -> float | None:
    """Creates a minute in the steady part (the middle 80 %), / the rate.

    The rate is the slope of a line fitted through the creates' times, not
    their count over the span from the first to the last: a create is
    recorded a moment after its grant, by a moment that varies on a busy
    machine, and a late first or early last one alone would move the span.
    """
    tenth = len(creates) // 10
    steady = creates[tenth : len(creates) - tenth]
    if len(steady) < 2 or steady[-1] == steady[0]:
        return None
    fit = statistics.linear_regression(steady, range(len(steady)))

    return round(60.0 * fit.slope / CREATES_PER_MINUTE, 3)


def _percentile(values: list[float], percent: int) -> float | None:
    if len(values) < 2:
        return round(values[0], 2) if values else None

    return round(statistics.quantiles(values, n=100)[percent - 1], 2)
