"""Input slabs: local clients write their inputs into an arena of their own that the workers read
in place; inputs that come as frames are copied into the engine's own slab. Results are the same
bit for bit whichever way the inputs came; arenas and ranges are given back when their connection
or request ends, also after a crash; a worker restart maps every live slab again; bounds hold.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from served import RawPeer, served

from vitserve import AsyncClient, Engine, EngineConfig
from vitserve.engine import EngineError
from vitserve.ipc.codec import array_ref
from vitserve.ipc.input_slabs import ALIGNMENT, InputSlab, Regions, input_slab_name
from vitserve.ipc.messages import Error, ImageItem, PatchItem, Result
from vitserve.ipc.slab_channel import ask_for_arena, channel_path
from vitserve.ipc.slabs import SlabError
from vitserve.preprocess import preprocess_image
from vitserve.workers import WindowConfig

WINDOW = ["--min-budget", "64", "--max-budget", "1024"]


def items() -> list:
    rng = np.random.default_rng(7)
    patches = preprocess_image(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8))
    return [rng.integers(0, 256, (80, 120, 3), dtype=np.uint8), rng.integers(0, 256, (4, 48, 64, 3), dtype=np.uint8),
            (patches.pixel_values, patches.grid_thw)]


async def encoded(client: AsyncClient, request: list) -> list[np.ndarray]:
    """Each item's rows, copied out, one request at a time (so every way runs the same windows)."""
    with await client.encode(request) as result:
        return [item.embeddings.clone().numpy() for item in result.items] + [item.deepstack.clone().numpy() for item in result.items]


async def stats(client: AsyncClient) -> dict[str, float]:
    return await client.stats()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# -- regions and slabs -----------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 5000)), max_size=60))
