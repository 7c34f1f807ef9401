"""The optimize-job flow end to end: a real Prefect server, PostgreSQL and provider."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest
from PIL import Image

from flows.optimize_job import optimize_job
from imageopt.jobs import job_report, submit
from imageopt.migrate import run_migrations
from imageopt.optimizer import OptimizeOptions
from imageopt.records import item_history
from imageopt.samples import sample_paths
from imageopt.schema import SchemaCheck

FINAL = {"COMPLETED", "FAILED", "CANCELED"}


@pytest.fixture
def database(make_database, monkeypatch) -> str:
    conninfo = make_database()
    run_migrations(conninfo)
    monkeypatch.setenv("IMAGEOPT_DATABASE_URL", conninfo)
    return conninfo


@pytest.fixture
def provider(provider_server, monkeypatch):
    """Start a provider with options and point imageopt at it."""

    def start(*options: str):
        server = provider_server(*options)
        monkeypatch.setenv("IMAGEOPT_PROVIDER_URL", server.url)
        return server

    return start


def _submit(conninfo: str, sources: list[str], **options) -> int:
    with psycopg.connect(conninfo, autocommit=True) as conn:
        schema = SchemaCheck().refresh(conn)
        return submit(
            conn,
            schema,
            "Test store",
            sources,
            OptimizeOptions(**options),
            max_input_bytes=50_000_000,
        )


def _report(conninfo: str, job_id: int) -> dict:
    with psycopg.connect(conninfo) as conn:
        return job_report(conn, job_id)


def _many_samples(count: int) -> list[str]:
    paths = [str(p) for p in sample_paths()]
    return [paths[i % len(paths)] for i in range(count)]


def test_a_job_of_the_sample_images_completes_with_every_output_stored(
    prefect_api, database, provider, tmp_path: Path
):
    provider("--create-limit", "0", "--read-limit", "0")
    job_id = _submit(database, [str(p) for p in sample_paths()], max_width=300)

    state = optimize_job(job_id=job_id, output=str(tmp_path), return_state=True)

    report = _report(database, job_id)
    assert state.is_completed()
    assert report["job"]["status"] == "COMPLETED"
    for item in report["items"]:
        assert item["status"] == "COMPLETED", item
        with Image.open(item["output"]) as image:
            image.load()
            assert image.width <= 300
        assert Path(item["output"]).stat().st_size == item["bytes_out"]
        assert item["bytes_out"] <= item["bytes_in"]
        assert "Test store" in item["output"] and f"job-{job_id}" in item["output"]


def test_each_item_history_shows_every_phase(
    prefect_api, database, provider, tmp_path: Path
):
    provider("--create-limit", "0", "--read-limit", "0", "--latency", "0.5")
    job_id = _submit(database, [str(sample_paths()[0])])

    optimize_job(job_id=job_id, output=str(tmp_path))

    item_id = _report(database, job_id)["items"][0]["id"]
    with psycopg.connect(database) as conn:
        steps = [(h[0], h[1]) for h in item_history(conn, item_id)]
    assert steps == [
        (None, "PENDING"),
        ("PENDING", "RUNNING"),
        ("RUNNING", "PROCESSING"),
        ("PROCESSING", "COMPLETED"),
    ]


def test_on_a_provider_with_no_history_the_first_polls_need_no_retry(
    prefect_api, database, provider, tmp_path: Path
):
    """A run that cannot learn the timing from the provider scouts for it."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from imageopt.services import wait_for_history

    provider("--create-limit", "0", "--read-limit", "0", "--latency", "2")
    job_id = _submit(database, _many_samples(12))

    state = optimize_job(job_id=job_id, output=str(tmp_path), return_state=True)

    flow_run_id = state.state_details.flow_run_id
    wait_for_history(flow_run_id)
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )
    polls = [run for run in runs if run.name.startswith("poll-prediction")]
    assert _report(database, job_id)["job"]["status"] == "COMPLETED"
    assert len(polls) == 12
    # Polled at once, all twelve retried. One prediction that ends a few
    # milliseconds later than the ones timed may still take a retry.
    retried = [run.name for run in polls if run.run_count > 1]
    assert len(retried) <= 1, retried


