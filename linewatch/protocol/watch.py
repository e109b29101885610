"""`linewatch watch`: live results of a running daemon on stdout (one line or one JSON header each), masks to
--save. Gaps, camera state changes and silent cameras go to stderr, so stdout stays one record per result."""

from __future__ import annotations

import argparse
import re
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

from linewatch.errors import ConfigError
from linewatch.protocol.client import Subscriber
from linewatch.protocol.wire import RESULT, Message, encode_json

SILENT_AFTER_S = 5.0  # no status for this long: say so (the daemon publishes one per camera per second)


def format_result(header: dict[str, Any]) -> str:
    """`time camera seq part verdict score regions`, plus the error text for ERROR."""
    stamp = datetime.fromtimestamp(header["frame_time"]).isoformat(timespec="milliseconds")
    score = header.get("image_score")
    line = (
        f"{stamp} {header['camera']} seq={header['seq']} part={header.get('part_id') or '-'} "
        f"{header['verdict']} score={'-' if score is None else f'{score:.6g}'} "
        f"regions={header.get('regions_total', len(header.get('regions', [])))}"
    )
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


def _client_curve(args: argparse.Namespace) -> tuple[bytes | None, tuple[bytes, bytes] | None]:
    from linewatch.protocol.curve import load_key_pair, load_public_key

    server_key = getattr(args, "server_key", None)
    key_file = getattr(args, "client_key_file", None)
    if bool(server_key) != bool(key_file):
        raise ConfigError("CURVE needs both --server-key and --client-key-file")
    if not server_key or not key_file:  # both or neither, checked above
        return None, None
    return load_public_key(server_key), load_key_pair(key_file)


def cli_watch(args: argparse.Namespace) -> int:
    server_key, client_keys = _client_curve(args)
    save = Path(args.save) if args.save else None
    if save is not None:
        save.mkdir(parents=True, exist_ok=True)
    shown = 0
    states: dict[str, object] = {}  # the status's `state`, whatever JSON it holds
    warned_silent: set[str] = set()
    print(f"watching {args.connect}" + (f" camera {args.camera}" if args.camera else ""), file=sys.stderr, flush=True)
    with Subscriber(args.connect, args.camera, server_key=server_key, client_keys=client_keys) as sub:
        missed_seen = 0
        while args.count is None or shown < args.count:
            msg = sub.recv(timeout_s=1.0)
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
