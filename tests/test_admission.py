"""Admission against a real PostgreSQL: rates, slots, fairness, leases, 429s.

Rates are measured over several seconds and checked against generous bounds;
fairness and wake-ups are checked by counts and order, not by timings.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import logging
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable

import psycopg
import pytest
from admission_fixtures import add_store

from imageopt.admission import Admission, Limits, Scheduler, TokenBucket, Waiting
from imageopt.cli import admission as admission_cli
from imageopt.db import Database
from imageopt.errors import AdmissionError, AdmissionTimeoutError
from imageopt.migrate import run_migrations
from imageopt.settings import Settings

_item_ids = itertools.count(1)


class Crowd:
    """Threads that ask for create grants for one store, over and over.

    Each grant is logged as (time, store id); ``hold`` is how long an item
    keeps its slot before it releases it.
    """

    def __init__(
        self,
        admission: Admission,
        store_id: int,
        threads: int,
        *,
        log: list[tuple[float, int]],
        hold: float = 0.0,
        on_hold: Callable[[int], None] | None = None,
    ) -> None:
        self.admission = admission
        self.store_id = store_id
        self.log = log
        self.hold = hold
        self.on_hold = on_hold
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run) for _ in range(threads)]
        for thread in self._threads:
            thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                grant = self.admission.admit_create(
                    self.store_id, next(_item_ids), timeout=0.5
                )
            except AdmissionTimeoutError:
                continue
            with self._lock:
                self.log.append((time.monotonic(), self.store_id))
            if self.on_hold:
                self.on_hold(+1)
            time.sleep(self.hold)
            if self.on_hold:
                self.on_hold(-1)
            self.admission.release(grant)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()


def _between(
    log: list[tuple[float, int]], start: float, end: float, store: int | None = None
) -> int:
    """Grants logged from ``start`` to ``end``, of one store or of all."""
    return sum(
        1
        for at, store_id in list(log)
        if start <= at < end and (store is None or store_id == store)
    )


def test_a_store_alone_gets_the_whole_creation_rate(conninfo, opened):
    store_id = add_store(conninfo, "Alone")
    admission = opened(creates_per_minute=600)
    log: list[tuple[float, int]] = []

    crowd = Crowd(admission, store_id, 20, log=log)
    time.sleep(1.0)
    start = time.monotonic()
    time.sleep(5.0)
    end = time.monotonic()
    crowd.stop()

    granted = _between(log, start, end)
    expected = 10.0 * (end - start)
    assert granted >= 0.9 * expected
    assert granted <= expected + 10 + 2


def test_two_waiting_stores_share_the_rate_by_their_weights(conninfo, opened):
    light, heavy = add_store(conninfo, "Light", 1), add_store(conninfo, "Heavy", 3)
    admission = opened(creates_per_minute=1200)
    log: list[tuple[float, int]] = []

    crowds = [Crowd(admission, s, 12, log=log) for s in (light, heavy)]
    time.sleep(0.5)
    start = time.monotonic()
    time.sleep(4.0)
    end = time.monotonic()
    for crowd in crowds:
        crowd.stop()

    light_grants = _between(log, start, end, light)
    heavy_grants = _between(log, start, end, heavy)
    assert light_grants + heavy_grants >= 0.9 * 20 * (end - start)
    assert 2.5 <= heavy_grants / light_grants <= 3.5


def test_a_store_that_starts_waiting_late_is_served_at_the_next_grant(conninfo, opened):
    early, late = add_store(conninfo, "Early"), add_store(conninfo, "Late")
    admission = opened(creates_per_minute=600)
    log: list[tuple[float, int]] = []
    crowd = Crowd(admission, early, 20, log=log)
    time.sleep(1.5)

    asked = time.monotonic()
    grant = admission.admit_create(late, next(_item_ids), timeout=30)
    served = time.monotonic()
    crowd.stop()

    # Twenty items of the early store were waiting when the late one came;
    # behind them it would have waited twenty grants.
    assert _between(log, asked, served, early) <= 5
    assert grant.store_id == late


def test_slots_in_flight_are_bounded_across_processes(conninfo, opened):
    store_id = add_store(conninfo, "Busy")
    first = opened(creates_per_minute=6000, max_in_flight=5)
    second = opened(creates_per_minute=6000, max_in_flight=5)
    log: list[tuple[float, int]] = []
    holding, most = [0], [0]
    lock = threading.Lock()

    def on_hold(change: int) -> None:
        with lock:
            holding[0] += change
            most[0] = max(most[0], holding[0])

    crowds = [
        Crowd(a, store_id, 8, log=log, hold=0.05, on_hold=on_hold)
        for a in (first, second)
    ]
    time.sleep(3.0)
    for crowd in crowds:
        crowd.stop()

    assert most[0] == 5
    assert len(log) >= 40


def test_a_released_slot_goes_to_a_waiter_of_another_process_at_once(conninfo, opened):
    store_id = add_store(conninfo, "Releasing")
    holder = opened(max_in_flight=2, admission_lease_seconds=60)
    waiter = opened(max_in_flight=2, admission_lease_seconds=60)
    held = [holder.admit_create(store_id, next(_item_ids)) for _ in range(2)]
    granted = []
    thread = threading.Thread(
        target=lambda: granted.append(waiter.admit_create(store_id, next(_item_ids)))
    )
    thread.start()
    thread.join(1.0)
    assert not granted

    holder.release(held[0])
    thread.join(5.0)

    assert granted


def test_the_slots_of_a_process_that_died_return_after_its_lease(
    conninfo, opened, caplog
):
    store_id = add_store(conninfo, "Survivor")
    script = textwrap.dedent(
        f"""
        import os, signal
        from imageopt.admission import Admission
        from imageopt.db import Database
        from imageopt.settings import get_settings

        db = Database.from_settings().open()
        admission = Admission.open(db, get_settings())
        admission.admit_create({store_id}, 1)
        print("holding", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    env = {
        **os.environ,
        "IMAGEOPT_DATABASE_URL": conninfo,
        "IMAGEOPT_MAX_IN_FLIGHT": "1",
        "IMAGEOPT_ADMISSION_LEASE_SECONDS": "2",
    }
    child = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True
    )
    assert child.stdout.strip() == "holding", child.stderr
    survivor = opened(max_in_flight=1, admission_lease_seconds=2)

    with caplog.at_level(logging.WARNING, logger="imageopt.admission"):
        grant = survivor.admit_create(store_id, 2, timeout=20)

    assert grant.waited >= 0.5
    assert any("1 slot(s) they held are free" in r.message for r in caplog.records)


