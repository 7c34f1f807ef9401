"""The Prefect server restarted during a job: no task run or state is lost.

The server runs split (API and services) on a Redis broker, as
:class:`imageopt.services.PrefectServerProcess` starts it when Redis answers.
Its services are stopped first, so that the events of the running job pile up
unrecorded in the broker; then the whole server is stopped and started again
on the same port, database and broker, while ``imageopt run`` carries on.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import psycopg
import pytest
from PIL import Image
from psycopg.conninfo import conninfo_to_dict

from imageopt.jobs import submit
from imageopt.migrate import run_migrations
from imageopt.optimizer import OptimizeOptions
from imageopt.schema import SchemaCheck
from imageopt.services import PrefectServerProcess

ITEMS = 200

# Creates a minute: the job lasts about 100 s, longer than the services take
# to stop (a few seconds, 40 at most) and the restart, so that events wait in
# the broker while they are down, whatever the machine's speed.
CREATES_PER_MINUTE = 120

# Task-run states the server has not seen the end of; SCHEDULED covers a poll
# waiting for its retry.
UNFINISHED = ["SCHEDULED", "PENDING", "RUNNING", "PAUSED", "CANCELLING"]


@pytest.fixture
def prefect_server(make_database, tmp_path: Path):
    conninfo = make_database()
    server = PrefectServerProcess(
        conninfo,
        dbname=conninfo_to_dict(conninfo)["dbname"],
        home=tmp_path / "prefect",
        # The UI is not looked at here, and copying it into place slows
        # every start.
        extra_env={"PREFECT_SERVER_UI_ENABLED": "false"},
    )
    if not server.split:
        server.stop()
        pytest.fail(
            "this test needs Redis for the Prefect server's broker: start it, "
            "or point IMAGEOPT_REDIS_URL at one"
        )

    yield server

    server.stop()


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_a_restart_of_the_prefect_server_mid_job_keeps_every_task_run_and_state(
    prefect_server, make_database, provider_server, tmp_path: Path
):
    database = make_database()
    run_migrations(database)
    provider = provider_server(
        "--create-limit", "0", "--read-limit", "0", "--latency", "1"
    )
    job_id = _submit(database, _tiny_image(tmp_path), ITEMS)
    env = {
        **os.environ,
        "IMAGEOPT_DATABASE_URL": database,
        "IMAGEOPT_PROVIDER_URL": provider.url,
        "IMAGEOPT_HOME": str(tmp_path),
        "IMAGEOPT_CREATES_PER_MINUTE": str(CREATES_PER_MINUTE),
        "PREFECT_API_URL": prefect_server.url,
        # A restart takes up to a minute on a busy machine; the client's five
        # default retries of a call span about as long.
        "PREFECT_CLIENT_MAX_RETRIES": "10",
    }
    run = subprocess.Popen(
        [sys.executable, "-m", "imageopt", "run", str(job_id)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    _wait_for_completed(database, job_id, ITEMS // 4, run)
    prefect_server.services.stop()
    _wait_for_completed(database, job_id, ITEMS // 2, run)
    waiting = _unrecorded_in_broker(prefect_server)
    prefect_server.stop()
    prefect_server.start()
    output, _ = run.communicate(timeout=900)
    _wait_until_recorded(prefect_server.url, job_id)
    task_runs = _task_runs(prefect_server.url, job_id)
    states = {
        (run["name"], run["id"]): _state_types(prefect_server.url, run["id"])
        for run in task_runs
    }

    assert run.returncode == 0, output
    assert waiting > 0, "no event was waiting in the broker when the server stopped"
    assert len(task_runs) == 2 * ITEMS, _complaints(prefect_server)
    for name, types in states.items():
        assert types[0] == "PENDING", (name, types, _complaints(prefect_server))
        assert types[-1] == "COMPLETED", (name, types, _complaints(prefect_server))
        # Each retry adds an AwaitingRetry (SCHEDULED) and a Retrying (RUNNING).
        assert types.count("RUNNING") == 1 + types.count("SCHEDULED"), (name, types)
        assert len(types) == 3 + 2 * types.count("SCHEDULED"), (name, types)
    stages = Counter(name.split()[0] for name, _ in states)
    assert stages == {"create-prediction": ITEMS, "poll-prediction": ITEMS}


def _tiny_image(directory: Path) -> str:
    path = directory / "tiny.png"
    Image.linear_gradient("L").resize((32, 32)).convert("RGB").save(path)
    return str(path)


def _submit(conninfo: str, source: str, items: int) -> int:
    with psycopg.connect(conninfo, autocommit=True) as conn:
        schema = SchemaCheck().refresh(conn)
        return submit(
            conn,
            schema,
            "Restart store",
            [source] * items,
            OptimizeOptions(format="jpeg"),
            max_input_bytes=50_000_000,
        )


def _wait_for_completed(
    conninfo: str, job_id: int, count: int, run: subprocess.Popen
) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        with psycopg.connect(conninfo) as conn:
            (done,) = conn.execute(
                "SELECT count(*) FROM items WHERE job_id = %s AND status = 'COMPLETED'",
                (job_id,),
            ).fetchone()
        if done >= count:
            return
        if run.poll() is not None:
            pytest.fail(f"the run ended early:\n{run.stdout.read()}")
        time.sleep(0.2)
    pytest.fail(f"{count} items of job {job_id} did not complete within 300 s")


def _unrecorded_in_broker(server: PrefectServerProcess) -> int:
    """Events the task-run recorder has not yet taken from the broker."""
    with server.broker.client() as client:
        groups = client.xinfo_groups("events")
    recorder = next(g for g in groups if g["name"] == b"task-run-recorder")

    return recorder["lag"] + recorder["pending"]


def _complaints(server: PrefectServerProcess) -> str:
    """What the server's processes logged about events they could not record."""
    lines = []
    for log in ("api.log", "services.log"):
        text = (server.home / log).read_text(errors="replace")
        lines += [
            f"{log}: {line}"
            for line in text.splitlines()
            if any(word in line for word in ("Dropping", "Error", "too many"))
        ]

    return "\n".join(lines[-30:]) or "nothing logged about lost events"


