"""systemd's sd_notify protocol (READY, WATCHDOG, STATUS, STOPPING, EXTEND_TIMEOUT_USEC...) over $NOTIFY_SOCKET,
never blocking.

A datagram socket blocks the sender when the receiver's queue is full (net.unix.max_dgram_qlen, often 10).
Blocking there would freeze the daemon's main loop, the one that publishes status and handles SIGTERM, so a
send that cannot complete within a few milliseconds is dropped and counted instead. Without $NOTIFY_SOCKET
(not started by systemd) every call is a no-op.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time

log = logging.getLogger("linewatch.line.systemd_notify")

SEND_TIMEOUT_S = 0.02


class SystemdNotifier:
    def __init__(self, address: str | None = None, timeout_s: float = SEND_TIMEOUT_S):
        address = os.environ.get("NOTIFY_SOCKET") if address is None else address
        self.dropped = 0
        self._sock: socket.socket | None = None
        if not address:
            return
        if address.startswith("@"):  # abstract namespace
            address = "\0" + address[1:]
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        sock.settimeout(timeout_s)
        try:
            sock.connect(address)
        except OSError as exc:
            log.warning("systemd notify socket %s unusable, notifications off: %s", address.lstrip("\0"), exc)
            sock.close()
            return
        self._sock = sock

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def notify(self, state: str) -> bool:
        """Send one message; False when it was dropped (no socket, receiver not reading, socket gone)."""
        if self._sock is None:
            return False
        try:
            self._sock.send(state.encode())
            return True
        except OSError as exc:  # socket.timeout is an OSError
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 100 == 0:
                log.warning(
                    "systemd notification dropped (%d so far): %s",
                    self.dropped,
                    "receiver not reading" if isinstance(exc, TimeoutError) else exc,
                )
            return False

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


class StartupExtender:
    """EXTEND_TIMEOUT_USEC while a long step runs before READY=1 (a first TensorRT engine build or a cuDNN search
    can outlast TimeoutStartSec).

    systemd extends the start-up timeout to `2 × step_s` from each message, so a helper thread repeats it every
    `step_s`, as long as the step runs but at most `limit_s` in all: a load that hangs still ends in systemd's
    timeout instead of an endless start. Use as a context manager around the step.
    """

    def __init__(self, notifier: SystemdNotifier, step_s: float = 30.0, limit_s: float = 1800.0):
        self._notifier = notifier
        self._step_s = float(step_s)
        self._limit_s = float(limit_s)
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="systemd-extend", daemon=True)
        self.sent = 0

    def __enter__(self) -> "StartupExtender":
        if self._notifier.enabled:
            self._extend()  # at once: the step may already be the slow one
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        if self._thread.is_alive():
            self._thread.join()

    def _extend(self) -> None:
        if self._notifier.notify(f"EXTEND_TIMEOUT_USEC={int(2 * self._step_s * 1_000_000)}"):
            self.sent += 1

    def _run(self) -> None:
        end = time.monotonic() + self._limit_s
        while not self._done.wait(self._step_s) and time.monotonic() < end:
            self._extend()
