"""The migration runner against a real PostgreSQL."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest

from imageopt.errors import MigrationChecksumError, MigrationError
from imageopt.migrate import (
    ADVISORY_LOCK_KEY,
    current_version,
    default_directory,
    load_migrations,
    newest_version,
    run_migrations,
)


def _enum_labels(conninfo: str, type_name: str) -> list[str]:
    with psycopg.connect(conninfo) as conn:
        rows = conn.execute(
            "SELECT e.enumlabel FROM pg_enum e JOIN pg_type t ON t.oid = e.enumtypid"
            " WHERE t.typname = %s ORDER BY e.enumsortorder",
            (type_name,),
        ).fetchall()
    return [label for (label,) in rows]


def _recorded_versions(conninfo: str) -> list[int]:
    with psycopg.connect(conninfo) as conn:
        rows = conn.execute("SELECT version FROM schema_migrations ORDER BY 1")
        return [v for (v,) in rows.fetchall()]


def _imageopt(*args: str, conninfo: str) -> subprocess.Popen:
    env = {**os.environ, "IMAGEOPT_DATABASE_URL": conninfo}
    return subprocess.Popen(
        [sys.executable, "-m", "imageopt", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_processing_is_added_by_its_own_file_outside_a_transaction():
    migrations = load_migrations()

    assert [m.version for m in migrations][:2] == [1, 2]
    assert "ADD VALUE IF NOT EXISTS 'PROCESSING'" in migrations[1].sql
    assert migrations[0].transactional
    assert not migrations[1].transactional


def test_fresh_database_migrates_to_the_newest_version(make_database):
    conninfo = make_database()

    report = run_migrations(conninfo)

    assert report.start_version == 0
    assert report.end_version == newest_version()
    assert _recorded_versions(conninfo) == [m.version for m in load_migrations()]
    assert "PROCESSING" in _enum_labels(conninfo, "item_status")


def test_second_run_applies_nothing(make_database):
    conninfo = make_database()
    run_migrations(conninfo)

    report = run_migrations(conninfo)

    assert report.applied == []
    assert report.start_version == report.end_version == newest_version()


def test_two_runners_started_together_both_succeed_and_apply_each_file_once(
    make_database,
):
    conninfo = make_database()
    # Hold the runners' lock so that both are provably waiting at once.
    with psycopg.connect(conninfo, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (ADVISORY_LOCK_KEY,))
        runners = [_imageopt("migrate", conninfo=conninfo) for _ in range(2)]
        _wait_for_lock_waiters(holder, count=2)
        holder.execute("SELECT pg_advisory_unlock(%s)", (ADVISORY_LOCK_KEY,))

    outcomes = [(r.wait(timeout=60), r.stdout.read()) for r in runners]

    assert [code for code, _ in outcomes] == [0, 0]
    applied_lines = [
        line for _, out in outcomes for line in out.splitlines() if "applied" in line
    ]
    assert len(applied_lines) == len(load_migrations())
    assert _recorded_versions(conninfo) == [m.version for m in load_migrations()]


def _wait_for_lock_waiters(conn: psycopg.Connection, count: int) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        (waiting,) = conn.execute(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
        ).fetchone()
        if waiting >= count:
            return
        time.sleep(0.05)
    pytest.fail(f"expected {count} runners waiting for the migration lock")


def test_to_version_1_builds_a_database_without_processing(make_database):
    conninfo = make_database()

    report = run_migrations(conninfo, to=1)

    assert report.end_version == 1
    assert _enum_labels(conninfo, "item_status") == [
        "PENDING",
        "RUNNING",
        "COMPLETED",
        "FAILED",
    ]


def test_dry_run_lists_pending_migrations_and_changes_nothing(make_database):
    conninfo = make_database()
    run_migrations(conninfo, to=1)

    runner = _imageopt("migrate", "--dry-run", conninfo=conninfo)
    out, err = runner.communicate(timeout=60)

    assert runner.returncode == 0, err
    assert "would apply 0002_processing_status" in out
    assert "would apply 0001" not in out
    assert _recorded_versions(conninfo) == [1]


def test_changed_applied_file_is_refused_with_nothing_applied(
    make_database, tmp_path: Path
):
    conninfo = make_database()
    history = tmp_path / "migrations"
    shutil.copytree(default_directory(), history)
    run_migrations(conninfo, to=1, directory=history)
    first = next(history.glob("0001_*.sql"))
    first.write_text(first.read_text() + "\nCREATE TABLE sneaky (id int);\n")

    with pytest.raises(MigrationChecksumError) as caught:
        run_migrations(conninfo, directory=history)

    assert "0001_initial" in str(caught.value)
    assert "new migration file" in str(caught.value)
    assert _recorded_versions(conninfo) == [1]
    assert "PROCESSING" not in _enum_labels(conninfo, "item_status")


def test_a_file_marked_no_transaction_runs_outside_a_transaction(
    make_database, admin_conninfo, tmp_path: Path
):
    conninfo = make_database()
    name = f"imageopt_notx_{os.getpid()}"
    # CREATE DATABASE is refused inside a transaction block.
    (tmp_path / "0001_make_database.sql").write_text(
        f'-- imageopt: no-transaction\nCREATE DATABASE "{name}";\n'
    )

    try:
        report = run_migrations(conninfo, directory=tmp_path)
    finally:
        with psycopg.connect(admin_conninfo, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}"')

    assert [m.label for m in report.applied] == ["0001_make_database"]


def test_an_unmarked_file_runs_in_a_transaction_and_fails_whole(
    make_database, tmp_path: Path
):
    conninfo = make_database()
    (tmp_path / "0001_half.sql").write_text(
        "CREATE TABLE kept_only_if_all_runs (id int);\nSELECT 1 / 0;\n"
    )

    with pytest.raises(MigrationError, match="0001_half failed"):
        run_migrations(conninfo, directory=tmp_path)

    with psycopg.connect(conninfo) as conn:
        query = "SELECT to_regclass('kept_only_if_all_runs')"
        (table,) = conn.execute(query).fetchone()
        assert table is None
        assert current_version(conn) == 0


def test_migrate_command_reports_the_version_it_reached(make_database):
    conninfo = make_database()

    runner = _imageopt("migrate", "--to", "2", conninfo=conninfo)
    out, err = runner.communicate(timeout=60)

    assert runner.returncode == 0, err
    assert out.splitlines()[-1] == "schema at version 2"
    assert _recorded_versions(conninfo) == [1, 2]
