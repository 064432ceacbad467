"""The client's matching of replies to requests, at the edges: a reply that arrives in the same loop
turn as its request is cancelled is still that request's one reply (a result is released, nothing
counts as stray), and a second reply to a request is reported as stray."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import zmq

from vitserve import AsyncClient
from vitserve.ipc.codec import server_codec
from vitserve.ipc.messages import PROTOCOL_VERSION, Error, OutputRef, Result, ServedModel, Welcome

SERVER = server_codec()  # the engine's side: encodes replies, decodes what the client sent
STAND_IN = ServedModel("stand-in", "qwen3_vl", "", "float32", 8, 0, (64,), 128, {})


async def connected(tmp_path) -> tuple[AsyncClient, zmq.Socket]:
    """A client shaken hands with a ROUTER socket that the test answers for."""
    endpoint = f"ipc://{tmp_path}/stand-in.sock"
    router = zmq.Context.instance().socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.bind(endpoint)
    client = AsyncClient(endpoint)
    connecting = asyncio.ensure_future(client.connect(10))
    identity, *_ = await asyncio.to_thread(router.recv_multipart)
    router.send_multipart([identity, *SERVER.encode(Welcome(PROTOCOL_VERSION, STAND_IN))])
    await connecting
    return client, router


REPLIES = {
    "error": Error(1, "overloaded", "the queue is full"),
    "result": Result(1, [OutputRef((4, 1, 8), "float32", "image", (1, 4, 4), slab="vitserve-1-w0-e0-0", epoch=0, offset=0)]),
}


@pytest.mark.parametrize("kind", sorted(REPLIES))
def test_a_reply_in_the_same_turn_as_the_cancel_is_not_stray(tmp_path, kind):
    async def run() -> None:
        client, router = await connected(tmp_path)
        request = asyncio.ensure_future(client.encode([np.zeros((8, 8, 3), np.uint8)]))
        await asyncio.sleep(0.05)  # sent; awaiting its reply
        request.cancel()
        client._dispatch(SERVER.encode(REPLIES[kind]))  # the reply, before the task unwinds
        with pytest.raises(asyncio.CancelledError):
            await request
        assert client.stray_replies == [] and 1 not in client._cancelled and 1 not in client._waiting
        await asyncio.sleep(0.05)  # a released result goes out as a Release message
        sent = []
        while router.poll(200):
            identity, *frames = router.recv_multipart()
            sent.append(type(SERVER.decode(frames)[0]).__name__)
        assert sent == (["Encode", "Release"] if kind == "result" else ["Encode"])  # no Cancel: it was answered
        await client.close()
        router.close(0)

    asyncio.run(run())


def test_a_second_reply_to_a_request_is_stray(tmp_path):
    async def run() -> None:
        client, router = await connected(tmp_path)
        request = asyncio.ensure_future(client.encode([np.zeros((8, 8, 3), np.uint8)]))
        await asyncio.sleep(0.05)
        client._dispatch(SERVER.encode(REPLIES["error"]))
        client._dispatch(SERVER.encode(REPLIES["error"]))
        with pytest.raises(Exception, match="overloaded"):
            await request
        assert len(client.stray_replies) == 1 and "overloaded" in client.stray_replies[0]
        await client.close()
        router.close(0)

    asyncio.run(run())
