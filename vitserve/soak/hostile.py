"""The soak's hostile clients: each injection tries every class of hostile or careless peer once
against the live engine and checks that it is refused the way it must be, while the soak's
ordinary clients go on (their requests must still each end once, and nothing may leak).

- no hello: an encode before the hello gets `protocol` ("say hello first");
- bounds: a release of too many ids and an encode of too many items get one `protocol` error each;
  a message of more frames than any request has shuts its connection;
- priority outside the engine's range: `invalid_input`;
- a claimed routing id: a peer that takes the routing id of a connection that sent a request and
  closed must never receive that request's result;
- colliding routing ids: peers that take the ids an unseeded libzmq would generate next, then
  anonymous peers: every anonymous peer is still welcomed (libzmq used to abort the engine);
- a connection flood: many raw connections opened and dropped at once; a new client is welcomed;
- another client's result (ipc:// only): the peer is given the slab of its own result, as every
  local client is, and tries every way to change it (write, truncate, grow, punch a hole, a
  writable mapping, a seal); the kernel must refuse each, and no slab may be a file in /dev/shm.
"""

from __future__ import annotations

import asyncio
import ctypes
import fcntl
import mmap
import os
import socket as sockets
import struct
import time

import numpy as np
import zmq

from vitserve.ipc.codec import array_ref, client_codec
from vitserve.ipc.messages import (
    MAX_ITEMS_PER_REQUEST, MAX_RELEASE_IDS, PROTOCOL_VERSION, Encode, Error, Hello, ImageItem, Release, Result,
    Welcome,
)
from vitserve.ipc.slab_channel import ask_for_slab, channel_path

from .ledger import Ledger

REPLY_TIMEOUT_S = 10.0
CLAIM_WAIT_S = 2.0  # how long the claimant listens for the first connection's result
CLAIM_AFTER_S = 0.2  # the claimant connects this long after the first connection closed
PREDICTED_STARTS = 8  # first values an unseeded libzmq would draw for its routing id counter
FLOOD = 200  # raw connections opened at once
_FALLOC_PUNCH_HOLE = 0x02 | 0x01  # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE


class Peer:
    """A raw DEALER socket, blocking calls (run in a thread)."""

    def __init__(self, context: zmq.Context, endpoint: str, routing_id: bytes | None = None, hello: bool = True):
        self.socket = context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        if routing_id is not None:
            self.socket.setsockopt(zmq.ROUTING_ID, routing_id)
        self.socket.connect(endpoint)
        self.codec = client_codec()
        if hello:
            self.send(self.codec.encode(Hello(PROTOCOL_VERSION)))

    def send(self, frames: list) -> None:
        self.socket.send_multipart(frames, copy=False)

    def reply(self, timeout_s: float = REPLY_TIMEOUT_S):
        """The next reply, or None when none comes in time."""
        if not self.socket.poll(int(timeout_s * 1000)):
            return None
        return self.codec.decode(self.socket.recv_multipart())[0]

    def close(self) -> None:
        self.socket.close(0)


def _image() -> tuple[list, list]:
    pixels = np.zeros((64, 64, 3), np.uint8)
    return [ImageItem(array_ref(pixels, 0))], [pixels]


def _expect_error(ledger: Ledger, what: str, reply, code: str) -> None:
    if not isinstance(reply, Error) or reply.code != code:
        ledger.violate(f"hostile {what}: expected a {code!r} error, got {reply!r}")