def test_regions_never_overlap_and_merge_back_to_one_range(steps):
    regions, taken = Regions(64 * 1024), {}
    for take, size in steps:
        if take or not taken:
            start = regions.take(size)
            if start is not None:
                assert start % ALIGNMENT == 0 and start + size <= regions.size
                assert all(start + size <= other or other + length <= start for other, length in taken.items())
                taken[start] = size
        else:
            regions.give(next(iter(taken)))
            del taken[next(iter(taken))]
        used = sum(-(-size // ALIGNMENT) * ALIGNMENT for size in taken.values())
        assert regions.free_bytes == regions.size - used
    for start in list(taken):
        regions.give(start)
    assert regions.take(regions.size) == 0  # everything merged into one range again


def test_a_slab_must_be_sealed_against_size_changes_and_arrays_must_lie_inside():
    bare = os.memfd_create("vitserve-1-x-in0", os.MFD_ALLOW_SEALING)
    os.ftruncate(bare, 4096)
    with pytest.raises(SlabError, match="lacks seals"):
        InputSlab.open(bare, "vitserve-1-x-in0")
    slab = InputSlab.create(input_slab_name(os.getpid(), "t", 0), 4096)
    try:
        with pytest.raises(OSError):
            os.ftruncate(slab.fd, 1024)  # the seal: no one can shrink it under the workers
        for offset, dtype, shape in ((-64, "uint8", (8,)), (4090, "uint8", (8,)), (2, "float32", (4,)),
                                     (0, "uint8", (64, 64, 3))):
            with pytest.raises(SlabError, match="do not lie inside"):
                slab.array(offset, dtype, shape)
        view = slab.array(64, "float32", (4,))
        assert not view.flags.writeable
        with pytest.raises(SlabError, match="not the slab"):
            InputSlab.open_from(os.getpid(), slab.fd, "vitserve-1-other-in9", slab.size)
        other = InputSlab.open_from(os.getpid(), slab.fd, slab.name, slab.size)  # as a worker maps it
        slab.array(0, "uint8", (3,), writable=True)[:] = (1, 2, 3)
        assert other.array(0, "uint8", (3,)).tolist() == [1, 2, 3]  # one memory
        assert fcntl.fcntl(slab.fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_WRITE == 0  # its writer keeps writing
        other.close()
    finally:
        slab.close()


# -- the embedded engine: the engine's own slab --------------------------------------------------


def test_embedded_inputs_are_copied_into_the_engines_slab_and_given_back():
    image = np.random.default_rng(1).integers(0, 256, (200, 200, 3), dtype=np.uint8)

    async def run() -> None:
        config = EngineConfig(window=WindowConfig(min_budget=64, max_budget=1024), max_request_bytes=150_000,
                              input_slab_bytes=200_000)
        async with Engine(config) as engine:
            size = engine.stats()["input_slab_free_bytes"]
            first = engine.submit(engine.admit([image]), None, 0)  # 120 000 bytes in the slab while it runs
            with pytest.raises(EngineError) as refused:
                engine.submit(engine.admit([image]), None, 0)
            assert refused.value.code == "overloaded" and "input_slab_bytes" in refused.value.message
            await first[1]
            engine.release(first[0])
            assert engine.stats()["input_slab_free_bytes"] == size
            with await engine.encode([image]) as result:  # room again
                assert result.items[0].embeddings.shape[0] > 0
            assert engine.stats()["input_slab_free_bytes"] == size

    asyncio.run(run())


# -- served: arenas ------------------------------------------------------------------------------------


def test_results_are_bit_equal_through_an_arena_frames_and_tcp(tmp_path):
    request = items()

    async def ipc_run(endpoint: str) -> tuple[list, list, dict]:
        async with AsyncClient(endpoint) as first, AsyncClient(endpoint) as second:
            # (connect() waits for the arena's answer: the first client's requests go through its arena)
            assert first._arena._regions is not None and second._arena._regions is None
            through_arena = await encoded(first, request)
            through_frames = await encoded(second, request)  # max_input_arenas=1: this one sends frames
            return through_arena, through_frames, await stats(first)

    async def tcp_run(endpoint: str) -> list:
        async with AsyncClient(endpoint) as client:
            return await encoded(client, request)

    endpoint = f"ipc://{tmp_path}/e.sock"
    with served(endpoint, *WINDOW, "--max-input-arenas", "1"):
        through_arena, through_frames, counters = asyncio.run(ipc_run(endpoint))
    assert counters["input_arenas"] == 1 and counters["input_arenas_refused"] == 1
    tcp = f"tcp://127.0.0.1:{free_port()}"
    with served(tcp, *WINDOW):
        through_tcp = asyncio.run(tcp_run(tcp))
    for arena, frames, remote in zip(through_arena, through_frames, through_tcp):
        np.testing.assert_array_equal(arena, frames)
        np.testing.assert_array_equal(arena, remote)


def test_a_request_larger_than_the_free_arena_goes_as_frames_and_ranges_come_back(tmp_path):
    endpoint = f"ipc://{tmp_path}/e.sock"
    small = np.zeros((32, 32, 3), np.uint8)
    large = np.full((160, 160, 3), 7, np.uint8)  # 76 800 bytes: more than the whole arena

    async def run() -> None:
        async with AsyncClient(endpoint) as client:
            reference = await encoded(client, [large])
            await encoded(client, [small])
            arena = client._arena._regions
            assert arena is not None and arena.free_bytes == arena.size  # every range given back
            results = await asyncio.gather(*(client.encode([small, large]) for _ in range(4)))
            for result in results:
                np.testing.assert_array_equal(result.items[1].embeddings.numpy(), reference[0])
                result.release()
            assert arena.free_bytes == arena.size
            counters = await stats(client)
            assert counters["input_slab_free_bytes"] > 0 and counters["input_arenas"] == 1

    with served(endpoint, *WINDOW, "--input-arena-bytes", "65536"):
        asyncio.run(run())


ARENA_HOLDER = """
import asyncio, sys, numpy as np
from vitserve import AsyncClient

async def main():
    async with AsyncClient(sys.argv[1]) as client:
        with await client.encode([np.zeros((64, 64, 3), np.uint8)]):
            print("holding", flush=True)
            await asyncio.sleep(600)

asyncio.run(main())
"""


def _arena_names(pid: int) -> set[str]:
    """The input slabs process `pid` maps."""
    with open(f"/proc/{pid}/maps") as maps:
        return {line.split("/memfd:")[1].split()[0] for line in maps if "/memfd:vitserve-" in line and "-in" in line}


def _held(pid: int, name: str) -> bool:
    """Whether process `pid` holds a descriptor of the slab `name`."""
    links = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            links.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            pass
    return f"/memfd:{name} (deleted)" in links


async def _until(condition, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


def test_a_crashed_clients_arena_is_unmapped_everywhere_and_a_restarted_worker_maps_the_live_ones(tmp_path):
    endpoint = f"ipc://{tmp_path}/e.sock"
    image = np.random.default_rng(3).integers(0, 256, (96, 96, 3), dtype=np.uint8)

    async def run() -> None:
        async with AsyncClient(endpoint) as client:
            before = await encoded(client, [image])
            health = await client.health()
            engine, worker = health.pid, health.worker_pids[0]
            arena = client._arena._slab.name
            live = _arena_names(worker)  # the engine's own slab and this client's arena
            assert arena in live and len(live) == 2 and _held(engine, arena)
            holder = subprocess.Popen([sys.executable, "-c", ARENA_HOLDER, endpoint], stdout=subprocess.PIPE, text=True)
            assert holder.stdout.readline().strip() == "holding"
            (crashed,) = _arena_names(worker) - live
            assert _held(engine, crashed)
            holder.kill()  # its connection closes: its arena is dropped, unmapped by the worker, then closed
            holder.wait()

            async def gone() -> bool:
                return crashed not in _arena_names(worker) and not _held(engine, crashed)

            await _until(gone)
            assert (await stats(client))["input_arenas"] == 1
            os.kill(worker, signal.SIGKILL)

            async def restarted() -> bool:
                now = await client.health()
                return now.ready and bool(now.worker_pids) and now.worker_pids[0] != worker

            await _until(restarted)
            after = await encoded(client, [image])
            new_worker = (await client.health()).worker_pids[0]
            assert _arena_names(new_worker) == live  # every live slab, mapped again; none of the crashed client's
            np.testing.assert_array_equal(before[0], after[0])

    with served(endpoint, *WINDOW):
        asyncio.run(run())


def test_arena_references_are_checked_like_frames(tmp_path):
    endpoint = f"ipc://{tmp_path}/e.sock"
    image = np.random.default_rng(5).integers(0, 256, (32, 32, 3), dtype=np.uint8)

    def one_reply(replies: list, kind: type, text: str = "") -> None:
        found = [reply for reply, _ in replies if isinstance(reply, (Error, Result))]
        assert len(found) == 1 and isinstance(found[0], kind), replies
        assert text in getattr(found[0], "message", ""), found[0]

    with served(endpoint, *WINDOW, "--input-arena-bytes", "65536"):
        peer = RawPeer(endpoint)
        try:
            at_start = ImageItem(array_ref(image, -1, offset=0))
            one_reply(peer.encode(1, [at_start], []), Error, "no input arena")
            channel = channel_path(str(tmp_path / "e.sock"))
            with pytest.raises(ValueError, match="no open connection has this token"):
                ask_for_arena(channel, "0" * 32)
            name, fd = ask_for_arena(channel, peer.welcome.input_token)
            arena = InputSlab.open(fd, name)
            arena.array(0, "uint8", image.shape, writable=True)[...] = image
            one_reply(peer.encode(2, [at_start], []), Result)
            one_reply(peer.encode(3, [ImageItem(array_ref(image, -1, offset=65536 - 64))], []), Error,
                      "do not lie inside")
            one_reply(peer.encode(4, [PatchItem(array_ref(np.zeros((4, 1536), np.float32), -1, offset=2), (1, 2, 2))],
                                  []), Error, "aligned")
            one_reply(peer.encode(5, [ImageItem(array_ref(image, 0, offset=0))], [image]), Error, "names frame")
            one_reply(peer.encode(6, [ImageItem(array_ref(image, -1, offset=-5))], []), Error, "no such frame")
            arena.close()
        finally:
            peer.close()
