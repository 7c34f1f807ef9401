"""The embedded default: a private cluster started from an empty IMAGEOPT_HOME."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from imageopt.embedded import EmbeddedCluster


def _imageopt(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGEOPT_")}
    env["IMAGEOPT_HOME"] = str(home)
    return subprocess.run(
        [sys.executable, "-m", "imageopt", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _postmaster_pid(cluster: EmbeddedCluster) -> int:
    return int((cluster.data_dir / "postmaster.pid").read_text().splitlines()[0])


@pytest.fixture
def empty_home() -> Iterator[Path]:
    # Not under pytest's tmp_path: the cluster's data must outlive nothing but
    # this test, and its parent must be one the service account can reach.
    home = Path(tempfile.mkdtemp(prefix="imageopt-embedded-")) / "home"
    yield home
    EmbeddedCluster(home).stop()
    shutil.rmtree(home.parent)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to start as root")
def test_embedded_default_starts_as_root_and_is_reused(empty_home):
    first = _imageopt("db", "url", home=empty_home)
    cluster = EmbeddedCluster(empty_home)
    pid = _postmaster_pid(cluster)

    second = _imageopt("db", "url", home=empty_home)

    assert first.returncode == 0, first.stderr
    assert second.stdout == first.stdout
    assert _postmaster_pid(cluster) == pid
    assert cluster.data_dir.stat().st_uid != 0
    with psycopg.connect(first.stdout.strip()) as conn:
        (user,) = conn.execute("SELECT current_user").fetchone()
    assert user == "imageopt"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to start as root")
def test_a_stopped_embedded_cluster_starts_again_with_its_data(empty_home):
    url = _imageopt("db", "url", home=empty_home).stdout.strip()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE survives (id int)")
    stopped = _imageopt("db", "stop", home=empty_home)

    started = _imageopt("db", "start", home=empty_home)

    assert stopped.returncode == 0 and "stopped" in stopped.stdout
    assert started.returncode == 0, started.stderr
    with psycopg.connect(url) as conn:
        (table,) = conn.execute("SELECT to_regclass('survives')").fetchone()
    assert table == "survives"


def test_embedded_default_starts_as_an_ordinary_user_and_is_reused(empty_home):
    if os.geteuid() == 0:
        outcome = _run_as_nobody(empty_home)
    else:
        outcome = _start_twice(empty_home)

    assert outcome["error"] is None, outcome["error"]
    assert outcome["first_url"] == outcome["second_url"]
    assert outcome["first_pid"] == outcome["second_pid"]
    assert outcome["owner"] == outcome["uid"]


def _start_twice(home: Path) -> dict:
    cluster = EmbeddedCluster(home)
    result: dict = {"error": None, "uid": os.geteuid()}
    try:
        result["first_url"] = cluster.ensure_started()
        result["first_pid"] = _postmaster_pid(cluster)
        result["second_url"] = EmbeddedCluster(home).ensure_started()
        result["second_pid"] = _postmaster_pid(cluster)
        result["owner"] = cluster.data_dir.stat().st_uid
        with psycopg.connect(result["first_url"]) as conn:
            conn.execute("SELECT 1")
    except Exception as exc:
        result["error"] = repr(exc)
    return result


def _run_as_nobody(home: Path) -> dict:
    """Start the cluster in a child process that has dropped root for ``nobody``.

    A fork keeps the modules this process already loaded, which an ordinary
    account could not read from root's own Python installation.
    """
    nobody = pwd.getpwnam("nobody")
    os.chmod(home.parent, 0o755)
    home.mkdir()
    os.chown(home, nobody.pw_uid, nobody.pw_gid)
    read_end, write_end = os.pipe()

    child = os.fork()
    if child == 0:
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            os.environ["HOME"] = str(home)
            payload = json.dumps(_start_twice(home)).encode()
            os.write(write_end, payload)
        finally:
            os._exit(0)

    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        payload = pipe.read()
    os.waitpid(child, 0)
    if not payload:
        return {"error": "the child process exited without a result"}

    return json.loads(payload)
