"""``imageopt report``: what jobs achieved, for people and for spreadsheets."""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Sequence
from typing import Any

from imageopt.cli import EXIT_OK
from imageopt.db import Database, database_url
from imageopt.reports import (
    ITEM_KEYS,
    SUMMARY_KEYS,
    item_rows,
    job_summaries,
    job_summary,
)


def register(commands: argparse._SubParsersAction) -> None:
    report = commands.add_parser(
        "report",
        help="what jobs achieved: items, predictions paid, bytes saved",
        description=(
            "Without JOB, one line per recent job: its items by status, the "
            "predictions made for it (what the provider bills), the bytes "
            "before and after over its completed items, and how long it took. "
            "With JOB, that job's line and one row per item."
        ),
    )
    report.add_argument("job", type=int, nargs="?", metavar="JOB")
    report.add_argument("--store", help="only this store's jobs")
    report.add_argument(
        "--limit", type=int, default=20, help="how many recent jobs (default 20)"
    )
    output = report.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="print JSON")
    output.add_argument("--csv", action="store_true", help="print CSV")
    report.set_defaults(handler=_report)


def _report(args: argparse.Namespace) -> int:
    with Database(database_url(), max_size=1) as db, db.connection() as conn:
        if args.job is None:
            summaries = job_summaries(conn, store=args.store, limit=args.limit)
            items = None
        else:
            summaries = [job_summary(conn, args.job)]
            items = item_rows(conn, args.job)

    if args.json:
        document: Any = summaries if items is None else {**summaries[0], "rows": items}
        print(json.dumps(document, ensure_ascii=False, indent=2))
    elif args.csv:
        rows, keys = (summaries, SUMMARY_KEYS) if items is None else (items, ITEM_KEYS)
        writer = csv.DictWriter(sys.stdout, fieldnames=keys, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    else:
        columns = ("job", "store", "status", "items", "completed", "failed")
        columns += ("unfinished", "predictions", "saving", "seconds")
        print(text_table(summaries, columns))
        if items is not None:
            print()
            print(text_table(items, ("item", "file", "status", "saving", "seconds")))
            for item in items:
                if item["reason"]:
                    print(f"item {item['item']} ({item['file']}): {item['reason']}")

    return EXIT_OK


def text_table(rows: list[dict[str, Any]], columns: Sequence[str]) -> str:
    """Rows as aligned columns under a header; numbers to the right."""
    cells = [list(columns)] + [[_cell(row[c]) for c in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    numeric = [
        all(isinstance(row[c], int | float) for row in rows if row[c] != "")
        for c in columns
    ]
    lines = []
    for line in cells:
        parts = [
            cell.rjust(width) if right else cell.ljust(width)
            for cell, width, right in zip(line, widths, numeric, strict=True)
        ]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def _cell(value: Any) -> str:
    return (
        f"{value:,}"
        if isinstance(value, int) and not isinstance(value, bool)
        else str(value)
    )
