"""What every pipeline benchmark starts: a database, a Prefect server, a provider.

The database is a fresh one on ``IMAGEOPT_BENCH_DATABASE_URL``'s server, else
on the machine's own PostgreSQL, else in a throwaway embedded cluster; it is
dropped afterwards. The Prefect server runs on a second fresh database there;
Prefect's migrations for PostgreSQL create the ``pg_trgm`` extension, so the
server's PostgreSQL must have it available (``postgresql-contrib`` on most
systems). The server is started without its UI, which a benchmark does not
look at and which costs seconds to copy into place at every start.

A benchmark that makes several runs may start one Prefect server and give
each run its own database and provider (:func:`prefect_server`, then
:func:`environment` with ``server=``): a Prefect server takes tens of seconds
to start on a busy two-core machine, and every run waits until the server
has recorded the history of the one before. Within :func:`shared_server`
(what ``--quick`` runs in), every benchmark's :func:`prefect_server` is that
one server.

Jobs run as ``imageopt run`` in child processes (:func:`run_child`), whose
peak memory and thread count are sampled from ``/proc`` while they run and
whose CPU time is read when they are reaped.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import psycopg
from PIL import Image
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from imageopt.jobs import submit
from imageopt.migrate import run_migrations
from imageopt.optimizer import OptimizeOptions
from imageopt.schema import SchemaCheck
from imageopt.services import PrefectServerProcess, ProviderProcess, local_postgres

# Admission settings under which it never paces: for runs whose provider has
# no limits, so that what is measured is the pipeline itself.
NO_ADMISSION_LIMITS = {
    "IMAGEOPT_CREATES_PER_MINUTE": "1000000",
    "IMAGEOPT_READS_PER_MINUTE": "1000000",
}

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class MissingExtensionError(RuntimeError):
    """The PostgreSQL benchmarks run on cannot host a Prefect server."""


@dataclass
class PrefectServer:
    """A running Prefect server: where its API is, and its processes."""

    url: str
    process: PrefectServerProcess = field(repr=False)

    @property
    def layout(self) -> str:
        """``split`` (API and services in processes of their own) or ``single``."""
        return "split" if getattr(self.process, "split", False) else "single"

    def pids(self) -> list[int]:
        """Every process of the server: the API, its workers, the services."""
        listed = getattr(self.process, "pids", None)
        if listed is not None:
            return listed()
        root = self.process.process.pid

        return [root, *_descendants(root)]

    def cpu_seconds(self) -> float:
        return sum(process_cpu_seconds(pid, children=False) for pid in self.pids())


@dataclass
class Environment:
    conninfo: str
    server: PrefectServer
    provider: ProviderProcess
    workdir: Path

    @property
    def prefect_url(self) -> str:
        return self.server.url

    def env(self, **settings: str) -> dict[str, str]:
        """The environment of an ``imageopt`` command run against these services."""
        return {
            **os.environ,
            "IMAGEOPT_DATABASE_URL": self.conninfo,
            "IMAGEOPT_PROVIDER_URL": self.provider.url,
            "IMAGEOPT_HOME": str(self.workdir),
            "PREFECT_API_URL": self.server.url,
            **settings,
        }


@contextlib.contextmanager
def _admin_conninfo() -> Iterator[str]:
    explicit = os.environ.get("IMAGEOPT_BENCH_DATABASE_URL") or local_postgres()
    if explicit:
        yield explicit
        return

    from imageopt.embedded import EmbeddedCluster

    with tempfile.TemporaryDirectory(prefix="imageopt-bench-pg-") as home:
        cluster = EmbeddedCluster(Path(home))
        yield make_conninfo(cluster.ensure_started(), dbname="postgres")
        cluster.stop()


@contextlib.contextmanager
def _fresh_database(admin: str) -> Iterator[str]:
    name = f"imageopt_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield make_conninfo(admin, dbname=name)
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                    sql.Identifier(name)
                )
            )


def require_pg_trgm(admin: str) -> None:
    """Fail early, saying what to install, when ``pg_trgm`` is not available."""
    with psycopg.connect(admin, autocommit=True) as conn:
        found = conn.execute(
            "SELECT 1 FROM pg_available_extensions WHERE name = 'pg_trgm'"
        ).fetchone()
    if found is None:
        where = conninfo_to_dict(admin).get("host") or "the default socket"
        msg = (
            f"the PostgreSQL at {where} lacks the pg_trgm extension, which "
            "Prefect's migrations create: install PostgreSQL's contrib package "
            "(postgresql-contrib), or point IMAGEOPT_BENCH_DATABASE_URL at a "
            "server that has it"
        )
        raise MissingExtensionError(msg)


# Within shared_server(): where the shared server is stopped, and the server.
_sharing: contextlib.ExitStack | None = None
_shared: PrefectServer | None = None


@contextlib.contextmanager
def shared_server() -> Iterator[None]:
    """Within this block every :func:`prefect_server` is one and the same,
    started when first asked for and stopped at the block's end."""
    global _sharing, _shared
    with contextlib.ExitStack() as stack:
        _sharing = stack
        try:
            yield
        finally:
            _sharing = _shared = None


