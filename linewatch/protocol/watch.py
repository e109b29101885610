"""`linewatch watch`: live results of a running daemon on stdout (one line or one JSON header each), masks to
--save. Gaps, camera state changes and silent cameras go to stderr, so stdout stays one record per result."""

from __future__ import annotations

import argparse
import re
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from linewatch.errors import ConfigError
from linewatch.protocol.client import Subscriber
from linewatch.protocol.curve import client_keys_from_args
from linewatch.protocol.wire import RESULT, Message, encode_json

SILENT_AFTER_S = 5.0  # no status for this long: say so (the daemon publishes one per camera per second)
QUIET_AFTER_S = 5.0  # nothing at all since start: a wrong port, camera name or key looks exactly like this


def format_result(header: dict[str, Any]) -> str:
    """`time camera seq part verdict score regions`, plus the error text for ERROR."""
    stamp = datetime.fromtimestamp(header["frame_time"]).isoformat(timespec="milliseconds")
    score = header.get("image_score")
    line = (
        f"{stamp} {header['camera']} seq={header['seq']} part={header.get('part_id') or '-'} "
        f"{header['verdict']} score={'-' if score is None else f'{score:.6g}'} "
        f"regions={header.get('regions_total', len(header.get('regions', [])))}"
    )
    if header.get("defect_regions") is not None:  # the regions that failed the part; the rest are specks
        line += f" defects={header['defect_regions']}"
    for region in header.get("regions", [])[:3]:
        x, y, w, h = region["bbox"]
        line += f" [{x},{y} {w}x{h} area={region['area']}]"
    if header.get("error"):
        line += f" error={header['error']!r}"
    return line


def mask_filename(header: dict[str, Any]) -> str:
    part = header.get("part_id")
    safe = "" if not part else "_" + re.sub(r"[^A-Za-z0-9_.-]", "_", part)[:80]
    return f"{header['camera']}_{header['seq']:08d}{safe}_{header['verdict']}.png"


def nothing_arrived(args: argparse.Namespace, waited_s: float, curve: bool) -> str:
    """What to check when a subscriber hears nothing: ZeroMQ connects to a port nobody serves, or subscribes to a
    camera nobody has, without any error, so silence is all a user would otherwise see."""
    camera = getattr(args, "camera", None)
    checks = [
        "is the daemon running (systemctl status linewatch, or its log)?",
        f"is {args.connect} the daemon's publish.endpoint (host and port)?"
        + (
            " 127.0.0.1 reaches this machine only" if "127.0.0.1" in args.connect or "localhost" in args.connect else ""
        ),
    ]
    if camera:
        checks.append(
            f"is a camera named exactly {camera!r} in the daemon's config (cameras: - name:, case-sensitive)?"
        )
    if curve:
        checks.append(
            "CURVE: is --server-key the daemon's public key, and this client's public key in its authorized_keys_dir?"
        )
    else:
        checks.append("if the daemon has security.curve on, pass --server-key and --client-key-file")
    return (
        f"nothing received from {args.connect}" + (f" for camera {camera}" if camera else "") + f" in {waited_s:g} s "
        "(a running daemon sends each camera's status every second by default); still waiting. Check:\n  - "
        + "\n  - ".join(checks)
    )


def cli_watch(args: argparse.Namespace) -> int:
    server_key, client_keys = client_keys_from_args(args)
    quiet_after = getattr(args, "quiet_after", QUIET_AFTER_S)
    if quiet_after is not None and not quiet_after > 0:
        raise ConfigError(f"--quiet-after must be a positive number of seconds, got {quiet_after}")
    save = Path(args.save) if args.save else None
    if save is not None:
        save.mkdir(parents=True, exist_ok=True)
    shown = 0
    states: dict[str, object] = {}  # the status's `state`, whatever JSON it holds
    warned_silent: set[str] = set()
    print(f"watching {args.connect}" + (f" camera {args.camera}" if args.camera else ""), file=sys.stderr, flush=True)
    with Subscriber(args.connect, args.camera, server_key=server_key, client_keys=client_keys) as sub:
        missed_seen = 0
        started, hinted = time.monotonic(), quiet_after is None
        while args.count is None or shown < args.count:
            msg = sub.recv(timeout_s=1.0 if hinted else min(1.0, max(0.05, started + quiet_after - time.monotonic())))
            if not hinted and not sub.tracks and not sub.invalid and time.monotonic() - started >= quiet_after:
                print(nothing_arrived(args, quiet_after, server_key is not None), file=sys.stderr, flush=True)
                hinted = True
            hinted = hinted or bool(sub.tracks) or bool(sub.invalid)
            if msg is not None and msg.kind == RESULT:
                _show(msg, args.json, save)
                shown += 1
            elif msg is not None:
                state = msg.header.get("state")
                if states.get(msg.camera) != state:
                    print(f"camera {msg.camera}: {state}", file=sys.stderr, flush=True)
                    states[msg.camera] = state
                warned_silent.discard(msg.camera)
            missed = sum(sub.missed.values())
            if missed > missed_seen:
                print(f"missed {missed - missed_seen} result(s) (total {missed})", file=sys.stderr, flush=True)
                missed_seen = missed
            for camera in sub.tracks:
                if camera not in warned_silent and not sub.alive(camera, SILENT_AFTER_S):
                    print(f"camera {camera}: nothing heard for {SILENT_AFTER_S:g} s", file=sys.stderr, flush=True)
                    warned_silent.add(camera)
    return 0


def _show(msg: Message, as_json: bool, save: Path | None) -> None:
    header = msg.header
    if save is not None and msg.mask is not None:
        path = save / mask_filename(header)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(msg.mask)
        tmp.replace(path)
    print(encode_json(header).decode() if as_json else format_result(header), flush=True)
