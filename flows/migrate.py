"""The ``migrate`` flow: apply pending database migrations from Prefect.

It runs the same runner as ``imageopt migrate``, logging each migration it
applies to the flow run, so a deployment can bring the schema up to date
before new code writes to it.
"""

from __future__ import annotations

from prefect import flow, get_run_logger

from imageopt.db import database_url
from imageopt.migrate import run_migrations


@flow(name="migrate", log_prints=False)
def migrate(to: int | None = None, dry_run: bool = False) -> list[str]:
    """Apply pending migrations up to version ``to``; return the files applied.

    With ``dry_run``, nothing changes and the files that would run are returned.
    """
    logger = get_run_logger()
    report = run_migrations(database_url(), to=to, dry_run=dry_run, log=logger)
    if dry_run:
        labels = [m.label for m in report.pending]
        logger.info("dry run: %s migration(s) would apply: %s", len(labels), labels)
        return labels

    logger.info(
        "schema at version %s (was %s)", report.end_version, report.start_version
    )

    return [m.label for m in report.applied]
