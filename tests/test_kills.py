"""A job's flow process killed with SIGKILL at five moments, then resumed.

One job of 200 items goes through ``imageopt run`` in a child process, exactly
as an operator runs it. The test watches the items' statuses in PostgreSQL and
the provider's counters, kills the process at each moment below, and runs the
job again; the sixth run finishes it. The provider answers creates 0.4 s after
making the prediction and serves outputs 0.3 s late, so that each moment lasts
long enough to be caught: a prediction that exists while its id is not saved,
an output copy under way.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from job_helpers import (
    check_outputs,
    history_problems,
    imageopt,
    report,
    sample_urls,
    stored_statuses,
    submit_job,
    wait_for,
)

from imageopt.migrate import run_migrations

pytestmark = pytest.mark.slow

ITEMS = 200

Snapshot = tuple[dict, dict]  # (stored statuses, provider counters)


def _admitting(start: Snapshot) -> Callable[[Snapshot], bool]:
    """The first creates are out; most items still wait for admission.

    Loose enough to be caught on an idle machine, where the run admits
    dozens of items between two looks.
    """
    return lambda now: (
        now[1]["create_requests"] >= 1 and now[0].get("PENDING", 0) >= ITEMS // 2
    )


def _creating(start: Snapshot) -> Callable[[Snapshot], bool]:
    """Items claimed, and predictions made whose ids are not saved yet."""

    def moment(now: Snapshot) -> bool:
        unsaved = now[1]["creates"] - now[0]["with_prediction"]
        sent = now[1]["create_requests"] - start[1]["create_requests"]
        return sent >= 5 and now[0]["claimed"] >= 3 and unsaved >= 3

    return moment


def _polling(start: Snapshot) -> Callable[[Snapshot], bool]:
    """Many predictions running and being polled."""
    return lambda now: (
        now[0].get("PROCESSING", 0) >= 30 and now[1]["reads"] - start[1]["reads"] >= 10
    )


def _copies_under_way(now: Snapshot, start: Snapshot) -> int:
    """Output downloads begun in this run whose item is not COMPLETED yet."""
    begun = now[1]["downloads"] - start[1]["downloads"]
    stored = now[0].get("COMPLETED", 0) - start[0].get("COMPLETED", 0)
    return begun - stored


def _storing(start: Snapshot) -> Callable[[Snapshot], bool]:
    """Outputs being copied into storage."""
    return lambda now: (
        _copies_under_way(now, start) >= 2 and now[0].get("COMPLETED", 0) >= 40
    )


def _late(start: Snapshot) -> Callable[[Snapshot], bool]:
    """Most items done; the last ones being polled and stored."""
    return lambda now: (
        now[0].get("COMPLETED", 0) >= 140 and _copies_under_way(now, start) >= 1
    )


MOMENTS = [
    ("admitting", _admitting),
    ("creating", _creating),
    ("polling", _polling),
    ("storing", _storing),
    ("late", _late),
]


def test_a_job_killed_five_times_loses_nothing_and_pays_once_per_item(
    prefect_api, make_database, provider_server, image_server, tmp_path: Path
):
    conninfo = make_database()
    run_migrations(conninfo)
    server = provider_server(
        "--allow-private-urls",
        "--create-limit",
        "0",
        "--read-limit",
        "0",
        "--latency",
        "uniform:0.5:1.5",
        "--create-delay",
        "0.4",
        "--output-delay",
        "0.3",
        "--seed",
        "11",
    )
    job_id = submit_job(conninfo, sample_urls(image_server, ITEMS), format="jpeg")
    outputs = tmp_path / "outputs"
    env = {
        "IMAGEOPT_DATABASE_URL": conninfo,
        "IMAGEOPT_PROVIDER_URL": server.url,
        "IMAGEOPT_CREATES_PER_MINUTE": "3000",
        "IMAGEOPT_ADMISSION_BURST_SECONDS": "0.5",
        "IMAGEOPT_MAX_IN_FLIGHT": "50",
        # A killed run's slots come back after this, not the default 15 s.
        "IMAGEOPT_ADMISSION_LEASE_SECONDS": "2",
    }
    args = ("run", str(job_id), "--output", str(outputs))

    def snapshot() -> Snapshot:
        return stored_statuses(conninfo, job_id), server.stats()

    seen_at_kills: dict[str, Snapshot] = {}
    for name, moment in MOMENTS:
        began = time.monotonic()
        arrived = moment(snapshot())
        run = imageopt(*args, env=env)

        def killed(run=run, arrived=arrived, name=name) -> bool:
            now = snapshot()
            if run.poll() is None and arrived(now):
                run.send_signal(signal.SIGKILL)
                seen_at_kills[name] = now
            return run.poll() is not None or name in seen_at_kills

        wait_for(killed, timeout=120, what=f"the {name} moment")
        assert name in seen_at_kills, f"the run ended before the {name} moment"
        run.wait()
        print(f"killed while {name} after {time.monotonic() - began:.1f} s")
    began = time.monotonic()
    final = imageopt(*args, env=env)
    output = final.communicate(timeout=300)[0]
    print(f"the last run took {time.monotonic() - began:.1f} s")

    assert final.returncode == 0, output
    items = report(conninfo, job_id)["items"]
    stats = server.stats()
    unfinished = {"PENDING", "RUNNING", "PROCESSING"}
    for counts, _ in seen_at_kills.values():
        assert sum(counts.get(status, 0) for status in unfinished) > 0
    assert {item["status"] for item in items} == {"COMPLETED"}
    assert stats["creates"] == ITEMS
    assert stats["predictions"]["canceled"] == 0
    check_outputs(outputs, items)
    assert history_problems(conninfo, job_id) == []
    for name, (counts, counters) in seen_at_kills.items():
        print(f"at the {name} kill: {counts}, {counters['creates']} creates")
    print(output[-3000:])