def test_with_failed_predictions_errors_and_a_low_create_limit_every_item_ends(
    prefect_api, database, provider, tmp_path: Path
):
    server = provider(
        "--fail-rate",
        "0.2",
        "--error-rate",
        "0.1",
        "--create-limit",
        "120",
        "--burst-seconds",
        "1",
        "--seed",
        "7",
    )
    job_id = _submit(database, _many_samples(16), format="webp")

    optimize_job(job_id=job_id, output=str(tmp_path))

    items = _report(database, job_id)["items"]
    stats = server.stats()
    assert {item["status"] for item in items} <= FINAL
    failed = [item for item in items if item["status"] == "FAILED"]
    assert failed, "a fail rate of 0.2 over 16 items should fail some"
    assert all(item["error"] for item in failed)
    assert stats["creates"] == len(items)
    assert stats["throttled"] > 0


def test_a_job_on_a_version_1_database_completes_without_enum_errors(
    prefect_api, make_database, monkeypatch, provider, tmp_path: Path
):
    conninfo = make_database()
    run_migrations(conninfo, to=1)
    monkeypatch.setenv("IMAGEOPT_DATABASE_URL", conninfo)
    provider("--create-limit", "0", "--read-limit", "0")
    job_id = _submit(conninfo, [str(p) for p in sample_paths()[:3]])

    state = optimize_job(job_id=job_id, output=str(tmp_path), return_state=True)

    assert state.is_completed()
    items = _report(conninfo, job_id)["items"]
    assert [item["status"] for item in items] == ["COMPLETED"] * 3
    with psycopg.connect(conninfo) as conn:
        stored = {h[1] for item in items for h in item_history(conn, item["id"])}
    assert "PROCESSING" not in stored


def test_an_unreadable_file_fails_its_item_and_the_rest_completes(
    prefect_api, database, provider, tmp_path: Path
):
    provider("--create-limit", "0", "--read-limit", "0")
    html = tmp_path / "page.jpg"
    html.write_text("<!doctype html><html><body>not an image</body></html>")
    good = str(sample_paths()[0])
    job_id = _submit(database, [good, str(html)])

    optimize_job(job_id=job_id, output=str(tmp_path / "out"))

    items = _report(database, job_id)["items"]
    assert items[0]["status"] == "COMPLETED"
    assert items[1]["status"] == "FAILED"
    assert "page.jpg" in items[1]["error"] and "image" in items[1]["error"]


def _imageopt(*args: str, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "imageopt", *args],
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}")


def test_two_concurrent_runs_of_a_job_create_one_prediction_per_item(
    prefect_api, database, provider, tmp_path: Path
):
    server = provider("--create-limit", "0", "--read-limit", "0", "--latency", "1")
    job_id = _submit(database, _many_samples(12), format="jpeg")
    env = {"IMAGEOPT_PROVIDER_URL": server.url, "IMAGEOPT_DATABASE_URL": database}

    runs = [
        _imageopt("run", str(job_id), "--output", str(tmp_path), env=env)
        for _ in range(2)
    ]
    outputs = [run.communicate(timeout=300)[0] for run in runs]

    assert [run.returncode for run in runs] == [0, 0], outputs
    items = _report(database, job_id)["items"]
    assert {item["status"] for item in items} == {"COMPLETED"}
    assert server.stats()["creates"] == len(items)


