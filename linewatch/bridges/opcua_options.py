"""Command-line options, kept apart from the implementation so that `linewatch --help` imports no server library."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--connect", default="tcp://127.0.0.1:5555", help="the daemon's publish.endpoint")
