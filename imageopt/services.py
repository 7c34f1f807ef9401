"""Services imageopt starts for itself when none is configured.

``imageopt run`` needs a Prefect API and a prediction API. When
``PREFECT_API_URL`` is unset it starts a Prefect server in a child process,
on a database ``prefect`` in the same PostgreSQL as imageopt's own (Prefect's
default SQLite falls behind, and locks up, at the rate of a job's task runs).
When ``IMAGEOPT_PROVIDER_URL`` is unset it starts ``imageopt serve-provider``.
Tests and benchmarks start both the same way.
"""

from __future__ import annotations

import contextlib
import getpass
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path
from urllib.parse import quote

import httpx
import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from imageopt.errors import ConfigurationError

logger = logging.getLogger(__name__)

PROVIDER_LISTENING = "imageopt provider listening on "


class ChildProcess:
    """A service in a child process.

    Its last output lines are kept for error messages, and all of them are
    written to ``log_path`` when one is given.
    """

    def __init__(
        self,
        name: str,
        argv: list[str],
        env: dict[str, str],
        log_path: Path | None = None,
    ) -> None:
        self.name = name
        self.log_path = log_path
        self.process = subprocess.Popen(
            argv,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        )
        self.lines: deque[str] = deque(maxlen=200)
        self._matched = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        with contextlib.ExitStack() as stack:
            log = (
                stack.enter_context(self.log_path.open("a")) if self.log_path else None
            )
            for line in self.process.stdout:
                if log is not None:
                    log.write(line)
                    log.flush()
                with self._matched:
                    self.lines.append(line.rstrip("\n"))
                    self._matched.notify_all()

    def wait_for_line(self, prefix: str, timeout: float) -> str:
        """The first output line starting with ``prefix``."""
        deadline = time.monotonic() + timeout
        with self._matched:
            while True:
                for line in self.lines:
                    if line.startswith(prefix):
                        return line
                if self.process.poll() is not None:
                    self._fail("exited")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self._fail(f"did not start within {timeout:.0f} s")
                self._matched.wait(min(remaining, 0.5))

    def _fail(self, what: str) -> None:
        tail = "\n".join(list(self.lines)[-20:])
        self.stop()
        msg = f"{self.name} {what}; its last output:\n{tail}"
        raise ConfigurationError(msg)

    def stop(self, timeout: float = 20.0) -> None:
        if self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


# Where a PostgreSQL server usually answers on a developer's machine.
_LOCAL_POSTGRES = (
    "host=/var/run/postgresql dbname=postgres",
    "host=/tmp dbname=postgres",
    "host=127.0.0.1 port=5432 dbname=postgres user=postgres",
)


def local_postgres() -> str | None:
    """A connection to the machine's own PostgreSQL, if one answers."""
    for conninfo in _LOCAL_POSTGRES:
        try:
            psycopg.connect(conninfo, connect_timeout=3).close()
        except psycopg.Error:
            continue
        return conninfo

    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ProviderProcess(ChildProcess):
    """``imageopt serve-provider`` on a free loopback port."""

    def __init__(
        self, *options: str, token: str | None = None, log_path: Path | None = None
    ) -> None:
        env = dict(os.environ)
        argv = [sys.executable, "-m", "imageopt", "serve-provider", "--port", "0"]
        env.pop("IMAGEOPT_PROVIDER_SERVER_TOKEN", None)
        if token is not None:
            # Given through the environment, not argv, where `ps` would show it.
            env["IMAGEOPT_PROVIDER_SERVER_TOKEN"] = token
        super().__init__("the provider server", [*argv, *options], env, log_path)
        line = self.wait_for_line(PROVIDER_LISTENING, timeout=60)
        self.url = line[len(PROVIDER_LISTENING) :].strip()

    def stats(self) -> dict:
        return httpx.get(f"{self.url}/_stats", timeout=10).json()


def asyncpg_url(conninfo: str, dbname: str) -> str:
    """A SQLAlchemy URL for Prefect's server to reach ``dbname`` on that server."""
    params = conninfo_to_dict(conninfo)
    user = quote(params.get("user") or getpass.getuser(), safe="")
    password = params.get("password")
    credentials = user + (f":{quote(password, safe='')}" if password else "")
    host = params.get("host") or "/var/run/postgresql"
    port = params.get("port")
    if host.startswith("/"):
        query = f"?host={quote(host)}" + (f"&port={port}" if port else "")
        return f"postgresql+asyncpg://{credentials}@/{dbname}{query}"

    netloc = f"{host}:{port}" if port else host
    return f"postgresql+asyncpg://{credentials}@{netloc}/{dbname}"


def ensure_database(conninfo: str, dbname: str) -> None:
    """Create ``dbname`` on the server ``conninfo`` points at, if missing."""
    with psycopg.connect(conninfo, autocommit=True) as conn:
        exists = conn.execute(
            "SELECT 1 FROM pg_database WHERE datname = %s", (dbname,)
        ).fetchone()
        if not exists:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))


class PrefectServerProcess(ChildProcess):
    """A Prefect server on PostgreSQL, on a free loopback port."""

    def __init__(
        self,
        conninfo: str,
        *,
        dbname: str = "prefect",
        home: Path,
        extra_env: dict[str, str] | None = None,
        timeout: float = 180.0,
    ) -> None:
        ensure_database(conninfo, dbname)
        port = free_port()
        self.url = f"http://127.0.0.1:{port}/api"
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")},
            "PREFECT_HOME": str(home),
            "PREFECT_API_DATABASE_CONNECTION_URL": asyncpg_url(conninfo, dbname),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            # The UI the server serves calls the API at this URL; left unset it
            # would be derived from the default port, 4200, not this one.
            "PREFECT_UI_API_URL": self.url,
            **(extra_env or {}),
        }
        argv = [
            sys.executable,
            "-m",
            "prefect",
            "server",
            "start",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ]
        logger.info("starting a Prefect server at %s", self.url)
        super().__init__("the Prefect server", argv, env)
        self._wait_until_healthy(timeout)

    def _wait_until_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self._fail("exited")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self._fail(f"did not answer within {timeout:.0f} s")


def flush_to_prefect(timeout: float = 30.0) -> None:
    """Send the events and logs this process still holds to the Prefect API."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    EventsWorker.drain_all(timeout=timeout)
    APILogWorker.drain_all(timeout=timeout)


def wait_for_history(flow_run_id, timeout: float = 300.0) -> float:
    """Wait until the Prefect server has recorded every task run of a flow run.

    Task-run states travel as events that the server records after the fact;
    a server stopped before it caught up loses them. "Recorded" means the
    server's count of the run's task runs has stopped growing and none of them
    is left in a state that is not final. Returns the seconds waited.
    """
    from prefect.client.orchestration import get_client

    flush_to_prefect()
    began = time.monotonic()
    runs = {"id": {"any_": [str(flow_run_id)]}}
    # Scheduled covers a poll waiting for its retry.
    unfinished = {
        "state": {
            "type": {
                "any_": ["SCHEDULED", "PENDING", "RUNNING", "PAUSED", "CANCELLING"]
            }
        }
    }
    previous = -1
    with get_client(sync_client=True) as client:

        def count(**filters: dict) -> int:
            response = client.request("POST", "/task_runs/count", json=filters)
            response.raise_for_status()
            return response.json()

        while time.monotonic() - began < timeout:
            total = count(flow_runs=runs)
            if total == previous and count(flow_runs=runs, task_runs=unfinished) == 0:
                break
            previous = total
            time.sleep(1.0)

    return time.monotonic() - began
