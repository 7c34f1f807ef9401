"""The ``migrate`` flow, run by Prefect against a temporary Prefect API."""

from __future__ import annotations

import psycopg
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
from prefect.logging.handlers import APILogWorker

from flows.migrate import migrate
from imageopt.migrate import current_version, newest_version


def _flow_run_logs(flow_run_id) -> list[str]:
    APILogWorker.drain_all(timeout=10)
    with get_client(sync_client=True) as client:
        logs = client.read_logs(
            log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))
        )
    return [log.message for log in logs]


def test_migrate_flow_applies_pending_migrations_and_logs_each(
    prefect_api, make_database, monkeypatch
):
    conninfo = make_database()
    monkeypatch.setenv("IMAGEOPT_DATABASE_URL", conninfo)

    state = migrate(return_state=True)

    assert state.is_completed()
    assert len(state.result()) == newest_version()
    with psycopg.connect(conninfo) as conn:
        assert current_version(conn) == newest_version()
    logs = _flow_run_logs(state.state_details.flow_run_id)
    assert "applied migration 0001_initial" in " ".join(logs)
    assert "applied migration 0002_processing_status" in " ".join(logs)


def test_migrate_flow_dry_run_changes_nothing(prefect_api, make_database, monkeypatch):
    conninfo = make_database()
    monkeypatch.setenv("IMAGEOPT_DATABASE_URL", conninfo)

    labels = migrate(dry_run=True)

    assert labels[0] == "0001_initial"
    with psycopg.connect(conninfo) as conn:
        assert current_version(conn) == 0
