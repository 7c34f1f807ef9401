"""Shared fixtures: a real PostgreSQL for every test module, and a clean home.

The server is ``IMAGEOPT_TEST_DATABASE_URL`` when set; else the machine's
PostgreSQL on its socket or on 127.0.0.1:5432 when one answers; else a
throwaway cluster started from the installed server programs. Each test module
(or test, through ``make_database``) gets a database of its own, dropped
afterwards.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from imageopt.services import local_postgres

pytest_plugins = ["provider_fixtures", "admission_fixtures", "deploy_fixtures"]


@pytest.fixture(scope="session", autouse=True)
def isolated_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Keep tests away from the user's own embedded cluster and settings."""
    home = tmp_path_factory.mktemp("imageopt-home")
    saved = {k: v for k, v in os.environ.items() if k.startswith("IMAGEOPT_")}
    for key in saved:
        if key != "IMAGEOPT_TEST_DATABASE_URL":
            del os.environ[key]
    os.environ["IMAGEOPT_HOME"] = str(home)

    yield home

    os.environ.pop("IMAGEOPT_HOME", None)
    os.environ.update(saved)


@pytest.fixture(scope="session")
def admin_conninfo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A connection to a server where tests may create and drop databases."""
    explicit = os.environ.get("IMAGEOPT_TEST_DATABASE_URL")
    if explicit:
        yield explicit
        return

    local = local_postgres()
    if local is not None:
        yield local
        return

    from imageopt.embedded import EmbeddedCluster

    cluster = EmbeddedCluster(tmp_path_factory.mktemp("throwaway-postgres"))
    url = cluster.ensure_started()
    yield make_conninfo(url, dbname="postgres")
    cluster.stop()


@pytest.fixture(scope="session")
def make_database(admin_conninfo: str) -> Iterator[Callable[[], str]]:
    """A factory of empty databases, each dropped when the session ends."""
    created: list[str] = []

    def make() -> str:
        name = f"imageopt_test_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(admin_conninfo, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        created.append(name)
        return make_conninfo(admin_conninfo, dbname=name)

    yield make

    with psycopg.connect(admin_conninfo, autocommit=True) as conn:
        for name in created:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def prefect_api(
    make_database: Callable[[], str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """A real Prefect server on PostgreSQL for the session; its API URL.

    Set for this process and for the processes tests start.
    """
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from imageopt.services import PrefectServerProcess, flush_to_prefect

    conninfo = make_database()
    server = PrefectServerProcess(
        conninfo,
        dbname=conninfo_to_dict(conninfo)["dbname"],
        home=tmp_path_factory.mktemp("prefect-home"),
    )
    os.environ["PREFECT_API_URL"] = server.url
    try:
        with temporary_settings({PREFECT_API_URL: server.url}):
            yield server.url
            flush_to_prefect()
    finally:
        os.environ.pop("PREFECT_API_URL", None)
        server.stop()


@pytest.fixture(scope="module")
def module_database(make_database: Callable[[], str]) -> str:
    """An empty database shared by the tests of one module."""
    return make_database()
