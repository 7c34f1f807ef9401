"""The ``sweep`` flow: once a minute, keep every job moving.

The event trigger starts a job's run the moment it is submitted; the sweep
catches what an event cannot:

- a job submitted with no Prefect API listening, or whose event was lost,
  gets a run;
- a job whose run crashed, or whose process died while Prefect still shows
  it running, gets a new run, which resumes it: a live run holds its job's
  lock, so an open job whose lock is free has nobody working on it;
- a prediction past the deadline sent with its create is canceled at the
  provider; the job's run then fails its item, saying why;
- a job whose items have all ended but whose run died before saying so gets
  its final status.

It reports what it did in its log and in a markdown artifact, and returns the
same as a dict.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowFilter,
    FlowFilterName,
    FlowRunFilter,
    FlowRunFilterName,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.deployments import run_deployment
from prefect.states import Crashed

from imageopt.db import Database
from imageopt.durations import parse_duration
from imageopt.provider import ProviderClient
from imageopt.records import refresh_job_status
from imageopt.schema import SchemaCheck
from imageopt.settings import get_settings
from imageopt.sweep import cancel_overdue, open_jobs, overdue_predictions

OPTIMIZE_DEPLOYMENT = "optimize-job/optimize-job"

# A run that has been RUNNING this long takes its job's lock; one that still
# has not is taken for lost.
LOST_AFTER_SECONDS = 60.0


@flow(name="sweep", log_prints=False)
def sweep(
    deployment: str = OPTIMIZE_DEPLOYMENT,
    lost_after_seconds: float = LOST_AFTER_SECONDS,
) -> dict[str, Any]:
    """Start, resume or settle open jobs and cancel overdue predictions.

    ``deployment`` is the optimize-job deployment that runs jobs.
    """
    logger = get_run_logger()
    settings = get_settings()
    deadline = parse_duration(settings.prediction_deadline)
    report: dict[str, list] = {
        "started": [],
        "resumed": [],
        "lost_runs": [],
        "running": [],
        "waiting": [],
        "settled": [],
        "overdue_canceled": [],
    }

    with (
        Database.from_settings(settings, max_size=2) as db,
        db.connection() as conn,
    ):
        schema = SchemaCheck().refresh(conn)
        jobs = open_jobs(conn)
        overdue = overdue_predictions(conn, deadline)
        for job in jobs:
            if job.unfinished == 0:
                status = refresh_job_status(conn, schema, job.id)
                report["settled"].append({"job": job.id, "status": str(status)})

    idle = [job for job in jobs if job.unfinished and not job.held]
    report["running"] = [job.id for job in jobs if job.unfinished and job.held]
    runs = _runs_by_job([job.id for job in idle])
    for job in idle:
        job_runs = runs.get(job.id, [])
        if _has_a_live_run(job_runs, lost_after_seconds):
            report["waiting"].append(job.id)
            continue
        lost = _mark_lost(job_runs)
        report["lost_runs"].extend(lost)
        kind = "resumed" if job_runs else "started"
        report[kind].append(job.id)
        _start_run(deployment, job.id, job_runs, logger, kind)

    if overdue:
        with ProviderClient.from_settings(settings) as provider:
            report["overdue_canceled"] = cancel_overdue(provider, overdue)

    _publish(report, logger)
    return report


def _has_a_live_run(runs: list[FlowRun], lost_after_seconds: float) -> bool:
    """Whether one of a job's runs is scheduled, pending or just started.

    A run scheduled, pending, paused or cancelling is in a worker's hands; a
    run that started less than ``lost_after_seconds`` ago is about to take
    its job's lock. A run RUNNING for longer without the lock is lost.
    """
    started_since = datetime.now(UTC) - timedelta(seconds=lost_after_seconds)
    for run in runs:
        if run.state is None or run.state.is_final():
            continue
        if not run.state.is_running():
            return True
        if run.start_time is None or run.start_time > started_since:
            return True
    return False


def _mark_lost(runs: list[FlowRun]) -> list[str]:
    """Mark crashed the runs Prefect shows running though their process is gone."""
    lost = [run for run in runs if run.state is not None and run.state.is_running()]
    if lost:
        with get_client(sync_client=True) as client:
            for run in lost:
                client.set_flow_run_state(
                    run.id,
                    Crashed(message="its process is gone: it no longer holds the job"),
                    force=True,
                )
    return [str(run.id) for run in lost]


def _runs_by_job(job_ids: list[int]) -> dict[int, list[FlowRun]]:
    """Every optimize-job flow run of these jobs, newest first, by job id.

    A run takes its name, ``job-<id>``, when it starts; one not started yet
    (scheduled by the event trigger, say) is found by its parameters.
    """
    found: dict[int, dict[UUID, FlowRun]] = {}
    wanted = set(job_ids)
    names = [f"job-{job_id}" for job_id in job_ids]
    optimize = FlowFilter(name=FlowFilterName(any_=["optimize-job"]))
    batch = 200
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_filter=optimize,
            flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(
                    type=FlowRunFilterStateType(
                        any_=[StateType.SCHEDULED, StateType.PENDING]
                    )
                )
            ),
        )
        for start in range(0, len(names), batch):
            runs += client.read_flow_runs(
                flow_filter=optimize,
                flow_run_filter=FlowRunFilter(
                    name=FlowRunFilterName(any_=names[start : start + batch])
                ),
            )
    for run in runs:
        job_id = _job_of(run)
        if job_id in wanted:
            found.setdefault(job_id, {})[run.id] = run
    return {
        job_id: sorted(by_id.values(), key=lambda r: r.created, reverse=True)
        for job_id, by_id in found.items()
    }


def _job_of(run: FlowRun) -> int | None:
    if run.parameters.get("job_id") is not None:
        return int(run.parameters["job_id"])
    if run.name.startswith("job-") and run.name[4:].isdigit():
        return int(run.name[4:])
    return None


def _start_run(
    deployment: str, job_id: int, runs: list[FlowRun], logger, kind: str
) -> None:
    """A new run of the job.

    The idempotency key names the job's latest run, so two sweeps at once
    start one run between them.
    """
    after = str(runs[0].id) if runs else "none"
    new_run = run_deployment(
        name=deployment,
        parameters={"job_id": job_id},
        timeout=0,
        as_subflow=False,
        flow_run_name=f"job-{job_id}",
        idempotency_key=f"imageopt-job-{job_id}-after-{after}",
    )
    logger.info("job %s %s: flow run %s", job_id, kind, new_run.name)


_LABELS = {
    "started": "jobs given their first run",
    "resumed": "jobs resumed after their run ended early",
    "lost_runs": "runs marked crashed: their process was gone",
    "running": "jobs held by a live run",
    "waiting": "jobs whose run is scheduled or starting",
    "settled": "jobs given their final status",
    "overdue_canceled": "predictions canceled past their deadline",
}


def _publish(report: dict[str, list], logger) -> None:
    """A summary of counts, and a table of every action, as artifacts."""
    summary = ["# Sweep", "", "| what | how many |", "| --- | --- |"]
    summary += [f"| {label} | {len(report[key])} |" for key, label in _LABELS.items()]
    create_markdown_artifact(
        markdown="\n".join(summary), key="sweep", description="What the sweep did"
    )
    actions = [
        _action(key, job=job_id)
        for key in ("started", "resumed")
        for job_id in report[key]
    ]
    actions += [_action("lost_runs", flow_run=run_id) for run_id in report["lost_runs"]]
    actions += [_action("settled", job=done["job"]) for done in report["settled"]]
    actions += [
        _action(
            "overdue_canceled", job=o["job"], item=o["item"], prediction=o["prediction"]
        )
        for o in report["overdue_canceled"]
    ]
    if actions:
        create_table_artifact(
            table=actions, key="sweep-actions", description="What the sweep did"
        )
    logger.info(
        "sweep: %s",
        ", ".join(f"{len(v)} {k.replace('_', ' ')}" for k, v in report.items()),
    )


def _action(what: str, *, job="", flow_run="", item="", prediction="") -> dict:
    return {
        "action": what,
        "job": job,
        "flow run": flow_run,
        "item": item,
        "prediction": prediction,
    }