def _wait_until_recorded(api_url: str, job_id: int) -> None:
    runs = {"name": {"any_": [f"job-{job_id}"]}}
    unfinished = {"state": {"type": {"any_": UNFINISHED}}}
    deadline = time.monotonic() + 300
    with httpx.Client(base_url=api_url, timeout=30) as client:
        while time.monotonic() < deadline:
            total = client.post("/task_runs/count", json={"flow_runs": runs}).json()
            left = client.post(
                "/task_runs/count", json={"flow_runs": runs, "task_runs": unfinished}
            ).json()
            if total >= 2 * ITEMS and left == 0:
                return
            time.sleep(1)


def _task_runs(api_url: str, job_id: int) -> list[dict]:
    """Every task run of the job's flow run, a page (the API's most) at a time."""
    found: list[dict] = []
    while True:
        response = httpx.post(
            f"{api_url}/task_runs/filter",
            json={
                "flow_runs": {"name": {"any_": [f"job-{job_id}"]}},
                "sort": "ID_DESC",
                "offset": len(found),
                "limit": 200,
            },
            timeout=30,
        )
        response.raise_for_status()
        page = response.json()
        found += page
        if len(page) < 200:
            return found


def _state_types(api_url: str, task_run_id: str) -> list[str]:
    """A task run's states, oldest first, as the UI lists them."""
    response = httpx.get(
        f"{api_url}/task_run_states/",
        params={"task_run_id": task_run_id},
        timeout=30,
    )
    response.raise_for_status()
    states = sorted(response.json(), key=lambda state: state["timestamp"])

    return [state["type"] for state in states]
