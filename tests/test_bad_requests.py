"""Requests the command must refuse, in one line, without a traceback.

Unknown jobs, empty jobs, blank stores and invalid options exit 2 with one
line saying what is wrong and change nothing in the database; a submission of
100,000 URLs is taken with bounded memory.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest
from job_helpers import run_command

from imageopt.migrate import run_migrations
from imageopt.samples import sample_paths

IMAGE = str(sample_paths()[0])


@pytest.fixture(scope="module")
def database(module_database: str) -> str:
    run_migrations(module_database)
    return module_database


@pytest.fixture
def env(database: str) -> dict[str, str]:
    return {"IMAGEOPT_DATABASE_URL": database}


def _jobs(conninfo: str) -> int:
    with psycopg.connect(conninfo) as conn:
        return conn.execute("SELECT count(*) FROM jobs").fetchone()[0]


def _assert_refused_in_one_line(code: int, output: str, *words: str) -> None:
    assert code == 2, output
    assert len(output.strip().splitlines()) == 1, output
    assert "Traceback" not in output
    for word in words:
        assert word in output, output


@pytest.mark.parametrize("command", ["status", "cancel"])
def test_an_unknown_job_is_refused_in_one_line(env, command: str):
    code, output = run_command(command, "999999", env=env)

    _assert_refused_in_one_line(code, output, "there is no job 999999")


def test_running_an_unknown_job_is_refused_before_any_flow_runs(prefect_api, env):
    code, output = run_command("run", "999999", env=env)

    _assert_refused_in_one_line(code, output, "there is no job 999999")


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--max-width", "-1"),
        ("--max-height", "0"),
        ("--quality", "101"),
        ("--format", "gif"),
    ],
)
def test_invalid_options_are_refused_at_submission_in_one_line(
    database, env, option: str, value: str
):
    before = _jobs(database)

    code, output = run_command("submit", "--store", "S", option, value, IMAGE, env=env)

    _assert_refused_in_one_line(code, output, option)
    assert _jobs(database) == before


def test_an_empty_job_is_refused(database, env, tmp_path: Path):
    empty_folder = tmp_path / "nothing"
    empty_folder.mkdir()
    empty_list = tmp_path / "list.txt"
    empty_list.write_text("# no sources yet\n\n")
    before = _jobs(database)

    results = [
        run_command("submit", "--store", "S", source, env=env)
        for source in (str(empty_folder), f"@{empty_list}")
    ]

    for code, output in results:
        _assert_refused_in_one_line(code, output, "needs at least one image")
    assert _jobs(database) == before


def test_a_blank_store_name_is_refused(database, env):
    before = _jobs(database)

    code, output = run_command("submit", "--store", "  ", IMAGE, env=env)

    _assert_refused_in_one_line(code, output, "store needs a name")
    assert _jobs(database) == before


def test_a_missing_source_is_refused_naming_it(database, env, tmp_path: Path):
    missing = tmp_path / "no-such-image.jpg"

    code, output = run_command("submit", "--store", "S", str(missing), env=env)

    _assert_refused_in_one_line(code, output, "no-such-image.jpg")


@pytest.mark.slow
def test_a_submission_of_100000_urls_is_taken_with_bounded_memory(
    database, tmp_path: Path
):
    count = 100_000
    listing = tmp_path / "urls.txt"
    listing.write_text(
        "".join(f"https://cdn.example.com/catalog/{i:06d}.jpg\n" for i in range(count))
    )
    env = {
        **{k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"},
        "IMAGEOPT_DATABASE_URL": database,
    }

    process = subprocess.Popen(
        [sys.executable, "-m", "imageopt", "submit", "--store", "Big", f"@{listing}"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    process.stdout.close()

    assert process.returncode == 0, output
    job_id = int(output.strip().splitlines()[-1])
    with psycopg.connect(database) as conn:
        items, history = conn.execute(
            "SELECT count(*), (SELECT count(*) FROM item_history h"
            " JOIN items i ON i.id = h.item_id WHERE i.job_id = %s)"
            " FROM items WHERE job_id = %s",
            (job_id, job_id),
        ).fetchone()
    assert items == history == count
    # ru_maxrss is in KiB on Linux. A correctness bound, not a speed one: the
    # list is held once, not copied per item.
    peak_mib = usage.ru_maxrss / 1024
    print(f"submit of {count} URLs: peak RSS {peak_mib:.0f} MiB")
    assert peak_mib < 400
