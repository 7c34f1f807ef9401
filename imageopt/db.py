"""Database access: which PostgreSQL to use, and a connection pool to it.

Connections from the pool are in autocommit mode; code that writes more than
one row opens ``conn.transaction()`` explicitly, so a transaction's extent is
always visible where it is used. Every query is parameterized.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
from psycopg_pool import ConnectionPool

from imageopt.settings import Settings, get_settings

logger = logging.getLogger(__name__)


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
