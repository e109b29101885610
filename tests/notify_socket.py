"""A real systemd notify socket for tests: the receiving end systemd holds for a Type=notify service."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path


class NotifySocket:
    """A real sd_notify datagram socket, as systemd gives a Type=notify service: read continuously by a thread
    (as systemd does), or never read (`reading=False`: a receiver that has stalled, its queue soon full)."""

    def __init__(self, path: Path, reading: bool = True):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.05)
        self.messages: list[str] = []
        if reading:
            threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        while True:
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except socket.timeout:
                continue
            except OSError:
                return

    def drain(self) -> list[str]:
        """What was received so far (the reader thread keeps appending)."""
        time.sleep(0.06)
        return self.messages


def fill_queue(path: str) -> int:
    """Queue datagrams until the kernel refuses more (max_dgram_qlen differs between machines)."""
    sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sender.setblocking(False)
    n = 0
    try:
        while True:
            sender.sendto(b"FILL", path)
            n += 1
    except BlockingIOError:
        return n
