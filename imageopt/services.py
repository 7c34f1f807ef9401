"""Services imageopt starts for itself when none is configured.

``imageopt run`` needs a Prefect API and a prediction API. When
``PREFECT_API_URL`` is unset it starts a Prefect server in child processes
(its API and its services, sharing a Redis broker when Redis answers), on a
database ``prefect`` in the same PostgreSQL as imageopt's own (Prefect's
default SQLite falls behind, and locks up, at the rate of a job's task runs).
When ``IMAGEOPT_PROVIDER_URL`` is unset it starts ``imageopt serve-provider``.
Tests and benchmarks start both the same way.
"""

from __future__ import annotations

import contextlib
import getpass
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

import httpx
import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from imageopt.errors import ConfigurationError

logger = logging.getLogger(__name__)

PROVIDER_LISTENING = "imageopt provider listening on "

# How long a Prefect server process is given to stop before it is told again.
STOP_SECONDS = 10.0


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
        *,
        stop_signal: int = signal.SIGTERM,
    ) -> None:
        self.name = name
        self.log_path = log_path
        self.stop_signal = stop_signal
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
        """Signal it to stop, again after ``timeout`` seconds, then kill it.

        Both Prefect's server and uvicorn take a second signal as "stop now",
        without waiting for what they were still winding down.
        """
        for then in ("signalling it again", "killing it"):
            if self.process.poll() is not None:
                return
            self.process.send_signal(self.stop_signal)
            try:
                self.process.wait(timeout)
                return
            except subprocess.TimeoutExpired:
                logger.warning(
                    "%s did not stop within %.0f s; %s. Its last output:\n%s",
                    self.name,
                    timeout,
                    then,
                    "\n".join(list(self.lines)[-10:]),
                )
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


def ensure_database(conninfo: str, dbname: str) -> bool:
    """Create ``dbname`` on the server ``conninfo`` points at, if missing.

    Returns whether it was created.
    """
    with psycopg.connect(conninfo, autocommit=True) as conn:
        exists = conn.execute(
            "SELECT 1 FROM pg_database WHERE datname = %s", (dbname,)
        ).fetchone()
        if not exists:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))

    return not exists


# Where the Prefect server's message broker lives unless IMAGEOPT_REDIS_URL
# says otherwise.
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379"

# The keys that mark a Redis database as the broker of one Prefect database,
# and its server as running; the second expires ALIVE_SECONDS after its
# server stops renewing it.
BROKER_OWNER_KEY = "imageopt:prefect-database"
BROKER_ALIVE_KEY = "imageopt:prefect-server-running"
ALIVE_SECONDS = 30

# Prefect's modules for a Redis broker (the prefect-redis package): events,
# their de-duplication, their causal ordering for triggers, and the leases of
# concurrency slots, all shared by the API and services processes. The
# broker is prefect-redis's with a stream trimming that loses no unread event
# (imageopt.prefect_broker says why).
_REDIS_MODULES = {
    "PREFECT_MESSAGING_BROKER": "imageopt.prefect_broker",
    "PREFECT_MESSAGING_CACHE": "prefect_redis.messaging",
    "PREFECT_SERVER_EVENTS_CAUSAL_ORDERING": "prefect_redis.ordering",
    "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": "prefect_redis.lease_storage",
}

