"""Owning a listening endpoint: bind it only when no one else holds it, and give it back cleanly.

ZeroMQ's own ipc:// bind deletes whatever file is at the path, so a second engine silently takes
the first one's new clients, and its close deletes the path even when another engine has bound
it since. Here the Unix socket is bound by us and handed to ZeroMQ (ZMQ_USE_FD): a socket file
that a live process accepts on is refused ("address in use"), a file that is not a socket is
never deleted, only a stale socket (connections refused: its owner died) is replaced. The socket
gets an explicit mode whatever the umask, and on release it is unlinked only if it is still the
file we created. tcp:// goes through ZeroMQ's bind, with a busy port reported as such. Both
fail in milliseconds, so a server binds before its minutes of model load and graph capture.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket as sockets
import stat
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import zmq

SOCKET_NAME = "vitserve.sock"
SHARED_TMP = Path("/tmp")  # where the per-user directory goes without a usable $XDG_RUNTIME_DIR
MAX_SOCKET_PATH_BYTES = 107  # sockaddr_un.sun_path holds 108 bytes, the last one a NUL
SLAB_CHANNEL_SUFFIX = ".slabs"  # beside an ipc:// endpoint, the socket that passes slab descriptors
LINK_SUFFIX = ".link"  # and the direct link's (ipc/direct.py)
MAX_ENDPOINT_PATH_BYTES = MAX_SOCKET_PATH_BYTES - max(len(SLAB_CHANNEL_SUFFIX), len(LINK_SUFFIX))
PROBE_TIMEOUT_S = 1.0  # a live server accepts at once; silence this long is taken as busy, never as stale
LOCK_TIMEOUT_S = 5.0  # another engine holds its directory's lock for milliseconds; longer is someone else's doing
DEFAULT_SOCKET_MODE = 0o600


class EndpointError(ValueError):
    """An endpoint that cannot be served: the message names it and what to change."""


@dataclass
class BoundEndpoint:
    """An endpoint a ZeroMQ socket now listens on. `address`: what clients connect to (for tcp://,
    the address ZeroMQ bound, with the port it picked for `*`). `path` and `identity` (st_dev,
    st_ino): the ipc:// socket file created, None for tcp://."""

    address: str
    path: str | None = None
    identity: tuple[int, int] | None = None

    def release(self) -> None:
        """Remove the socket file, if it is still ours (never one another engine bound since)."""
        if self.path is None or self.identity is None:
            return
        if _identity(self.path) == self.identity:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
        self.identity = None


def bind_endpoint(socket: zmq.Socket, endpoint: str, mode: int = DEFAULT_SOCKET_MODE) -> BoundEndpoint:
    """Bind `socket` to `endpoint` (ipc://PATH or tcp://HOST:PORT); EndpointError when it is taken or
    cannot be used. An ipc:// socket file gets `mode`."""
    scheme, where = split_endpoint(endpoint)
    if scheme == "tcp":
        return _bind_tcp(socket, endpoint)
    listener, bound = bind_unix_socket(where, mode, sockets.SOCK_STREAM, socket.getsockopt(zmq.BACKLOG))
    bound.address = endpoint
    try:
        socket.setsockopt(zmq.USE_FD, listener.fileno())
        try:
            socket.bind(endpoint)
        finally:
            socket.setsockopt(zmq.USE_FD, -1)  # a later bind of this socket makes its own descriptor
    except zmq.ZMQError as err:
        listener.close()
        bound.release()
        raise EndpointError(f"{endpoint} could not be bound: {err}") from err
    listener.detach()  # ZeroMQ owns the descriptor now, and closes it with the socket
    return bound


def bind_unix_socket(path: str, mode: int, kind: int, backlog: int) -> tuple[sockets.socket, BoundEndpoint]:
    """A Unix socket of `kind` listening at `path` with `mode`, refused when a live one is there."""
    check_socket_mode(mode)
    with _directory_lock(path):  # two engines starting at once: one replaces a stale socket, the other sees it live
        _clear_stale_socket(path, kind)
        listener, identity = _bind_unix(path, mode, backlog, kind)
    return listener, BoundEndpoint(path, path, identity)


