"""History: items a minute, counted only once the Prefect server has recorded them.

One job of N items (1,800; 150 with ``--quick``) runs as one flow run against
a provider that allows Replicate's 600 creates a minute and takes
``lognormal:3:0.3`` to predict (median 3 s); admission paces the creates at
600 a minute. The run counts as finished only when the Prefect server has
recorded every task run of the flow run: two an item, none of them left in a
state that is not final. The Prefect API is asked every half second.

The same run is made once per server setup, side by side, each on a fresh
database, Prefect database, provider and broker:

- ``server: "single"``: ``prefect server start``, API and services in one
  process, with Prefect's in-memory message broker (what imageopt ran before);
- ``server: "split"``: the API (``prefect server start --no-services``) and
  the services (``prefect server services start``) in processes of their own,
  sharing a Redis broker, with the settings :mod:`imageopt.services` chooses.

Each line:

- ``items_per_minute``: at the flow; items completed / the time from the
  first create (an item's PENDING -> RUNNING) to the last completion;
- ``items_per_minute_history_complete``: items / the time from the first
  create until the server had recorded every task run;
- ``history_lag_seconds``: from the last completion until then;
- ``server_cpu_ms_per_item``: the CPU time of every server process (API, its
  workers, services), from the flow's start until then, / items;
- ``flow_cpu_ms_per_item``: the flow process's CPU time while the flow ran
  (its start-up left out), / items;
- ``states_per_item``: the task-run states the server holds for the flow
  run, read through the API task run by task run, / items;
- ``history_complete``: false when the server had still not recorded every
  task run ``HISTORY_TIMEOUT`` seconds after the flow ended, or had recorded
  nothing new for ``HISTORY_STALL`` seconds after it ended (the figures that
  depend on it are then null).

    python -m bench history          # 1,800 items on each setup
    python -m bench history --quick  # 150 items on each setup
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg.conninfo import conninfo_to_dict

from bench.harness import (
    _admin_conninfo,
    _fresh_database,
    count_states,
    flow_runs_of,
    submit_job,
    tiny_image,
)
from imageopt.migrate import run_migrations
from imageopt.services import PrefectServerProcess, ProviderProcess

ITEMS = 1_800
QUICK_ITEMS = 150
CREATES_PER_MINUTE = 600
STORE = "History"

PROVIDER = (
    "--create-limit",
    str(CREATES_PER_MINUTE),
    "--read-limit",
    "3000",
    "--latency",
    "lognormal:3:0.3",
)

# Keyword arguments of PrefectServerProcess for each setup compared.
SETUPS = {"single": {"split": False, "tuned": False}, "split": {}}

# How long after the flow ends the server may take to record the history
# before the run is reported incomplete; and how long it may go without
# recording anything new, once the flow has ended, before that.
HISTORY_TIMEOUT = 600.0
HISTORY_STALL = 60.0

# Task-run states the server has not seen the end of; SCHEDULED covers a poll
# waiting for its retry.
UNFINISHED = ["SCHEDULED", "PENDING", "RUNNING", "PAUSED", "CANCELLING"]


def run(quick: bool = False) -> list[dict]:
    items = QUICK_ITEMS if quick else ITEMS
    results = []
    for setup, options in SETUPS.items():
        with _environment(options) as env:
            job_id = submit_job(
                env.conninfo, STORE, [str(tiny_image(env.workdir))] * items
            )
            measured = _run(env, job_id, items)
        results.append({"bench": "history", "server": setup, **measured})

    return results


@dataclass
class _Environment:
    conninfo: str
    server: PrefectServerProcess
    provider: ProviderProcess
    workdir: Path

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "IMAGEOPT_DATABASE_URL": self.conninfo,
            "IMAGEOPT_PROVIDER_URL": self.provider.url,
            "IMAGEOPT_HOME": str(self.workdir),
            "IMAGEOPT_CREATES_PER_MINUTE": str(CREATES_PER_MINUTE),
            "PREFECT_API_URL": self.server.url,
        }


@contextlib.contextmanager
def _environment(server_options: dict) -> Iterator[_Environment]:
    """A migrated database, a Prefect server set up so, and a provider."""
    with contextlib.ExitStack() as stack:
        admin = stack.enter_context(_admin_conninfo())
        conninfo = stack.enter_context(_fresh_database(admin))
        prefect_db = stack.enter_context(_fresh_database(admin))
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        run_migrations(conninfo)
        server = PrefectServerProcess(
            prefect_db,
            dbname=conninfo_to_dict(prefect_db)["dbname"],
            home=workdir / "prefect",
            **server_options,
        )
        stack.callback(server.stop)
        provider = ProviderProcess(*PROVIDER)
        stack.callback(provider.stop)
        yield _Environment(conninfo, server, provider, workdir)


def _run(env: _Environment, job_id: int, items: int) -> dict:
    """Run the job's flow in a child process; watch the server record it."""
    cpu_before = env.server.cpu_seconds()
    log = env.workdir / "flow.log"
    with log.open("w") as out:
        flow = subprocess.Popen(
            [sys.executable, "-m", "bench.history", str(job_id)],
            env=env.env(),
            stdout=subprocess.PIPE,
            stderr=out,
            text=True,
        )
    recorded_at = _wait_for_history(env, job_id, items, flow)
    server_cpu = env.server.cpu_seconds() - cpu_before
    flow_output, _ = flow.communicate()
    if flow.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"the flow of job {job_id} failed:\n{tail}")
    flow_cpu = json.loads(flow_output.strip().splitlines()[-1])["cpu_seconds"]

    first_create, last_completion, completed = _item_times(env.conninfo, job_id)
    flow_span = last_completion - first_create
    complete = recorded_at is not None
    states = count_states(env.server.url, flow_runs_of([job_id]))

    return {
        "items": items,
        "completed": completed,
        "items_per_minute": round(60.0 * completed / flow_span, 1),
        "items_per_minute_history_complete": (
            round(60.0 * items / (recorded_at - first_create), 1) if complete else None
        ),
        "history_lag_seconds": (
            round(max(0.0, recorded_at - last_completion), 1) if complete else None
        ),
        "history_complete": complete,
        "server_cpu_ms_per_item": round(1000.0 * server_cpu / items, 1),
        "flow_cpu_ms_per_item": round(1000.0 * flow_cpu / items, 1),
        "states_per_item": round(states["states"] / items, 2),
        "task_runs": states["task_runs"],
    }


