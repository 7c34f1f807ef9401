"""The PROCESSING migration lands while a job runs on a version-1 database.

The run starts in compatibility mode (RUNNING stored for both phases), the
migration that adds PROCESSING (0002) is applied in the middle, and the run
goes on without a restart and without an enum error. It looks at the schema
again for each page of pending items it reads (100 at a time), so the items of
the second page, created after the migration, are stored PROCESSING.
"""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest
from job_helpers import (
    history_problems,
    imageopt,
    report,
    run_command,
    sample_urls,
    stored_statuses,
    wait_while_running,
)

from imageopt.migrate import run_migrations

pytestmark = pytest.mark.slow

ITEMS = 150
PAGE = 100  # the flow's page of pending items


def _created_as(conninfo: str, job_id: int) -> dict[int, tuple]:
    """For each item, what its create's end was stored as, and when."""
    with psycopg.connect(conninfo) as conn:
        rows = conn.execute(
            "SELECT h.item_id, h.to_status::text, h.at FROM item_history h"
            " JOIN items i ON i.id = h.item_id WHERE i.job_id = %s"
            " AND h.from_status = 'RUNNING'"
            " AND h.to_status IN ('RUNNING', 'PROCESSING')",
            (job_id,),
        ).fetchall()
    return {item_id: (status, at) for item_id, status, at in rows}


def test_a_job_on_version_1_takes_up_processing_once_0002_lands_mid_run(
    prefect_api, make_database, provider_server, image_server, tmp_path: Path
):
    conninfo = make_database()
    env = {"IMAGEOPT_DATABASE_URL": conninfo}
    code, output = run_command("migrate", "--to", "1", env=env)
    assert code == 0, output
    server = provider_server(
        "--allow-private-urls", "--create-limit", "0", "--read-limit", "0"
    )
    code, output = run_command(
        "submit",
        "--store",
        "Old schema store",
        f"@{_listing(tmp_path, sample_urls(image_server, ITEMS))}",
        env=env,
    )
    job_id = int(output.strip().splitlines()[-1])
    first_id = min(item["id"] for item in report(conninfo, job_id)["items"])
    run = imageopt(
        "run",
        str(job_id),
        "--output",
        str(tmp_path / "out"),
        env={
            **env,
            "IMAGEOPT_PROVIDER_URL": server.url,
            "IMAGEOPT_CREATES_PER_MINUTE": "600",
            "IMAGEOPT_ADMISSION_BURST_SECONDS": "0.5",
            "IMAGEOPT_MAX_IN_FLIGHT": "20",
        },
    )
    wait_while_running(
        run,
        lambda: stored_statuses(conninfo, job_id).get("COMPLETED", 0) >= 5,
        timeout=120,
        what="the first items completed in compatibility mode",
    )

    run_migrations(conninfo, to=2)
    with psycopg.connect(conninfo) as conn:
        (migrated_at,) = conn.execute("SELECT now()").fetchone()
        (second_page,) = conn.execute(
            "SELECT status::text FROM items WHERE id = %s", (first_id + PAGE,)
        ).fetchone()
    output = run.communicate(timeout=300)[0]

    assert second_page == "PENDING", "the run read its second page too early"
    assert run.returncode == 0, output
    assert "invalid input value for enum" not in output
    items = report(conninfo, job_id)["items"]
    assert {item["status"] for item in items} == {"COMPLETED"}
    assert server.stats()["creates"] == ITEMS
    created = _created_as(conninfo, job_id)
    before = [i for i, (_, at) in created.items() if at < migrated_at]
    assert before and all(created[i][0] == "RUNNING" for i in before)
    second = range(first_id + PAGE, first_id + ITEMS)
    assert [created[i][0] for i in second] == ["PROCESSING"] * len(second)
    assert history_problems(conninfo, job_id) == []


def _listing(folder: Path, sources: list[str]) -> Path:
    path = folder / "sources.txt"
    path.write_text("".join(f"{source}\n" for source in sources))
    return path
