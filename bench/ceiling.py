"""Ceiling: the most items a minute the Prefect pipeline gives, against the old design.

A provider with no rate limits and a fixed latency of 0.5 s; one job of one
store at a time. Two ways of working through the same kind of job, in turn,
against the same provider, Prefect server and database:

- ``flow``: ``imageopt run JOB`` in a process of its own: the optimize-job
  flow, a create task and a poll task per item, admission's rates set out of
  reach (a million a minute) and its bound of 100 predictions in flight;
- ``baseline``: ``python -m bench.baseline --concurrency 100`` (see
  :mod:`bench.baseline`): the old system's design, one asyncio process
  picking pending rows fairly across stores from PostgreSQL, creating,
  polling every 0.5 s, storing the output and writing each status change
  with its history, through httpx's and psycopg's async clients.

The pair runs ``ROUNDS`` times (flow, baseline, flow, baseline, ...), one
line a round, so that the machine's drift falls on both alike:

- ``items_per_minute``: the flow's items completed / the time from the first
  create (an item's PENDING -> RUNNING) until the Prefect server had recorded
  every task run of the flow run (``imageopt run`` waits for that, asking
  every second, then exits): a figure counts only once its history is kept;
- ``items_per_minute_to_last_item``: the same, to the last completion;
- ``history_lag_seconds``: from the last completion to the process's end;
- ``unrecorded_task_runs``: task runs the server still showed unfinished
  then; ``imageopt run`` waits at most 300 s for the history, so a lag near
  300 s with task runs left means ``items_per_minute`` is an upper bound;
- ``baseline_items_per_minute``: the baseline's items completed / the time
  from its first create to its last completion;
- ``ratio``: ``items_per_minute / baseline_items_per_minute``;
- ``flow_cpu_ms_per_item``, ``baseline_cpu_ms_per_item``: the process's whole
  CPU time (``wait4``'s resource usage: start-up included), / items;
- ``server_cpu_ms_per_item``: the Prefect server's CPU time (``/proc/PID/stat``
  utime + stime) from the flow's start to its end, / items;
- ``states_per_item``: the task-run states the server holds for the flow
  run, read through the API as the UI reads them, / items;
- ``server_idle_cpu_percent``: the server's CPU while the baseline ran, which
  does not use it: what the server costs doing nothing.

To see where the time goes, set ``IMAGEOPT_BENCH_PROFILE`` to a folder: the
first round's flow process and each process of the Prefect server are then
sampled by py-spy (``pip install py-spy``; ptrace rights needed) into
``flow.txt`` and ``server-PID.txt`` there, in py-spy's raw format (one
collapsed stack a line with its sample count). Only the thread holding the
GIL is sampled (``--gil``), so the samples show where CPU time goes, not
where threads wait; the process's CPU share says how busy it was.
``python -m bench.profiles FOLDER`` summarises them.

    python -m bench ceiling          # 1,000 items a side, 2 rounds
    python -m bench ceiling --quick  # 100 items a side, 1 round
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from bench.harness import (
    NO_ADMISSION_LIMITS,
    ChildRun,
    Environment,
    environment,
    finish_child,
    imageopt_run,
    item_times,
    run_child,
    start_child,
    states_per_item,
    submit_job,
    tiny_image,
    unrecorded_task_runs,
)

ITEMS = 1_000
QUICK_ITEMS = 100
ROUNDS = 2
LATENCY = "0.5"
CONCURRENCY = 100
PROVIDER = ("--create-limit", "0", "--read-limit", "0", "--latency", LATENCY)
PROFILE_ENV = "IMAGEOPT_BENCH_PROFILE"


def run(quick: bool = False) -> list[dict]:
    items = QUICK_ITEMS if quick else ITEMS
    profile = os.environ.get(PROFILE_ENV)
    results = []
    with environment(*PROVIDER) as env:
        source = str(tiny_image(env.workdir))
        for round_ in range(1 if quick else ROUNDS):
            folder = Path(profile) if profile and round_ == 0 else None
            flow = _run_flow(env, source, items, folder)
            baseline = _run_baseline(env, source, items)
            results.append(
                {
                    "bench": "ceiling",
                    "round": round_ + 1,
                    "prefect_server": env.server.layout,
                    **flow,
                    **baseline,
                }
            )
            flow_rate = flow["items_per_minute"]
            base_rate = baseline["baseline_items_per_minute"]
            results[-1]["ratio"] = (
                round(flow_rate / base_rate, 3) if base_rate else None
            )
        results[-1]["creates"] = env.provider.stats()["creates"]

    return results


def _run_flow(env: Environment, source: str, items: int, profile: Path | None) -> dict:
    job_id = submit_job(env.conninfo, "Ceiling", [source] * items, format="jpeg")
    log = env.workdir / f"flow-{job_id}.log"
    server_cpu = env.server.cpu_seconds()
    since = datetime.now(UTC)
    child = start_child(imageopt_run(job_id), env.env(**NO_ADMISSION_LIMITS), log)
    servers = {f"server-{pid}": pid for pid in env.server.pids()}
    with _profiling(profile, flow=child.pid, **servers):
        finish_child(child)
    server_cpu = env.server.cpu_seconds() - server_cpu
    child.check(f"the flow run of job {job_id}")
    times = item_times(env.conninfo, [job_id])
    unrecorded = unrecorded_task_runs(env.server, [job_id], since)

    return {
        "items": items,
        "completed": len(times.completions),
        "items_per_minute": times.per_minute(until=child.ended_at),
        "items_per_minute_to_last_item": times.per_minute(),
        "history_lag_seconds": round(child.ended_at - times.last_completion, 1),
        "unrecorded_task_runs": unrecorded,
        "flow_seconds": round(child.seconds, 1),
        "flow_cpu_ms_per_item": _per_item(child.cpu_seconds, items),
        "server_cpu_ms_per_item": _per_item(server_cpu, items),
        "states_per_item": states_per_item(env.server.url, [job_id], items, since),
        "flow_peak_threads": child.peak_threads,
    }


def _run_baseline(env: Environment, source: str, items: int) -> dict:
    job_id = submit_job(env.conninfo, "Ceiling", [source] * items, format="jpeg")
    log = env.workdir / f"baseline-{job_id}.log"
    argv = [
        sys.executable,
        "-m",
        "bench.baseline",
        "--concurrency",
        str(CONCURRENCY),
    ]
    server_cpu = env.server.cpu_seconds()
    child: ChildRun = run_child(argv, env.env(), log)
    server_cpu = env.server.cpu_seconds() - server_cpu
    child.check(f"the baseline's run of job {job_id}")
    times = item_times(env.conninfo, [job_id])

    return {
        "baseline_completed": len(times.completions),
        "baseline_items_per_minute": times.per_minute(),
        "baseline_seconds": round(child.seconds, 1),
        "baseline_cpu_ms_per_item": _per_item(child.cpu_seconds, items),
        "server_idle_cpu_percent": round(100 * server_cpu / child.seconds, 1),
    }


def _per_item(seconds: float, items: int) -> float:
    return round(1000 * seconds / items, 1)


@contextlib.contextmanager
def _profiling(folder: Path | None, **pids: int) -> Iterator[None]:
    """py-spy sampling each of ``pids`` into FOLDER/NAME.txt while the block runs."""
    if folder is None:
        yield
        return

    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    folder.mkdir(parents=True, exist_ok=True)
    samplers = [
        subprocess.Popen(
            [
                spy,
                "record",
                "--pid",
                str(pid),
                "--format",
                "raw",
                "--rate",
                "50",
                "--nonblocking",
                "--gil",
                "--output",
                str(folder / f"{name}.txt"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for name, pid in pids.items()
    ]
    try:
        yield
    finally:
        # py-spy writes its file when told to stop (SIGINT) or when its
        # target exits.
        for sampler in samplers:
            if sampler.poll() is None:
                sampler.send_signal(signal.SIGINT)
        for sampler in samplers:
            sampler.wait(30)