def split_endpoint(endpoint: str) -> tuple[str, str]:
    """("ipc", path) or ("tcp", "host:port"), or EndpointError saying what to write instead."""
    scheme, separator, where = endpoint.partition("://")
    if not separator or scheme not in ("ipc", "tcp"):
        raise EndpointError(f"endpoint {endpoint!r} is neither ipc://PATH (this host, outputs in shared memory) nor "
                            f"tcp://HOST:PORT (other hosts): write it as one of those")
    if scheme == "tcp":
        host, separator, port = where.rpartition(":")
        if not separator or not host or not (port == "*" or (port.isdigit() and int(port) <= 65535)):
            raise EndpointError(f"endpoint {endpoint!r}: tcp:// needs HOST:PORT with a port of 0-65535 (or *), "
                                f"e.g. tcp://0.0.0.0:5555")
        return scheme, where
    if not where or where == "*" or where.startswith("@") or "\0" in where:
        raise EndpointError(f"endpoint {endpoint!r}: ipc:// needs the path of a socket file, e.g. "
                            f"ipc:///run/user/{os.getuid()}/{SOCKET_NAME} (abstract or wildcard sockets have no "
                            f"file permissions, so any local user could connect)")
    length = len(os.fsencode(where))
    if length > MAX_ENDPOINT_PATH_BYTES:
        raise EndpointError(f"endpoint {endpoint!r}: the path is {length} bytes, more than the "
                            f"{MAX_ENDPOINT_PATH_BYTES} an endpoint may have (a Unix socket path holds "
                            f"{MAX_SOCKET_PATH_BYTES}, and the slab channel adds {SLAB_CHANNEL_SUFFIX!r}): "
                            f"choose a shorter one")
    return scheme, where


def check_socket_mode(mode: int) -> None:
    if isinstance(mode, bool) or not isinstance(mode, int) or not 0 <= mode <= 0o777 or mode & 0o600 != 0o600:
        shown = oct(mode) if isinstance(mode, int) else repr(mode)
        raise EndpointError(f"socket mode {shown} must be permission bits (at most 0777) that let the owner read and "
                            f"write (0600), or no client of yours could connect: e.g. 0600, or 0660 for the group")


def parse_socket_mode(text: str) -> int:
    """The octal mode of `--socket-mode` ("0600", "660", "0o660"), checked."""
    try:
        mode = int(text.removeprefix("0o"), 8)
    except ValueError:
        raise EndpointError(f"--socket-mode {text!r} is not an octal mode: write e.g. 0600, or 0660 for the group") \
            from None
    check_socket_mode(mode)
    return mode


def default_endpoint() -> str:
    """ipc:// in $XDG_RUNTIME_DIR when that is a directory only the user can write, else in
    /tmp/vitserve-<uid>/ (created with mode 0700; refused when someone else could write it)."""
    runtime = os.environ.get("XDG_RUNTIME_DIR", "")
    if runtime and os.path.isabs(runtime) and _writable_only_by(Path(runtime), os.getuid()):
        return f"ipc://{Path(runtime) / SOCKET_NAME}"
    return f"ipc://{private_directory(SHARED_TMP / f'vitserve-{os.getuid()}') / SOCKET_NAME}"


def private_directory(path: Path, uid: int | None = None) -> Path:
    """`path` as a directory that only `uid` (default: this user) can write, created with mode 0700;
    EndpointError when one is there that someone else could use to replace the socket."""
    uid = os.getuid() if uid is None else uid
    try:
        os.mkdir(path, 0o700)
        os.chmod(path, 0o700)  # mkdir's mode is cut by the umask: the owner must keep rwx
    except FileExistsError:
        pass
    except OSError as err:
        raise EndpointError(f"the endpoint directory {path} could not be created ({err.strerror}): pass --endpoint "
                            f"ipc://PATH in a directory only you can write") from err
    info = os.lstat(path)
    advice = "remove it, or pass --endpoint ipc://PATH in a directory only you can write"
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        kind = "a symbolic link" if stat.S_ISLNK(info.st_mode) else "not a directory"
        raise EndpointError(f"the endpoint directory {path} is {kind}: {advice}")
    if info.st_uid != uid:
        raise EndpointError(f"the endpoint directory {path} belongs to uid {info.st_uid}, not to you (uid {uid}): "
                            f"its owner could replace your socket; {advice}")
    if info.st_mode & 0o022:
        raise EndpointError(f"the endpoint directory {path} has mode {stat.S_IMODE(info.st_mode):04o}: others could "
                            f"replace your socket; chmod 700 {path}, or {advice}")
    return path