# 3: while creating; 12 (every create made, predictions still running): polling.
@pytest.mark.parametrize("kill_after_creates", [3, 12])
def test_a_run_killed_midway_resumes_without_paying_twice(
    prefect_api, database, provider, tmp_path: Path, kill_after_creates: int
):
    server = provider("--create-limit", "240", "--burst-seconds", "1", "--latency", "2")
    job_id = _submit(database, _many_samples(12), format="jpeg")
    env = {"IMAGEOPT_PROVIDER_URL": server.url, "IMAGEOPT_DATABASE_URL": database}
    args = ("run", str(job_id), "--output", str(tmp_path))

    first = _imageopt(*args, env=env)
    _wait_for(
        lambda: server.stats()["creates"] >= kill_after_creates,
        timeout=120,
        what=f"{kill_after_creates} creates",
    )
    first.send_signal(signal.SIGKILL)
    first.wait()
    interrupted = {i["status"] for i in _report(database, job_id)["items"]}
    second = _imageopt(*args, env=env)
    output = second.communicate(timeout=300)[0]

    assert second.returncode == 0, output
    assert interrupted & {"PENDING", "RUNNING", "PROCESSING"}
    items = _report(database, job_id)["items"]
    assert {item["status"] for item in items} == {"COMPLETED"}
    assert server.stats()["creates"] == len(items)
    assert len({item["output"] for item in items}) == len(items)


def test_cancel_stops_the_run_and_cancels_its_predictions(
    prefect_api, database, provider, tmp_path: Path
):
    server = provider("--create-limit", "0", "--read-limit", "0", "--latency", "60")
    job_id = _submit(database, _many_samples(6), format="jpeg")
    env = {"IMAGEOPT_PROVIDER_URL": server.url, "IMAGEOPT_DATABASE_URL": database}
    run = _imageopt("run", str(job_id), "--output", str(tmp_path), env=env)
    _wait_for(lambda: server.stats()["creates"] >= 6, timeout=120, what="6 creates")

    cancel = _imageopt("cancel", str(job_id), env=env)
    cancel_output = cancel.communicate(timeout=120)[0]
    run_output = run.communicate(timeout=120)[0]

    assert cancel.returncode == 0, cancel_output
    assert "6 item(s) canceled" in cancel_output
    # Every item ended, some canceled: exit code 1.
    assert run.returncode == 1, run_output
    report = _report(database, job_id)
    assert report["job"]["status"] == "CANCELED"
    assert {item["status"] for item in report["items"]} == {"CANCELED"}
    assert server.stats()["cancels"] >= 6


