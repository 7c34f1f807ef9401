"""The ``imageopt`` command as a new user meets it: help, the demo from
nothing, a second demo reusing what the first started, and the report."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from imageopt.embedded import EmbeddedCluster
from imageopt.samples import sample_paths

COMMANDS = [
    "migrate",
    "serve-provider",
    "submit",
    "run",
    "status",
    "cancel",
    "report",
    "store",
    "db",
    "demo",
    "admission",
]


def _imageopt(*args: str, env: dict[str, str] | None = None, timeout: float = 900):
    return subprocess.run(
        [sys.executable, "-m", "imageopt", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_explains_itself(command: str):
    done = _imageopt(command, "--help")

    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: imageopt {command}")


def test_the_top_level_help_lists_every_command():
    listed = _imageopt("--help").stdout

    assert all(f"    {command}" in listed for command in COMMANDS)


def test_a_mistyped_command_line_is_one_line_and_exit_code_2():
    done = _imageopt("report", "not-a-number")

    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1
    assert "invalid int value" in done.stderr and "Traceback" not in done.stderr


@pytest.fixture
def empty_home() -> Iterator[Path]:
    """An empty IMAGEOPT_HOME outside pytest's temporary folder, which each
    pytest session resets to mode 0700, shutting out the cluster's account
    when run as root."""
    home = Path(tempfile.mkdtemp(prefix="imageopt-demo-"))
    yield home
    shutil.rmtree(home, ignore_errors=True)


@pytest.mark.slow
def test_the_demo_from_nothing_then_again_reusing_what_it_started(
    empty_home: Path, tmp_path: Path
):
    home = empty_home
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("IMAGEOPT_", "PREFECT_"))
    }
    env["IMAGEOPT_HOME"] = str(home)
    picked = tmp_path / "picked"
    picked.mkdir()
    for path in sample_paths()[:2]:
        (picked / path.name).write_bytes(path.read_bytes())
    (picked / "broken.jpg").write_bytes(b"<html>not an image</html>")
    try:
        first = _imageopt("demo", "--format", "jpeg", env=env)
        pid = _postmaster_pid(home)
        second = _imageopt(
            "demo", str(picked), "--output", str(tmp_path / "out"), env=env
        )
        report = _imageopt("report", "--json", env=env)
        items_csv = _imageopt("report", "1", "--csv", env=env)
        assert _postmaster_pid(home) == pid, "the second demo started another cluster"
    finally:
        EmbeddedCluster(home).stop()

    assert first.returncode == 0, first.stdout + first.stderr
    table = _saving_table(first.stdout)
    samples = sample_paths()
    assert [row[0] for row in table[:-1]] == [path.name for path in samples]
    for (_, before, after, saving, output), path in zip(
        table[:-1], samples, strict=True
    ):
        assert before == path.stat().st_size
        assert after == Path(output).stat().st_size < before
        assert saving == f"{100 * (1 - after / before):.1f}%"
        with Image.open(output) as image:
            assert image.format == "JPEG"
    total = table[-1]
    assert total[0] == "total"
    assert total[1] == sum(row[1] for row in table[:-1])
    assert total[2] == sum(row[2] for row in table[:-1])
    assert f"{len(samples)} of {len(samples)} image(s) optimized" in total[4]
    assert f"job 1: {len(samples)}/{len(samples)} items ended" in first.stderr

    # Two images and a broken one: the broken one fails alone, with a reason,
    # and the run says so in its exit code.
    assert second.returncode == 1, second.stdout + second.stderr
    assert "submitted job 2: 3 image(s)" in second.stdout
    assert "broken.jpg" in second.stdout and "FAILED: " in second.stdout
    assert "2 of 3 image(s) optimized" in second.stdout
    assert len(list((tmp_path / "out").rglob("*.*"))) == 2

    jobs = json.loads(report.stdout)
    assert [(j["job"], j["completed"], j["failed"]) for j in jobs] == [
        (2, 2, 1),
        (1, len(samples), 0),
    ]
    assert jobs[1]["predictions"] == len(samples)
    rows = list(csv.DictReader(io.StringIO(items_csv.stdout)))
    assert [row["file"] for row in rows] == [path.name for path in samples]
    assert all(int(row["bytes_in"]) > int(row["bytes_out"]) for row in rows)


def _saving_table(stdout: str) -> list[tuple]:
    """The demo's rows: (file, bytes before, bytes after, saving, last column)."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("file "))
    rows = []
    for line in lines[start + 1 :]:
        name, before, after, saving, last = line.split(maxsplit=4)
        rows.append(
            (
                name,
                int(before.replace(",", "")),
                int(after.replace(",", "")),
                saving,
                last,
            )
        )
        if name == "total":
            break
    return rows


def _postmaster_pid(home: Path) -> int:
    (pid_file,) = home.rglob("postmaster.pid")
    return int(pid_file.read_text().split()[0])