def _wait_for_history(
    env: _Environment, job_id: int, items: int, flow: subprocess.Popen
) -> float | None:
    """When the server had recorded every task run of the job; None if never."""
    import httpx

    # The server is this run's own: the name alone selects the flow run.
    runs = flow_runs_of([job_id])
    unfinished = {"state": {"type": {"any_": UNFINISHED}}}
    flow_ended_at = None
    with httpx.Client(base_url=env.server.url, timeout=30) as client:

        def count(**filters: dict) -> int | None:
            # A server that is behind may answer 503 for a while: ask again.
            try:
                response = client.post("/task_runs/count", json=filters)
                response.raise_for_status()
            except httpx.HTTPError:
                return None
            return response.json()

        seen, moved_at = None, time.monotonic()
        while True:
            if flow_ended_at is None and flow.poll() is not None:
                flow_ended_at = time.monotonic()
            if flow.poll() is not None and flow.returncode != 0:
                return None
            total = count(flow_runs=runs)
            left = count(flow_runs=runs, task_runs=unfinished)
            if total is not None and total >= 2 * items and left == 0:
                return time.time()
            now = time.monotonic()
            if (total, left) != seen:
                seen, moved_at = (total, left), now
            if flow_ended_at is not None and (
                now - flow_ended_at > HISTORY_TIMEOUT or now - moved_at > HISTORY_STALL
            ):
                return None
            time.sleep(0.5)


def _item_times(conninfo: str, job_id: int) -> tuple[float, float, int]:
    """The first create, the last completion (epoch seconds), items completed."""
    with psycopg.connect(conninfo) as conn:
        first, last, completed = conn.execute(
            """
            SELECT
              min(extract(epoch FROM h.at)) FILTER (WHERE h.to_status = 'RUNNING'),
              max(extract(epoch FROM h.at)) FILTER (WHERE h.to_status = 'COMPLETED'),
              count(*) FILTER (WHERE h.to_status = 'COMPLETED')
            FROM item_history h JOIN items i ON i.id = h.item_id
            WHERE i.job_id = %s
            """,
            (job_id,),
        ).fetchone()

    return float(first), float(last), completed


def _run_flow(job_id: int) -> None:
    """The flow of job ``job_id`` in this process; prints the CPU it took."""
    from flows.optimize_job import optimize_job

    began = time.process_time()
    state = optimize_job(job_id=job_id, return_state=True)
    cpu = time.process_time() - began
    print(json.dumps({"cpu_seconds": cpu, "state": state.type.value}), flush=True)
    sys.exit(0 if state.is_completed() else 1)


if __name__ == "__main__":
    _run_flow(int(sys.argv[1]))
