"""Summarise py-spy raw profiles: where each process spent its samples.

``py-spy record --format raw`` writes one collapsed stack a line, outermost
frame first, frames joined by ``;``, then a space and the number of samples.
For each file given (or each ``*.txt`` in a folder given), this prints the
frames holding the largest share of samples: inclusive (the frame anywhere
on the stack) and self (the innermost frame), and the share of samples whose
stack passes through each package. ``bench/ceiling.py`` writes such files
when ``IMAGEOPT_BENCH_PROFILE`` is set::

    python -m bench.profiles FOLDER [--top 25]
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from pathlib import Path

# "function (path/to/module.py:123)": the line number is dropped, so that one
# function's samples add up.
_FRAME = re.compile(r"^(?P<function>.*?) \((?P<path>[^:()]*)(?::\d+)?\)$")


def read_stacks(path: Path) -> Counter[tuple[str, ...]]:
    stacks: Counter[tuple[str, ...]] = Counter()
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = tuple(frame.strip() for frame in stack.split(";"))
        stacks[frames] += int(count)

    return stacks


def _frame_name(frame: str) -> str:
    match = _FRAME.match(frame.strip())
    if match is None:
        return frame.strip()
    path = match["path"]
    short = "/".join(path.split("/")[-2:])

    return f"{match['function']} ({short})"


def _package(frame: str) -> str | None:
    """The top-level package of a frame's module, as py-spy shortens its path
    (``prefect/task_engine.py``); None for a module on its own (``threading.py``)
    or a frozen one."""
    match = _FRAME.match(frame)
    if match is None or "/" not in match["path"] or match["path"].startswith("<"):
        return None

    return match["path"].split("/", 1)[0]


def summarise(path: Path, top: int) -> str:
    stacks = read_stacks(path)
    total = sum(stacks.values())
    if not total:
        return f"{path}: no samples"

    inclusive: Counter[str] = Counter()
    innermost: Counter[str] = Counter()
    packages: Counter[str] = Counter()
    starting = 0
    for frames, count in stacks.items():
        names = [_frame_name(frame) for frame in frames]
        for name in set(names):
            inclusive[name] += count
        innermost[names[-1]] += count
        if any("importlib._bootstrap" in frame for frame in frames):
            starting += count
        for package in {_package(frame) for frame in frames} - {None}:
            packages[package] += count

    def table(title: str, counts: Counter[str]) -> list[str]:
        rows = [
            f"  {100 * n / total:5.1f} %  {name}" for name, n in counts.most_common(top)
        ]
        return [title, *rows]

    lines = [
        f"{path}: {total} samples, {100 * starting / total:.1f} % of them importing",
        *table("inclusive:", inclusive),
        *table("self:", innermost),
        *table("packages on the stack:", packages),
    ]

    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.profiles", description=__doc__
    )
    parser.add_argument("paths", nargs="+", type=Path, metavar="FILE_OR_FOLDER")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)

    files = [
        file
        for path in args.paths
        for file in (sorted(path.glob("*.txt")) if path.is_dir() else [path])
    ]
    print("\n\n".join(summarise(file, args.top) for file in files))

    return 0


if __name__ == "__main__":
    sys.exit(main())
