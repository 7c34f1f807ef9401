"""What every pipeline benchmark starts: a database, a Prefect server, a provider.

The database is a fresh one on ``IMAGEOPT_BENCH_DATABASE_URL``'s server, else
on the machine's own PostgreSQL, else in a throwaway embedded cluster; it is
dropped afterwards. The Prefect server runs on a second fresh database there.
Jobs run as ``imageopt run`` in a child process, whose peak memory and thread
count are sampled from ``/proc`` while it runs.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
from PIL import Image
from psycopg import sql
from psycopg.conninfo import make_conninfo

from imageopt.jobs import submit
from imageopt.migrate import run_migrations
from imageopt.optimizer import OptimizeOptions
from imageopt.schema import SchemaCheck
from imageopt.services import PrefectServerProcess, ProviderProcess, local_postgres


@dataclass
class Environment:
    conninfo: str
    prefect_url: str
    provider: ProviderProcess
    workdir: Path

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "IMAGEOPT_DATABASE_URL": self.conninfo,
            "IMAGEOPT_PROVIDER_URL": self.provider.url,
            "PREFECT_API_URL": self.prefect_url,
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


@contextlib.contextmanager
def environment(*provider_options: str) -> Iterator[Environment]:
    """A migrated database, a Prefect server and a provider, all fresh."""
    with contextlib.ExitStack() as stack:
        admin = stack.enter_context(_admin_conninfo())
        conninfo = stack.enter_context(_fresh_database(admin))
        prefect_db = stack.enter_context(_fresh_database(admin))
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        run_migrations(conninfo)
        server = PrefectServerProcess(
            prefect_db,
            dbname=psycopg.conninfo.conninfo_to_dict(prefect_db)["dbname"],
            home=workdir / "prefect",
        )
        stack.callback(server.stop)
        provider = ProviderProcess(*provider_options)
        stack.callback(provider.stop)
        yield Environment(conninfo, server.url, provider, workdir)


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


@dataclass
class RunResult:
    seconds: float
    returncode: int
    peak_rss_mb: float
    peak_threads: int
    output: str


def run_job(env: Environment, job_id: int) -> RunResult:
    """``imageopt run JOB`` in a child process, sampling its memory and threads."""
    began = time.monotonic()
    process = subprocess.Popen(
        [sys.executable, "-m", "imageopt", "run", str(job_id)],
        env={**env.env(), "IMAGEOPT_HOME": str(env.workdir)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    peaks = {"rss_kb": 0, "threads": 0}
    sampler = threading.Thread(target=_sample, args=(process, peaks), daemon=True)
    sampler.start()
    output, _ = process.communicate()
    seconds = time.monotonic() - began
    sampler.join()

    return RunResult(
        seconds=seconds,
        returncode=process.returncode,
        peak_rss_mb=round(peaks["rss_kb"] / 1024, 1),
        peak_threads=peaks["threads"],
        output=output,
    )


def _sample(process: subprocess.Popen, peaks: dict[str, int]) -> None:
    status = Path(f"/proc/{process.pid}/status")
    while process.poll() is None:
        with contextlib.suppress(OSError):
            for line in status.read_text().splitlines():
                key, _, value = line.partition(":")
                if key == "VmRSS":
                    peaks["rss_kb"] = max(peaks["rss_kb"], int(value.split()[0]))
                elif key == "Threads":
                    peaks["threads"] = max(peaks["threads"], int(value))
        time.sleep(0.2)
