"""A misbehaving provider: every item still ends, each with its reason.

The flow runs in this process against the project's provider server, which
injects the faults: a surge of 429s over half the requests, 5xx answers,
predictions stuck in ``starting`` past their deadline, aborted predictions,
and outputs already expired when they are copied.

The policy these tests pin down: throttles and 5xx answers are waited out and
cost nothing (no item fails, no prediction is made twice); a prediction that
ends badly at the provider fails its item with the reason, and is not created
again, because a second prediction is paid for and may end the same way.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from job_helpers import (
    FINAL,
    check_outputs,
    history_problems,
    report,
    sample_urls,
    submit_job,
)

from flows.optimize_job import optimize_job
from imageopt.migrate import run_migrations


@pytest.fixture
def database(make_database, monkeypatch) -> str:
    conninfo = make_database()
    run_migrations(conninfo)
    monkeypatch.setenv("IMAGEOPT_DATABASE_URL", conninfo)
    # Admission slows down after a 429 and climbs back within this many seconds.
    monkeypatch.setenv("IMAGEOPT_ADMISSION_RECOVERY_SECONDS", "2")
    return conninfo


@pytest.fixture
def provider(provider_server, monkeypatch):
    def start(*faults: str):
        server = provider_server(
            "--allow-private-urls", "--create-limit", "0", "--read-limit", "0", *faults
        )
        monkeypatch.setenv("IMAGEOPT_PROVIDER_URL", server.url)
        return server

    return start


def _failed_because(items: list[dict], words: str) -> list[dict]:
    return [i for i in items if i["status"] == "FAILED" and words in i["error"]]


@pytest.mark.slow
def test_a_surge_of_429s_and_5xx_answers_are_waited_out_and_every_item_completes(
    prefect_api, database, provider, image_server, tmp_path: Path
):
    server = provider(
        # Half of all requests throttled for the first 8 s (a scaled-down
        # surge: the shape, not the length, is what the client must survive).
        "--throttle-rate",
        "0.5",
        "--throttle-window",
        "8",
        "--error-rate",
        "0.2",
        "--latency",
        "0.5",
        "--seed",
        "3",
    )
    job_id = submit_job(database, sample_urls(image_server, 30), format="webp")

    optimize_job(job_id=job_id, output=str(tmp_path / "out"))

    items = report(database, job_id)["items"]
    stats = server.stats()
    assert stats["faults"]["throttled_injected"] >= 5
    assert stats["faults"]["errors_5xx"] >= 5
    assert {item["status"] for item in items} == {"COMPLETED"}
    assert stats["creates"] == len(items)
    check_outputs(tmp_path / "out", items)
    assert history_problems(database, job_id) == []
    print(f"{len(items)} items; provider: {server.stats()}")


def test_stuck_and_aborted_predictions_fail_their_items_with_the_reason(
    prefect_api, database, provider, image_server, monkeypatch, tmp_path: Path
):
    # The provider cancels a prediction still unfinished 2 s after its create.
    monkeypatch.setenv("IMAGEOPT_PREDICTION_DEADLINE", "2s")
    # With a fixed latency the seed fixes every outcome drawn at create.
    server = provider(
        "--stuck-rate",
        "0.1",
        "--aborted-rate",
        "0.1",
        "--latency",
        "0.3",
        "--seed",
        "9",
    )
    job_id = submit_job(database, sample_urls(image_server, 40), format="jpeg")

    optimize_job(job_id=job_id, output=str(tmp_path / "out"))

    items = report(database, job_id)["items"]
    stats = server.stats()
    stuck = _failed_because(items, "ran past its deadline of 2s")
    aborted = _failed_because(items, "aborted")
    assert stats["faults"]["stuck"] > 0
    assert stats["faults"]["aborted"] > 0
    # Every stuck prediction hits its deadline; on a starved machine a slow
    # one can too, and is failed the same way.
    canceled = stats["predictions"]["canceled"]
    assert len(stuck) == canceled >= stats["faults"]["stuck"]
    assert len(aborted) == stats["faults"]["aborted"]
    assert all("resubmit" in item["error"] for item in stuck)
    completed = [item for item in items if item["status"] == "COMPLETED"]
    assert len(completed) + len(stuck) + len(aborted) == len(items)
    assert stats["creates"] == len(items)
    assert report(database, job_id)["job"]["status"] == "COMPLETED"
    check_outputs(tmp_path / "out", items)
    assert history_problems(database, job_id) == []
    print(f"{len(items)} items; provider: {server.stats()}")


def test_an_output_expired_before_its_copy_fails_its_item_saying_so(
    prefect_api, database, provider, image_server, tmp_path: Path
):
    server = provider("--expired-output-rate", "0.25", "--seed", "5")
    job_id = submit_job(database, sample_urls(image_server, 12), format="png")

    optimize_job(job_id=job_id, output=str(tmp_path / "out"))

    items = report(database, job_id)["items"]
    expired = _failed_because(items, "HTTP 410")
    assert server.stats()["faults"]["expired_outputs"] == len(expired) > 0
    assert all("expired" in item["error"] for item in expired)
    assert {item["status"] for item in items} <= FINAL
    assert server.stats()["creates"] == len(items)
    check_outputs(tmp_path / "out", items)
    assert history_problems(database, job_id) == []
    print(f"{len(items)} items; provider: {server.stats()}")
