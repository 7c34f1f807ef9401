"""Store and file names with quotes, spaces and other scripts go through untouched.

Where a name shows up, it is the name as given: the database, the output's
path in storage, ``imageopt status`` in text and JSON, and the Prefect task
runs' names.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import psycopg
from job_helpers import report, run_command

from flows.optimize_job import optimize_job
from imageopt.migrate import run_migrations
from imageopt.samples import sample_paths
from imageopt.services import wait_for_history

STORE = 'O\'Brien "Café" 東京'
FILENAME = "été photo 'a'.png"


def test_names_with_quotes_spaces_and_other_scripts_reach_every_place_untouched(
    prefect_api, make_database, provider_server, monkeypatch, tmp_path: Path
):
    conninfo = make_database()
    run_migrations(conninfo)
    monkeypatch.setenv("IMAGEOPT_DATABASE_URL", conninfo)
    server = provider_server("--create-limit", "0", "--read-limit", "0")
    monkeypatch.setenv("IMAGEOPT_PROVIDER_URL", server.url)
    folder = tmp_path / "dossier d'images"
    folder.mkdir()
    source = folder / FILENAME
    source.write_bytes(sample_paths()[0].read_bytes())
    code, output = run_command(
        "submit", "--store", STORE, "--format", "webp", str(source), env={}
    )
    assert code == 0, output
    job_id = int(output.strip().splitlines()[-1])

    state = optimize_job(job_id=job_id, output=str(tmp_path / "out"), return_state=True)
    flow_run_id = state.state_details.flow_run_id
    wait_for_history(flow_run_id)
    _, text = run_command("status", str(job_id), env={})
    _, as_json = run_command("status", str(job_id), "--json", env={})

    (item,) = report(conninfo, job_id)["items"]
    with psycopg.connect(conninfo) as conn:
        stores = [name for (name,) in conn.execute("SELECT name FROM stores")]
    assert stores == [STORE]
    assert item["status"] == "COMPLETED", item
    assert item["source"] == str(source)
    expected = (
        tmp_path / "out" / STORE / f"job-{job_id}" / f"{item['id']}-été photo 'a'.webp"
    )
    assert item["output"] == str(expected)
    assert expected.is_file()
    assert f"for store {STORE!r}" in text and str(source) in text
    assert json.loads(as_json)["job"]["store"] == STORE
    assert json.loads(as_json)["items"][0]["source"] == str(source)
    runs = httpx.post(
        f"{prefect_api}/task_runs/filter",
        json={"flow_runs": {"id": {"any_": [str(flow_run_id)]}}},
    ).json()
    assert sorted(run["name"] for run in runs) == [
        f"create-prediction {item['id']} {FILENAME}",
        f"poll-prediction {item['id']} {FILENAME}",
    ]
