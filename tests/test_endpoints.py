"""Owning the endpoint: `vitserve serve` refuses one that a live engine (or any file) holds, binds
before the slow start, sets the socket's mode whatever the umask, and removes its socket file on
exit; the default endpoint lies in a directory only the user can write."""

from __future__ import annotations

import asyncio
import os
import socket
import stat
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import zmq
from served import served

from vitserve import Client, EngineConfig
from vitserve.engine import serve as serve_module
from vitserve.ipc import endpoints
from vitserve.ipc.endpoints import EndpointError, bind_endpoint, default_endpoint, parse_socket_mode, private_directory

FLAGS = ("--min-budget", "64", "--max-budget", "256")
REFUSAL_S = 15.0  # interpreter and torch import; starting the model with the default budgets takes a minute or more


@contextmanager
def umask(mask: int):
    """A process umask inherited by the children started in the block."""
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


@pytest.fixture
def router():
    context = zmq.Context()
    sockets = []

    def make() -> zmq.Socket:
        sockets.append(context.socket(zmq.ROUTER))
        sockets[-1].setsockopt(zmq.LINGER, 0)
        return sockets[-1]

    yield make
    for made in sockets:
        made.close(0)
    context.term()


def round_trip(context_socket: zmq.Socket, endpoint: str) -> bytes:
    """A message from a new DEALER on `endpoint`, as `context_socket` (a bound ROUTER) receives it."""
    dealer = context_socket.context.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    try:
        dealer.connect(endpoint)
        dealer.send(b"hello")
        assert context_socket.poll(5000), f"nothing arrived on {endpoint}"
        return context_socket.recv_multipart()[-1]
    finally:
        dealer.close(0)


def stale_socket(path: Path) -> None:
    """What a killed engine leaves: a socket file no one listens on."""
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))
    dead.close()


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def refused_serve(endpoint: str, *flags: str) -> subprocess.CompletedProcess:
    """`vitserve serve` expected to give up on its endpoint at once (default budgets: a real start is slow)."""
    began = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "vitserve.cli", "serve", "--endpoint", endpoint, *flags],
                          capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - began
    assert done.returncode == 2 and "ready" not in done.stdout, (done.returncode, done.stdout, done.stderr)
    assert elapsed < REFUSAL_S, f"refused only after {elapsed:.1f} s: the engine started first"
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("vitserve serve: "), done.stderr  # no traceback
    return done


# -- bind_endpoint ----------------------------------------------------------------------------------

def test_a_live_socket_is_refused_and_keeps_its_server(router, tmp_path):
    endpoint = f"ipc://{tmp_path}/engine.sock"
    first = router()
    bind_endpoint(first, endpoint)
    with pytest.raises(EndpointError, match=f"address in use: another engine .* serves {tmp_path}/engine.sock"):
        bind_endpoint(router(), endpoint)
    assert round_trip(first, endpoint) == b"hello"