def test_a_closed_admission_keeps_its_unreleased_slots_until_its_lease_runs_out(
    conninfo, opened
):
    store_id = add_store(conninfo, "Closing")
    closing = opened(max_in_flight=1, admission_lease_seconds=2)
    closing.admit_create(store_id, next(_item_ids))
    closing.close()
    survivor = opened(max_in_flight=1, admission_lease_seconds=2)

    grant = survivor.admit_create(store_id, next(_item_ids), timeout=20)

    assert grant.waited >= 0.5


def test_a_429_slows_every_process_and_the_rate_climbs_back(conninfo, opened):
    store_id = add_store(conninfo, "Throttled")
    limits = {"creates_per_minute": 1200, "admission_recovery_seconds": 3.0}
    throttled = opened(**limits)
    bystander = opened(**limits)
    log: list[tuple[float, int]] = []
    crowd = Crowd(bystander, store_id, 10, log=log)
    time.sleep(1.5)

    at = time.monotonic()
    throttled.throttled("create", retry_after=1.0)
    lowered = bystander.snapshot()["rates"]["create"]
    time.sleep(5.5)
    recovered = bystander.snapshot()["rates"]["create"]
    crowd.stop()

    assert lowered["allowed_per_minute"] == 600
    assert lowered["paused_for"] > 0
    assert _between(log, at + 0.3, at + 0.9) == 0
    # At full rate the 2.5 s after the 429 would hold 50 grants.
    assert _between(log, at, at + 2.5) <= 35
    assert recovered["allowed_per_minute"] == 1200
    assert _between(log, at + 3.5, at + 5.5) >= 0.85 * 40


def test_two_processes_together_stay_within_the_rate(conninfo, opened):
    stores = [add_store(conninfo, "First"), add_store(conninfo, "Second")]
    admissions = [opened(creates_per_minute=1200) for _ in stores]
    log: list[tuple[float, int]] = []

    crowds = [Crowd(a, s, 10, log=log) for a, s in zip(admissions, stores, strict=True)]
    time.sleep(0.5)
    start = time.monotonic()
    time.sleep(4.0)
    end = time.monotonic()
    for crowd in crowds:
        crowd.stop()

    total = _between(log, start, end)
    expected = 20 * (end - start)
    assert 0.9 * expected <= total <= expected + 20 + 2
    for store_id in stores:
        assert _between(log, start, end, store_id) >= 0.3 * total


