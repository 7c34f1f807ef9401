"""``imageopt demo``: the whole pipeline on this machine, from nothing.

It starts (or reuses) the embedded PostgreSQL, migrates it, starts the
built-in provider and a Prefect server for the run, submits the images,
runs the job with a progress bar and prints what each image saved.
"""

from __future__ import annotations

import argparse
from typing import Any

from imageopt.cli.jobs import run_here
from imageopt.db import Database, database_url
from imageopt.jobs import display_name, expand_sources, job_report, submit
from imageopt.optimizer import FORMATS, OptimizeOptions
from imageopt.reports import saving
from imageopt.schema import SchemaCheck
from imageopt.settings import get_settings

DEMO_STORE = "Demo store"


def register(commands: argparse._SubParsersAction) -> None:
    demo = commands.add_parser(
        "demo",
        help="optimize images end to end on this machine (default: the samples)",
        description=(
            "Start or reuse the embedded PostgreSQL (unless IMAGEOPT_DATABASE_URL "
            "is set) and migrate it, start the built-in provider and a Prefect "
            "server for the run, submit the SOURCEs (default: the sample images "
            "imageopt ships) for the store 'Demo store', run the job with a "
            "progress bar, and print each file's size before and after."
        ),
    )
    demo.add_argument(
        "sources",
        nargs="*",
        metavar="SOURCE",
        help="an image, a folder of images, a URL or @FILE listing them",
    )
    demo.add_argument(
        "--output",
        metavar="DIR",
        help="store outputs in this folder (default: IMAGEOPT_HOME/outputs)",
    )
    demo.add_argument("--format", choices=FORMATS, default="auto")
    demo.add_argument(
        "--max-width", type=int, default=1024, metavar="PIXELS", help="default 1024"
    )
    demo.set_defaults(handler=_demo)


def _demo(args: argparse.Namespace) -> int:
    from imageopt.migrate import run_migrations
    from imageopt.samples import sample_paths

    settings = get_settings()
    url = database_url(settings)
    report = run_migrations(url)
    print(f"database schema at version {report.end_version}")
    if args.sources:
        sources = list(expand_sources(args.sources))
    else:
        sources = [str(path) for path in sample_paths()]
    options = OptimizeOptions(format=args.format, max_width=args.max_width)
    with Database(url, max_size=1) as db, db.connection() as conn:
        schema = SchemaCheck().refresh(conn)
        job_id = submit(
            conn,
            schema,
            DEMO_STORE,
            sources,
            options,
            max_input_bytes=settings.max_input_bytes,
        )
    print(f"submitted job {job_id}: {len(sources)} image(s)")

    code = run_here(job_id, args.output)
    with Database(url, max_size=1) as db, db.connection() as conn:
        items = job_report(conn, job_id)["items"]
    print(saving_table(items))

    return code


def saving_table(items: list[dict[str, Any]]) -> str:
    """Each item's file, size before and after, and saving, with a total."""
    rows = [("file", "before", "after", "saving", "output or reason")]
    bytes_in = bytes_out = completed = 0
    for item in items:
        name = display_name(item["source"])
        if item["status"] == "COMPLETED":
            completed += 1
            bytes_in += item["bytes_in"]
            bytes_out += item["bytes_out"]
            rows.append(
                (
                    name,
                    f"{item['bytes_in']:,}",
                    f"{item['bytes_out']:,}",
                    saving(item["bytes_in"], item["bytes_out"]),
                    item["output"],
                )
            )
        else:
            rows.append((name, "", "", "", f"{item['status']}: {item['error']}"))
    rows.append(
        (
            "total",
            f"{bytes_in:,}",
            f"{bytes_out:,}",
            saving(bytes_in, bytes_out),
            f"{completed} of {len(items)} image(s) optimized",
        )
    )

    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = []
    for row in rows:
        name, before, after, share, last = row
        lines.append(
            f"{name:<{widths[0]}}  {before:>{widths[1]}}  {after:>{widths[2]}}  "
            f"{share:>{widths[3]}}  {last}"
        )
    return "\n".join(lines)
