"""A client process for the soak's kill-client fault: it takes results without releasing them,
queues more requests, says "holding" and waits to be killed.

    python -m vitserve.soak.victim ENDPOINT
"""

from __future__ import annotations

import asyncio
import sys

import numpy as np

from vitserve.client import AsyncClient
from vitserve.engine.errors import EngineError


async def main(endpoint: str) -> None:
    client = AsyncClient(endpoint)
    await client.connect()
    rng = np.random.default_rng()
    images = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(8)]
    held = []  # results it never releases
    for image in images[:2]:
        try:
            held.append(await client.encode([image]))
        except EngineError:  # e.g. overloaded by the soak's own burst: it holds what it got
            pass
    queued = [asyncio.ensure_future(client.encode([image])) for image in images[2:]]
    await asyncio.sleep(0)
    await client.stats()  # the queued ones were admitted
    print("holding", flush=True)
    await asyncio.Event().wait()  # until killed
    del held, queued


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
