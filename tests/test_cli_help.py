"""`linewatch COMMAND --help` is the reference: every argument of every subcommand says what it means, and every
option with a default shows that default, in the help text argparse really prints."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

import pytest

from linewatch.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return {"linewatch": parser, **{f"linewatch {name}": p for name, p in sub.choices.items()}}


def flat(text: str) -> str:
    return re.sub(r"\s+", " ", text)


def shown_default(action: argparse.Action) -> bool:
    """Options whose default means something to show: not None, not suppressed, not an on/off flag."""
    return action.default not in (None, argparse.SUPPRESS) and action.nargs != 0


@pytest.mark.unit
@pytest.mark.parametrize("command", sorted(subcommands()))
def test_every_argument_has_help_and_shows_its_default(command):
    parser = subcommands()[command]
    page = flat(parser.format_help())
    formatter = parser._get_formatter()
    missing, no_default = [], []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            continue
        name = "/".join(action.option_strings) or action.dest
        if not (action.help or "").strip():
            missing.append(name)
            continue
        text = flat(formatter._expand_help(action))  # the help text as printed, %(default)s expanded
        assert text in page, (name, text)
        if shown_default(action) and not re.search(rf"default:? {re.escape(str(action.default))}\b", text):
            no_default.append(f"{name} (default {action.default!r}): {text!r}")
    assert not missing, f"{command}: arguments without a help text: {missing}"
    assert not no_default, f"{command}: defaults not shown in --help: {no_default}"


@pytest.mark.unit
def test_the_options_named_in_the_issue_explain_themselves():
    commands = subcommands()
    for command, option in [
        ("linewatch calibrate", "--fpr"),
        ("linewatch calibrate", "--min-defect-area"),
        ("linewatch calibrate", "--frames"),
        ("linewatch train", "--padding"),
        ("linewatch train", "--align"),
        ("linewatch train", "--epochs"),
        ("linewatch train", "--seed"),
        ("linewatch export", "--opset"),
        ("linewatch bench", "--iters"),
        ("linewatch run", "--config"),
        ("linewatch watch", "--quiet-after"),
    ]:
        parser = commands[command]
        (action,) = [a for a in parser._actions if option in a.option_strings]
        text = flat(parser._get_formatter()._expand_help(action))
        assert len(text) > 15, (command, option, text)
        if action.default is not None:
            assert f"(default: {action.default})" in text, (command, option, text)


@pytest.mark.e2e
def test_help_output_of_the_installed_command_shows_defaults():
    """The real command line, as a user runs it: the examples keep their layout and defaults are printed."""
    proc = subprocess.run(
        [sys.executable, "-m", "linewatch.cli", "bench", "--help"], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    page = flat(proc.stdout)
    assert "timed runs per batch size (after warm-up) (default: 20)" in page
    assert "(default: 1,8)" in page and "(default: fp32)" in page
    assert "--no-reference skip the naive torch reference --json" in page  # a flag: no "(default: False)"
    assert "\n  linewatch bench models/bottle --batch 1,8,32 --json bench.json\n" in proc.stdout  # not re-wrapped