@contextlib.contextmanager
def prefect_server() -> Iterator[PrefectServer]:
    """A Prefect server on a fresh PostgreSQL database, stopped and dropped after."""
    global _shared
    if _sharing is None:
        with _new_prefect_server() as server:
            yield server
        return
    if _shared is None:
        _shared = _sharing.enter_context(_new_prefect_server())
    yield _shared


@contextlib.contextmanager
def _new_prefect_server() -> Iterator[PrefectServer]:
    with contextlib.ExitStack() as stack:
        admin = stack.enter_context(_admin_conninfo())
        require_pg_trgm(admin)
        prefect_db = stack.enter_context(_fresh_database(admin))
        home = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        server = PrefectServerProcess(
            prefect_db,
            dbname=conninfo_to_dict(prefect_db)["dbname"],
            home=home / "prefect",
            extra_env={"PREFECT_SERVER_UI_ENABLED": "false"},
        )
        stack.callback(server.stop)
        yield PrefectServer(server.url, server)


@contextlib.contextmanager
def environment(
    *provider_options: str, server: PrefectServer | None = None
) -> Iterator[Environment]:
    """A migrated database and a provider, fresh; a fresh Prefect server too
    unless ``server`` is given."""
    with contextlib.ExitStack() as stack:
        if server is None:
            server = stack.enter_context(prefect_server())
        admin = stack.enter_context(_admin_conninfo())
        conninfo = stack.enter_context(_fresh_database(admin))
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        run_migrations(conninfo)
        provider = ProviderProcess(*provider_options)
        stack.callback(provider.stop)
        yield Environment(conninfo, server, provider, workdir)


def tiny_image(directory: Path) -> Path:
    """A small photo-like image, so that the optimizer's cost stays out of the way."""
    path = directory / "tiny.png"
    image = Image.linear_gradient("L").resize((64, 64)).convert("RGB")
    image.save(path)
    return path


def submit_job(conninfo: str, store: str, sources: list[str], **options) -> int:
    with psycopg.connect(conninfo, autocommit=True) as conn:
        schema = SchemaCheck().refresh(conn)
        return submit(
            conn,
            schema,
            store,
            sources,
            OptimizeOptions(**options),
            max_input_bytes=50_000_000,
        )


# -- child processes ----------------------------------------------------------


def process_cpu_seconds(pid: int, *, children: bool = True) -> float:
    """User and system CPU time of a running process (and its descendants).

    Read from ``/proc/PID/stat`` (fields 14 and 15, in clock ticks); a
    process that has already exited counts as 0.
    """
    total = 0.0
    for each in [pid, *(_descendants(pid) if children else [])]:
        try:
            fields = Path(f"/proc/{each}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # After the ")" closing the command name, field 3 is the state, so
        # utime (field 14) and stime (field 15) are at indexes 11 and 12.
        total += (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS

    return total


def _descendants(pid: int) -> list[int]:
    found = []
    pending = [pid]
    while pending:
        parent = pending.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            with contextlib.suppress(OSError):
                children = [int(c) for c in (task / "children").read_text().split()]
                found.extend(children)
                pending.extend(children)

    return found


@dataclass
class ChildRun:
    """A command run to its end (or stopped), as the benchmarks report it."""

    argv: list[str]
    log: Path
    began: float
    seconds: float = 0.0
    # Wall-clock time (the database's clock too) when it ended or was stopped.
    ended_at: float = 0.0
    returncode: int | None = None
    cpu_seconds: float = 0.0
    peak_rss_mb: float = 0.0
    peak_threads: int = 0
    stopped: bool = False
    process: subprocess.Popen | None = field(default=None, repr=False)
    _peaks: dict[str, int] = field(default_factory=dict, repr=False)
    _sampler: threading.Thread | None = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:]

    def check(self, what: str) -> None:
        if self.returncode != 0 and not self.stopped:
            msg = f"{what} failed (exit {self.returncode}):\n{self.tail()}"
            raise RuntimeError(msg)


