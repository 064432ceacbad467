"""Result isolation (issue 13, class 9): a local client can neither alter nor destroy the results
delivered to another, and a reused run of slots never shows an earlier request's rows.

Slabs used to be files in /dev/shm that any process of the engine's user could open read-write:
rewrite rows under a victim's read-only view, or truncate the file so that the victim and the worker
died of SIGBUS. Now they are sealed memory files, reachable only as descriptors, which the kernel
keeps from being written, truncated, grown, punched or re-sealed by anyone but the worker's one
mapping made before the seals."""

from __future__ import annotations

import asyncio
import fcntl
import mmap
import os
import socket
import time

import numpy as np
import pytest

from served import served

from vitserve import Client, Engine, EngineConfig
from vitserve.ipc.sealed import SEALS, create_sealed
from vitserve.ipc.slab_channel import ASK_TIMEOUT_S, MAX_ANSWERING, ask_for_slab, channel_path
from vitserve.ipc.slabs import SlabError, parse_slab_name
from vitserve.soak.hostile import slab_attacks
from vitserve.soak.resources import slab_sizes
from vitserve.workers import WindowConfig

FLAGS = ("--min-budget", "64", "--max-budget", "1024", "--output-windows", "8")


def image(size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def test_a_sealed_slab_refuses_every_change_but_through_its_makers_mapping():
    fd, writable = create_sealed(f"vitserve-{os.getpid()}-iso-e0-0", 8192)
    writable[:4] = b"rows"
    read_write = os.open(f"/proc/self/fd/{fd}", os.O_RDWR)  # what any process of the user could open
    try:
        assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) & SEALS == SEALS
        refused = slab_attacks(read_write, 8192)
        assert len(refused) == 8 and all(refused.values()), refused
        private = mmap.mmap(read_write, 8192, flags=mmap.MAP_PRIVATE)  # a copy-on-write mapping: its own pages
        private[:4] = b"evil"
        writable[4:8] = b"more"  # the maker still writes
        assert bytes(mmap.mmap(fd, 8192, access=mmap.ACCESS_READ)[:8]) == b"rowsmore"
        assert os.fstat(fd).st_size == 8192
    finally:
        os.close(read_write)
        os.close(fd)


def test_a_hostile_local_client_cannot_alter_or_destroy_another_clients_result(tmp_path):
    endpoint = f"ipc://{tmp_path}/engine.sock"
    with served(endpoint, *FLAGS):
        with Client(endpoint) as victim, Client(endpoint) as other:
            result = victim.encode([image(128, 1)])
            before = result.items[0].embeddings.clone()
            health = victim.health()
            assert not [name for name in os.listdir("/dev/shm") if name.startswith("vitserve-")]  # nothing by name

            # The hostile client is given a descriptor of the very slab, as every local client is...
            slab = next(iter(slab_sizes(health.pid)))
            granted = ask_for_slab(channel_path(endpoint.removeprefix("ipc://")), slab)
            size = os.fstat(granted).st_size
            refused = slab_attacks(granted, size)
            assert all(refused.values()), refused
            os.close(granted)
            # ...and reaches every slab the engine and its workers hold through /proc, read-write.
            tried = 0
            for pid in (health.pid, *health.worker_pids):
                for fd in os.listdir(f"/proc/{pid}/fd"):
                    try:
                        # Output slabs only: input slabs are written by their clients (and through /proc
                        # by the engine's own user, who can ptrace the engine anyway: README, trust model).
                        target = os.readlink(f"/proc/{pid}/fd/{fd}")
                        if not target.startswith("/memfd:vitserve-") or parse_slab_name(
                                target.removeprefix("/memfd:").removesuffix(" (deleted)")) is None:
                            continue
                        stolen = os.open(f"/proc/{pid}/fd/{fd}", os.O_RDWR)
                    except OSError:
                        continue
                    tried += 1
                    try:
                        refused = slab_attacks(stolen, os.fstat(stolen).st_size)
                        assert all(refused.values()), refused
                    finally:
                        os.close(stolen)
            assert tried >= 2  # the engine's descriptor and the worker's

            assert (result.items[0].embeddings == before).all()  # unchanged, and no SIGBUS reading it
            with other.encode([image(96, 2)]) as later:  # the engine and its worker serve on
                assert later.items[0].embeddings.isfinite().all()
            assert (result.items[0].embeddings == before).all()
            result.release()