# What the server does for every task-run state, tuned. A task-run state
# reaches the server as an event; the services record it as a task-run state
# (the task-run recorder), store the event itself (the event persister, for
# the UI's event feed) and match it against automations (triggers). Profiled
# with py-spy while a job ran, Prefect's defaults spent most of the server's
# CPU on one database transaction per event in the recorder, each statement
# compiled anew by SQLAlchemy, because it reads and writes one event at a
# time. Batches make that cost per batch. A batch is written once full or
# after FLUSH_INTERVAL seconds; the recorder and the persister acknowledge an
# event to the broker when they take it into a batch, so a services process
# that is killed (not stopped) loses the batch it holds. Stopped, it writes it.
_BATCH = "100"
_FLUSH_INTERVAL = "1"
SERVICE_SETTINGS = {
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_READ_BATCH_SIZE": _BATCH,
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE": _BATCH,
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_FLUSH_INTERVAL": _FLUSH_INTERVAL,
    "PREFECT_SERVER_SERVICES_EVENT_PERSISTER_READ_BATCH_SIZE": _BATCH,
    "PREFECT_SERVER_SERVICES_EVENT_PERSISTER_BATCH_SIZE": _BATCH,
    "PREFECT_SERVER_SERVICES_EVENT_PERSISTER_FLUSH_INTERVAL": _FLUSH_INTERVAL,
    "PREFECT_SERVER_SERVICES_TRIGGERS_READ_BATCH_SIZE": _BATCH,
    # The API publishes the events of each client connection to Redis five at
    # a time, or every PUBLISH_EVERY (10 s by default): the last events of a
    # run would wait that long before any service sees them.
    "PREFECT_REDIS_MESSAGING_PUBLISHER_PUBLISH_EVERY": "1",
    # Redis drops from a stream what every consumer group has read, but skips
    # groups whose consumers have all been idle for TRIM_IDLE_THRESHOLD (5
    # minutes by default): services down longer than that would come back to
    # find the events of their downtime gone. A day of events at 600 items a
    # minute is a few gigabytes of Redis memory.
    "PREFECT_REDIS_MESSAGING_CONSUMER_TRIM_IDLE_THRESHOLD": str(24 * 3600),
}


class RedisBroker:
    """A Redis database that carries one Prefect server's events.

    Every Prefect server imageopt starts gets a database number of its own
    (prefect-redis has no key prefix), so that parallel tests and benchmarks
    never read each other's streams; ``redis://host:port/N`` names one
    outright. The database is marked with the Prefect database it serves
    (``BROKER_OWNER_KEY``): a server started again on the same Prefect
    database finds its broker, and the events it had not recorded yet, where
    it left them. While its server runs, a mark that expires unless renewed
    (``BROKER_ALIVE_KEY``) says so. A database whose server is not running is
    emptied and taken over when its Prefect database no longer exists on the
    same PostgreSQL, or lives on another PostgreSQL, which cannot be checked.
    """

    def __init__(self, url: str, db: int, owner: str) -> None:
        self.url = url
        self.db = db
        self.owner = owner
        self._stop_renewing = threading.Event()

    def __str__(self) -> str:
        # The URL may carry a password: name the server and database only.
        parts = urlsplit(self.url)
        return f"redis://{parts.hostname}:{parts.port or 6379}/{self.db}"

    def env(self) -> dict[str, str]:
        """Prefect's settings for a server that uses this broker."""
        parts = urlsplit(self.url)
        url = urlunsplit((parts.scheme, parts.netloc, f"/{self.db}", "", ""))
        return {**_REDIS_MODULES, "PREFECT_REDIS_MESSAGING_URL": url}

    def client(self):
        import redis

        return redis.Redis.from_url(self.url, db=self.db)

    @classmethod
    def claim(cls, url: str, owner: str, admin: str) -> RedisBroker | None:
        """The database for ``owner``'s server; None when Redis does not answer.

        ``admin`` is a connection to the PostgreSQL of the Prefect database,
        used to tell a stale broker from one in use.
        """
        import redis

        parts = urlsplit(url)
        explicit = parts.path.strip("/")
        try:
            with redis.Redis.from_url(url, socket_connect_timeout=3) as client:
                client.ping()
                databases = _database_count(client)
        except redis.RedisError as exc:
            logger.warning(
                "Redis at %s:%s does not answer (%s)",
                parts.hostname,
                parts.port or 6379,
                type(exc).__name__,
            )
            return None

        if explicit:
            broker = cls(url, int(explicit), owner)
            with broker.client() as client:
                client.set(BROKER_OWNER_KEY, owner)
            return broker

        # Its own broker first: a restarted server continues where it stopped.
        for db in range(1, databases):
            with redis.Redis.from_url(url, db=db) as client:
                if client.get(BROKER_OWNER_KEY) == owner.encode():
                    return cls(url, db, owner)
        for db in range(1, databases):
            with redis.Redis.from_url(url, db=db) as client:
                if _take(client, owner, admin):
                    return cls(url, db, owner)

        msg = (
            f"no free Redis database for the Prefect server's broker among the "
            f"{databases - 1} at {parts.hostname}:{parts.port or 6379} (0 is left "
            f"alone): each serves a running server or an existing Prefect "
            f"database; stop those, or name a database in IMAGEOPT_REDIS_URL "
            f"(redis://host:port/N)"
        )
        raise ConfigurationError(msg)

    def forget(self) -> None:
        """Drop the events it holds, for a Prefect database that starts empty."""
        with self.client() as client:
            client.flushdb()
            client.set(BROKER_OWNER_KEY, self.owner)

    def keep_alive(self) -> None:
        """Mark its server running until ``let_go``, renewing the mark."""
        self._stop_renewing.clear()
        threading.Thread(target=self._renew, daemon=True).start()

    def let_go(self) -> None:
        import redis

        self._stop_renewing.set()
        with contextlib.suppress(redis.RedisError), self.client() as client:
            client.delete(BROKER_ALIVE_KEY)

    def _renew(self) -> None:
        import redis

        with self.client() as client:
            while True:
                try:
                    client.set(BROKER_ALIVE_KEY, self.owner, ex=ALIVE_SECONDS)
                except redis.RedisError as exc:
                    logger.warning(
                        "cannot mark broker %s in use (%s); retrying",
                        self,
                        type(exc).__name__,
                    )
                if self._stop_renewing.wait(ALIVE_SECONDS / 3):
                    return


