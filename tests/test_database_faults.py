"""PostgreSQL going away under a running job: the run rides it out.

Two ways the database fails a flow: the server restarts (every connection
breaks at once and nothing answers for a while), and a single connection is
dropped in the middle of an item's status change. Either way the run goes on,
finishes the job, and every status change it made is in the history once.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import psycopg
import pytest
from job_helpers import (
    check_outputs,
    history_problems,
    imageopt,
    private_cluster,
    report,
    sample_urls,
    stored_statuses,
    submit_job,
    wait_while_running,
)
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from flows.optimize_job import optimize_job
from imageopt.migrate import run_migrations

pytestmark = pytest.mark.slow

# The steps of an item that went through without a hitch.
CLEAN_HISTORY = [
    (None, "PENDING"),
    ("PENDING", "RUNNING"),
    ("RUNNING", "PROCESSING"),
    ("PROCESSING", "COMPLETED"),
]


def _steps(conninfo: str, job_id: int) -> dict[int, list[tuple]]:
    with psycopg.connect(conninfo) as conn:
        rows = conn.execute(
            "SELECT h.item_id, h.from_status::text, h.to_status::text"
            " FROM item_history h JOIN items i ON i.id = h.item_id"
            " WHERE i.job_id = %s ORDER BY h.item_id, h.at, h.id",
            (job_id,),
        ).fetchall()
    steps: dict[int, list[tuple]] = {}
    for item_id, from_status, to_status in rows:
        steps.setdefault(item_id, []).append((from_status, to_status))
    return steps


def _server_pid(conninfo: str) -> int:
    """The postmaster's process id: it changes when the server restarts."""
    with psycopg.connect(conninfo) as conn:
        (path,) = conn.execute("SHOW data_directory").fetchone()
    return int((Path(path) / "postmaster.pid").read_text().split()[0])


@pytest.fixture
def restartable():
    """A PostgreSQL cluster of the test's own, which it may restart."""
    with private_cluster() as (cluster, url):
        yield cluster, url


def test_a_restart_of_postgresql_mid_job_is_ridden_out_and_the_run_finishes(
    prefect_api, restartable, provider_server, image_server, tmp_path: Path
):
    cluster, url = restartable
    run_migrations(url)
    server = provider_server(
        "--allow-private-urls",
        "--create-limit",
        "0",
        "--read-limit",
        "0",
        "--latency",
        "uniform:0.5:1.5",
    )
    job_id = submit_job(url, sample_urls(image_server, 40), format="jpeg")
    env = {
        "IMAGEOPT_DATABASE_URL": url,
        "IMAGEOPT_PROVIDER_URL": server.url,
        # Four creates a second: the job is still creating when items complete.
        "IMAGEOPT_CREATES_PER_MINUTE": "240",
        "IMAGEOPT_ADMISSION_BURST_SECONDS": "0.5",
    }
    outputs = tmp_path / "outputs"
    run = imageopt("run", str(job_id), "--output", str(outputs), env=env)

    def mid_job() -> bool:
        counts = stored_statuses(url, job_id)
        return counts.get("COMPLETED", 0) >= 3 and counts.get("PENDING", 0) >= 5

    wait_while_running(run, mid_job, timeout=120, what="job half done")
    server_pid = _server_pid(url)
    cluster.stop()
    time.sleep(3)  # nothing answers meanwhile
    assert cluster.ensure_started() == url
    output = run.communicate(timeout=300)[0]

    assert run.returncode == 0, output
    items = report(url, job_id)["items"]
    assert {item["status"] for item in items} == {"COMPLETED"}, output
    assert server.stats()["creates"] == len(items)
    check_outputs(outputs, items)
    assert history_problems(url, job_id) == []
    assert _server_pid(url) != server_pid


class _BackendKiller(threading.Thread):
    """Drops the connection of every backend caught in an item's status change.

    A transition is a transaction of a ``SELECT ... FOR UPDATE`` on the item,
    an ``UPDATE`` and an ``INSERT`` into the history; a backend found in one
    of those, running or idle between them, is terminated.
    """

    def __init__(self, conninfo: str) -> None:
        super().__init__(daemon=True)
        self.conninfo = conninfo
        self.dbname = conninfo_to_dict(conninfo)["dbname"]
        self.admin = make_conninfo(conninfo, dbname="postgres")
        self.terminated: list[str] = []
        self.error: BaseException | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            self._kill_until_stopped()
        except BaseException as exc:
            self.error = exc

    def _kill_until_stopped(self) -> None:
        # Found and terminated in one statement, so that a backend that has
        # just finished its change is not caught idle. The CTE is materialized
        # so that no other backend (this one least of all) is terminated on
        # the way to the filter.
        caught = (
            "WITH caught AS MATERIALIZED (SELECT pid, query FROM pg_stat_activity"
            " WHERE datname = %s AND state IN ('active', 'idle in transaction')"
            " AND (query LIKE '%%FROM items WHERE id = $1 FOR UPDATE%%'"
            " OR query LIKE 'UPDATE items SET status%%'"
            " OR query LIKE 'INSERT INTO item_history%%'))"
            " SELECT query FROM caught WHERE pg_terminate_backend(pid)"
        )
        with psycopg.connect(self.admin, autocommit=True) as conn:
            while not self.stop.is_set():
                rows = conn.execute(caught, (self.dbname,)).fetchall()
                self.terminated += [query for (query,) in rows]
                time.sleep(0.02)


def test_connections_dropped_during_status_writes_lose_no_transition(
    prefect_api,
    make_database,
    provider_server,
    image_server,
    monkeypatch,
    tmp_path: Path,
):
    conninfo = make_database()
    run_migrations(conninfo)
    monkeypatch.setenv("IMAGEOPT_DATABASE_URL", conninfo)
    server = provider_server(
        "--allow-private-urls", "--create-limit", "0", "--read-limit", "0"
    )
    monkeypatch.setenv("IMAGEOPT_PROVIDER_URL", server.url)
    job_id = submit_job(conninfo, sample_urls(image_server, 40), format="jpeg")
    killer = _BackendKiller(conninfo)

    killer.start()
    try:
        optimize_job(job_id=job_id, output=str(tmp_path / "out"))
    finally:
        killer.stop.set()
        killer.join()

    items = report(conninfo, job_id)["items"]
    assert killer.error is None
    assert len(killer.terminated) >= 3, killer.terminated
    assert {item["status"] for item in items} == {"COMPLETED"}
    assert server.stats()["creates"] == len(items)
    assert all(steps == CLEAN_HISTORY for steps in _steps(conninfo, job_id).values())
    check_outputs(tmp_path / "out", items)