def test_a_file_that_is_not_a_socket_is_refused_and_left_intact(router, tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("keep me")
    link = tmp_path / "link.sock"
    link.symlink_to(path)
    for taken in (path, link):
        with pytest.raises(EndpointError, match="is not a socket: it is left as it is"):
            bind_endpoint(router(), f"ipc://{taken}")
    assert path.read_text() == "keep me" and link.is_symlink()


def test_a_stale_socket_is_replaced(router, tmp_path):
    path = tmp_path / "engine.sock"
    stale_socket(path)
    server = router()
    bind_endpoint(server, f"ipc://{path}")
    assert round_trip(server, f"ipc://{path}") == b"hello"


def test_the_socket_mode_is_explicit_whatever_the_umask(router, tmp_path):
    with umask(0):
        bind_endpoint(router(), f"ipc://{tmp_path}/private.sock")
        bind_endpoint(router(), f"ipc://{tmp_path}/group.sock", mode=0o660)
    assert mode_of(tmp_path / "private.sock") == 0o600 and mode_of(tmp_path / "group.sock") == 0o660


def test_release_removes_only_the_socket_file_it_created(router, tmp_path):
    path = tmp_path / "engine.sock"
    bound = bind_endpoint(router(), f"ipc://{path}")
    bound.release()
    assert not path.exists()
    bound = bind_endpoint(router(), f"ipc://{path}")
    path.unlink()
    stale_socket(path)  # another engine's socket now, at the same path
    bound.release()
    assert stat.S_ISSOCK(os.lstat(path).st_mode)


def test_a_busy_tcp_port_is_refused(router):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        endpoint = f"tcp://127.0.0.1:{busy.getsockname()[1]}"
        with pytest.raises(EndpointError, match=f"address in use: .* listens on {endpoint}"):
            bind_endpoint(router(), endpoint)


@pytest.mark.parametrize("endpoint, says", [
    ("/tmp/vitserve.sock", "neither ipc://PATH"), ("inproc://x", "neither ipc://PATH"), ("ipc://", "needs the path"),
    ("ipc://@abstract", "needs the path"), ("tcp://127.0.0.1", "needs HOST:PORT"), ("tcp://:5555", "needs HOST:PORT"),
    ("tcp://host:70000", "needs HOST:PORT"), ("ipc:///tmp/" + "x" * 100 + ".sock", "more than the 101 an endpoint may have"),
])
def test_malformed_endpoints_are_refused_with_what_to_write(router, endpoint, says):
    with pytest.raises(EndpointError, match=says) as info:
        bind_endpoint(router(), endpoint)
    assert repr(endpoint) in str(info.value)


def test_socket_modes():
    assert [parse_socket_mode(text) for text in ("0600", "660", "0o640")] == [0o600, 0o660, 0o640]
    for text in ("0400", "01600", "rw", "0x600", ""):
        with pytest.raises(EndpointError, match="--socket-mode|socket mode"):
            parse_socket_mode(text)


# -- the default endpoint ---------------------------------------------------------------------------

def test_the_default_endpoint_is_in_a_new_0700_directory_of_the_user(monkeypatch, tmp_path):
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.setattr(endpoints, "SHARED_TMP", tmp_path)
    with umask(0):
        endpoint = default_endpoint()
    directory = tmp_path / f"vitserve-{os.getuid()}"
    assert endpoint == f"ipc://{directory}/vitserve.sock"
    info = os.lstat(directory)
    assert stat.S_ISDIR(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o700 and info.st_uid == os.getuid()
    assert default_endpoint() == endpoint  # the directory, once made, is used again


def test_the_default_endpoint_prefers_a_private_runtime_directory(monkeypatch, tmp_path):
    runtime, shared = tmp_path / "runtime", tmp_path / "shared"
    runtime.mkdir(mode=0o700)
    shared.mkdir()
    monkeypatch.setattr(endpoints, "SHARED_TMP", shared)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    assert default_endpoint() == f"ipc://{runtime}/vitserve.sock"
    runtime.chmod(0o777)  # others could replace the socket there: not used
    assert default_endpoint() == f"ipc://{shared}/vitserve-{os.getuid()}/vitserve.sock"


def test_a_directory_others_could_write_or_own_is_refused(monkeypatch, tmp_path):
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.setattr(endpoints, "SHARED_TMP", tmp_path)
    directory = tmp_path / f"vitserve-{os.getuid()}"
    directory.mkdir()
    directory.chmod(0o777)
    with pytest.raises(EndpointError, match=f"{directory} has mode 0777: .*chmod 700"):
        default_endpoint()
    directory.chmod(0o700)
    with pytest.raises(EndpointError, match=f"belongs to uid {os.getuid()}, not to you"):
        private_directory(directory, uid=os.getuid() + 1)
    directory.rmdir()
    directory.symlink_to(tmp_path)
    with pytest.raises(EndpointError, match="is a symbolic link"):
        default_endpoint()
    directory.unlink()
    directory.write_text("")
    with pytest.raises(EndpointError, match="is not a directory"):
        default_endpoint()


# -- vitserve serve ---------------------------------------------------------------------------------

def test_the_endpoint_is_bound_before_the_engine_starts_and_removed_when_it_fails(monkeypatch, tmp_path):
    path = tmp_path / "engine.sock"
    seen = []

    class EngineThatFails:
        """What the frontend may ask of an engine while it starts, and a start that fails."""

        started = False

        def __init__(self, config, early=None):
            pass

        async def start(self):
            seen.append(stat.S_ISSOCK(os.lstat(path).st_mode) if path.exists() else False)
            raise RuntimeError("the worker did not start")

        def slab_descriptor(self, slab):
            return None

    monkeypatch.setattr(serve_module, "Engine", EngineThatFails)
    with pytest.raises(RuntimeError, match="did not start"):
        asyncio.run(serve_module.serve(EngineConfig(), f"ipc://{path}"))
    assert seen == [True] and not path.exists()


def test_a_second_serve_on_the_same_path_is_refused_while_the_first_keeps_serving(tmp_path):
    endpoint = f"ipc://{tmp_path}/engine.sock"
    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    with umask(0), served(endpoint, *FLAGS):
        assert mode_of(tmp_path / "engine.sock") == 0o600
        done = refused_serve(endpoint)
        assert f"address in use: another engine (or program) serves {tmp_path}/engine.sock" in done.stderr
        with Client(endpoint) as client, client.encode([image]) as result:
            assert result.items[0].embeddings.shape[0] > 0


def test_a_stale_socket_is_replaced_with_the_chosen_mode_and_removed_after_sigterm(tmp_path):
    path = tmp_path / "engine.sock"
    stale_socket(path)
    with umask(0), served(f"ipc://{path}", *FLAGS, "--socket-mode", "0660"):
        assert mode_of(path) == 0o660
        with Client(f"ipc://{path}") as client:
            assert client.health().ready
    assert not path.exists()


def test_serve_leaves_a_regular_file_at_its_path_intact(tmp_path):
    path = tmp_path / "engine.sock"
    path.write_text("not a socket")
    done = refused_serve(f"ipc://{path}")
    assert "is not a socket: it is left as it is" in done.stderr and path.read_text() == "not a socket"


def test_serve_on_a_busy_tcp_port_exits_2_before_starting_the_model():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        endpoint = f"tcp://127.0.0.1:{busy.getsockname()[1]}"
        done = refused_serve(endpoint)
    assert f"address in use: another engine (or program) listens on {endpoint}" in done.stderr
