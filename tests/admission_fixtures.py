"""Fixtures shared by the admission tests: a migrated database, admissions on it."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import psycopg
import pytest

from imageopt.admission import Admission
from imageopt.db import Database
from imageopt.migrate import run_migrations
from imageopt.records import ensure_store
from imageopt.settings import Settings


@pytest.fixture
def conninfo(make_database: Callable[[], str]) -> str:
    conninfo = make_database()
    run_migrations(conninfo)
    return conninfo


@pytest.fixture
def db(conninfo: str) -> Iterator[Database]:
    with Database(conninfo, max_size=4) as db:
        yield db


@pytest.fixture
def opened(db: Database) -> Iterator[Callable[..., Admission]]:
    """Open admissions (agents) on the test's database; each closed afterwards."""
    admissions: list[Admission] = []

    def open_admission(**settings) -> Admission:
        defaults = {"admission_burst_seconds": 1.0, "max_in_flight": 1000}
        admission = Admission.open(db, Settings(**{**defaults, **settings}))
        admissions.append(admission)
        return admission

    yield open_admission

    for admission in admissions:
        admission.close()


def add_store(conninfo: str, name: str, weight: int = 1) -> int:
    with psycopg.connect(conninfo, autocommit=True) as conn:
        return ensure_store(conn, name, weight=weight)