def _refusals(context: zmq.Context, endpoint: str, ledger: Ledger) -> None:
    codec = client_codec()
    silent = Peer(context, endpoint, hello=False)
    try:
        items, frames = _image()
        silent.send(codec.encode(Encode(1, items), frames))
        _expect_error(ledger, "encode before hello", silent.reply(), "protocol")
    finally:
        silent.close()
    peer = Peer(context, endpoint)
    try:
        if not isinstance(peer.reply(), Welcome):
            ledger.violate("hostile peer: no welcome to its hello")
            return
        peer.send(codec.encode(Release(list(range(MAX_RELEASE_IDS + 1)))))
        _expect_error(ledger, "release of too many ids", peer.reply(), "protocol")
        pixels = np.zeros((1, 1, 3), np.uint8)
        peer.send(codec.encode(Encode(2, [ImageItem(array_ref(pixels, 0))] * (MAX_ITEMS_PER_REQUEST + 1)), [pixels]))
        _expect_error(ledger, "encode of too many items", peer.reply(), "protocol")
        items, frames = _image()
        peer.send(codec.encode(Encode(3, items, priority=2**62), frames))
        _expect_error(ledger, "priority out of range", peer.reply(), "invalid_input")
    finally:
        peer.close()
    flooder = Peer(context, endpoint)
    try:
        flooder.reply()
        flooder.send([b"x"] * (MAX_ITEMS_PER_REQUEST + 2))
        if flooder.reply(1.0) is not None:
            ledger.violate("hostile message of too many frames was answered instead of its connection shut")
    finally:
        flooder.close()


def _claimed_routing_id(context: zmq.Context, endpoint: str, ledger: Ledger) -> None:
    routing_id = b"\x02" + os.urandom(15)
    first = Peer(context, endpoint, routing_id)
    items, frames = _image()
    first.reply()
    first.send(first.codec.encode(Encode(7, items), frames))
    first.close()  # before its result
    time.sleep(CLAIM_AFTER_S)  # (while the first connection is still up, libzmq ignores a second peer of its id)
    claimant = Peer(context, endpoint, routing_id)
    try:
        deadline_s = REPLY_TIMEOUT_S + CLAIM_WAIT_S
        while (reply := claimant.reply(deadline_s)) is not None:
            if isinstance(reply, Result) and reply.id == 7:
                ledger.violate("a peer that claimed a closed connection's routing id received its result")
            if isinstance(reply, Welcome):
                deadline_s = CLAIM_WAIT_S  # welcomed: listen a while for a result that must not come
    finally:
        claimant.close()


def _predicted_routing_ids() -> list[bytes]:
    """The first routing ids libzmq generates when rand() was never seeded (srand(1))."""
    libc = ctypes.CDLL(None)
    libc.srand(1)
    draws = [libc.rand() for _ in range(PREDICTED_STARTS + 1)]
    libc.srand(int.from_bytes(os.urandom(4), "little"))  # leave no predictable state behind
    starts = [(low | ((high & 1) << 31)) & 0xFFFFFFFF for low, high in zip(draws, draws[1:])]
    return [b"\x00" + struct.pack(">I", (start + k) & 0xFFFFFFFF) for start in starts for k in range(4)]


def _colliding_routing_ids(context: zmq.Context, endpoint: str, ledger: Ledger) -> None:
    squatters = [Peer(context, endpoint, routing_id, hello=False) for routing_id in _predicted_routing_ids()]
    anonymous = [Peer(context, endpoint) for _ in range(8)]
    try:
        for peer in anonymous:
            if not isinstance(peer.reply(), Welcome):
                ledger.violate("an anonymous peer was not welcomed after others took predictable routing ids")
                return
    finally:
        for peer in squatters + anonymous:
            peer.close()


def _flood(context: zmq.Context, endpoint: str, ledger: Ledger) -> None:
    if endpoint.startswith("ipc://"):
        family, address = sockets.AF_UNIX, endpoint.removeprefix("ipc://")
    else:
        host, port = endpoint.removeprefix("tcp://").rsplit(":", 1)
        family, address = sockets.AF_INET, (host, int(port))
    opened = []
    try:
        for _ in range(FLOOD):
            raw = sockets.socket(family, sockets.SOCK_STREAM)
            raw.settimeout(REPLY_TIMEOUT_S)
            try:
                raw.connect(address)
            except OSError:
                raw.close()
                break
            opened.append(raw)
    finally:
        for raw in opened:
            raw.close()
    peer = Peer(context, endpoint)
    try:
        if not isinstance(peer.reply(), Welcome):
            ledger.violate(f"a client was not welcomed after a flood of {len(opened)} connections")
    finally:
        peer.close()