def test_the_slab_channel_refuses_unknown_slabs_and_outlasts_silent_connections(tmp_path):
    endpoint = f"ipc://{tmp_path}/engine.sock"
    path = channel_path(endpoint.removeprefix("ipc://"))
    with served(endpoint, *FLAGS):
        with Client(endpoint) as client:
            with pytest.raises(ValueError, match="did not give slab .*no such slab"):
                ask_for_slab(path, f"vitserve-{client.health().pid}-w0n0-e9-0")
            silent = []
            for _ in range(MAX_ANSWERING + 8):  # connect and say nothing: a slow-loris on the channel
                peer = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                peer.connect(path)
                silent.append(peer)
            began = time.monotonic()
            with client.encode([image(64, 3)]) as result:  # maps its slab through the channel meanwhile
                assert result.items[0].embeddings.isfinite().all()
            assert time.monotonic() - began < ASK_TIMEOUT_S
            garbage = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            garbage.connect(path)
            garbage.send(b"\xc1 not msgpack")
            assert garbage.recv(100) == b""  # closed without an answer
            for peer in [*silent, garbage]:
                peer.close()
            assert client.stats()["slabs_granted"] >= 1


def test_a_reused_run_never_shows_an_earlier_requests_rows():
    """A small window in a run that a large one used before: the rows it leaves of the run are
    cleared, so neither its reader nor anyone mapping the slab sees the earlier request's rows there."""
    config = EngineConfig(model="random:tiny", devices=("cpu",), window=WindowConfig(min_budget=64, max_budget=1024),
                          output_windows=2)

    async def run() -> None:
        async with Engine(config) as engine:
            layout = engine.layout
            large_key, (large,) = await engine.run(engine.admit([image(256, 4)]), None, 0)
            patch_dim = config.preprocess.patch_dim
            small_patches = np.random.default_rng(5).standard_normal((12, patch_dim), dtype=np.float32)
            small_items = engine.admit([(small_patches, (1, 2, 6))])  # 12 patches: 3 rows, less than a slot
            assert large.shape[0] > layout.slot_rows  # the large result fills the first slot of its run
            engine.release(large_key)
            await asyncio.sleep(0)
            small_key, (small,) = await engine.run(small_items, None, 0)
            small_rows = small.shape[0]
            assert (small.slab, small.offset) == (large.slab, large.offset) and small_rows < layout.slot_rows
            fd = engine._open_slab(small.slab)
            try:
                whole = np.frombuffer(mmap.mmap(fd, 0, access=mmap.ACCESS_READ), np.uint8)
            finally:
                os.close(fd)
            slot_bytes = engine._pools[0].slot_bytes
            left = whole[small.offset + small_rows * layout.row_bytes: small.offset + slot_bytes]
            assert left.size > 0 and not left.any()
            engine.release(small_key)

    asyncio.run(run())


def test_the_reader_refuses_a_slab_name_the_engine_never_made():
    async def run() -> None:
        config = EngineConfig(model="random:tiny", devices=("cpu",), window=WindowConfig(min_budget=64, max_budget=1024))
        async with Engine(config) as engine:
            with pytest.raises(SlabError, match="is not one of this engine's"):
                engine._open_slab(f"vitserve-{os.getpid()}-w0n99-e0-0")

    asyncio.run(run())


def test_the_attacks_find_a_slab_that_is_not_sealed():
    """The soak's hostile client and these tests count on `slab_attacks`: on an unsealed memory file
    (what a slab in /dev/shm was) it must report the changes it could make."""
    fd = os.memfd_create("vitserve-unsealed")
    os.ftruncate(fd, 8192)
    try:
        refused = slab_attacks(fd, 8192)
        allowed = {name for name, was_refused in refused.items() if not was_refused}
        assert {"writable shared mapping", "write", "truncate", "grow", "punch a hole"} <= allowed, refused
    finally:
        os.close(fd)
