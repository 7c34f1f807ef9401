"""Helpers for the tests that try to break a job: submit, run, watch, check.

The checks here are the promises every such test ends on: every item has
ended with a reason, its history is one unbroken chain ending in its status,
and the storage folder holds exactly one readable file per completed item.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from PIL import Image

from imageopt.embedded import EmbeddedCluster
from imageopt.jobs import job_report, submit
from imageopt.optimizer import OptimizeOptions
from imageopt.samples import sample_paths
from imageopt.schema import SchemaCheck

FINAL = {"COMPLETED", "FAILED", "CANCELED"}


def submit_job(
    conninfo: str,
    sources: list[str],
    *,
    store: str = "Test store",
    max_input_bytes: int = 50_000_000,
    **options,
) -> int:
    with psycopg.connect(conninfo, autocommit=True) as conn:
        schema = SchemaCheck().refresh(conn)
        return submit(
            conn,
            schema,
            store,
            sources,
            OptimizeOptions(**options),
            max_input_bytes=max_input_bytes,
        )


def report(conninfo: str, job_id: int) -> dict:
    with psycopg.connect(conninfo) as conn:
        return job_report(conn, job_id)


def sample_urls(image_server, count: int) -> list[str]:
    """``count`` URLs of the sample images, served by the test image server."""
    names = [path.name for path in sample_paths()]
    return [image_server.sample_url(names[i % len(names)]) for i in range(count)]


def imageopt(*args: str, env: dict[str, str]) -> subprocess.Popen:
    """``imageopt ARGS`` in a child process, stdout and stderr together."""
    return subprocess.Popen(
        [sys.executable, "-m", "imageopt", *args],
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def run_command(*args: str, env: dict[str, str], timeout: float = 300) -> tuple:
    """Run ``imageopt ARGS`` to its end: (exit code, output)."""
    process = imageopt(*args, env=env)
    output = process.communicate(timeout=timeout)[0]
    return process.returncode, output


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    pytest.fail(f"timed out after {timeout:g} s waiting for {what}")


def wait_while_running(
    run: subprocess.Popen, condition: Callable[[], bool], timeout: float, what: str
) -> None:
    """Wait for ``condition`` while ``run`` works; its output if it never comes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and run.poll() is None:
        if condition():
            return
        time.sleep(0.05)
    if run.poll() is None:
        run.kill()
    output = run.communicate()[0]
    pytest.fail(f"no {what} (exit code {run.returncode}); the run said:\n{output}")


def stored_statuses(conninfo: str, job_id: int) -> dict[str, int]:
    """How many of the job's items are in each stored status, plus ``claimed``:
    RUNNING without a prediction id (the create is under way)."""
    with psycopg.connect(conninfo) as conn:
        rows = conn.execute(
            "SELECT status::text, count(*), count(prediction_id) FROM items"
            " WHERE job_id = %s GROUP BY 1",
            (job_id,),
        ).fetchall()
    counts = {status: n for status, n, _ in rows}
    counts["claimed"] = sum(n - ids for status, n, ids in rows if status == "RUNNING")
    counts["with_prediction"] = sum(ids for _, _, ids in rows)
    return counts


def history_problems(conninfo: str, job_id: int) -> list[str]:
    """Every way the job's item histories break the chain, or no entry at all.

    A history starts with (none → PENDING), each step starts where the one
    before ended, and the last step ends in the item's stored status; every
    step has a reason.
    """
    with psycopg.connect(conninfo) as conn:
        items = conn.execute(
            "SELECT id, status::text FROM items WHERE job_id = %s ORDER BY id",
            (job_id,),
        ).fetchall()
        rows = conn.execute(
            "SELECT h.item_id, h.from_status::text, h.to_status::text, h.reason"
            " FROM item_history h JOIN items i ON i.id = h.item_id"
            " WHERE i.job_id = %s ORDER BY h.item_id, h.at, h.id",
            (job_id,),
        ).fetchall()
    steps: dict[int, list[tuple]] = {}
    for item_id, from_status, to_status, reason in rows:
        steps.setdefault(item_id, []).append((from_status, to_status, reason))

    problems = []
    for item_id, status in items:
        history = steps.get(item_id, [])
        if not history or history[0][:2] != (None, "PENDING"):
            problems.append(f"item {item_id}: history does not start at PENDING")
            continue
        for before, step in itertools.pairwise(history):
            if step[0] != before[1]:
                problems.append(f"item {item_id}: {before[:2]} then {step[:2]}")
        if history[-1][1] != status:
            problems.append(
                f"item {item_id}: history ends {history[-1][1]}, is {status}"
            )
        if any(not reason for *_, reason in history):
            problems.append(f"item {item_id}: a step without a reason")
    return problems


def check_outputs(folder: Path, items: list[dict]) -> None:
    """One file per completed item, where its row says, decoding as an image;
    nothing else in the folder."""
    completed = [item for item in items if item["status"] == "COMPLETED"]
    files = sorted(p for p in folder.rglob("*") if p.is_file())

    assert sorted(Path(item["output"]) for item in completed) == files
    for item in completed:
        path = Path(item["output"])
        assert path.stat().st_size == item["bytes_out"], item
        with Image.open(path) as image:
            image.load()


@contextlib.contextmanager
def private_cluster() -> Iterator[tuple[EmbeddedCluster, str]]:
    """A PostgreSQL cluster of the test's own, with password authentication,
    and its URL; stopped and deleted afterwards.

    Not under pytest's tmp_path, which the account PostgreSQL runs as (when
    the tests run as root) cannot reach.
    """
    home = Path(tempfile.mkdtemp(prefix="imageopt-cluster-")) / "home"
    cluster = EmbeddedCluster(home)
    try:
        yield cluster, cluster.ensure_started()
    finally:
        cluster.stop()
        shutil.rmtree(home.parent, ignore_errors=True)
