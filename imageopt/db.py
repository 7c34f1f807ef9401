"""Database access: which PostgreSQL to use, and a connection pool to it.

Connections from the pool are in autocommit mode; code that writes more than
one row opens ``conn.transaction()`` explicitly, so a transaction's extent is
always visible where it is used. Every query is parameterized.

A restart of PostgreSQL, a failover or a terminated backend breaks the
connections in use at that moment. :meth:`Database.retrying` runs work that is
safe to repeat again on a fresh connection until the server answers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import psycopg
from psycopg_pool import ConnectionPool, PoolClosed

from imageopt.errors import DatabaseUnavailableError
from imageopt.settings import Settings, get_settings

logger = logging.getLogger(__name__)

T = TypeVar("T")

# How long work that is safe to repeat waits for the database to come back:
# enough for a restart or a failover, short enough to end a run that cannot go
# on and say why.
OUTAGE_BUDGET = 120.0


def database_url(settings: Settings | None = None) -> str:
    """``IMAGEOPT_DATABASE_URL``, or the embedded cluster's URL (started if needed)."""
    settings = settings or get_settings()
    if settings.database_url is not None:
        return settings.database_url.get_secret_value()

    from imageopt.embedded import EmbeddedCluster

    return EmbeddedCluster(settings.home).ensure_started()


class Database:
    """A pool of connections to imageopt's database.

    Connections are checked before they are handed out, so a pool outlives a
    server restart: a dead connection is replaced instead of failing a query.
    """

    def __init__(self, conninfo: str, *, min_size: int = 1, max_size: int = 8) -> None:
        self.conninfo = conninfo
        self.pool = ConnectionPool(
            conninfo,
            min_size=min_size,
            max_size=max_size,
            kwargs={"autocommit": True},
            check=ConnectionPool.check_connection,
            open=False,
            name="imageopt",
        )

    @classmethod
    def from_settings(cls, settings: Settings | None = None, **kwargs) -> Database:
        return cls(database_url(settings), **kwargs)

    def open(self, timeout: float = 30.0) -> Database:
        """Connect, or say at once why the database cannot be reached.

        One plain connection comes first: the pool would retry a wrong
        password or an unknown host for ``timeout`` seconds and then report
        only that it timed out.
        """
        try:
            psycopg.connect(self.conninfo, connect_timeout=int(timeout)).close()
        except psycopg.OperationalError as exc:
            # psycopg's message names the server and the user, never the
            # password.
            reason = str(exc).strip().replace("\n", " ")
            msg = (
                f"cannot connect to the database: {reason}; check "
                "IMAGEOPT_DATABASE_URL and that PostgreSQL is running"
            )
            raise DatabaseUnavailableError(msg) from exc
        self.pool.open(wait=True, timeout=timeout)
        return self

    def close(self) -> None:
        self.pool.close()

    def __enter__(self) -> Database:
        return self.open()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @contextmanager
    def connection(self) -> Iterator[psycopg.Connection]:
        with self.pool.connection() as conn:
            yield conn

    def retrying(
        self,
        what: str,
        work: Callable[[psycopg.Connection, bool], T],
        *,
        budget: float = OUTAGE_BUDGET,
    ) -> T:
        """``work(conn, again)`` on a connection, repeated on a fresh one while
        the database is unreachable.

        psycopg raises ``OperationalError`` for a lost connection, a server
        shutting down and a pool that cannot connect. ``again`` is true on a
        repeat: a write whose commit was sent may have landed although its
        answer was lost, so work that writes looks for its own effect first.
        After ``budget`` seconds of failures, raises DatabaseUnavailableError.
        """
        began = time.monotonic()
        failures = 0
        while True:
            try:
                with self.connection() as conn:
                    return work(conn, failures > 0)
            except PoolClosed:
                # Closed by its owner, which is done: nothing to wait for.
                raise
            except psycopg.OperationalError as exc:
                failures += 1
                waited = time.monotonic() - began
                if waited > budget:
                    msg = (
                        f"{what}: the database has been unreachable for "
                        f"{waited:.0f} s ({type(exc).__name__}): check that "
                        "PostgreSQL is running, then run the job again"
                    )
                    raise DatabaseUnavailableError(msg) from exc
                logger.warning(
                    "%s: the database connection was lost (%s); trying again",
                    what,
                    type(exc).__name__,
                )
                time.sleep(min(2.0, 0.1 * 2**failures))
