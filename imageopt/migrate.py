"""The migration runner: plain SQL files in ``migrations/``, applied in order.

A file is named ``NNNN_slug.sql``; its number is its version. Each applied file
is recorded in ``schema_migrations`` with a checksum of its bytes. Before
anything runs, every recorded checksum is compared with the file on disk: an
applied migration that was edited afterwards is refused, since databases
migrated before and after the edit would differ under the same version.

Runners take a PostgreSQL advisory lock for the whole run, so two runners
started together serialise: the first applies, the second waits and then finds
nothing left to do. Both succeed, and each file runs once.

A file whose first lines carry the marker ``-- imageopt: no-transaction`` runs
outside a transaction, one statement at a time. PostgreSQL needs that for
statements such as ``ALTER TYPE ... ADD VALUE``, whose new value cannot be used
in the transaction that added it. Such a file is split on semicolons that end
a line, so it must hold plain statements (no function bodies), and each
statement must be safe to run again (``IF NOT EXISTS``): a crash between two
of them leaves the file unrecorded, and the next run starts it over.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

from imageopt.errors import MigrationChecksumError, MigrationError

logger = logging.getLogger(__name__)

NO_TRANSACTION_MARKER = "-- imageopt: no-transaction"

# Any fixed 64-bit number works; this one spells "imageopt" in ASCII.
ADVISORY_LOCK_KEY = int.from_bytes(b"imageopt", "big") & 0x7FFF_FFFF_FFFF_FFFF

_FILE_NAME = re.compile(r"^(\d{4,})_([a-z0-9_]+)\.sql$")
_STATEMENT_END = re.compile(r";[ \t]*(?:\n|$)")


@dataclass(frozen=True)
class Migration:
    """One SQL file of the history."""

    version: int
    name: str
    sql: str
    checksum: str
    transactional: bool

    @property
    def label(self) -> str:
        return f"{self.version:04d}_{self.name}"

    def statements(self) -> list[str]:
        """The file's statements, for running outside a transaction."""
        lines = [ln for ln in self.sql.splitlines() if not ln.lstrip().startswith("--")]
        parts = _STATEMENT_END.split("\n".join(lines) + "\n")
        return [p.strip() for p in parts if p.strip()]


@dataclass
class MigrationReport:
    """What a run found and did."""

    start_version: int
    end_version: int
    applied: list[Migration] = field(default_factory=list)
    pending: list[Migration] = field(default_factory=list)
    dry_run: bool = False


def default_directory() -> Path:
    """Where the SQL history is: beside the package in a checkout, else inside it."""
    package = Path(__file__).resolve().parent
    for candidate in (package / "migrations", package.parent / "migrations"):
        if candidate.is_dir() and any(candidate.glob("*.sql")):
            return candidate

    msg = f"no migrations directory found beside or inside {package}"
    raise MigrationError(msg)


def load_migrations(directory: Path | None = None) -> list[Migration]:
    """Every migration file in ``directory``, in version order."""
    directory = directory or default_directory()
    migrations: dict[int, Migration] = {}
    for path in sorted(directory.glob("*.sql")):
        match = _FILE_NAME.match(path.name)
        if not match:
            msg = f"{path.name}: a migration file is named NNNN_slug.sql"
            raise MigrationError(msg)

        version = int(match.group(1))
        if version in migrations:
            msg = (
                f"{path.name}: version {version} is already taken by "
                f"{migrations[version].label}.sql"
            )
            raise MigrationError(msg)

        raw = path.read_bytes()
        sql = raw.decode("utf-8")
        head = sql.lstrip().splitlines()[:3]
        migrations[version] = Migration(
            version=version,
            name=match.group(2),
            sql=sql,
            checksum=hashlib.sha256(raw).hexdigest(),
            transactional=NO_TRANSACTION_MARKER not in (ln.strip() for ln in head),
        )

    return [migrations[v] for v in sorted(migrations)]


def newest_version(directory: Path | None = None) -> int:
    return max((m.version for m in load_migrations(directory)), default=0)


