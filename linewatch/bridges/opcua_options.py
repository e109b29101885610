"""Command-line options, kept apart from the implementation so that `linewatch --help` imports no server library."""

from __future__ import annotations

import argparse

# The daemon's own defaults (trigger.timeout_s, publish.status_interval_s): the bridge cannot read its config.
DAEMON_TRIGGER_TIMEOUT_S = 5.0
DAEMON_STATUS_INTERVAL_S = 1.0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--connect", default="tcp://127.0.0.1:5555", help="the daemon's publish.endpoint")
    p.add_argument(
        "--trigger",
        metavar="ENDPOINT",
        help="the daemon's trigger.endpoint; without it the cameras have no Inspect method",
    )
    p.add_argument(
        "--listen",
        default="opc.tcp://127.0.0.1:4840",
        metavar="URL",
        help="OPC UA endpoint to serve (opc.tcp://HOST:PORT); beyond loopback only with --security sign-encrypt",
    )
    p.add_argument(
        "--security",
        choices=("none", "sign-encrypt"),
        default="none",
        help="none (loopback only) or Basic256Sha256 SignAndEncrypt with --cert/--key and --users",
    )
    p.add_argument("--cert", metavar="FILE", help="server certificate (DER or PEM), e.g. from --make-cert")
    p.add_argument("--key", metavar="FILE", help="the certificate's private key (PEM)")
    p.add_argument(
        "--users",
        metavar="FILE",
        help="user file (name:pbkdf2-sha256$...; one user a line), needed with sign-encrypt; see --add-user",
    )
    p.add_argument(
        "--trigger-timeout",
        type=float,
        default=DAEMON_TRIGGER_TIMEOUT_S,
        metavar="SECONDS",
        help="the daemon's trigger.timeout_s; Inspect waits this plus a 1 s margin for the reply",
    )
    p.add_argument(
        "--status-interval",
        type=float,
        default=DAEMON_STATUS_INTERVAL_S,
        metavar="SECONDS",
        help="the daemon's publish.status_interval_s; no status for 2.5 intervals: DaemonAlive false",
    )
    p.add_argument("--server-key", help="daemon's CURVE public key (z85 or file) when CURVE is on")
    p.add_argument("--client-key-file", help="this bridge's CURVE key pair file")
    p.add_argument(
        "--make-cert",
        metavar="DIR",
        help="write a self-signed server certificate (DIR/server_cert.der) and key (DIR/server_key.pem) for "
        "--listen's host, then exit",
    )
    p.add_argument(
        "--add-user",
        metavar="NAME",
        help="add NAME (or change its password) in --users FILE, the password read from stdin or a prompt, then exit",
    )
