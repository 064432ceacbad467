"""tcp:// with CURVE: a client with an admitted key is served (encode, health, stats); a wrong key
or no key gets no connection at all, and is told so at once; an unauthenticated endpoint that
other hosts could reach is refused unless explicitly allowed."""

from __future__ import annotations

import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zmq.auth
from served import served

from vitserve import Client
from vitserve.engine import EngineError
from vitserve.ipc.auth import AuthError, ServerKeys, check_exposure


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    root = tmp_path_factory.mktemp("keys")
    allowed = root / "allowed"
    allowed.mkdir()
    zmq.auth.create_certificates(root, "server")
    zmq.auth.create_certificates(allowed, "admitted")
    zmq.auth.create_certificates(root, "stranger")
    done = subprocess.run([sys.executable, "-m", "vitserve.cli", "keys", str(allowed), "ranked", "--priorities", "0,10"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return root


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def endpoint(keys):
    address = f"tcp://127.0.0.1:{free_port()}"
    with served(address, "--min-budget", "64", "--max-budget", "512", "--curve-secret-key",
                str(keys / "server.key_secret"), "--curve-clients", str(keys / "allowed")):
        yield address


def test_an_admitted_key_is_served(endpoint, keys):
    with Client(endpoint, curve_secret_key=keys / "allowed" / "admitted.key_secret",
                curve_server_key=keys / "server.key") as client:
        assert client.health().ready
        assert client.stats()["requests"] >= 0
        with client.encode([np.full((64, 64, 3), 3, np.uint8)]) as result:
            assert tuple(result.items[0].embeddings.shape) == (64, 128)


@pytest.mark.parametrize("who", ["stranger", "nobody"])
def test_a_wrong_key_or_none_gets_no_connection_and_is_told_at_once(endpoint, keys, who):
    credentials = {} if who == "nobody" else dict(curve_secret_key=keys / "stranger.key_secret",
                                                 curve_server_key=keys / "server.key")
    began = time.monotonic()
    with pytest.raises(ConnectionError) as info:
        Client(endpoint, **credentials)
    assert "refused the connection's handshake" in str(info.value)
    assert time.monotonic() - began < 10, "told at once, not after the connect timeout"


def test_a_key_with_a_priority_range_is_held_to_it_and_others_to_the_servers(endpoint, keys):
    """Priorities are bounded per credential: the range in a client's certificate replaces the
    server's --priorities (-100..100 here) for connections authenticated with that key."""
    image = np.full((64, 64, 3), 5, np.uint8)
    with Client(endpoint, curve_secret_key=keys / "allowed" / "ranked.key_secret",
                curve_server_key=keys / "server.key") as ranked, \
            Client(endpoint, curve_secret_key=keys / "allowed" / "admitted.key_secret",
                   curve_server_key=keys / "server.key") as plain:
        for priority in (0, 10):
            ranked.encode([image], priority=priority).release()
        for priority in (11, 50, -1):
            with pytest.raises(EngineError, match=rf"priority {priority} is outside this client key's range 0..10"):
                ranked.encode([image], priority=priority)
        plain.encode([image], priority=50).release()
        with pytest.raises(EngineError, match="outside the engine's range -100..100"):
            plain.encode([image], priority=101)


def test_a_certificate_with_an_unreadable_priority_range_is_refused_at_start(keys, tmp_path):
    for text in ("10,0", "high,low", "5"):
        public, _ = zmq.auth.create_certificates(tmp_path, f"bad{len(text)}")
        certificate = Path(public).read_text().replace("\nmetadata\n", f"\nmetadata\n    priorities = {text}\n")
        Path(public).write_text(certificate)
        with pytest.raises(AuthError, match=rf"the priorities of .*bad{len(text)}.key is '{text}': write LOW,HIGH"):
            ServerKeys(keys / "server.key_secret", tmp_path)
        (tmp_path / f"bad{len(text)}.key").unlink()
        (tmp_path / f"bad{len(text)}.key_secret").unlink()
    done = subprocess.run([sys.executable, "-m", "vitserve.cli", "keys", str(tmp_path), "c", "--priorities", "9,1"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "write LOW,HIGH" in done.stderr


def test_keys_must_be_usable(keys, tmp_path):
    with pytest.raises(AuthError, match="holds only a public key"):
        ServerKeys(keys / "server.key", keys / "allowed")
    with pytest.raises(AuthError, match="holds no client certificate"):
        ServerKeys(keys / "server.key_secret", tmp_path)
    with pytest.raises(ValueError, match="go together"):
        Client("tcp://127.0.0.1:1", curve_secret_key=keys / "server.key_secret")


def test_only_loopback_may_be_served_without_authentication():
    for endpoint in ("tcp://127.0.0.1:5555", "tcp://localhost:5555", "tcp://[::1]:5555", "ipc:///tmp/x.sock"):
        check_exposure(endpoint, authenticated=False, allow_insecure=False)
    for endpoint in ("tcp://0.0.0.0:5555", "tcp://*:5555", "tcp://10.1.2.3:5555", "tcp://eth0:5555"):
        with pytest.raises(AuthError, match="--allow-insecure-tcp"):
            check_exposure(endpoint, authenticated=False, allow_insecure=False)
        check_exposure(endpoint, authenticated=True, allow_insecure=False)
        check_exposure(endpoint, authenticated=False, allow_insecure=True)


def test_serve_refuses_an_open_port_without_keys_before_starting_the_model():
    began = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "vitserve.cli", "serve", "--endpoint", f"tcp://0.0.0.0:{free_port()}"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--allow-insecure-tcp" in done.stderr and "ready" not in done.stdout
    assert time.monotonic() - began < 30


def test_keys_command_writes_a_private_secret(tmp_path):
    done = subprocess.run([sys.executable, "-m", "vitserve.cli", "keys", str(tmp_path / "k"), "client-a"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    secret = tmp_path / "k" / "client-a.key_secret"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    public, private = zmq.auth.load_certificate(secret)
    assert public and private
    again = subprocess.run([sys.executable, "-m", "vitserve.cli", "keys", str(tmp_path / "k"), "client-a"],
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "exists" in again.stderr
