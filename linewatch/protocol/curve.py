"""ZeroMQ CURVE for the result and trigger sockets, and the rule that keeps a keyless daemon on loopback.

Key files are pyzmq's certificate format (`zmq.auth.create_certificates`): `NAME.key` holds the public key,
`NAME.key_secret` the pair. The server loads its pair; clients' public `.key` files in one folder are the allow
list, enforced by a ZAP authenticator thread per server context, so a client with another key (or none) gets
nothing at all: the handshake is refused before any message is sent.

Fail closed: server sockets set a ZAP domain and `zap_enforce_domain`, so if the authenticator is gone libzmq
refuses every handshake instead of falling back to "any key may connect" (its default without a ZAP handler).
The authenticator's thread is part of the daemon's health (`zap_health`). A secret key file that its group or
others can read is refused, and `linewatch keygen` creates its files under a 0077 umask.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import zmq

from linewatch.errors import ConfigError

if TYPE_CHECKING:
    from zmq.auth.thread import ThreadAuthenticator

LOCAL_TRANSPORTS = ("ipc", "inproc")
LOOPBACK_NAMES = ("localhost", "lo")
ZAP_DOMAIN = "linewatch"  # set on every server socket; the authenticator's allow list is for this domain
ZAP_DEAD = "CURVE authenticator (ZAP) thread has died"


@dataclass(frozen=True)
class CurveConfig:
    """The server side of CURVE: its key pair and the folder of allowed client public keys."""

    server_public: bytes
    server_secret: bytes
    authorized_keys_dir: Path

    @classmethod
    def from_files(
        cls, server_secret_key_file: str | os.PathLike[str], authorized_keys_dir: str | os.PathLike[str]
    ) -> "CurveConfig":
        public, secret = load_key_pair(server_secret_key_file)
        keys_dir = Path(authorized_keys_dir)
        if not keys_dir.is_dir():
            raise ConfigError(f"authorized keys folder {keys_dir}: not found")
        if not authorized_public_keys(keys_dir):
            raise ConfigError(
                f"authorized keys folder {keys_dir}: no client public keys (*.key): no client could connect"
            )
        return cls(public, secret, keys_dir)


def load_key_pair(path: str | os.PathLike[str]) -> tuple[bytes, bytes]:
    """(public, secret) z85 keys from a `.key_secret` file; ConfigError naming the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"CURVE key pair file {path}: not found")
    public, secret = _certificate(path, "CURVE key pair file")
    if not secret:
        raise ConfigError(f"CURVE key pair file {path}: holds only a public key; expected the .key_secret file")
    _check_private(path)
    return public, secret


def load_public_key(value: str | os.PathLike[str]) -> bytes:
    """A public key given as 40 z85 characters or as a `.key`/`.key_secret` certificate file."""
    from zmq.utils import z85

    text = str(value)
    if len(text) == 40 and not Path(text).exists():
        try:
            z85.decode(text.encode("ascii"))
        except (ValueError, KeyError, UnicodeEncodeError):
            raise ConfigError(f"public key {text!r}: not a z85 key") from None
        return text.encode("ascii")
    path = Path(text)
    if not path.is_file():
        raise ConfigError(f"public key {text!r}: neither 40 z85 characters nor a key file")
    return _certificate(path, "public key file")[0]


def _check_private(path: Path) -> None:
    """A secret key that its group or others can read is no secret: refuse it, and say how to fix it."""
    if os.name != "posix":  # no POSIX mode bits to judge
        return
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise ConfigError(
            f"CURVE key pair file {path}: readable by group or others (mode {mode:04o}); "
            f"make it private to its owner: chmod 600 {path}"
        )


def _certificate(path: Path, what: str) -> tuple[bytes, bytes | None]:
    import zmq.auth

    try:
        return zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{what} {path}: not a zmq certificate ({exc})") from None


def authorized_public_keys(keys_dir: Path) -> list[Path]:
    return sorted(p for p in Path(keys_dir).glob("*.key") if p.is_file())


def start_authenticator(context: zmq.Context[Any], curve: CurveConfig) -> ThreadAuthenticator:
    """ZAP handler for `context` that admits only the allowed client keys. Stop it with `.stop()`."""
    from zmq.auth.thread import ThreadAuthenticator

    auth = ThreadAuthenticator(context)
    auth.start()
    auth.configure_curve(domain=ZAP_DOMAIN, location=str(curve.authorized_keys_dir))
    return auth


