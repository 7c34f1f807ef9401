"""The ``imageopt`` command.

Each command group lives in a module of this package with a ``register``
function that adds its subcommands. A command returns an exit code; an error
the user caused (an :class:`~imageopt.errors.ImageoptError`) is printed as one
line on stderr with exit code 2, never as a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import NoReturn

from imageopt.errors import ImageoptError

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """Refuses bad arguments in one line, like every other refusal here."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from imageopt.cli import admission, database, jobs, provider

    parser = _Parser(
        prog="imageopt",
        description="Optimize product images through a prediction API.",
    )
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="debug logging"
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in (database, jobs, provider, admission):
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
    except ImageoptError as exc:
        print(f"imageopt {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
