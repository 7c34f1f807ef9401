"""Broken images in a job of good ones: each fails alone, saying what is wrong.

Every bad input is its own item beside good ones; the good ones complete, and
each bad one ends FAILED with a reason that names the file and the problem.
Some are caught at submission (a local file that is certainly not an image),
the rest by the provider's optimizer or its fetch guards.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import pytest
from job_helpers import (
    check_outputs,
    history_problems,
    report,
    run_command,
    submit_job,
)

from flows.optimize_job import optimize_job
from imageopt.migrate import run_migrations
from imageopt.samples import sample_paths

SAMPLES = {path.name: path for path in sample_paths()}


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` pixels and carries a few bytes:
    what a decompression bomb looks like before it is decoded."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    pixels = zlib.compress(b"\0" * 4096)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", pixels)
        + chunk(b"IEND", b"")
    )


@pytest.fixture
def database(make_database, monkeypatch) -> str:
    conninfo = make_database()
    run_migrations(conninfo)
    monkeypatch.setenv("IMAGEOPT_DATABASE_URL", conninfo)
    return conninfo


@pytest.fixture
def bad_files(tmp_path: Path) -> dict[str, Path]:
    folder = tmp_path / "inputs"
    folder.mkdir()
    rocket = SAMPLES["rocket.jpg"].read_bytes()
    files = {
        "empty.jpg": b"",
        "cut.jpg": rocket[: len(rocket) // 3],
        "page.jpg": b"<!DOCTYPE html><html><head><title>Sign in</title></head></html>",
        # 9000 x 9000 = 81 M pixels: under Pillow's own ceiling, over the
        # provider's 50 M pixel guard.
        "bomb.png": _png_header_only(9000, 9000),
        "photo.heic": b"\0\0\0\x18ftypheic\0\0\0\0mif1heic" + b"\0" * 64,
        "astronaut.png": SAMPLES["astronaut.png"].read_bytes(),
    }
    paths = {}
    for name, data in files.items():
        paths[name] = folder / name
        paths[name].write_bytes(data)
    return paths


def _by_name(items: list[dict]) -> dict[str, dict]:
    return {Path(item["source"]).name: item for item in items}


@pytest.mark.slow
def test_each_bad_input_fails_alone_with_a_reason_naming_the_problem(
    prefect_api,
    database,
    provider_server,
    image_server,
    monkeypatch,
    bad_files,
    tmp_path: Path,
):
    server = provider_server(
        "--allow-private-urls", "--create-limit", "0", "--read-limit", "0"
    )
    monkeypatch.setenv("IMAGEOPT_PROVIDER_URL", server.url)
    monkeypatch.setenv("IMAGEOPT_MAX_INPUT_BYTES", "300000")
    good = [
        str(SAMPLES["rocket.jpg"]),
        image_server.sample_url("brick.png"),
        image_server.sample_url("text.png"),
    ]
    sources = [*good, *map(str, bad_files.values()), f"{image_server.url}/missing.jpg"]
    code, output = run_command(
        "submit", "--store", "Bad inputs", "--format", "jpeg", *sources, env={}
    )
    assert code == 0, output
    job_id = int(output.strip().splitlines()[-1])

    optimize_job(job_id=job_id, output=str(tmp_path / "out"))

    items = _by_name(report(database, job_id)["items"])
    reasons = {name: item["error"] for name, item in items.items()}
    assert [items[Path(s).name]["status"] for s in good] == ["COMPLETED"] * 3
    expected = {
        "empty.jpg": ["empty.jpg is empty (0 bytes)"],
        "cut.jpg": ["cut.jpg", "truncated or corrupt"],
        "page.jpg": ["page.jpg", "HTML page"],
        "bomb.png": ["bomb.png", "81,000,000 pixels", "decompression bombs"],
        "photo.heic": ["photo.heic", "HEIC"],
        "astronaut.png": ["astronaut.png is 791,555 bytes, over the limit of 300,000"],
        "missing.jpg": ["missing.jpg", "HTTP 404"],
    }
    for name, words in expected.items():
        assert items[name]["status"] == "FAILED", (name, items[name])
        for word in words:
            assert word in reasons[name], (name, reasons[name])
    print("\n".join(f"{name}: {reasons[name]}" for name in expected))
    assert server.stats()["creates"] == 3 + 3  # the good ones, cut, bomb, missing
    check_outputs(tmp_path / "out", list(items.values()))
    assert history_problems(database, job_id) == []


def test_urls_on_loopback_and_private_addresses_are_refused_by_the_provider(
    prefect_api, database, provider_server, image_server, monkeypatch, tmp_path: Path
):
    server = provider_server("--create-limit", "0", "--read-limit", "0")
    monkeypatch.setenv("IMAGEOPT_PROVIDER_URL", server.url)
    served = image_server.put(
        "/refused/rocket.jpg", SAMPLES["rocket.jpg"].read_bytes(), "image/jpeg"
    )
    loopback = served.replace("127.0.0.1", "localhost")
    private = "http://10.1.2.3/catalog/shoe.jpg"
    good = str(SAMPLES["text.png"])
    job_id = submit_job(database, [good, loopback, private])

    optimize_job(job_id=job_id, output=str(tmp_path))

    good_item, loopback_item, private_item = report(database, job_id)["items"]
    assert good_item["status"] == "COMPLETED"
    assert loopback_item["status"] == private_item["status"] == "FAILED"
    assert "rocket.jpg" in loopback_item["error"]
    assert "a loopback address" in loopback_item["error"]
    assert "shoe.jpg" in private_item["error"]
    assert "10.1.2.3, a private address" in private_item["error"]
    assert image_server.headers_of("/refused/rocket.jpg") == []
    print(loopback_item["error"], private_item["error"], sep="\n")