def _writable_only_by(path: Path, uid: int) -> bool:
    try:
        info = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(info.st_mode) and info.st_uid == uid and not info.st_mode & 0o022


def _bind_tcp(socket: zmq.Socket, endpoint: str) -> BoundEndpoint:
    try:
        socket.bind(endpoint)
    except zmq.ZMQError as err:
        if err.errno == zmq.EADDRINUSE:
            raise EndpointError(f"address in use: another engine (or program) listens on {endpoint}; stop it, or "
                                f"choose another port") from err
        raise EndpointError(f"{endpoint} could not be bound ({err}): give a local address or 0.0.0.0, and a free "
                            f"port") from err
    return BoundEndpoint(socket.getsockopt_string(zmq.LAST_ENDPOINT))


def _clear_stale_socket(path: str, kind: int) -> None:
    """Nothing at `path` afterwards, or EndpointError: only a socket no one accepts on is removed."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise EndpointError(f"{path} exists and is not a socket: it is left as it is; remove it yourself, or choose "
                            f"another endpoint path")
    probe = sockets.socket(sockets.AF_UNIX, kind)
    probe.settimeout(PROBE_TIMEOUT_S)
    try:
        probe.connect(path)
    except ConnectionRefusedError:  # no one listens: what a killed engine leaves
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        return
    except FileNotFoundError:
        return
    except OSError as err:  # busy past the timeout, another kind of socket, or not ours to check
        raise EndpointError(f"address in use: {path} is a socket that could not be checked ({err.strerror or err}); "
                            f"stop what serves it, or choose another endpoint path") from err
    finally:
        probe.close()
    raise EndpointError(f"address in use: another engine (or program) serves {path}; stop it, or choose another "
                        f"endpoint path")


def _bind_unix(path: str, mode: int, backlog: int, kind: int) -> tuple[sockets.socket, tuple[int, int]]:
    """A listening Unix socket of `kind` at `path` with `mode`, and the (st_dev, st_ino) of its file."""
    listener = sockets.socket(sockets.AF_UNIX, kind)
    umask = os.umask(0o177)  # the file is never more open than 0600, not even between bind and chmod
    try:
        listener.bind(path)  # unlike ZeroMQ's bind, fails on any file already there
    except OSError as err:
        listener.close()
        if err.errno == errno.EADDRINUSE:
            raise EndpointError(f"address in use: {path} was created by someone else just now; choose another "
                                f"endpoint path") from err
        raise EndpointError(f"{path} could not be bound ({err.strerror}): choose an endpoint path in an existing "
                            f"directory you can write") from err
    finally:
        os.umask(umask)
    identity = _identity(path)
    try:
        os.chmod(path, mode)
        listener.listen(backlog)
    except OSError as err:
        listener.close()
        BoundEndpoint(path, path, identity).release()
        raise EndpointError(f"{path} could not be set up ({err.strerror})") from err
    return listener, identity


def _identity(path: str) -> tuple[int, int] | None:
    try:
        info = os.lstat(path)
    except OSError:
        return None
    return info.st_dev, info.st_ino


@contextmanager
def _directory_lock(path: str):
    """An exclusive lock on the socket's directory (held for milliseconds), where it can be opened."""
    try:
        directory = os.open(os.path.dirname(path) or ".", os.O_RDONLY | os.O_DIRECTORY)
    except OSError:  # the bind will say why the directory cannot be used
        yield
        return
    try:
        deadline = time.monotonic() + LOCK_TIMEOUT_S
        while True:  # not a blocking lock: anyone who can open a shared directory can lock it for good
            try:
                fcntl.flock(directory, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise EndpointError(f"the directory of {path} stayed locked by another process for "
                                        f"{LOCK_TIMEOUT_S:g} s (an engine starting there?): try again, or choose an "
                                        f"endpoint path in a directory only you can write") from None
                time.sleep(0.01)
        yield
    finally:
        os.close(directory)  # closing releases the lock
