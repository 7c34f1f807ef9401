"""Run benchmarks and print one JSON object per result line.

python -m bench optimizer      # one benchmark, in full
python -m bench --quick        # every benchmark, shortened
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import sys
import time

from bench import BENCHMARKS
from bench.harness import shared_server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("names", nargs="*", metavar="NAME", help=", ".join(BENCHMARKS))
    parser.add_argument("--quick", action="store_true", help="shortened runs")
    args = parser.parse_args(argv)

    unknown = sorted(set(args.names) - set(BENCHMARKS))
    if unknown:
        choices = ", ".join(BENCHMARKS)
        parser.error(f"no benchmark {', '.join(unknown)}: choose from {choices}")
    names = args.names or (BENCHMARKS if args.quick else None)
    if not names:
        parser.error(f"name a benchmark ({', '.join(BENCHMARKS)}) or pass --quick")

    began = time.monotonic()
    # Shortened runs share one Prefect server: each start costs seconds.
    with shared_server() if args.quick else contextlib.nullcontext():
        for name in names:
            module = importlib.import_module(f"bench.{name}")
            for result in module.run(quick=args.quick):
                print(json.dumps(result), flush=True)
    seconds = round(time.monotonic() - began, 1)
    print(json.dumps({"bench": "suite", "names": names, "seconds": seconds}))

    return 0


if __name__ == "__main__":
    sys.exit(main())
