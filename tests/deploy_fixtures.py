"""The project's deployments, registered and served as an operator would.

``deployed`` starts a Prefect server of its own for a test module (so that
its event triggers hear only that module's events), a database and a
provider, then runs, from the project's folder, exactly what the README
tells an operator to run::

    prefect work-pool create imageopt --type process
    prefect deploy --all
    prefect worker start --pool imageopt

The worker runs with the module's database and provider in its environment,
and polls every second instead of every ten.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from uuid import UUID

import httpx
import pytest
from provider_fixtures import ProviderServer, start_provider_server
from psycopg.conninfo import conninfo_to_dict

from imageopt.migrate import run_migrations
from imageopt.services import ChildProcess, PrefectServerProcess

PROJECT = Path(__file__).resolve().parents[1]
POOL = "imageopt"
PROVIDER_LATENCY = 1.0


@dataclass
class Deployed:
    """A Prefect server with the project's deployments and a worker."""

    api_url: str
    database: str
    provider: ProviderServer
    worker: ChildProcess
    server: PrefectServerProcess

    def deployment_id(self, name: str) -> UUID:
        """The id of deployment ``flow/deployment``, e.g. optimize-job/optimize-job."""
        response = httpx.get(f"{self.api_url}/deployments/name/{name}", timeout=60)
        response.raise_for_status()
        return UUID(response.json()["id"])

    def server_output(self) -> str:
        return "\n".join(
            line
            for child in (self.server.api, self.server.services)
            if child is not None
            for line in list(child.lines)[-30:]
        )

    def worker_output(self) -> str:
        return "\n".join(list(self.worker.lines)[-40:])


def prefect(api_url: str, *args: str, timeout: float = 120.0) -> str:
    """Run the ``prefect`` command against ``api_url``; its output, or fail."""
    env = {**os.environ, "PREFECT_API_URL": api_url}
    done = subprocess.run(
        [sys.executable, "-m", "prefect", "--no-prompt", *args],
        cwd=PROJECT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if done.returncode != 0:
        pytest.fail(f"prefect {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
    return done.stdout


@pytest.fixture(scope="module")
def deployed(
    make_database: Callable[[], str],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Deployed]:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    prefect_db = make_database()
    server = PrefectServerProcess(
        prefect_db,
        dbname=conninfo_to_dict(prefect_db)["dbname"],
        home=tmp_path_factory.mktemp("deployed-prefect-home"),
        # Schedules turned into runs within seconds, not a minute.
        extra_env={"PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2"},
    )
    database = make_database()
    run_migrations(database)
    # A second's latency, so that a poll or two retry, as in real use.
    provider = start_provider_server(
        tmp_path_factory.mktemp("deployed-provider"),
        "--allow-private-urls",
        "--create-limit",
        "0",
        "--read-limit",
        "0",
        "--latency",
        str(PROVIDER_LATENCY),
    )

    prefect(server.url, "work-pool", "create", POOL, "--type", "process")
    prefect(server.url, "deploy", "--all")
    # The trigger service learns of a new automation from a PostgreSQL NOTIFY,
    # which it missed now and then on a loaded machine when the deployment
    # came seconds after it started; started again, it loads the automations
    # from the database, as a long-running server's services have.
    server.stop()
    server.start()

    saved_api = os.environ.get("PREFECT_API_URL")
    os.environ["PREFECT_API_URL"] = server.url
    worker_env = {
        **os.environ,
        "IMAGEOPT_DATABASE_URL": database,
        "IMAGEOPT_PROVIDER_URL": provider.url,
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "PREFECT_WORKER_PREFETCH_SECONDS": "1",
    }
    worker = ChildProcess(
        "the Prefect worker",
        [sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL],
        worker_env,
    )
    try:
        with temporary_settings({PREFECT_API_URL: server.url}):
            yield Deployed(server.url, database, provider, worker, server)
    finally:
        worker.stop()
        provider.stop()
        server.stop()
        if saved_api is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = saved_api


def wait_for_job_run(
    deployed: Deployed,
    job_id: int,
    *,
    final: bool = True,
    other_than: str | None = None,
    timeout: float = 300.0,
) -> dict:
    """The latest optimize-job run of ``job_id`` (not ``other_than``), once it
    exists and, with ``final``, once it has ended.

    A run is the job's by its name, ``job-<id>``, or, before it has started
    and taken that name, by its parameters. On timeout the test fails with
    every run seen and the worker's last lines.
    """
    deadline = time.monotonic() + timeout
    body = {
        "flows": {"name": {"any_": ["optimize-job"]}},
        "sort": "EXPECTED_START_TIME_DESC",
    }
    runs: list[dict] = []
    while time.monotonic() < deadline:
        response = httpx.post(
            f"{deployed.api_url}/flow_runs/filter", json=body, timeout=60
        )
        response.raise_for_status()
        runs = [
            run
            for run in response.json()
            if run["id"] != other_than
            and (
                run["name"] == f"job-{job_id}"
                or str(run["parameters"].get("job_id")) == str(job_id)
            )
        ]
        if runs and (
            not final or (runs[0]["state"] or {}).get("type") in _FINAL_STATES
        ):
            return runs[0]
        time.sleep(0.5)
    seen = [(r["name"], r["state"]["type"], r["state"]["message"]) for r in runs]
    pytest.fail(
        f"no run of job {job_id} ended within {timeout} s; runs seen: {seen}; "
        f"the worker's last lines:\n{deployed.worker_output()}\n"
        f"the server's:\n{deployed.server_output()}"
    )


_FINAL_STATES = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def wait_for_flow_run_id(api_url: str, flow_run_id: str, timeout: float = 180.0):
    """Flow run ``flow_run_id`` once it has ended; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        response = httpx.get(f"{api_url}/flow_runs/{flow_run_id}", timeout=60)
        response.raise_for_status()
        run = response.json()
        if (run["state"] or {}).get("type") in _FINAL_STATES:
            return run
        time.sleep(0.5)
    pytest.fail(f"flow run {flow_run_id} not done in {timeout} s: {run}")