def _flow_run_of_job(job_id: int, run_id=None):
    """The job's running flow run, or the one with ``run_id``.

    Flow runs are named after their job, and job ids repeat across the tests'
    databases, which share one Prefect server.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                name=FlowRunFilterName(any_=[f"job-{job_id}"])
            )
        )
    if run_id is not None:
        return next(run for run in runs if run.id == run_id)
    (running,) = [run for run in runs if run.state and run.state.is_running()]
    return running


def test_canceling_the_flow_run_in_prefect_cancels_the_job(
    prefect_api, database, provider, tmp_path: Path
):
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelling

    server = provider("--create-limit", "0", "--read-limit", "0", "--latency", "60")
    job_id = _submit(database, _many_samples(4), format="jpeg")
    env = {"IMAGEOPT_PROVIDER_URL": server.url, "IMAGEOPT_DATABASE_URL": database}
    run = _imageopt("run", str(job_id), "--output", str(tmp_path), env=env)
    _wait_for(lambda: server.stats()["creates"] >= 4, timeout=120, what="4 creates")

    flow_run = _flow_run_of_job(job_id)
    with get_client(sync_client=True) as client:
        client.set_flow_run_state(flow_run.id, Cancelling(), force=True)
    output = run.communicate(timeout=120)[0]

    assert run.returncode == 1, output  # every item ended, canceled
    assert {i["status"] for i in _report(database, job_id)["items"]} == {"CANCELED"}
    assert server.stats()["cancels"] >= 4
    assert _flow_run_of_job(job_id, flow_run.id).state.is_cancelled()


def test_a_run_publishes_progress_a_table_and_a_summary(
    prefect_api, database, provider, tmp_path: Path
):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    provider("--create-limit", "0", "--read-limit", "0")
    job_id = _submit(database, [str(p) for p in sample_paths()[:2]])

    state = optimize_job(job_id=job_id, output=str(tmp_path), return_state=True)

    keys = [f"job-{job_id}-progress", f"job-{job_id}-items", f"job-{job_id}-summary"]
    flow_run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])
            )
        )
    by_key = {a.key: a for a in artifacts}
    assert set(by_key) == set(keys)
    assert by_key[f"job-{job_id}-progress"].data == 100.0
    assert "COMPLETED | 2" in by_key[f"job-{job_id}-summary"].data
    assert "astronaut.png" in str(by_key[f"job-{job_id}-items"].data)


def test_submit_status_and_the_submitted_event_through_the_command(
    prefect_api, database, tmp_path: Path
):
    folder = tmp_path / "images"
    folder.mkdir()
    for path in sample_paths()[:2]:
        (folder / path.name).write_bytes(path.read_bytes())
    (folder / "empty.png").write_bytes(b"")
    env = {"IMAGEOPT_DATABASE_URL": database}

    submitted = _imageopt(
        "submit",
        "--store",
        'Café "Zürich" Store',
        "--format",
        "webp",
        str(folder),
        env=env,
    )
    out = submitted.communicate(timeout=120)[0]
    job_id = int(out.strip().splitlines()[-1])
    status = _imageopt("status", str(job_id), "--json", env=env)
    report = json.loads(status.communicate(timeout=60)[0])

    assert submitted.returncode == 0, out
    assert report["job"]["store"] == 'Café "Zürich" Store'
    assert report["job"]["counts"]["PENDING"] == 2
    assert report["job"]["counts"]["FAILED"] == 1
    (failed,) = [i for i in report["items"] if i["status"] == "FAILED"]
    assert "empty.png is empty" in failed["error"]
    assert set(report["items"][0]) == {
        "id",
        "source",
        "status",
        "prediction_id",
        "bytes_in",
        "bytes_out",
        "output",
        "error",
    }
    assert _submitted_event_for(job_id)


def _submitted_event_for(job_id: int) -> bool:
    import httpx
    from prefect.settings import PREFECT_API_URL

    body = {
        "filter": {
            "event": {"name": ["imageopt.job.submitted"]},
            "resource": {"id": [f"imageopt.job.{job_id}"]},
        },
        "limit": 10,
    }
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        response = httpx.post(f"{PREFECT_API_URL.value()}/events/filter", json=body)
        if response.status_code == 200 and response.json()["events"]:
            return True
        time.sleep(0.5)
    return False


def test_submit_refuses_invalid_options_in_one_line(database):
    refused = _imageopt(
        "submit",
        "--store",
        "S",
        "--quality",
        "0",
        str(sample_paths()[0]),
        env={"IMAGEOPT_DATABASE_URL": database},
    )
    out = refused.communicate(timeout=60)[0]

    assert refused.returncode == 2
    assert out.strip().count("\n") == 0
    assert "--quality" in out and "Traceback" not in out


def test_outputs_go_to_the_prefect_filesystem_block_the_settings_name(
    prefect_api, database, provider, tmp_path: Path, monkeypatch
):
    from prefect.filesystems import LocalFileSystem

    provider("--create-limit", "0", "--read-limit", "0")
    block_name = f"outputs-{os.getpid()}-{time.monotonic_ns()}"
    LocalFileSystem(basepath=str(tmp_path / "block")).save(block_name)
    monkeypatch.setenv("IMAGEOPT_STORAGE_BLOCK", f"local-file-system/{block_name}")
    job_id = _submit(database, [str(sample_paths()[0])])

    optimize_job(job_id=job_id)

    (item,) = _report(database, job_id)["items"]
    assert item["status"] == "COMPLETED"
    assert item["output"].startswith(str(tmp_path / "block"))
    assert Path(item["output"]).stat().st_size == item["bytes_out"]
