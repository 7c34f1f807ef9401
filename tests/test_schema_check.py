"""The schema check and status transitions against a real PostgreSQL."""

from __future__ import annotations

import logging

import psycopg
import pytest

from imageopt.errors import IllegalTransitionError, SchemaTooOldError
from imageopt.migrate import run_migrations
from imageopt.records import create_job, ensure_store, item_history, transition
from imageopt.schema import SchemaCheck
from imageopt.status import ItemStatus


def _new_item(conn: psycopg.Connection) -> int:
    store_id = ensure_store(conn, "Schema test store")
    job_id = create_job(conn, store_id, ["https://example.com/a.jpg"], {})
    (item_id,) = conn.execute(
        "SELECT id FROM items WHERE job_id = %s", (job_id,)
    ).fetchone()
    return item_id


def _stored_status(conn: psycopg.Connection, item_id: int) -> str:
    (status,) = conn.execute(
        "SELECT status FROM items WHERE id = %s", (item_id,)
    ).fetchone()
    return status


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "imageopt.schema" and r.levelno == logging.WARNING
    ]


@pytest.fixture
def version_1_database(make_database) -> str:
    conninfo = make_database()
    run_migrations(conninfo, to=1)
    return conninfo


def test_a_database_without_schema_is_refused_with_the_command_to_run(make_database):
    with (
        psycopg.connect(make_database(), autocommit=True) as conn,
        pytest.raises(SchemaTooOldError) as caught,
    ):
        SchemaCheck().refresh(conn)

    message = str(caught.value)
    assert "version 0" in message
    assert "at least version 1" in message
    assert "imageopt migrate" in message


def test_create_phase_on_version_1_is_written_as_running_with_one_warning(
    version_1_database, caplog
):
    caplog.set_level(logging.WARNING, logger="imageopt")
    check = SchemaCheck()
    with psycopg.connect(version_1_database, autocommit=True) as conn:
        first, second = _new_item(conn), _new_item(conn)

        for item_id in (first, second):
            state = check.refresh(conn)
            transition(conn, state, item_id, ItemStatus.RUNNING, reason="creating")
            transition(
                conn,
                state,
                item_id,
                ItemStatus.PROCESSING,
                reason="prediction created",
                prediction_id=f"p-{item_id}",
            )

        stored = [_stored_status(conn, i) for i in (first, second)]
        history = item_history(conn, first)

    assert stored == ["RUNNING", "RUNNING"]
    assert [(h[0], h[1]) for h in history] == [
        (None, "PENDING"),
        ("PENDING", "RUNNING"),
        ("RUNNING", "RUNNING"),
    ]
    assert "PROCESSING stored as RUNNING" in history[-1][3]
    assert len(_warnings(caplog)) == 1
    assert "imageopt migrate" in _warnings(caplog)[0]


def test_after_migrate_the_same_process_writes_processing(version_1_database):
    check = SchemaCheck()
    with psycopg.connect(version_1_database, autocommit=True) as conn:
        before = _new_item(conn)
        state = check.refresh(conn)
        transition(conn, state, before, ItemStatus.RUNNING, reason="creating")

        run_migrations(version_1_database)
        after = _new_item(conn)
        state = check.refresh(conn)
        transition(conn, state, after, ItemStatus.RUNNING, reason="creating")
        transition(
            conn,
            state,
            after,
            ItemStatus.PROCESSING,
            reason="prediction created",
            prediction_id="p-after",
        )
        stored = _stored_status(conn, after)

    assert stored == "PROCESSING"


def test_an_item_started_in_compatibility_mode_finishes_after_migrate(
    version_1_database,
):
    check = SchemaCheck()
    with psycopg.connect(version_1_database, autocommit=True) as conn:
        item_id = _new_item(conn)
        state = check.refresh(conn)
        transition(conn, state, item_id, ItemStatus.RUNNING, reason="creating")
        transition(
            conn,
            state,
            item_id,
            ItemStatus.PROCESSING,
            reason="prediction created",
            prediction_id="p-compat",
        )

        run_migrations(version_1_database)
        state = check.refresh(conn)
        done = transition(conn, state, item_id, ItemStatus.COMPLETED, reason="stored")

    assert done.from_status is ItemStatus.PROCESSING
    assert done.stored_status is ItemStatus.COMPLETED


def test_canceled_on_version_1_is_stored_as_failed_saying_canceled(
    version_1_database,
):
    with psycopg.connect(version_1_database, autocommit=True) as conn:
        item_id = _new_item(conn)
        state = SchemaCheck().refresh(conn)

        transition(conn, state, item_id, ItemStatus.CANCELED, reason="canceled")
        history = item_history(conn, item_id)

    assert history[-1][1] == "FAILED"
    assert history[-1][3].startswith("canceled")


@pytest.fixture(scope="module")
def migrated_database(module_database) -> str:
    run_migrations(module_database)
    return module_database


def test_legal_transitions_leave_a_history_row_each(migrated_database):
    with psycopg.connect(migrated_database, autocommit=True) as conn:
        item_id = _new_item(conn)
        state = SchemaCheck().refresh(conn)

        transition(conn, state, item_id, ItemStatus.RUNNING, reason="creating")
        transition(
            conn,
            state,
            item_id,
            ItemStatus.PROCESSING,
            reason="created",
            prediction_id="p-legal",
        )
        transition(
            conn,
            state,
            item_id,
            ItemStatus.COMPLETED,
            reason="stored",
            bytes_in=1000,
            bytes_out=400,
            output="store/1/1.webp",
        )
        history = item_history(conn, item_id)
        row = conn.execute(
            "SELECT status, prediction_id, bytes_in, bytes_out, output FROM items"
            " WHERE id = %s",
            (item_id,),
        ).fetchone()

    assert [(h[0], h[1], h[3]) for h in history] == [
        (None, "PENDING", "submitted"),
        ("PENDING", "RUNNING", "creating"),
        ("RUNNING", "PROCESSING", "created"),
        ("PROCESSING", "COMPLETED", "stored"),
    ]
    assert row == ("COMPLETED", "p-legal", 1000, 400, "store/1/1.webp")


def test_an_illegal_transition_is_refused_naming_the_item_and_both_statuses(
    migrated_database,
):
    with psycopg.connect(migrated_database, autocommit=True) as conn:
        item_id = _new_item(conn)
        state = SchemaCheck().refresh(conn)
        transition(conn, state, item_id, ItemStatus.FAILED, reason="broken")

        with pytest.raises(IllegalTransitionError) as caught:
            transition(conn, state, item_id, ItemStatus.RUNNING, reason="again")
        history = item_history(conn, item_id)

    assert f"item {item_id}" in str(caught.value)
    assert "from FAILED to RUNNING" in str(caught.value)
    assert len(history) == 2


def test_processing_without_a_prediction_id_is_refused(migrated_database):
    with psycopg.connect(migrated_database, autocommit=True) as conn:
        item_id = _new_item(conn)
        state = SchemaCheck().refresh(conn)
        transition(conn, state, item_id, ItemStatus.RUNNING, reason="creating")

        with pytest.raises(ValueError, match="prediction id"):
            transition(conn, state, item_id, ItemStatus.PROCESSING, reason="created")

        assert _stored_status(conn, item_id) == "RUNNING"
