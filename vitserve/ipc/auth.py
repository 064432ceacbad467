"""Authentication of clients with ZeroMQ's CURVE: who may use a tcp:// endpoint.

Keys are ZeroMQ certificate files, as `vitserve keys` (zmq.auth.create_certificates) writes them:
NAME.key holds a public key, NAME.key_secret the pair. The server has its secret certificate and
a directory of the client certificates it accepts; a client has its own secret certificate and
the server's public one. libzmq then encrypts every message and authenticates every connection
before the frontend sees a byte of it, health and stats included: a ZAP handler (pyzmq's
ThreadAuthenticator, on a thread of its own) accepts only keys found in the directory, so a wrong
key or none never gets a connection.

A client certificate may carry its own priority range in its metadata (`priorities = "LOW,HIGH"`,
as `vitserve keys --priorities` writes it); that range replaces the server's `--priorities` for
connections authenticated with that key (libzmq gives each message its key as the User-Id).

Without CURVE a tcp:// endpoint serves anyone who reaches it, so one that is not on a loopback
address is refused unless the operator says so explicitly (`--allow-insecure-tcp`).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

LOOPBACK_NAMES = ("localhost",)
PRIORITIES_KEY = "priorities"  # in a client certificate's metadata: "LOW,HIGH"
_METADATA_ENTRY = re.compile(r'\s+([A-Za-z0-9_.-]+)\s*=\s*"?([^"\n]*)"?\s*')


class AuthError(ValueError):
    """Keys that cannot be used, or an unauthenticated endpoint that may not be served: the
    message names the setting and what to change."""


@dataclass(frozen=True)
class ServerKeys:
    secret_file: Path  # the server's certificate with its secret key (NAME.key_secret)
    clients_dir: Path  # the public certificates (NAME.key) of the clients allowed in
    # A client's User-Id (its public key, z85) -> the priority range of its certificate, if it has one.
    priorities: dict[str, tuple[int, int]] = field(init=False, compare=False)

    def __post_init__(self) -> None:
        load_secret(self.secret_file, "--curve-secret-key")
        directory = Path(self.clients_dir)
        if not directory.is_dir():
            raise AuthError(f"--curve-clients {directory} is not a directory: give the folder holding the "
                            f"public certificates (NAME.key) of the clients to let in")
        if not any(directory.glob("*.key")):
            raise AuthError(f"--curve-clients {directory} holds no client certificate (*.key): no client could "
                            f"connect; create keys with `vitserve keys`")
        ranges = {}
        for certificate in sorted(directory.glob("*.key")):
            priorities = certificate_priorities(certificate)
            if priorities is not None:
                ranges[load_public(certificate, "--curve-clients").decode()] = priorities
        object.__setattr__(self, "priorities", ranges)


def certificate_priorities(path: Path) -> tuple[int, int] | None:
    """The priority range in a certificate's metadata, None when it has none; AuthError when unreadable."""
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise AuthError(f"--curve-clients {path}: cannot read the certificate ({err})") from None
    section = None
    for line in lines:
        if line and not line[0].isspace() and not line.startswith("#"):
            section = line.strip()
            continue
        entry = _METADATA_ENTRY.fullmatch(line)
        if section == "metadata" and entry and entry.group(1) == PRIORITIES_KEY:
            return parse_priorities(entry.group(2), f"the {PRIORITIES_KEY} of {path}")
    return None


def write_priorities(public_file: Path, low: int, high: int) -> None:
    """Put a priority range into the metadata of a public certificate (the file the server's
    --curve-clients holds: the operator's copy, not the client's)."""
    text = Path(public_file).read_text()
    if "\nmetadata\n" not in text:
        raise AuthError(f"{public_file} has no metadata section: create it with `vitserve keys`")
    Path(public_file).write_text(text.replace("\nmetadata\n", f'\nmetadata\n    {PRIORITIES_KEY} = "{low},{high}"\n', 1))


def parse_priorities(text: str, setting: str) -> tuple[int, int]:
    """(lowest, highest) from "LOW,HIGH"; AuthError naming `setting` otherwise."""
    low, _, high = text.partition(",")
    try:
        bounds = (int(low), int(high))
    except ValueError:
        bounds = None
    if bounds is None or bounds[0] > bounds[1]:
        raise AuthError(f"{setting} is {text!r}: write LOW,HIGH, two integers with LOW <= HIGH, e.g. 0,50")
    return bounds


def load_secret(path: Path, setting: str) -> tuple[bytes, bytes]:
    """(public, secret) of a secret certificate; AuthError naming `setting` when it has no secret key."""
    try:
        public, secret = zmq.auth.load_certificate(Path(path))
    except (OSError, ValueError) as err:
        raise AuthError(f"{setting} {path}: cannot read a ZeroMQ certificate ({err}); create one with "
                        f"`vitserve keys`") from None
    if not secret:
        raise AuthError(f"{setting} {path} holds only a public key: give the NAME.key_secret file")
    return public, secret


def load_public(path: Path, setting: str) -> bytes:
    try:
        public, _ = zmq.auth.load_certificate(Path(path))
    except (OSError, ValueError) as err:
        raise AuthError(f"{setting} {path}: cannot read a ZeroMQ certificate ({err})") from None
    return public


def serve_with_curve(context: zmq.Context, socket: zmq.Socket, keys: ServerKeys) -> ThreadAuthenticator:
    """Make `socket` (before its bind) a CURVE server that admits the clients of `keys` only; the
    returned authenticator must be stopped when the socket closes."""
    public, secret = load_secret(keys.secret_file, "--curve-secret-key")
    authenticator = ThreadAuthenticator(context)
    authenticator.start()
    authenticator.configure_curve(domain="*", location=str(keys.clients_dir))
    socket.setsockopt(zmq.CURVE_SERVER, 1)
    socket.setsockopt(zmq.CURVE_PUBLICKEY, public)
    socket.setsockopt(zmq.CURVE_SECRETKEY, secret)
    return authenticator


def connect_with_curve(socket: zmq.Socket, secret_file: Path, server_file: Path) -> None:
    """Make `socket` (before its connect) a CURVE client with its own keys and the server's public key."""
    public, secret = load_secret(secret_file, "curve_secret_key")
    socket.setsockopt(zmq.CURVE_SERVERKEY, load_public(server_file, "curve_server_key"))
    socket.setsockopt(zmq.CURVE_PUBLICKEY, public)
    socket.setsockopt(zmq.CURVE_SECRETKEY, secret)


def check_exposure(endpoint: str, authenticated: bool, allow_insecure: bool) -> None:
    """Refuse a tcp:// endpoint reachable from other hosts without authentication, unless allowed."""
    if authenticated or allow_insecure or not endpoint.startswith("tcp://"):
        return
    host = endpoint.removeprefix("tcp://").rsplit(":", 1)[0].strip("[]")
    if host in LOOPBACK_NAMES or _is_loopback(host):
        return
    raise AuthError(f"{endpoint} would serve any host that reaches it without authentication: give "
                    f"--curve-secret-key and --curve-clients, bind to 127.0.0.1, or pass --allow-insecure-tcp "
                    f"on a network you trust")


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name or an interface ("*", "eth0"): it may be reachable from elsewhere