def _database_count(client) -> int:
    import redis

    try:
        return int(client.config_get("databases")["databases"])
    except (redis.RedisError, KeyError, ValueError):
        # Managed Redis services often refuse CONFIG; 16 is Redis's default.
        return 16


def _take(client, owner: str, admin: str) -> bool:
    """Mark this Redis database as ``owner``'s broker if it is free or stale."""
    import redis

    if client.set(BROKER_OWNER_KEY, owner, nx=True):
        if client.dbsize() == 1:
            return True
        # Keys without our mark: someone else's data; leave it alone.
        client.delete(BROKER_OWNER_KEY)
        return False

    with client.pipeline() as pipe:
        try:
            pipe.watch(BROKER_OWNER_KEY, BROKER_ALIVE_KEY)
            current = pipe.get(BROKER_OWNER_KEY)
            if pipe.exists(BROKER_ALIVE_KEY) or (
                current is not None and _prefect_database_exists(current, admin)
            ):
                return False
            pipe.multi()
            pipe.flushdb()
            pipe.set(BROKER_OWNER_KEY, owner)
            pipe.execute()
        except redis.WatchError:
            # Another server took it first.
            return False

    return True


def _broker_owner(conninfo: str, dbname: str) -> str:
    """The name a broker is marked with: the Prefect database and its server."""
    params = conninfo_to_dict(conninfo)
    host = params.get("host") or "/var/run/postgresql"
    return f"{host}:{params.get('port') or 5432}/{dbname}"


def _prefect_database_exists(owner: bytes, admin: str) -> bool:
    """Whether a broker's Prefect database is still there, on ``admin``'s server.

    A database on another PostgreSQL cannot be checked and counts as gone.
    """
    where, _, dbname = owner.decode(errors="replace").rpartition("/")
    if _broker_owner(admin, "") != f"{where}/":
        return False
    with psycopg.connect(admin, autocommit=True) as conn:
        found = conn.execute(
            "SELECT 1 FROM pg_database WHERE datname = %s", (dbname,)
        ).fetchone()

    return found is not None


