"""The embedded default: a private PostgreSQL cluster that imageopt runs itself.

With no ``IMAGEOPT_DATABASE_URL``, imageopt creates a cluster from the
PostgreSQL server programs installed on the machine, in
``$IMAGEOPT_HOME/postgres``, listening on a loopback port chosen once, with a
password of its own; the next call finds it and starts it again if it stopped.

PostgreSQL refuses to run as root. When imageopt runs as root (common in
containers), the cluster belongs to an unprivileged account (``postgres``
where the packages created it, else ``nobody``) and its programs run as that
account. That account must be able to reach the data directory, so imageopt
grants it search permission (not listing) on each directory above the data
directory that lacks it, and says so.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import logging
import os
import pwd
import secrets
import shutil
import socket
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from imageopt.errors import ConfigurationError

logger = logging.getLogger(__name__)

DATABASE = "imageopt"
SUPERUSER = "imageopt"
SERVICE_ACCOUNTS = ("postgres", "nobody")

# Where distributions put the server programs when they are not on PATH.
_SEARCH_PATTERNS = (
    "/usr/lib/postgresql/*/bin",
    "/usr/pgsql-*/bin",
    "/usr/local/pgsql/bin",
    "/opt/homebrew/opt/postgresql*/bin",
    "/usr/local/opt/postgresql*/bin",
    "/Applications/Postgres.app/Contents/Versions/*/bin",
)

_INSTALL_HINT = (
    "no PostgreSQL server programs (initdb, pg_ctl) were found on PATH or in "
    "the usual install locations: install them (Debian/Ubuntu: `apt-get install "
    "postgresql`; Fedora: `dnf install postgresql-server`; macOS: `brew install "
    "postgresql`) or point imageopt at a server with IMAGEOPT_DATABASE_URL"
)


def find_server_programs() -> Path:
    """The directory holding ``initdb`` and ``pg_ctl``, newest version first."""
    on_path = shutil.which("pg_ctl")
    if on_path and shutil.which("initdb"):
        return Path(on_path).resolve().parent

    candidates = [Path(p) for pattern in _SEARCH_PATTERNS for p in glob.glob(pattern)]
    usable = [
        d for d in candidates if (d / "initdb").exists() and (d / "pg_ctl").exists()
    ]
    if not usable:
        raise ConfigurationError(_INSTALL_HINT)

    return max(usable, key=_version_key)


def _version_key(bindir: Path) -> tuple[int, ...]:
    digits = "".join(c if c.isdigit() else " " for c in str(bindir)).split()
    return tuple(int(d) for d in digits)


@dataclass(frozen=True)
class _Account:
    """Who the server programs run as: ourselves, or an account as root."""

    uid: int
    gid: int
    name: str

    @property
    def is_self(self) -> bool:
        return self.uid == os.geteuid()


def _service_account(data_dir: Path) -> _Account:
    """Ourselves; or as root, the data directory's owner or a service account."""
    if os.geteuid() != 0:
        entry = pwd.getpwuid(os.geteuid())
        return _Account(entry.pw_uid, entry.pw_gid, entry.pw_name)

    if data_dir.exists() and data_dir.stat().st_uid != 0:
        entry = pwd.getpwuid(data_dir.stat().st_uid)
        return _Account(entry.pw_uid, entry.pw_gid, entry.pw_name)

    for name in SERVICE_ACCOUNTS:
        with contextlib.suppress(KeyError):
            entry = pwd.getpwnam(name)
            return _Account(entry.pw_uid, entry.pw_gid, entry.pw_name)

    msg = (
        "PostgreSQL refuses to run as root and no unprivileged account "
        f"({', '.join(SERVICE_ACCOUNTS)}) exists to run it: create one "
        "(`useradd postgres`) or set IMAGEOPT_DATABASE_URL"
    )
    raise ConfigurationError(msg)