def test_grants_take_a_fraction_of_a_transaction_each(conninfo, opened):
    store_id = add_store(conninfo, "Cheap")
    admission = opened(creates_per_minute=600, reads_per_minute=3000)
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            admission.admit_read(store_id)

    log: list[tuple[float, int]] = []
    crowd = Crowd(admission, store_id, 10, log=log, hold=0.2)
    readers = [threading.Thread(target=read) for _ in range(10)]
    for thread in readers:
        thread.start()
    time.sleep(3.0)
    stop.set()
    crowd.stop()
    for thread in readers:
        thread.join()

    agent = admission.snapshot()["agent"]
    assert agent["grants"] >= 100
    assert agent["passes"] <= 0.6 * agent["grants"]


def test_an_item_that_waits_too_long_gets_an_error_naming_it(conninfo, opened):
    store_id = add_store(conninfo, "Patient")
    admission = opened(max_in_flight=1)
    admission.admit_create(store_id, 101)

    with pytest.raises(AdmissionTimeoutError) as caught:
        admission.admit_create(store_id, 102, timeout=0.3)

    assert f"item 102 of store {store_id}" in str(caught.value)


def test_an_older_schema_gets_in_process_admission_with_one_warning(
    make_database, caplog
):
    conninfo = make_database()
    run_migrations(conninfo, to=3)
    store_id = add_store(conninfo, "Old schema")
    settings = Settings(max_in_flight=1, admission_burst_seconds=1.0)

    with (
        caplog.at_level(logging.WARNING, logger="imageopt.admission"),
        Database(conninfo) as db,
        Admission.open(db, settings) as admission,
    ):
        first = admission.admit_create(store_id, 1, timeout=5)
        with pytest.raises(AdmissionTimeoutError):
            admission.admit_create(store_id, 2, timeout=0.3)
        admission.release(first)
        admission.admit_create(store_id, 2, timeout=5)
        admission.admit_read(store_id, timeout=5)
        shared = admission.shared

    warnings = [r for r in caplog.records if r.name == "imageopt.admission"]
    assert not shared
    assert len(warnings) == 1
    assert "run `imageopt migrate`" in warnings[0].getMessage()


def _cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="imageopt")
    admission_cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.handler(args)


def test_store_set_creates_a_store_then_changes_its_weight(
    conninfo, monkeypatch, capsys
):
    monkeypatch.setenv("IMAGEOPT_DATABASE_URL", conninfo)

    _cli("store", "set", "Weighty", "--weight", "3")
    _cli("store", "set", "Weighty", "--weight", "5")

    with psycopg.connect(conninfo) as conn:
        rows = conn.execute(
            "SELECT weight FROM stores WHERE name = 'Weighty'"
        ).fetchall()
    assert rows == [(5,)]
    assert "created with weight 3" in capsys.readouterr().out


def test_the_admission_command_shows_waiting_items_and_shares(
    conninfo, opened, monkeypatch, capsys
):
    monkeypatch.setenv("IMAGEOPT_DATABASE_URL", conninfo)
    store_id = add_store(conninfo, "Shown", 2)
    admission = opened(max_in_flight=1, creates_per_minute=600)
    admission.admit_create(store_id, next(_item_ids))
    item_id = next(_item_ids)

    def wait_for_a_slot() -> None:
        with contextlib.suppress(AdmissionError):
            admission.admit_create(store_id, item_id, timeout=5.0)

    waiting = threading.Thread(target=wait_for_a_slot)
    waiting.start()
    time.sleep(0.5)

    _cli("admission", "--json")
    shown = json.loads(capsys.readouterr().out)
    _cli("admission")
    table = capsys.readouterr().out
    admission.close()
    waiting.join()

    (row,) = shown["stores"]
    assert (row["name"], row["weight"], row["waiting_items"]) == ("Shown", 2, 1)
    assert (row["in_flight"], row["creates_last_minute"]) == (1, 1)
    assert shown["in_flight"] == 1
    assert "Shown" in table
    assert "in flight: 1 of" in table


def test_a_store_served_alone_for_long_is_not_owed_that_time_later():
    """Virtual time moves on while a store is idle, so no store builds credit."""
    limits = Limits(creates_per_minute=60, reads_per_minute=60, max_in_flight=10**6)
    bucket = TokenBucket(tokens=0.0, updated_at=0.0)
    scheduler = Scheduler(
        limits, {"create": bucket, "read": TokenBucket(0, 0)}, {}, [], 0
    )

    def serve(store_ids: list[int], grants: int) -> list[int]:
        scheduler.waiting = [Waiting("a", "create", s, 10**6) for s in store_ids]
        scheduler.granted.clear()
        order = []
        for _ in range(grants):
            bucket.tokens = 1.0
            scheduler.grant(bucket.updated_at)
            order += [s for (_, s, _), n in scheduler.granted.items() for _ in range(n)]
            scheduler.granted.clear()
        return order

    serve([1], 100)
    serve([2], 10)
    order = serve([1, 2], 6)

    assert order.count(1) == order.count(2) == 3