def start_child(argv: list[str], env: dict[str, str], log: Path) -> ChildRun:
    """Start ``argv``, its output to ``log``; :func:`finish_child` ends it."""
    with log.open("w") as out:
        process = subprocess.Popen(
            argv,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    run = ChildRun(argv, log, time.monotonic(), process=process)
    run._peaks = {"rss_kb": 0, "threads": 0}
    run._sampler = threading.Thread(
        target=_sample, args=(process, run._peaks), daemon=True
    )
    run._sampler.start()

    return run


def finish_child(run: ChildRun, timeout: float | None = None) -> ChildRun:
    """Wait for the child (stopping it after ``timeout``) and fill in its figures.

    The child is reaped with ``wait4``, whose resource usage gives its CPU
    time to the last tick, after it can no longer be read from ``/proc``.
    A ``poll()`` or ``wait()`` on its process that reaps it first leaves
    ``cpu_seconds`` at 0.
    """
    assert run.process is not None
    deadline = None if timeout is None else run.began + timeout
    while run.process.returncode is None:
        pid, status, usage = os.wait4(run.pid, os.WNOHANG)
        if pid == run.pid:
            run.process.returncode = os.waitstatus_to_exitcode(status)
            run.cpu_seconds = usage.ru_utime + usage.ru_stime
            break
        if deadline is not None and time.monotonic() > deadline and not run.stopped:
            run.stopped = True
            run.ended_at = time.time()
            run.seconds = time.monotonic() - run.began
            run.process.terminate()
            deadline = time.monotonic() + 20
            continue
        if run.stopped and time.monotonic() > deadline:
            run.process.kill()
        time.sleep(0.05)

    if not run.stopped:
        run.ended_at = time.time()
        run.seconds = time.monotonic() - run.began
    run.returncode = run.process.returncode
    if run._sampler is not None:
        run._sampler.join()
    run.peak_rss_mb = round(run._peaks["rss_kb"] / 1024, 1)
    run.peak_threads = run._peaks["threads"]

    return run


def run_child(
    argv: list[str], env: dict[str, str], log: Path, timeout: float | None = None
) -> ChildRun:
    return finish_child(start_child(argv, env, log), timeout)


def imageopt_run(job_id: int) -> list[str]:
    """The command that runs a job's flow in a process of its own."""
    return [sys.executable, "-m", "imageopt", "run", str(job_id)]


def run_job(env: Environment, job_id: int, **settings: str) -> ChildRun:
    """``imageopt run JOB`` in a child process, to its end."""
    log = env.workdir / f"run-{job_id}.log"

    return run_child(imageopt_run(job_id), env.env(**settings), log)


def _sample(process: subprocess.Popen, peaks: dict[str, int]) -> None:
    status = Path(f"/proc/{process.pid}/status")
    while process.returncode is None:
        try:
            text = status.read_text()
        except OSError:
            break
        for line in text.splitlines():
            key, _, value = line.partition(":")
            if key == "VmRSS":
                peaks["rss_kb"] = max(peaks["rss_kb"], int(value.split()[0]))
            elif key == "Threads":
                peaks["threads"] = max(peaks["threads"], int(value))
        time.sleep(0.2)


# -- what the database says happened -------------------------------------------


@dataclass
class ItemTimes:
    """When the items of some jobs were created and completed, from their history."""

    # Epoch seconds of each item's first PENDING -> RUNNING (its create).
    creates: dict[int, float]
    # Epoch seconds of each item's COMPLETED.
    completions: dict[int, float]

    @property
    def first_create(self) -> float:
        return min(self.creates.values())

    @property
    def last_completion(self) -> float:
        return max(self.completions.values())

    @property
    def span(self) -> float:
        """From the first create to the last completion."""
        return self.last_completion - self.first_create

    def per_minute(self, until: float | None = None) -> float:
        """Items completed a minute, from the first create to ``until`` (or the last
        completion)."""
        end = self.last_completion if until is None else until
        seconds = end - self.first_create

        return round(60.0 * len(self.completions) / seconds, 1) if seconds > 0 else 0.0


def item_times(conninfo: str, job_ids: list[int]) -> ItemTimes:
    with psycopg.connect(conninfo) as conn:
        rows = conn.execute(
            """
            SELECT h.item_id, h.from_status::text, h.to_status::text,
                   extract(epoch FROM h.at)::float8
            FROM item_history h JOIN items i ON i.id = h.item_id
            WHERE i.job_id = ANY(%s)
            ORDER BY h.at, h.id
            """,
            (job_ids,),
        ).fetchall()

    times = ItemTimes({}, {})
    for item_id, old, new, at in rows:
        if (old, new) == ("PENDING", "RUNNING"):
            times.creates.setdefault(item_id, at)
        elif new == "COMPLETED":
            times.completions[item_id] = at

    return times


# Task-run states the Prefect server has not seen the end of; SCHEDULED
# covers a poll waiting for its retry.
UNFINISHED = ["SCHEDULED", "PENDING", "RUNNING", "PAUSED", "CANCELLING"]


def flow_runs_of(job_ids: list[int], since: datetime | None = None) -> dict:
    """The Prefect API's filter for the flow runs of these jobs, started after
    ``since`` when given: each benchmark run has a database of its own, so a
    Prefect server shared by several runs holds a ``job-1`` for each."""
    runs: dict = {"name": {"any_": [f"job-{job_id}" for job_id in job_ids]}}
    if since is not None:
        runs["start_time"] = {"after_": since.isoformat()}

    return runs


def unrecorded_task_runs(
    server: PrefectServer, job_ids: list[int], since: datetime
) -> int:
    """Task runs of the jobs' flow runs that the server shows unfinished.

    ``imageopt run`` waits for the server to record its flow run's history
    for at most 300 s; a run that ended with some still unrecorded shows here.
    """
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    filters = {
        "flow_runs": flow_runs_of(job_ids, since),
        "task_runs": {"state": {"type": {"any_": UNFINISHED}}},
    }
    with (
        temporary_settings({PREFECT_API_URL: server.url}),
        get_client(sync_client=True) as client,
    ):
        response = client.request("POST", "/task_runs/count", json=filters)
        response.raise_for_status()

        return response.json()


def states_per_item(
    api_url: str, job_ids: list[int], items: int, since: datetime
) -> float:
    """Task-run states the server holds for the jobs' flow runs, per item."""
    counted = count_states(api_url, flow_runs_of(job_ids, since))

    return round(counted["states"] / items, 2)


def count_states(api_url: str, flow_runs: dict) -> dict[str, int]:
    """Task runs of the flow runs ``flow_runs`` selects (a Prefect API filter)
    and their states, as the UI reads them: the task runs a page at a time,
    then each one's states."""
    return asyncio.run(_count_states(api_url, flow_runs))


async def _count_states(api_url: str, flow_runs: dict) -> dict[str, int]:
    import httpx

    async with httpx.AsyncClient(base_url=api_url, timeout=60) as client:
        task_runs = []
        while True:
            page = await _ask(
                client,
                "POST",
                "/task_runs/filter",
                json={
                    "flow_runs": flow_runs,
                    # A stable order, so that pages neither overlap nor skip.
                    "sort": "ID_DESC",
                    "offset": len(task_runs),
                    "limit": 200,
                },
            )
            task_runs.extend(page)
            if len(page) < 200:
                break

        gate = asyncio.Semaphore(8)

        async def states_of(task_run_id: str) -> int:
            async with gate:
                states = await _ask(
                    client,
                    "GET",
                    "/task_run_states/",
                    params={"task_run_id": task_run_id},
                )
                return len(states)

        counts = await asyncio.gather(*(states_of(t["id"]) for t in task_runs))

    return {"task_runs": len(task_runs), "states": sum(counts)}


async def _ask(client, method: str, url: str, **options) -> list:
    """An API answer, asked again while a busy server answers 503."""
    for _ in range(30):
        response = await client.request(method, url, **options)
        if response.status_code != 503:
            break
        await asyncio.sleep(2)
    response.raise_for_status()

    return response.json()