def zap_health(auth: ThreadAuthenticator | None) -> str | None:
    """None while the authenticator thread runs (or CURVE is off); otherwise the reason for health()."""
    return None if auth is None or auth.is_alive() else ZAP_DEAD


def apply_server_curve(socket: zmq.Socket[Any], curve: CurveConfig) -> None:
    """Make `socket` a CURVE server (call before bind; start_authenticator on its context restricts clients).

    With `zap_enforce_domain` a missing ZAP handler refuses every client; without it libzmq would admit any key.
    """
    socket.curve_secretkey = curve.server_secret
    socket.curve_publickey = curve.server_public
    socket.curve_server = True
    socket.setsockopt_string(zmq.ZAP_DOMAIN, ZAP_DOMAIN)
    socket.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)


def apply_client_curve(socket: zmq.Socket[Any], server_public: bytes, client_keys: tuple[bytes, bytes]) -> None:
    """Make `socket` a CURVE client of the server with `server_public`, as (public, secret) `client_keys`."""
    public, secret = client_keys
    socket.curve_serverkey = server_public
    socket.curve_publickey = public
    socket.curve_secretkey = secret


def is_loopback_endpoint(endpoint: str) -> bool:
    """True for ipc://, inproc:// and tcp:// (or ws://) on 127.0.0.0/8, ::1, localhost or the lo interface."""
    transport, sep, address = endpoint.partition("://")
    if not sep:
        return False
    if transport in LOCAL_TRANSPORTS:
        return True
    host = address.rsplit(":", 1)[0] if ":" in address else address
    return is_loopback_host(host.split("/", 1)[0])


def is_loopback_host(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 (bracketed or not), localhost and lo; false for "" (every interface)."""
    host = host.strip("[]")
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind_security(
    endpoint: str, curve_enabled: bool, allow_insecure: bool = False, key: str = "endpoint"
) -> None:
    """Refuse to bind a non-loopback endpoint in the clear: results and triggers would be open to the network.

    Config validation calls it with the config key for the message; the publisher and trigger server call it
    again before binding, so the rule also holds for code that skips the config.
    """
    if curve_enabled or allow_insecure or is_loopback_endpoint(endpoint):
        return
    raise ConfigError(
        f"{key} {endpoint!r}: binding beyond loopback needs CURVE (security.curve with keys) or "
        "an explicit security.allow_insecure_bind: true"
    )


def cli_keygen(args: argparse.Namespace) -> int:
    """`linewatch keygen DIR [--name NAME]`: a CURVE key pair, secret file readable by its owner only.

    The files are created under a 0077 umask, so the secret is never readable by others, not even for the moment
    between writing and a chmod; the public file is then given the usual mode (it is meant to be copied around).
    """
    import zmq.auth

    out = Path(args.dir)
    out.mkdir(parents=True, exist_ok=True)
    public_file, secret_file = out / f"{args.name}.key", out / f"{args.name}.key_secret"
    existing = [str(p) for p in (public_file, secret_file) if p.exists()]
    if existing and not args.force:
        raise ConfigError(f"{', '.join(existing)} already exist(s); use --force to replace")
    for path in (public_file, secret_file):  # --force: a new file gets the umask's mode, not the old file's
        path.unlink(missing_ok=True)
    umask = os.umask(0o077)
    try:
        public_path, secret_path = zmq.auth.create_certificates(out, args.name)
    finally:
        os.umask(umask)
    os.chmod(secret_path, 0o600)
    os.chmod(public_path, 0o666 & ~umask)
    public, _ = zmq.auth.load_certificate(public_path)
    print(f"public key  {public.decode()}")
    print(f"public file {public_path}   (give to the other side / put in authorized_keys_dir)")
    print(f"secret file {secret_path}   (keep private)")
    return 0


def client_keys_from_args(args: argparse.Namespace) -> tuple[bytes | None, tuple[bytes, bytes] | None]:
    """A subscriber command's `--server-key` / `--client-key-file` (watch, dashboard, the bridges): the daemon's
    public key and this client's key pair, both or neither; (None, None) without CURVE."""
    server_key = getattr(args, "server_key", None)
    key_file = getattr(args, "client_key_file", None)
    if bool(server_key) != bool(key_file):
        raise ConfigError("CURVE needs both --server-key and --client-key-file")
    if not server_key or not key_file:  # both or neither, checked above
        return None, None
    return load_public_key(server_key), load_key_pair(key_file)
