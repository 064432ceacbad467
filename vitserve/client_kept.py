"""The client's side of kept items (engine/kept.py): find items by the names any client kept them
under, forget names, and read rows another process holds. A mixin of `AsyncClient` (client.py),
which owns the connection and `_exchange`."""

from __future__ import annotations

from typing import Sequence

from vitserve.ipc.messages import Forget, Lookup, OutputRef
from vitserve.ipc.outputs import Encoded, EncodedItem, encoded_from_refs


class ClientKeptItems:
    async def lookup(self, names: Sequence[str]) -> Encoded:
        """The items kept under these names (encode's `keep`, by any client), in order; None where
        nothing is kept under a name. Held, as a result is, until released."""
        request_id = next(self._ids)
        began = self._loop.time()
        await self._until_ready(self.timeout_s)
        return await self._exchange(request_id, Lookup(request_id, list(names), self.inline), [], self.timeout_s,
                                    began)

    def view(self, ref: OutputRef) -> EncodedItem:
        """The rows a reference names (a result's `refs`, perhaps another process's), viewing shared
        memory without holding them: valid while whoever has the result holds it (ipc:// only)."""
        if ref.frame >= 0:
            raise ValueError("an inline reference names a frame of another reply, not shared memory")
        return encoded_from_refs([ref], self._reader, None).items[0]

    async def forget(self, names: Sequence[str]) -> None:
        """Keep these names no longer (what a lookup holds stays readable until released)."""
        await self._until_ready(self.timeout_s)
        await self._transport.send(self._codec.encode(Forget(list(names))))