def slab_attacks(fd: int, size: int) -> dict[str, bool]:
    """Every way to change a slab through a descriptor of it (opened read-write if the caller could):
    whether each one was refused, by name."""
    libc = ctypes.CDLL(None, use_errno=True)

    def check(status: int, what: str) -> None:
        if status != 0:
            raise OSError(ctypes.get_errno(), what)

    def upgrade_read_only_mapping() -> None:
        view = mmap.mmap(fd, size, prot=mmap.PROT_READ)
        address = np.frombuffer(view, np.uint8).ctypes.data
        check(libc.mprotect(ctypes.c_void_p(address), ctypes.c_size_t(size), mmap.PROT_READ | mmap.PROT_WRITE),
              "mprotect")

    tries = {
        "writable shared mapping": lambda: mmap.mmap(fd, size),
        "write": lambda: os.pwrite(fd, b"\xff" * 64, 0),
        "truncate": lambda: os.ftruncate(fd, 0),
        "shrink": lambda: os.ftruncate(fd, size // 2),
        "grow": lambda: os.ftruncate(fd, size * 2),
        "punch a hole": lambda: check(libc.fallocate(fd, _FALLOC_PUNCH_HOLE, ctypes.c_long(0), ctypes.c_long(size)),
                                      "fallocate"),
        "seal against the writer": lambda: fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE),
        "make a read-only mapping writable": upgrade_read_only_mapping,
    }
    refused = {}
    for name, attempt in tries.items():
        try:
            attempt()
            refused[name] = False
        except (OSError, ValueError):
            refused[name] = True
    return refused


def _slabs(context: zmq.Context, endpoint: str, ledger: Ledger) -> None:
    if not endpoint.startswith("ipc://"):
        return  # tcp:// clients get their rows inline: there is no slab to reach
    named = [name for name in os.listdir("/dev/shm") if name.startswith("vitserve-")]
    if named:
        ledger.violate(f"slabs are files anyone of the user can open: {named[:3]}")
    peer = Peer(context, endpoint)
    try:
        peer.reply()
        items, frames = _image()
        peer.send(peer.codec.encode(Encode(11, items), frames))
        reply = peer.reply()
        if not isinstance(reply, Result):
            return  # overloaded, say: the soak's load decides; nothing to attack
        slab = reply.outputs[0].slab
        try:
            fd = ask_for_slab(channel_path(endpoint.removeprefix("ipc://")), slab)
        except (OSError, ValueError) as err:
            ledger.violate(f"the slab channel did not give the slab of a result: {err}")
            return
        try:
            writable = os.open(f"/proc/self/fd/{fd}", os.O_RDWR)  # what any process of the user could open
        except OSError:
            writable = None
        try:
            for target in (fd, writable):
                if target is None:
                    continue
                allowed = [name for name, refused in slab_attacks(target, os.fstat(target).st_size).items()
                           if not refused]
                if allowed:
                    ledger.violate(f"a local client could change a slab that holds others' results: {allowed}")
        finally:
            for target in (fd, writable):
                if target is not None:
                    os.close(target)
        peer.send(peer.codec.encode(Release([11])))
    finally:
        peer.close()


def _all(endpoint: str, ledger: Ledger) -> None:
    context = zmq.Context()
    try:
        for scenario in (_refusals, _claimed_routing_id, _colliding_routing_ids, _flood, _slabs):
            scenario(context, endpoint, ledger)
    finally:
        context.term()


async def hostile_clients(endpoint: str, ledger: Ledger) -> bool:
    """Every hostile scenario once; violations go to the ledger."""
    await asyncio.to_thread(_all, endpoint, ledger)
    return True