class PrefectServerProcess:
    """A Prefect server on PostgreSQL, on a free loopback port.

    One Prefect server process records about 40 task-run states a second on
    two cores, whatever the flow achieves, and an in-memory broker loses every
    event it has not recorded when it stops. So, when Redis answers, the
    server runs split, as Prefect runs in production:

    - the API: ``prefect server start --no-services`` (``api_workers`` worker
      processes), which takes the events in and publishes them to Redis;
    - the services: ``prefect server services start``, which record them;
    - the broker: Redis streams (prefect-redis), in a database of the
      server's own (:class:`RedisBroker`). An event waits there until a
      service has taken it, through a restart of either process.

    Without Redis it runs as one process with Prefect's in-memory broker, and
    says so. ``split=False`` asks for that layout; ``tuned=False`` leaves out
    ``SERVICE_SETTINGS``, for comparisons with Prefect's defaults.

    ``stop()`` and ``start()`` restart it on the same port, database and
    broker.
    """

    def __init__(
        self,
        conninfo: str,
        *,
        dbname: str = "prefect",
        home: Path,
        extra_env: dict[str, str] | None = None,
        # A two-core machine under a load of 20 took two minutes to import
        # Prefect's server before it answered.
        timeout: float = 600.0,
        split: bool = True,
        api_workers: int = 1,
        tuned: bool = True,
        redis_url: str | None = None,
    ) -> None:
        created = ensure_database(conninfo, dbname)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/api"
        self.api_workers = api_workers
        # Each process's output is appended to a log here, across restarts.
        self.home = home
        home.mkdir(parents=True, exist_ok=True)
        self._timeout = timeout
        self.broker: RedisBroker | None = None
        if split:
            url = redis_url or os.environ.get("IMAGEOPT_REDIS_URL", DEFAULT_REDIS_URL)
            self.broker = RedisBroker.claim(
                url, _broker_owner(conninfo, dbname), conninfo
            )
            if self.broker is None:
                logger.warning(
                    "running the Prefect server as one process with an in-memory "
                    "broker: history it has not recorded is lost if it stops"
                )
            elif created:
                self.broker.forget()
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")},
            "PREFECT_HOME": str(home),
            "PREFECT_API_DATABASE_CONNECTION_URL": asyncpg_url(conninfo, dbname),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            # Output lines as they come: start() waits for one of them.
            "PYTHONUNBUFFERED": "1",
            # The UI the server serves calls the API at this URL; left unset it
            # would be derived from the default port, 4200, not this one.
            "PREFECT_UI_API_URL": self.url,
            **(SERVICE_SETTINGS if tuned else {}),
            **(self.broker.env() if self.broker else {}),
            **(extra_env or {}),
        }
        self.api: ChildProcess | None = None
        self.services: ChildProcess | None = None
        self.start()

    @property
    def split(self) -> bool:
        return self.broker is not None

    @property
    def process(self) -> subprocess.Popen:
        """The API's process (the only one when not split)."""
        assert self.api is not None, "the Prefect server is stopped"
        return self.api.process

    def start(self) -> None:
        """Start the API, wait until it answers, then start the services."""
        argv = [
            *("-m", "prefect", "server", "start"),
            *("--host", "127.0.0.1", "--port", str(self.port)),
        ]
        if self.broker is not None:
            self.broker.keep_alive()
            argv += ["--no-services", "--workers", str(self.api_workers)]
            logger.info(
                "starting a Prefect server at %s: API and services apart, broker %s",
                self.url,
                self.broker,
            )
        else:
            logger.info("starting a Prefect server at %s", self.url)
        self.api = ChildProcess(
            "the Prefect server",
            [sys.executable, *argv],
            self.env,
            log_path=self.home / "api.log",
        )
        self._wait_until_healthy(self._timeout)
        if self.split:
            # SIGINT: the services write the batches they hold, then exit.
            self.services = ChildProcess(
                "the Prefect server's services",
                [sys.executable, "-m", "prefect", "server", "services", "start"],
                self.env,
                log_path=self.home / "services.log",
                stop_signal=signal.SIGINT,
            )
            self.services.wait_for_line("Starting services", self._timeout)

    def stop(self) -> None:
        """Stop the API first, so that the events it holds reach the broker.

        Each process is given time to wind down before it is signalled again:
        the API to publish the events it holds, the services to write the
        batches they hold, which they have already told the broker are taken.
        Both take a second or two; killed, they would lose those.
        """
        for child in (self.api, self.services):
            if child is not None:
                child.stop(timeout=STOP_SECONDS)
        self.api = self.services = None
        if self.broker is not None:
            self.broker.let_go()

    def pids(self) -> list[int]:
        """Every process of the server: API, its workers, services."""
        roots = [c.process.pid for c in (self.api, self.services) if c is not None]

        return [pid for root in roots for pid in [root, *_descendants(root)]]

    def cpu_seconds(self) -> float:
        """CPU time (user and system) of every process of the server so far."""
        return sum(_cpu_seconds(pid) for pid in self.pids())

    def _wait_until_healthy(self, timeout: float) -> None:
        assert self.api is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.api.process.poll() is not None:
                self.api._fail("exited")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.api._fail(f"did not answer within {timeout:.0f} s")


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pid: int) -> float:
    """User and system CPU time of a live process, from ``/proc``; 0 if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    # After the command name in parentheses, utime and stime are the 12th and
    # 13th fields (proc(5) numbers them 14 and 15 from the start).
    fields = stat.rsplit(")", 1)[1].split()

    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def _descendants(pid: int) -> list[int]:
    found: list[int] = []
    parents = [pid]
    while parents:
        parent = parents.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            with contextlib.suppress(OSError, ValueError):
                children = [int(c) for c in (task / "children").read_text().split()]
                found += children
                parents += children

    return found


def flush_to_prefect(timeout: float = 30.0) -> None:
    """Send the events and logs this process still holds to the Prefect API."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    EventsWorker.drain_all(timeout=timeout)
    APILogWorker.drain_all(timeout=timeout)


