"""Scaling: one job of 100, 1,000 and 10,000 items, zero latency, no limits.

Each size is one job of one store, run by ``imageopt run JOB`` in a process
of its own against a provider with no latency and no rate limits, and with
admission's rates set out of reach (a million a minute), so that nothing but
the pipeline paces it; admission's bound of 100 predictions in flight, the
flow's window, stays. The sizes run one after another on one Prefect server,
each with its own database and provider. Per size, a line with:

- ``seconds_per_item``: from the first create (an item's PENDING -> RUNNING)
  to the last completion, / items: the pipeline's own pace, start-up left out;
- ``history_lag_seconds``: from the last completion until the process ended,
  which ``imageopt run`` does once the Prefect server has recorded every task
  run of the flow run, or after waiting 300 s for it: ``unrecorded_task_runs``
  counts those the server still showed unfinished then;
- ``seconds``: the process's wall time, start-up and that wait included;
- ``flow_cpu_ms_per_item`` and ``server_cpu_ms_per_item``: CPU time of the
  flow's process (all of it, start-up included) and of the Prefect server
  (from the flow's start to its end), / items;
- ``states_per_item``: the task-run states the server holds for the flow
  run, read through the API as the UI reads them, / items;
- ``peak_rss_mb`` and ``peak_threads`` of the flow's process, sampled from
  ``/proc`` every 0.2 s.

Flat per-item cost and bounded memory and threads are the point.

    python -m bench scaling          # 100, 1,000 and 10,000 items (~20 min)
    python -m bench scaling --quick  # 25 and 100
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

from bench.harness import (
    NO_ADMISSION_LIMITS,
    environment,
    item_times,
    prefect_server,
    run_job,
    states_per_item,
    submit_job,
    tiny_image,
    unrecorded_task_runs,
)

SIZES = (100, 1_000, 10_000)
QUICK_SIZES = (25, 100)
PROVIDER = ("--create-limit", "0", "--read-limit", "0")


def run(quick: bool = False) -> Iterator[dict]:
    """A line per size, each as soon as it is measured: the largest takes long."""
    with prefect_server() as server:
        for size in QUICK_SIZES if quick else SIZES:
            with environment(*PROVIDER, server=server) as env:
                source = str(tiny_image(env.workdir))
                job_id = submit_job(
                    env.conninfo, "Scaling", [source] * size, format="jpeg"
                )
                server_cpu = server.cpu_seconds()
                since = datetime.now(UTC)
                run = run_job(env, job_id, **NO_ADMISSION_LIMITS)
                server_cpu = server.cpu_seconds() - server_cpu
                run.check(f"the {size}-item job")
                stats = env.provider.stats()
                times = item_times(env.conninfo, [job_id])
                unrecorded = unrecorded_task_runs(server, [job_id], since)
                states = states_per_item(server.url, [job_id], size, since)
            yield {
                "bench": "scaling",
                "items": size,
                "completed": len(times.completions),
                "seconds_per_item": round(times.span / size, 4),
                "history_lag_seconds": round(run.ended_at - times.last_completion, 1),
                "unrecorded_task_runs": unrecorded,
                "seconds": round(run.seconds, 1),
                "flow_cpu_ms_per_item": round(1000 * run.cpu_seconds / size, 1),
                "server_cpu_ms_per_item": round(1000 * server_cpu / size, 1),
                "states_per_item": states,
                "peak_rss_mb": run.peak_rss_mb,
                "peak_threads": run.peak_threads,
                "creates": stats["creates"],
                "prefect_server": server.layout,
            }
