"""A job's progress while it runs: items ended of the total, rate, time left.

On a terminal it is a bar drawn by rich on the same console as the log lines,
so that log lines scroll above it. Elsewhere (a CI log, a file) it is one line
every ``LINE_SECONDS`` and one at the end.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from typing import Any

import psycopg
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from imageopt.jobs import status_counts
from imageopt.status import ItemStatus

# How often the database is asked, and how often a plain line is printed.
POLL_SECONDS = 0.5
LINE_SECONDS = 10.0


class JobProgress:
    """Follow job ``job_id`` in a thread of its own while the block runs."""

    def __init__(self, conninfo: str, job_id: int) -> None:
        self.conninfo = conninfo
        self.job_id = job_id
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, daemon=True)
        self._console = _log_console()

    def __enter__(self) -> JobProgress:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _follow(self) -> None:
        try:
            with psycopg.connect(self.conninfo, autocommit=True) as conn:
                if self._console.is_terminal:
                    self._bar(conn)
                else:
                    self._lines(conn)
        except psycopg.Error as exc:
            # Progress is a courtesy: the run goes on and reports at the end.
            logging.getLogger(__name__).debug("progress stopped: %s", exc)

    def _ended(self, conn: psycopg.Connection) -> tuple[int, int]:
        counts = status_counts(conn, self.job_id)
        ended = sum(n for s, n in counts.items() if ItemStatus(s).is_final)
        return ended, sum(counts.values())

    def _bar(self, conn: psycopg.Connection) -> None:
        columns = (
            TextColumn(f"job {self.job_id}"),
            BarColumn(),
            MofNCompleteColumn(),
            _RateColumn(),
            TextColumn("left"),
            TimeRemainingColumn(),
        )
        with Progress(*columns, console=self._console, transient=False) as bar:
            ended, total = self._ended(conn)
            task = bar.add_task("items", total=total, completed=ended)
            while not self._stop.wait(POLL_SECONDS):
                ended, total = self._ended(conn)
                bar.update(task, completed=ended, total=total)
            bar.update(task, completed=self._ended(conn)[0])

    def _lines(self, conn: psycopg.Connection) -> None:
        began = time.monotonic()
        first, _ = self._ended(conn)
        while not self._stop.wait(LINE_SECONDS):
            self._print_line(conn, began, first)
        self._print_line(conn, began, first)

    def _print_line(self, conn: psycopg.Connection, began: float, first: int) -> None:
        ended, total = self._ended(conn)
        minutes = (time.monotonic() - began) / 60
        rate = (ended - first) / minutes if minutes > 0 else 0.0
        left = ""
        if rate and ended < total:
            left = f", about {_duration(60 * (total - ended) / rate)} left"
        print(
            f"job {self.job_id}: {ended}/{total} items ended, "
            f"{rate:.0f} a minute{left}",
            file=sys.stderr,
            flush=True,
        )


class _RateColumn(ProgressColumn):
    """Items a minute, from rich's own estimate of the recent speed."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{60 * speed:.0f}/min" if speed else "-/min")


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


def _log_console() -> Console:
    """The console Prefect's log handler writes to, so both share the screen."""
    from prefect.logging.handlers import PrefectConsoleHandler

    for name in ("prefect", "imageopt", ""):
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, PrefectConsoleHandler):
                console: Any = handler.console
                return console
    return Console(stderr=True)
