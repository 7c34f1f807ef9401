"""The deployments in prefect.yaml, registered with `prefect deploy --all` and
run by a `prefect worker`, as in production."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import httpx
import psycopg
import pytest
from deploy_fixtures import Deployed, wait_for_flow_run_id, wait_for_job_run

from imageopt.jobs import submit
from imageopt.optimizer import OptimizeOptions
from imageopt.samples import sample_paths
from imageopt.schema import SchemaCheck


def _imageopt(deployed: Deployed, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "imageopt", *args],
        env=_env(deployed),
        capture_output=True,
        text=True,
        timeout=120,
    )


def _items(database: str, job_id: int) -> list[tuple[str, str | None]]:
    with psycopg.connect(database) as conn:
        return conn.execute(
            "SELECT status::text, output FROM items WHERE job_id = %s ORDER BY id",
            (job_id,),
        ).fetchall()


def test_the_sweep_is_scheduled_every_minute(deployed: Deployed):
    deployment_id = deployed.deployment_id("sweep/sweep")

    response = httpx.get(
        f"{deployed.api_url}/deployments/{deployment_id}/schedules", timeout=60
    )

    response.raise_for_status()
    schedules = response.json()
    assert [s["schedule"]["interval"] for s in schedules] == [60.0]
    assert all(s["active"] for s in schedules)
    _wait_until(
        lambda: httpx.post(
            f"{deployed.api_url}/flow_runs/filter",
            json={"deployments": {"id": {"any_": [str(deployment_id)]}}},
            timeout=60,
        ).json(),
        what="sweep run from the schedule",
    )


@pytest.fixture(scope="module")
def sweep_unscheduled(deployed: Deployed):
    """From here on the sweep runs only when a test starts it, so that no
    scheduled sweep races what a test does."""
    deployment_id = deployed.deployment_id("sweep/sweep")
    api = deployed.api_url
    schedules = httpx.get(
        f"{api}/deployments/{deployment_id}/schedules", timeout=60
    ).json()
    for schedule in schedules:
        httpx.patch(
            f"{api}/deployments/{deployment_id}/schedules/{schedule['id']}",
            json={"active": False},
            timeout=60,
        ).raise_for_status()
    _wait_until(
        lambda: not _unfinished_runs(deployed, deployment_id),
        what="scheduled sweeps gone",
    )


def _unfinished_runs(deployed: Deployed, deployment_id) -> list[dict]:
    """Runs of the deployment not yet ended; scheduled ones are deleted."""
    runs = httpx.post(
        f"{deployed.api_url}/flow_runs/filter",
        json={"deployments": {"id": {"any_": [str(deployment_id)]}}},
        timeout=60,
    ).json()
    unfinished = []
    for run in runs:
        if run["state"]["type"] == "SCHEDULED":
            httpx.delete(f"{deployed.api_url}/flow_runs/{run['id']}", timeout=60)
        elif run["state"]["type"] not in (
            "COMPLETED",
            "FAILED",
            "CRASHED",
            "CANCELLED",
        ):
            unfinished.append(run)
    return unfinished


def test_a_submitted_job_is_started_by_its_event_at_once(
    deployed: Deployed, sweep_unscheduled
):
    images = [str(path) for path in sample_paths()[:3]]

    done = _imageopt(deployed, "submit", "--store", "Event store", *images)

    assert done.returncode == 0, done.stderr
    job_id = int(done.stdout.split()[-1])
    run = wait_for_job_run(deployed, job_id)
    assert run["state"]["type"] == "COMPLETED", deployed.worker_output()
    assert run["deployment_id"] == str(
        deployed.deployment_id("optimize-job/optimize-job")
    )
    assert run["parameters"]["job_id"] == job_id
    assert run["created_by"]["type"] == "AUTOMATION"
    items = _items(deployed.database, job_id)
    assert [status for status, _ in items] == ["COMPLETED"] * 3
    assert all(output for _, output in items)


def test_a_flow_run_created_through_the_rest_api_creates_and_runs_its_job(
    deployed: Deployed, sweep_unscheduled, image_server
):
    deployment_id = deployed.deployment_id("optimize-job/optimize-job")
    urls = [image_server.sample_url(path.name) for path in sample_paths()[:2]]

    # What a store's backend does: one HTTP call, no imageopt installed.
    response = httpx.post(
        f"{deployed.api_url}/deployments/{deployment_id}/create_flow_run",
        json={
            "parameters": {
                "new_job": {
                    "store": "API store",
                    "images": urls,
                    "options": {"format": "webp", "quality": 70},
                }
            }
        },
        timeout=60,
    )

    assert response.status_code == 201, response.text
    flow_run_id = response.json()["id"]
    run = wait_for_flow_run_id(deployed.api_url, flow_run_id)
    assert run["state"]["type"] == "COMPLETED", deployed.worker_output()
    job_id = int(run["name"].removeprefix("job-"))
    with psycopg.connect(deployed.database) as conn:
        store, params = conn.execute(
            "SELECT s.name, j.params FROM jobs j JOIN stores s ON s.id = j.store_id"
            " WHERE j.id = %s",
            (job_id,),
        ).fetchone()
    assert store == "API store"
    assert params["format"] == "webp" and params["quality"] == 70
    items = _items(deployed.database, job_id)
    assert [status for status, _ in items] == ["COMPLETED"] * 2
    assert all(output.endswith(".webp") for _, output in items)


def test_the_sweep_resumes_a_job_whose_run_died(deployed: Deployed, sweep_unscheduled):
    job_id = _submit_quietly(deployed.database, [str(p) for p in sample_paths()])
    creates_before = deployed.provider.stats()["creates"]
    # A run outside the worker, killed once its predictions are being made:
    # Prefect still shows it running, but nobody holds the job.
    first = subprocess.Popen(
        [sys.executable, "-m", "imageopt", "run", str(job_id)],
        env=_env(deployed),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    _wait_until(
        lambda: deployed.provider.stats()["creates"] >= creates_before + 3,
        what="three creates",
    )
    first.send_signal(signal.SIGKILL)
    first.wait()
    killed = wait_for_job_run(deployed, job_id, final=False)
    assert killed["state"]["type"] == "RUNNING"

    sweep_run = _run_deployment(deployed, "sweep/sweep", {"lost_after_seconds": 1})

    assert sweep_run["state"]["type"] == "COMPLETED", deployed.worker_output()
    actions = _sweep_actions(deployed)
    assert ("resumed", str(job_id)) in actions
    assert ("lost_runs", killed["id"]) in actions
    resumed = wait_for_job_run(deployed, job_id, other_than=killed["id"])
    assert resumed["state"]["type"] == "COMPLETED", deployed.worker_output()
    assert _flow_run(deployed, killed["id"])["state"]["type"] == "CRASHED"
    items = _items(deployed.database, job_id)
    assert {status for status, _ in items} == {"COMPLETED"}
    assert len({output for _, output in items}) == len(items)
    assert deployed.provider.stats()["creates"] - creates_before == len(items)


def test_the_sweep_starts_a_submitted_job_that_has_no_run(
    deployed: Deployed, sweep_unscheduled
):
    # Submitted straight into the database: no event, as when no Prefect API
    # was listening.
    job_id = _submit_quietly(deployed.database, [str(sample_paths()[0])])

    sweep_run = _run_deployment(deployed, "sweep/sweep", {})

    assert sweep_run["state"]["type"] == "COMPLETED", deployed.worker_output()
    assert ("started", str(job_id)) in _sweep_actions(deployed)
    run = wait_for_job_run(deployed, job_id)
    assert run["state"]["type"] == "COMPLETED", deployed.worker_output()
    assert _items(deployed.database, job_id)[0][0] == "COMPLETED"


def _env(deployed: Deployed) -> dict[str, str]:
    return {
        **os.environ,
        "PREFECT_API_URL": deployed.api_url,
        "IMAGEOPT_DATABASE_URL": deployed.database,
        "IMAGEOPT_PROVIDER_URL": deployed.provider.url,
    }


def _submit_quietly(database: str, sources: list[str]) -> int:
    with psycopg.connect(database, autocommit=True) as conn:
        schema = SchemaCheck().refresh(conn)
        return submit(
            conn,
            schema,
            "Sweep store",
            sources,
            OptimizeOptions(format="jpeg"),
            max_input_bytes=50_000_000,
        )


def _run_deployment(deployed: Deployed, name: str, parameters: dict) -> dict:
    deployment_id = deployed.deployment_id(name)
    response = httpx.post(
        f"{deployed.api_url}/deployments/{deployment_id}/create_flow_run",
        json={"parameters": parameters},
        timeout=60,
    )
    response.raise_for_status()
    return wait_for_flow_run_id(deployed.api_url, response.json()["id"])


def _flow_run(deployed: Deployed, flow_run_id: str) -> dict:
    response = httpx.get(f"{deployed.api_url}/flow_runs/{flow_run_id}", timeout=60)
    response.raise_for_status()
    return response.json()


def _sweep_actions(deployed: Deployed) -> list[tuple[str, str]]:
    """What every sweep so far did: (action, the job or flow run it did it to)."""
    response = httpx.post(
        f"{deployed.api_url}/artifacts/filter",
        json={"artifacts": {"key": {"any_": ["sweep-actions"]}}},
        timeout=60,
    )
    response.raise_for_status()
    return [
        (row["action"], str(row["job"] or row["flow run"]))
        for artifact in response.json()
        for row in json.loads(artifact["data"])
    ]


def _wait_until(condition, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} within {timeout} s")
        time.sleep(0.2)
