"""Security of the OPC UA bridge: the loopback-only rule for security None, the users file (PBKDF2 hashes, never
plain text) and a self-signed application certificate for Basic256Sha256 SignAndEncrypt.

A users file holds one `name:pbkdf2-sha256$ITERATIONS$SALT$HASH` a line (salt and hash base64); `#` starts a
comment. `linewatch bridge opcua --users FILE --add-user NAME` writes it (mode 600)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import secrets
import socket
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

from linewatch.errors import ConfigError
from linewatch.protocol.curve import is_loopback_host

SCHEME = "pbkdf2-sha256"
# OWASP's 2023 figure for PBKDF2-HMAC-SHA256 is 600 000; each login costs ~0.2 s of one core at 200 000, which a
# brute force pays per guess while a PLC logs in once per session. The count is stored per user, so it can rise.
ITERATIONS = 200_000
USER_NAME = re.compile(r"[A-Za-z0-9_.@-]{1,64}")
MIN_PASSWORD = 8
CERT_FILE, KEY_FILE = "server_cert.der", "server_key.pem"


# --- the endpoint --------------------------------------------------------------------------------------------


def parse_listen(url: str) -> tuple[str, int]:
    """`opc.tcp://HOST:PORT` -> (host, port); ConfigError for anything else."""
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = None
    if parts.scheme != "opc.tcp" or not parts.hostname or port is None:
        raise ConfigError(f"--listen {url!r}: expected opc.tcp://HOST:PORT, e.g. opc.tcp://127.0.0.1:4840")
    return parts.hostname, port


def check_listen_security(url: str, security: str) -> None:
    """Security None serves anyone who reaches the port, unauthenticated and in the clear: loopback only."""
    host, _ = parse_listen(url)
    if security == "none" and not is_loopback_host(host):
        raise ConfigError(
            f"--listen {url!r} is reachable beyond this machine: security none is allowed on loopback only "
            "(127.0.0.1, ::1, localhost); use --security sign-encrypt with --cert, --key and --users"
        )


# --- users ---------------------------------------------------------------------------------------------------


def hash_password(password: str, iterations: int = ITERATIONS, salt: bytes | None = None) -> str:
    salt = secrets.token_bytes(16) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    b64 = base64.b64encode
    return f"{SCHEME}${iterations}${b64(salt).decode()}${b64(digest).decode()}"


def verify_password(password: str, stored: str) -> bool:
    """Constant-time comparison; a malformed stored hash never matches."""
    try:
        scheme, iterations, salt, digest = stored.split("$")
        if scheme != SCHEME:
            return False
        expected = base64.b64decode(digest, validate=True)
        got = hashlib.pbkdf2_hmac("sha256", password.encode(), base64.b64decode(salt, validate=True), int(iterations))
    except ValueError:
        return False
    return hmac.compare_digest(got, expected)


def _parse_hash(stored: str, where: str) -> str:
    fields = stored.split("$")
    if len(fields) != 4 or fields[0] != SCHEME or not fields[1].isdigit() or int(fields[1]) < 10_000:
        raise ConfigError(f"{where}: expected NAME:{SCHEME}$ITERATIONS$SALT$HASH (plain-text passwords are refused)")
    try:
        base64.b64decode(fields[2], validate=True)
        base64.b64decode(fields[3], validate=True)
    except ValueError:
        raise ConfigError(f"{where}: salt and hash must be base64") from None
    return stored


def load_users(path: str | os.PathLike[str]) -> dict[str, str]:
    """name -> stored hash. ConfigError naming the file and line for anything else, and for a file without users."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"users file {path}: cannot read it: {exc}") from None
    users: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        where = f"users file {path}, line {number}"
        name, sep, stored = line.partition(":")
        if not sep or not USER_NAME.fullmatch(name):
            raise ConfigError(f"{where}: expected NAME:HASH with NAME of letters, digits, '_', '.', '@', '-'")
        if name in users:
            raise ConfigError(f"{where}: user {name!r} listed twice")
        users[name] = _parse_hash(stored, where)
    if not users:
        raise ConfigError(
            f"users file {path}: no users (add one: linewatch bridge opcua --users {path} --add-user NAME)"
        )
    return users


def add_user(path: str | os.PathLike[str], name: str, password: str) -> bool:
    """Add `name` or replace its password; the file is rewritten atomically, mode 600. True if the user was new."""
    if not USER_NAME.fullmatch(name):
        raise ConfigError(f"user name {name!r}: letters, digits, '_', '.', '@', '-' only (at most 64)")
    if len(password) < MIN_PASSWORD:
        raise ConfigError(f"password for {name!r}: at least {MIN_PASSWORD} characters")
    path = Path(path)
    lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
    if lines:
        load_users(path)  # refuse to rewrite a file we cannot read back
    entry = f"{name}:{hash_password(password)}"
    kept = [line for line in lines if line.strip().partition(":")[0] != name]
    new = len(kept) == len(lines)
    _write_private(path, "\n".join([*kept, entry]) + "\n")
    return new


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --- certificates --------------------------------------------------------------------------------------------


def application_uri(hostname: str | None = None) -> str:
    return f"urn:linewatch:bridge:{hostname or socket.gethostname()}"


def make_certificate(directory: str | os.PathLike[str], listen_url: str, days: int = 3650) -> tuple[Path, Path]:
    """A self-signed OPC UA application instance certificate (RSA 2048, SHA-256, the subjectAltName URI the
    server announces, DNS/IP for the host) and its key (PEM, mode 600). Refuses to overwrite either file."""
    import ipaddress

    from asyncua.crypto.cert_gen import (
        dump_private_key_as_pem,
        generate_private_key,
        generate_self_signed_app_certificate,
    )
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding
    from cryptography.x509.oid import ExtendedKeyUsageOID

    host, _ = parse_listen(listen_url)
    folder = Path(directory)
    cert_path, key_path = folder / CERT_FILE, folder / KEY_FILE
    for existing in (cert_path, key_path):
        if existing.exists():
            raise ConfigError(f"{existing} exists: remove it first (clients trust the old certificate)")
    hostname = socket.gethostname()
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(application_uri(hostname)), x509.DNSName(hostname)]
    try:
        names.append(x509.IPAddress(ipaddress.ip_address(host)))
    except ValueError:
        if host != hostname:
            names.append(x509.DNSName(host))
    key = generate_private_key()
    cert = generate_self_signed_app_certificate(
        key,
        f"linewatch OPC UA bridge@{hostname}",
        {"organizationName": "linewatch"},
        names,
        extended=[ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
        days=days,
    )
    _write_private(key_path, dump_private_key_as_pem(key).decode())
    folder.mkdir(parents=True, exist_ok=True)
    cert_path.write_bytes(cert.public_bytes(Encoding.DER))
    return cert_path, key_path


def certificate_uri(cert_file: str | os.PathLike[str]) -> str | None:
    """The application URI in a certificate's subjectAltName: the server must announce exactly this one, or
    clients refuse the certificate."""
    from cryptography import x509

    data = Path(cert_file).read_bytes()
    try:
        cert = (
            x509.load_pem_x509_certificate(data) if data.startswith(b"-----") else x509.load_der_x509_certificate(data)
        )
    except ValueError as exc:
        raise ConfigError(f"--cert {cert_file}: not a DER or PEM certificate: {exc}") from None
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    return uris[0] if uris else None
