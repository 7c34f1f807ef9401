"""The ``imageopt`` command.

Each command group lives in a module of this package with a ``register``
function that adds its subcommands. A command returns an exit code; an error
the user caused (an :class:`~imageopt.errors.ImageoptError`) is printed as one
line on stderr, never as a traceback. The exit codes, the same for every
command:

0  done: for ``run`` and ``demo``, every item completed
1  done, but some items failed or were canceled (``imageopt report JOB``
   says why)
2  refused: bad arguments, or a request that cannot be served (an unknown
   job, an invalid option); nothing was changed
3  stopped before every item ended: run the job again to resume it
4  a service could not be reached (the database); nothing was changed
130  interrupted (Ctrl-C)
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import NoReturn

from imageopt.errors import DatabaseUnavailableError, ImageoptError

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNFINISHED = 3
EXIT_UNAVAILABLE = 4


class _Parser(argparse.ArgumentParser):
    """Refuses bad arguments in one line, like every other refusal here."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from imageopt.cli import admission, database, demo, jobs, provider, report

    parser = _Parser(
        prog="imageopt",
        description="Optimize product images through a prediction API.",
    )
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="debug logging"
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in (database, jobs, report, demo, provider, admission):
        module.register(commands)

    return parser


def _configure_logging(verbosity: int) -> None:
    """imageopt's messages through Prefect's console handler, one format for all.

    INFO by default (a cluster started, a migration applied), DEBUG with -v.
    """
    from prefect.logging.configuration import setup_logging

    setup_logging()
    logging.getLogger("imageopt").setLevel(logging.DEBUG if verbosity else logging.INFO)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.verbose)

    try:
        return args.handler(args)
    except DatabaseUnavailableError as exc:
        print(f"imageopt {args.command}: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except ImageoptError as exc:
        print(f"imageopt {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
