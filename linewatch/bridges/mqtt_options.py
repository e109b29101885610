"""Command-line options, kept apart from the implementation so that `linewatch --help` imports no server library."""

from __future__ import annotations

import argparse
from typing import Any, NoReturn

# The daemon's default publish.status_interval_s: the bridge cannot read the daemon's config. It measures the real
# interval from the statuses' publish_time once it has seen a few, so this only matters until then.
DAEMON_STATUS_INTERVAL_S = 1.0


class _RefusePassword(argparse.Action):
    """`--password` exists only to be refused: a password in argv is visible to every user of the machine (ps,
    /proc/PID/cmdline), and without this option argparse would take `--password X` as an abbreviation of
    `--password-file X`."""

    def __call__(self, parser: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> NoReturn:
        parser.error(
            "--password: a password on the command line is visible to every user of this machine; "
            "put it in a file only you can read (chmod 600) and pass --password-file FILE"
        )


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--connect", default="tcp://127.0.0.1:5555", help="the daemon's publish.endpoint")
    p.add_argument("--camera", help="bridge this camera only (default: every camera of the daemon)")
    p.add_argument(
        "--broker",
        default="mqtt://127.0.0.1:1883",
        metavar="URL",
        help="mqtt://HOST[:PORT] (port 1883 when left out) or mqtts://HOST[:PORT] (TLS, port 8883 when left out)",
    )
    p.add_argument("--tls", action="store_true", help="TLS to the broker (implied by mqtts://)")
    p.add_argument("--cafile", metavar="FILE", help="CA certificate(s) to verify the broker (default: system CAs)")
    p.add_argument("--certfile", metavar="FILE", help="client certificate (PEM) when the broker wants one")
    p.add_argument("--keyfile", metavar="FILE", help="the client certificate's private key (PEM)")
    p.add_argument("--username", help="broker user name")
    p.add_argument(
        "--password-file",
        metavar="FILE",
        help="file holding the broker password (first line; readable by its owner only, chmod 600)",
    )
    p.add_argument("--password", nargs="?", action=_RefusePassword, help=argparse.SUPPRESS)
    p.add_argument(
        "--client-id",
        help="MQTT client id, also names the state topic <prefix>/bridge/<client-id>/state "
        "(default: linewatch-mqtt-<hostname>)",
    )
    p.add_argument("--topic-prefix", default="linewatch", help="first topic level(s): <prefix>/<camera>/result")
    p.add_argument(
        "--qos-result", type=int, choices=(0, 1, 2), default=1, help="QoS of result messages (status: always 1)"
    )
    p.add_argument(
        "--with-mask",
        action="store_true",
        help="add the result's mask PNG, base64, as mask_png_base64 in the result JSON (off: header only)",
    )
    p.add_argument(
        "--queue-size",
        type=int,
        default=1000,
        metavar="N",
        help="results kept while the broker is unreachable; beyond it the oldest are dropped (counted)",
    )
    p.add_argument(
        "--status-interval",
        type=float,
        default=DAEMON_STATUS_INTERVAL_S,
        metavar="SECONDS",
        help="the daemon's publish.status_interval_s until measured; no status for 3 intervals: retained "
        "daemon-offline status",
    )
    p.add_argument(
        "--state-interval",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="how often the bridge publishes its state and counters (also on every connect)",
    )
    p.add_argument("--keepalive", type=int, default=30, metavar="SECONDS", help="MQTT keep-alive")
    p.add_argument(
        "--reconnect-max",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="longest wait between reconnect attempts (1 s, doubled after each failure, up to this)",
    )
    p.add_argument("--server-key", help="daemon's CURVE public key (z85 or file) when CURVE is on")
    p.add_argument("--client-key-file", help="this bridge's CURVE key pair file")
