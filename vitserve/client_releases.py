"""What a client says back about its requests: cancels of those it gave up on, and releases of
results (gathered over one loop turn into one message). A mixin of `AsyncClient` (client.py),
which owns the socket, the loop and the connection's generation."""

from __future__ import annotations

import asyncio

from vitserve.ipc.messages import Cancel, Error, Found, Release, Result


class ClientReleases:
    def _give_up(self, request_id: int) -> None:
        """Stop waiting for a request: the engine cancels it, and a result that comes anyway is released."""
        self._cancelled.add(request_id)
        self._send_control(Cancel(request_id))

    def _releaser(self, request_id: int):
        loop, generation = self._loop, self._generation

        def release() -> None:  # may run in any thread, from garbage collection
            try:
                loop.call_soon_threadsafe(self._send_release, request_id, generation)
            except RuntimeError:
                pass  # the client's loop is closed; the engine frees the slots when the client goes

        return release

    def _send_release(self, request_id: int, generation: int | None = None) -> None:
        if generation is not None and generation != self._generation:
            return  # held on a connection since lost: the engine released it then
        if not self._releases:
            self._loop.call_soon(self._flush_releases)
        self._releases.append(request_id)

    def _flush_releases(self) -> None:
        ids, self._releases = self._releases, []
        self._send_control(Release(ids))

    def _send_control(self, message: Cancel | Release | list) -> None:
        """Small messages that must not wait (or frames already encoded): queued by ZeroMQ, or sent
        as soon as it has room (they are lost only with the socket or its connection)."""
        frames = message if isinstance(message, list) else self._codec.encode(message)
        if not self._transport.closed and not self._transport.send_now(frames):
            asyncio.ensure_future(self._transport.send(frames))

    def _unwanted(self, request_id: int, reply: Result | Found | Error) -> None:
        """The reply to a request given up on: a result that finished before the cancel is released."""
        if isinstance(reply, (Result, Found)):  # an inline one is released too: its bytes were received
            self._send_release(request_id)
