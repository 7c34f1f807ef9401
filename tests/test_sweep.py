"""What the sweep finds in the database: open jobs, whether a live run holds
each, and predictions past their deadline, which it cancels at the provider.

Starting and resuming runs through the deployments is in test_deployments.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import psycopg
import pytest
from job_helpers import imageopt, report, run_command, submit_job, wait_for

from imageopt.migrate import run_migrations
from imageopt.samples import sample_paths
from imageopt.sweep import cancel_overdue, open_jobs, overdue_predictions


@pytest.fixture
def database(make_database) -> str:
    conninfo = make_database()
    run_migrations(conninfo)
    return conninfo


def test_a_dead_run_leaves_its_job_open_and_its_overdue_predictions_are_canceled(
    prefect_api, database, provider_server, tmp_path: Path
):
    # Predictions that would run for ten minutes.
    server = provider_server(
        "--create-limit", "0", "--read-limit", "0", "--latency", "600"
    )
    job_id = submit_job(database, [str(p) for p in sample_paths()[:2]], format="jpeg")
    env = {"IMAGEOPT_DATABASE_URL": database, "IMAGEOPT_PROVIDER_URL": server.url}
    args = ("run", str(job_id), "--output", str(tmp_path))

    run = imageopt(*args, env=env)
    wait_for(lambda: server.stats()["creates"] == 2, timeout=120, what="two creates")
    with psycopg.connect(database) as conn:
        while_running = open_jobs(conn)
    run.send_signal(signal.SIGKILL)
    run.wait()
    time.sleep(1.5)
    with psycopg.connect(database) as conn:
        after_death = open_jobs(conn)
        not_yet = overdue_predictions(conn, deadline_seconds=3600)
        overdue = overdue_predictions(conn, deadline_seconds=1, grace_seconds=0)
    client = server.client()
    canceled = cancel_overdue(client, overdue)

    assert [(j.id, j.unfinished, j.held) for j in while_running] == [(job_id, 2, True)]
    assert [(j.id, j.unfinished, j.held) for j in after_death] == [(job_id, 2, False)]
    assert not_yet == []
    items = report(database, job_id)["items"]
    assert sorted(o.prediction_id for o in overdue) == sorted(
        i["prediction_id"] for i in items
    )
    assert [c["prediction"] for c in canceled] == [o.prediction_id for o in overdue]
    assert {client.get(o.prediction_id).status for o in overdue} == {"canceled"}

    # The job's next run settles the items from what the provider says.
    code, output = run_command(*args, env=env)

    assert code == 1, output
    items = report(database, job_id)["items"]
    assert {i["status"] for i in items} == {"FAILED"}
    assert all("canceled" in i["error"] for i in items), items
    assert server.stats()["creates"] == 2
    with psycopg.connect(database) as conn:
        assert open_jobs(conn) == []