def wait_for_history(
    flow_run_id, timeout: float = 300.0, stalled_after: float = 30.0
) -> float:
    """Wait until the Prefect server has recorded every task run of a flow run.

    Task-run states travel as events that the server records after the fact;
    a server stopped before it caught up loses them. "Recorded" means the
    server's count of the run's task runs has stopped growing and none of them
    is left in a state that is not final. Waiting stops, with a warning, after
    ``timeout`` seconds, or once neither count has moved for ``stalled_after``
    seconds: what the server has not recorded by then it is not going to.
    Returns the seconds waited.
    """
    from prefect.client.orchestration import get_client

    flush_to_prefect()
    began = moved_at = time.monotonic()
    runs = {"id": {"any_": [str(flow_run_id)]}}
    # Scheduled covers a poll waiting for its retry.
    unfinished = {
        "state": {
            "type": {
                "any_": ["SCHEDULED", "PENDING", "RUNNING", "PAUSED", "CANCELLING"]
            }
        }
    }
    previous = None
    with get_client(sync_client=True) as client:

        def count(**filters: dict) -> int:
            response = client.request("POST", "/task_runs/count", json=filters)
            response.raise_for_status()
            return response.json()

        while True:
            now = time.monotonic()
            counts = count(flow_runs=runs), count(flow_runs=runs, task_runs=unfinished)
            if counts == previous and counts[1] == 0:
                break
            if counts != previous:
                previous, moved_at = counts, now
            if now - moved_at > stalled_after or now - began > timeout:
                logger.warning(
                    "the Prefect server shows %s task run(s) of flow run %s "
                    "unfinished %.0f s after the flow ended, and has recorded "
                    "nothing new for %.0f s; the UI will show them so, and the "
                    "items' statuses in imageopt's database are unaffected",
                    counts[1],
                    flow_run_id,
                    now - began,
                    now - moved_at,
                )
                break
            time.sleep(1.0)

    return time.monotonic() - began
