"""`vitserve soak`: mixed load with faults against a live engine, checking that every request ends
exactly once, that repeated inputs give the same embeddings, and that nothing leaks.

The run: connect (or start `vitserve serve` first); encode every distinct input once (their
references); sample the engine's footprint; send Poisson arrivals from several clients for the
duration while injecting one fault every interval, showing a progress line; wait for every
request to end, for the workers to be back and for every slot to be free; sample the footprint
again; print a summary table. The exit status is 1 when anything was violated.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from dataclasses import dataclass, field

from tqdm import tqdm

from vitserve.bench.workloads import make_requests
from vitserve.choices import SOAK_FAULTS
from vitserve.client import AsyncClient
from vitserve.engine.errors import EngineError

from . import faults
from .hostile import hostile_clients
from .ledger import Ledger
from .report import summary
from .resources import Footprint, Growth, footprint, gpu_indices
from .served import ServedEngine

COMPARED_ROWS = 32  # rows of each result compared with the input's first result
SETTLE_S = 60.0  # after the load: time for restarts to finish and every slot to come back


@dataclass(frozen=True)
class SoakConfig:
    endpoint: str | None = None  # None: start an engine of our own
    serve_flags: tuple[str, ...] = ()  # for our own engine: model, devices, budgets...
    duration_s: float = 60.0
    rate: float = 20.0  # requests per second, Poisson
    workload: str = "small-mix"
    distinct: int = 32  # distinct inputs; requests repeat them, so results can be compared
    clients: int = 4
    deadline_ms: float | None = None
    faults: tuple[str, ...] = SOAK_FAULTS
    fault_interval_s: float = 10.0
    overload_burst: int = 400
    hang_s: float = 300.0  # a request not ended after this long is a violation
    growth: Growth = field(default_factory=Growth)
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = set(self.faults) - set(SOAK_FAULTS)
        if unknown:
            raise ValueError(f"unknown faults {sorted(unknown)}: choose from {', '.join(SOAK_FAULTS)}")
        for name in ("duration_s", "rate", "fault_interval_s", "hang_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("distinct", "clients", "overload_burst"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)!r}")
        remote = self.endpoint is not None and not self.endpoint.startswith("ipc://")
        if remote and faults.LOCAL_ONLY & set(self.faults):
            raise ValueError(f"faults {sorted(faults.LOCAL_ONLY & set(self.faults))} need the engine's processes on "
                             f"this host: use an ipc:// endpoint, or leave them out of the faults")


class Soak:
    def __init__(self, config: SoakConfig, endpoint: str, clients: list[AsyncClient]):
        self.config = config
        self.endpoint = endpoint
        self.clients = clients
        self.ledger = Ledger(dtype=clients[0].model.dtype)
        self.requests = make_requests(config.workload, config.distinct, config.seed)
        self.rng = random.Random(config.seed)
        self.tasks: list[asyncio.Task] = []
        self.baseline: Footprint | None = None  # footprint once every fault has happened once, settled
        self.paused_s = 0.0  # arrivals paused for the baseline
        self._next_client = itertools.cycle(clients)

    def send(self, index: int, cancel_after_s: float | None = None) -> None:
        self.ledger.sent += 1
        self.tasks.append(asyncio.ensure_future(self._one(next(self._next_client), index, cancel_after_s)))

    async def _one(self, client: AsyncClient, index: int, cancel_after_s: float | None) -> None:
        began = time.perf_counter()
        limit = self.config.hang_s if cancel_after_s is None else cancel_after_s
        try:
            result = await asyncio.wait_for(client.encode(self.requests[index], self.config.deadline_ms), limit)
        except EngineError as err:
            self.ledger.error(err.code, err.message)
            return
        except asyncio.TimeoutError:
            if cancel_after_s is None:
                self.ledger.violate(f"a request of input {index} did not end within {limit:g} s")
            self.ledger.outcomes["cancelled"] += 1
            return
        with result:
            self.ledger.result((time.perf_counter() - began) * 1e3)
            for item, encoded in enumerate(result.items):  # a spread of rows: large items are megabytes
                rows = encoded.embeddings.shape[0]
                sampled = encoded.embeddings[::max(1, rows // COMPARED_ROWS)]  # (≤ 2 × COMPARED_ROWS, out_hidden)
                self.ledger.check_repeat(index, item, sampled.float().numpy())

    async def inject(self, kind: str) -> None:
        match kind:
            case "kill-worker":
                done = await faults.kill_worker(self.clients[0], self.rng)
            case "kill-client":
                done = await faults.kill_client(self.endpoint, self.rng, self.ledger)
            case "cancel":
                for _ in range(8):
                    self.send(self.rng.randrange(len(self.requests)), cancel_after_s=self.rng.uniform(0.0, 0.05))
                done = True
            case "bad-input":
                done = await faults.bad_input(self.endpoint, self.ledger)
            case "overload":
                for _ in range(self.config.overload_burst):
                    self.send(self.rng.randrange(len(self.requests)))
                done = True
            case "hostile":
                done = await hostile_clients(self.endpoint, self.ledger)
        self.ledger.faults[kind if done else f"{kind} (not possible then)"] += 1

    async def load(self, progress: tqdm, workers: int, gpus: list[int] | None) -> None:
        """Poisson arrivals for the duration, with a fault every interval. After the first round of
        faults, arrivals pause until the engine settles, for the baseline footprint: the first
        restart, burst and killed client raise memory high-water marks once, and a leak is what
        grows after that."""
        config, loop = self.config, asyncio.get_running_loop()
        began = loop.time()
        kinds = itertools.cycle(config.faults) if config.faults else None
        next_arrival, next_fault, next_tick = began, began + config.fault_interval_s, began + 1.0
        injecting: list[asyncio.Task] = []
        while (now := loop.time()) < began + config.duration_s:
            while next_arrival <= now:
                self.send(self.rng.randrange(len(self.requests)))
                next_arrival += self.rng.expovariate(config.rate)
            if kinds is not None and next_fault <= now:
                injecting.append(asyncio.ensure_future(self.inject(next(kinds))))
                next_fault += config.fault_interval_s
                if len(injecting) == len(config.faults):
                    paused = loop.time()
                    await asyncio.gather(*injecting, *self.tasks)
                    await self.settled(workers)
                    self.baseline = await self.sample(gpus) or self.baseline
                    shift = loop.time() - paused  # the pause does not count as load
                    self.paused_s += shift
                    began, next_arrival, next_fault, next_tick = (t + shift for t in (began, next_arrival, next_fault,
                                                                                        next_tick))
            if next_tick <= now:
                progress.update(1)
                progress.set_postfix(self.ledger.progress() | {"p50_ms": f"{self.ledger.percentile(50):.0f}"})
                next_tick += 1.0
            await asyncio.sleep(max(0.0, min(next_arrival, next_fault, next_tick) - loop.time()))
        await asyncio.gather(*injecting)
        await asyncio.gather(*self.tasks)
        progress.update(progress.total - progress.n)
        progress.set_postfix(self.ledger.progress() | {"p50_ms": f"{self.ledger.percentile(50):.0f}"})

    async def settled(self, workers: int) -> dict:
        """Stats once the workers are all back and nothing is open, queued, in flight or leased."""
        client, deadline = self.clients[0], time.monotonic() + SETTLE_S
        while True:
            stats, health = await client.stats(), await client.health()
            idle = all(stats.get(k, 0) == 0 for k in ("requests_open", "queued_items", "windows_in_flight", "slots_leased",
                                                      "workers_warming", "standby_loading"))
            if idle and health.workers_ready == workers:
                return stats
            if time.monotonic() > deadline:
                self.ledger.violate(f"{SETTLE_S:g} s after the load the engine had not settled: {health.workers_ready} "
                                    f"of {workers} workers ready, stats {stats}")
                return stats
            await asyncio.sleep(0.1)

    async def sample(self, gpus: list[int] | None) -> Footprint | None:
        if not self.endpoint.startswith("ipc://"):
            return None  # the engine may be on another host
        health = await self.clients[0].health()
        return footprint(health.pid, health.worker_pids, gpus)

    async def run(self, gpus: list[int] | None) -> tuple[float, Footprint | None, Footprint | None]:
        """Warm up, sample, load with faults, settle, sample: (seconds of load, footprints)."""
        workers = (await self.clients[0].health()).workers
        for index in range(len(self.requests)):  # references for every distinct input, before any fault
            self.send(index)
        await asyncio.gather(*self.tasks)
        await self.settled(workers)
        self.baseline = await self.sample(gpus)
        began = time.perf_counter()
        with tqdm(total=int(self.config.duration_s), unit="s", desc="soak", dynamic_ncols=True) as progress:
            await self.load(progress, workers, gpus)
        seconds = time.perf_counter() - began - self.paused_s
        await self.settled(workers)
        start, end = self.baseline, await self.sample(gpus)
        for client in self.clients:
            for reply in client.stray_replies:
                self.ledger.violate(f"a reply matched no waiting request of {client.name}: {reply}")
        if start is not None and end is not None:
            for problem in self.config.growth.violations(start, end):
                self.ledger.violate(problem)
        return seconds, start, end


async def soak(config: SoakConfig) -> int:
    """Run the soak; the exit status: 0 when nothing was violated."""
    served = None if config.endpoint else await ServedEngine.start(config.serve_flags)
    endpoint = config.endpoint or served.endpoint
    clients = [AsyncClient(endpoint, name=f"soak-{i}") for i in range(config.clients)]
    try:
        for client in clients:
            await client.connect()
        run = Soak(config, endpoint, clients)
        seconds, start, end = await run.run(gpu_indices(served.devices) if served else None)
    finally:
        for client in clients:
            await client.close()
        problems = await served.stop() if served is not None else []
    for problem in problems:
        run.ledger.violate(problem)
    print(summary(config, run.ledger, seconds, start, end))
    return 1 if run.ledger.violations else 0