def current_version(conn: psycopg.Connection) -> int:
    """The newest version applied to the database; 0 for an empty one."""
    (table,) = conn.execute("SELECT to_regclass('schema_migrations')").fetchone()
    if table is None:
        return 0

    query = "SELECT coalesce(max(version), 0) FROM schema_migrations"
    (version,) = conn.execute(query).fetchone()
    return int(version)


def run_migrations(
    conninfo: str,
    *,
    to: int | None = None,
    dry_run: bool = False,
    directory: Path | None = None,
    log: logging.Logger | logging.LoggerAdapter = logger,
) -> MigrationReport:
    """Apply pending migrations up to ``to`` (all when None).

    With ``dry_run``, nothing is written: the report lists what would run.
    Raises :class:`MigrationChecksumError` before applying anything when an
    applied file was changed.
    """
    migrations = load_migrations(directory)
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (ADVISORY_LOCK_KEY,))
        try:
            return _run_locked(conn, migrations, to=to, dry_run=dry_run, log=log)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (ADVISORY_LOCK_KEY,))


def _run_locked(
    conn: psycopg.Connection,
    migrations: Sequence[Migration],
    *,
    to: int | None,
    dry_run: bool,
    log: logging.Logger | logging.LoggerAdapter,
) -> MigrationReport:
    applied = _applied_checksums(conn)
    _refuse_changed_files(migrations, applied)

    start = max(applied, default=0)
    pending = [
        m
        for m in migrations
        if m.version not in applied and (to is None or m.version <= to)
    ]
    report = MigrationReport(start, start, pending=list(pending), dry_run=dry_run)
    if dry_run or not pending:
        return report

    _ensure_record_table(conn)
    for migration in pending:
        log.info("applying migration %s", migration.label)
        began = time.perf_counter()
        _apply(conn, migration)
        log.info(
            "applied migration %s in %.0f ms",
            migration.label,
            (time.perf_counter() - began) * 1000,
        )
        report.applied.append(migration)
        report.end_version = max(report.end_version, migration.version)

    report.pending = []

    return report


def _applied_checksums(conn: psycopg.Connection) -> dict[int, str]:
    if current_version(conn) == 0:
        return {}

    rows = conn.execute("SELECT version, checksum FROM schema_migrations").fetchall()
    return {int(version): checksum for version, checksum in rows}


def _refuse_changed_files(
    migrations: Sequence[Migration], applied: dict[int, str]
) -> None:
    changed = [
        m.label
        for m in migrations
        if m.version in applied and applied[m.version] != m.checksum
    ]
    if changed:
        msg = (
            f"applied migration files were changed since they ran: "
            f"{', '.join(changed)}. Nothing was applied. Restore the files as "
            "they were and put the change in a new migration file."
        )
        raise MigrationChecksumError(msg)


def _ensure_record_table(conn: psycopg.Connection) -> None:
    conn.execute(
        """
        CREATE TABLE IF NOT EXISTS schema_migrations (
            version     integer PRIMARY KEY,
            name        text NOT NULL,
            checksum    text NOT NULL,
            applied_at  timestamptz NOT NULL DEFAULT now(),
            duration_ms integer NOT NULL
        )
        """
    )


def _apply(conn: psycopg.Connection, migration: Migration) -> None:
    began = time.perf_counter()
    try:
        if migration.transactional:
            with conn.transaction():
                conn.execute(migration.sql)
                _record(conn, migration, began)
        else:
            for statement in migration.statements():
                conn.execute(statement)
            _record(conn, migration, began)
    except psycopg.Error as exc:
        msg = f"migration {migration.label} failed and was not recorded: {exc}"
        raise MigrationError(msg) from exc


def _record(conn: psycopg.Connection, migration: Migration, began: float) -> None:
    conn.execute(
        "INSERT INTO schema_migrations (version, name, checksum, duration_ms)"
        " VALUES (%s, %s, %s, %s)",
        (
            migration.version,
            migration.name,
            migration.checksum,
            round((time.perf_counter() - began) * 1000),
        ),
    )
