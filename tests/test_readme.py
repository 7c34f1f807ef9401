"""The README stays true: every setting and every command is documented, and
CI runs the test command its first screen gives."""

from __future__ import annotations

import re
from pathlib import Path

from imageopt.cli import build_parser
from imageopt.settings import Settings

PROJECT = Path(__file__).resolve().parents[1]
README = (PROJECT / "README.md").read_text()


def test_every_setting_is_in_the_settings_table():
    documented = set(re.findall(r"^\| `(IMAGEOPT_[A-Z_]+)` \|", README, re.MULTILINE))

    expected = {f"IMAGEOPT_{name.upper()}" for name in Settings.model_fields}

    assert expected - documented == set(), "settings missing from the README"
    assert documented - expected == set(), (
        "the README documents settings that no longer exist"
    )


def test_every_command_is_in_the_readme():
    parser = build_parser()
    (commands,) = [a for a in parser._actions if a.dest == "command"]

    missing = [name for name in commands.choices if f"imageopt {name}" not in README]

    assert missing == []


def test_ci_runs_the_test_command_of_the_first_screen():
    first_screen = "\n".join(README.splitlines()[:24])
    ci = (PROJECT / ".ci" / "run").read_text()

    assert ".venv/bin/imageopt demo" in first_screen
    assert ".venv/bin/pytest" in first_screen
    assert re.search(r"^\.venv/bin/pytest\b", ci, re.MULTILINE)
