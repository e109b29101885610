"""Command-line options, kept apart from the implementation so that `linewatch --help` imports no server library."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--connect", default="tcp://127.0.0.1:5555", help="the daemon's publish.endpoint")
    p.add_argument("--camera", help="only this camera (default: every camera the daemon publishes)")
    p.add_argument(
        "--listen",
        default="127.0.0.1:8080",
        metavar="HOST:PORT",
        help="where the web page is served; beyond loopback with --feedback only with a token (--token-file)",
    )
    p.add_argument(
        "--archive",
        metavar="DIR",
        help="the daemon's archive.dir: full-size frames of archived parts for the detail view and feedback",
    )
    p.add_argument(
        "--feedback",
        metavar="DIR",
        help="turn marking on: operators' corrections (false reject, missed defect) are saved here "
        "(default: marking off)",
    )
    p.add_argument(
        "--token-file",
        metavar="FILE",
        help="file holding the token operators give to mark parts (private to its owner, at least 16 characters; "
        "or env LINEWATCH_DASHBOARD_TOKEN); required with --feedback beyond loopback",
    )
    p.add_argument("--server-key", help="daemon's CURVE public key (z85 or key file) when CURVE is on")
    p.add_argument("--client-key-file", help="this client's CURVE key pair file")
    p.add_argument("--history", type=int, default=200, metavar="N", help="parts per camera in the score trend")
    p.add_argument("--gallery", type=int, default=24, metavar="N", help="recent NOK and ERROR parts in the gallery")
    p.add_argument(
        "--previews",
        type=int,
        default=50,
        metavar="N",
        help="previews (frame and heat map) held in memory per camera, for the detail view and feedback",
    )
    p.add_argument(
        "--status-interval",
        type=float,
        metavar="SECONDS",
        help="the daemon's publish.status_interval_s; the life bit is missing after 3 intervals without a status "
        "(default: learnt from the status stream, 1 s until then)",
    )
