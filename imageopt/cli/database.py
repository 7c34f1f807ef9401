"""``imageopt migrate`` and ``imageopt db``: the schema and the embedded cluster."""

from __future__ import annotations

import argparse

from imageopt.cli import EXIT_OK
from imageopt.db import database_url
from imageopt.errors import ConfigurationError
from imageopt.migrate import run_migrations
from imageopt.settings import get_settings


def register(commands: argparse._SubParsersAction) -> None:
    migrate = commands.add_parser(
        "migrate",
        help="apply pending database migrations",
        description=(
            "Apply the pending SQL migrations in order. Safe to run from several "
            "places at once: runners take turns, and each file is applied once."
        ),
    )
    migrate.add_argument(
        "--to",
        type=int,
        metavar="VERSION",
        help="stop after this version (0002_x.sql is version 2)",
    )
    migrate.add_argument(
        "--dry-run", action="store_true", help="list what would run; change nothing"
    )
    migrate.set_defaults(handler=_migrate)

    db = commands.add_parser(
        "db",
        help="manage the embedded PostgreSQL cluster",
        description=(
            "Without IMAGEOPT_DATABASE_URL, imageopt keeps a private PostgreSQL "
            "cluster under IMAGEOPT_HOME; these commands manage it."
        ),
    )
    actions = db.add_subparsers(dest="action", metavar="ACTION", required=True)
    actions.add_parser(
        "start", help="create the cluster if needed and start it"
    ).set_defaults(handler=_db_start)
    actions.add_parser("stop", help="stop the cluster").set_defaults(handler=_db_stop)
    actions.add_parser(
        "url",
        help="print the database URL imageopt uses (starts the cluster if needed)",
        description=(
            "Print the URL of the database imageopt uses. It carries a "
            "password: keep it out of logs."
        ),
    ).set_defaults(handler=_db_url)


def _migrate(args: argparse.Namespace) -> int:
    report = run_migrations(database_url(), to=args.to, dry_run=args.dry_run)
    if args.dry_run:
        for migration in report.pending:
            print(f"would apply {migration.label}")
        print(
            f"schema at version {report.start_version}; "
            f"{len(report.pending)} migration(s) pending"
        )
        return EXIT_OK

    for migration in report.applied:
        print(f"applied {migration.label}")
    if not report.applied:
        print("nothing to apply")
    print(f"schema at version {report.end_version}")

    return EXIT_OK


def _embedded_cluster():
    from imageopt.embedded import EmbeddedCluster

    settings = get_settings()
    if settings.database_url is not None:
        msg = (
            "IMAGEOPT_DATABASE_URL is set, so imageopt uses that database and "
            "not the embedded cluster: unset it to manage the embedded one"
        )
        raise ConfigurationError(msg)

    return EmbeddedCluster(settings.home)


def _db_start(args: argparse.Namespace) -> int:
    cluster = _embedded_cluster()
    cluster.ensure_started()
    print(f"embedded PostgreSQL running, data in {cluster.data_dir}")

    return EXIT_OK


def _db_stop(args: argparse.Namespace) -> int:
    cluster = _embedded_cluster()
    stopped = cluster.stop()
    print("embedded PostgreSQL " + ("stopped" if stopped else "was not running"))

    return EXIT_OK


def _db_url(args: argparse.Namespace) -> int:
    print(database_url())

    return EXIT_OK
