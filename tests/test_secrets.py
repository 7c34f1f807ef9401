"""The provider token and the database password reach nothing a person reads.

A job runs with a distinctive token and a database with a real password (a
private cluster with password authentication), with faults that make the
code talk: failed predictions, 5xx answers, lost creates, debug logging. A
second job runs with a wrong token, so that refusals are explained too. Then
every place a secret could land is searched: the run's output, the provider's
log, the Prefect API's logs, artifacts, flow and task runs and recent events, every
row of every table of the database, and the processes' command lines.
"""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import unquote, urlsplit

import httpx
import psycopg
import pytest
from job_helpers import private_cluster, report, run_command, sample_urls, submit_job
from psycopg import sql

from imageopt.migrate import run_migrations

pytestmark = pytest.mark.slow

TOKEN = "tok-SECRET-5c1e0b7d9a"
WRONG_TOKEN = "tok-WRONG-83f2aa61c4"


def _everything_in(api: str, path: str, body: dict | None = None) -> list:
    """Every object a Prefect ``.../filter`` endpoint returns, page by page."""
    found: list = []
    while True:
        page = httpx.post(
            f"{api}{path}", json={**(body or {}), "limit": 200, "offset": len(found)}
        )
        page.raise_for_status()
        found += page.json()
        if len(page.json()) < 200:
            return found


def _database_text(conninfo: str) -> str:
    """Every row of every table, as text."""
    with psycopg.connect(conninfo) as conn:
        tables = conn.execute(
            "SELECT table_schema, table_name FROM information_schema.tables"
            " WHERE table_schema NOT IN ('pg_catalog', 'information_schema')"
            " AND table_type = 'BASE TABLE'"
        ).fetchall()
        rows = [
            row[0]
            for schema, table in tables
            for row in conn.execute(
                sql.SQL("SELECT t::text FROM {} t").format(
                    sql.Identifier(schema, table)
                )
            ).fetchall()
        ]
    assert len(tables) >= 4 and rows
    return "\n".join(rows)


def test_the_token_and_the_database_password_leak_nowhere(
    prefect_api, provider_server, image_server, tmp_path: Path
):
    with private_cluster() as (_, url):
        password = unquote(urlsplit(url).password or "")
        assert len(password) >= 16
        run_migrations(url)
        server = provider_server(
            "--allow-private-urls",
            "--fail-rate",
            "0.2",
            "--error-rate",
            "0.2",
            "--lost-create-rate",
            "0.1",
            "--seed",
            "4",
            token=TOKEN,
        )
        env = {
            "IMAGEOPT_DATABASE_URL": url,
            "IMAGEOPT_PROVIDER_URL": server.url,
            "IMAGEOPT_PROVIDER_TOKEN": TOKEN,
        }
        job_id = submit_job(url, sample_urls(image_server, 12), format="webp")
        refused_job = submit_job(url, sample_urls(image_server, 2), format="webp")
        outputs = str(tmp_path / "out")

        code, output = run_command(
            "-v", "run", str(job_id), "--output", outputs, env=env
        )
        wrong = {**env, "IMAGEOPT_PROVIDER_TOKEN": WRONG_TOKEN}
        _, refused_output = run_command(
            "-v", "run", str(refused_job), "--output", outputs, env=wrong
        )
        _, status_output = run_command("status", str(job_id), env=env)
        bad_password = url.replace(password, "pw-WRONG-0d9e7c")
        bad_code, bad_output = run_command(
            "status", str(job_id), env={**env, "IMAGEOPT_DATABASE_URL": bad_password}
        )
        cmdline = Path(f"/proc/{server.process.pid}/cmdline").read_bytes()

        items = report(url, job_id)["items"]
        refused = report(url, refused_job)["items"]
        database = _database_text(url)

    # 1: every item ended, some failed (the injected failures).
    assert code == 1, output
    assert server.stats()["faults"]["failed"] > 0
    assert server.stats()["unauthorized"] > 0
    assert any(item["status"] == "COMPLETED" for item in items)
    assert all("IMAGEOPT_PROVIDER_TOKEN" in item["error"] for item in refused)
    assert bad_code not in (0, 1) and "Traceback" not in bad_output
    assert "password authentication failed" in bad_output
    names = [f"job-{job_id}", f"job-{refused_job}"]
    runs = _everything_in(
        prefect_api, "/flow_runs/filter", {"flow_runs": {"name": {"any_": names}}}
    )
    events = httpx.post(f"{prefect_api}/events/filter", json={"limit": 50})
    places = {
        "the run's output": output + refused_output + status_output + bad_output,
        "the provider's log": server.log_text(),
        "Prefect's logs": json.dumps(_everything_in(prefect_api, "/logs/filter")),
        "Prefect's artifacts": json.dumps(
            _everything_in(prefect_api, "/artifacts/filter")
        ),
        "Prefect's flow runs": json.dumps(runs),
        "Prefect's task runs": json.dumps(
            _everything_in(
                prefect_api,
                "/task_runs/filter",
                {"flow_runs": {"id": {"any_": [r["id"] for r in runs]}}},
            )
        ),
        "Prefect's events": events.text,
        "the database": database,
        "the provider's command line": cmdline.decode(),
    }
    assert "item" in places["Prefect's logs"]
    for secret in (TOKEN, WRONG_TOKEN, password, "pw-WRONG-0d9e7c"):
        leaks = [where for where, text in places.items() if secret in text]
        assert leaks == [], f"{secret[:6]}... found in {leaks}"