class EmbeddedCluster:
    """A private PostgreSQL cluster under ``home/postgres``.

    Every method is safe to call from several processes at once: a file lock
    serialises creating, starting and stopping.
    """

    def __init__(self, home: Path) -> None:
        self.root = Path(home).absolute() / "postgres"
        self.data_dir = self.root / "data"
        self._password_file = self.root / "password"
        self._port_file = self.root / "port"
        self._log_file = self.root / "server.log"

    def url(self) -> str:
        """The connection URL, password included: treat it as a secret."""
        password = quote(self._password_file.read_text().strip(), safe="")
        port = int(self._port_file.read_text())
        return f"postgresql://{SUPERUSER}:{password}@127.0.0.1:{port}/{DATABASE}"

    def is_initialised(self) -> bool:
        return (self.data_dir / "PG_VERSION").exists()

    def is_running(self) -> bool:
        if not self.is_initialised():
            return False
        result = self._run_as_account(["pg_ctl", "status", "-D", str(self.data_dir)])
        return result.returncode == 0

    def ensure_started(self) -> str:
        """Create the cluster if needed, start it if stopped; return its URL."""
        with self._locked():
            if not self.is_initialised():
                self._initialise()
            if not self.is_running():
                self._start()
            self._ensure_database()

        return self.url()

    def stop(self) -> bool:
        """Stop the cluster; False when it was not running."""
        with self._locked():
            if not self.is_running():
                return False
            logger.info("stopping the embedded PostgreSQL in %s", self.data_dir)
            self._run_as_account(
                ["pg_ctl", "stop", "-D", str(self.data_dir), "-m", "fast", "-w"],
                check=True,
            )

        return True

    # -- creating -----------------------------------------------------------

    def _initialise(self) -> None:
        account = _service_account(self.data_dir)
        logger.info(
            "creating the embedded PostgreSQL cluster in %s (as %s)",
            self.data_dir,
            account.name,
        )
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        if not account.is_self:
            os.chown(self.root, account.uid, account.gid)
            self._grant_search_to(account)

        password = secrets.token_urlsafe(24)
        self._write_private(self._password_file, password + "\n", account)
        self._port_file.write_text(f"{_free_loopback_port()}\n")

        result = self._run_as_account(
            [
                "initdb",
                "-D",
                str(self.data_dir),
                "-U",
                SUPERUSER,
                "--auth=scram-sha-256",
                f"--pwfile={self._password_file}",
                "-E",
                "UTF8",
                "--locale=C",
            ]
        )
        if result.returncode != 0:
            shutil.rmtree(self.data_dir, ignore_errors=True)
            msg = f"initdb failed for {self.data_dir}: {result.stderr.strip()}"
            raise ConfigurationError(msg)

    def _grant_search_to(self, account: _Account) -> None:
        """Let the service account traverse every directory above ``root``."""
        for parent in reversed(self.root.parents):
            mode = parent.stat().st_mode
            if mode & stat.S_IXOTH:
                continue
            logger.info(
                "granting search permission on %s so that %s can reach the "
                "embedded cluster",
                parent,
                account.name,
            )
            os.chmod(parent, mode | stat.S_IXOTH)

    def _write_private(self, path: Path, text: str, account: _Account) -> None:
        path.write_text(text)
        os.chmod(path, 0o600)
        if not account.is_self:
            os.chown(path, account.uid, account.gid)

    # -- starting -----------------------------------------------------------

    def _start(self) -> None:
        port = int(self._port_file.read_text())
        if not _port_is_free(port):
            port = _free_loopback_port()
            self._port_file.write_text(f"{port}\n")

        logger.info("starting the embedded PostgreSQL on 127.0.0.1:%s", port)
        options = f"-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories="
        result = self._run_as_account(
            [
                "pg_ctl",
                "start",
                "-D",
                str(self.data_dir),
                "-l",
                str(self._log_file),
                "-w",
                "-t",
                "60",
                "-o",
                options,
            ]
        )
        if result.returncode != 0:
            output = result.stderr.strip() or result.stdout.strip()
            msg = (
                f"the embedded PostgreSQL in {self.data_dir} did not start: "
                f"{output}; see {self._log_file}"
            )
            raise ConfigurationError(msg)

    def _ensure_database(self) -> None:
        import psycopg

        admin_url = self.url().rsplit("/", 1)[0] + "/postgres"
        with psycopg.connect(admin_url, autocommit=True) as conn:
            exists = conn.execute(
                "SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,)
            ).fetchone()
            if not exists:
                conn.execute(f'CREATE DATABASE "{DATABASE}"')

    # -- plumbing -----------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self):
        self.root.parent.mkdir(parents=True, exist_ok=True)
        lock_path = self.root.parent / "postgres.lock"
        with open(lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _run_as_account(
        self, argv: list[str], *, check: bool = False
    ) -> subprocess.CompletedProcess[str]:
        account = _service_account(self.data_dir)
        program = find_server_programs() / argv[0]
        kwargs: dict = {}
        if not account.is_self:
            kwargs = {"user": account.uid, "group": account.gid, "extra_groups": []}

        result = subprocess.run(
            [str(program), *argv[1:]],
            capture_output=True,
            text=True,
            cwd=self.root if self.root.exists() else None,
            env={**os.environ, "LC_ALL": "C"},
            **kwargs,
        )
        if check and result.returncode != 0:
            msg = f"{argv[0]} failed for {self.data_dir}: {result.stderr.strip()}"
            raise ConfigurationError(msg)

        return result


def _free_loopback_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        # As PostgreSQL does: a port whose last connections linger in
        # TIME_WAIT after a stop is free to listen on again.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True
