"""The named workloads of DESIGN.md, as seeded synthetic requests."""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np

from .load import Job, jobs_of

ARENA_SIDES = (224, 336, 448, 672, 1008)
ARENA_WEIGHTS = (0.2, 0.3, 0.2, 0.2, 0.1)
SMALL_SIDES = (32, 64, 96, 128)
# mixed-slo: the share of interactive requests (one 448² image; the others are batches of twenty 336²),
# and each class's deadline and priority (in vitserve lower priorities go first, so the interactive
# class gets the more urgent one)
INTERACTIVE_SHARE = 0.7
CLASSES = {"interactive": (100.0, 0), "batch": (10_000.0, 1)}


@dataclass(frozen=True)
class Workload:
    name: str
    purpose: str
    named: bool = True  # one of DESIGN.md's benchmark workloads (`bench --workloads all` runs these)

    def request_shapes(self, rng: random.Random) -> list[tuple[int, ...]]:
        """Input shapes of one request: (H, W) images, (T, H, W) videos."""
        if self.name == "single-448":
            return [(448, 448)]
        if self.name == "arena-mix":
            count = rng.randint(1, 4)
            return [(s, s) for s in rng.choices(ARENA_SIDES, weights=ARENA_WEIGHTS, k=count)]
        if self.name == "many-336":
            return [(336, 336)] * 20
        if self.name == "video-448":
            return [(16, 448, 448)]
        if self.name == "small-mix":  # cheap enough for the tiny model on two CPU cores
            shapes = [(rng.choice(SMALL_SIDES), rng.choice(SMALL_SIDES)) for _ in range(rng.randint(1, 3))]
            return shapes + [(4, 64, 64)] if rng.random() < 0.1 else shapes
        raise ValueError(f"unknown workload {self.name!r}")


WORKLOADS = {
    w.name: w
    for w in (
        Workload("single-448", "latency floor of one small item"),
        Workload("arena-mix", "realistic mixed traffic"),
        Workload("many-336", "many small items per request"),
        Workload("video-448", "frames as attention sequences"),
        Workload("small-mix", "CPU soak and tests: 1-3 small images, sometimes a short video", named=False),
        Workload("mixed-slo", "flush policies: interactive single images (100 ms) among batches of twenty (10 s)",
                 named=False),
    )
}


def synthetic_item(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """A uint8 image (H, W, 3) or video (T, H, W, 3): a smooth gradient with noise."""
    *frames, height, width = shape
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], axis=-1)
    if frames:
        base = np.broadcast_to(base, (frames[0], height, width, 3))
    return np.clip(base + rng.normal(0, 16, base.shape), 0, 255).astype(np.uint8)


def make_jobs(name: str, count: int, deadline_ms: float | None, seed: int = 0) -> list[Job]:
    """Jobs of a workload: each with `deadline_ms`, except mixed-slo's, whose class sets deadline and priority."""
    requests = make_requests(name, count, seed)
    if name != "mixed-slo":
        return jobs_of(requests, deadline_ms)
    jobs = []
    for items in requests:
        kind = "interactive" if len(items) == 1 else "batch"
        jobs.append(Job(items, *CLASSES[kind], kind))
    return jobs


def make_requests(name: str, count: int, seed: int = 0) -> list[list[np.ndarray]]:
    workload = WORKLOADS[name]
    shapes_rng, pixel_rng = random.Random(seed), np.random.default_rng(seed)
    if name == "mixed-slo":  # the classes in their exact shares, in a seeded order
        batch = set(shapes_rng.sample(range(count), round((1 - INTERACTIVE_SHARE) * count)))
        shapes = [[(336, 336)] * 20 if index in batch else [(448, 448)] for index in range(count)]
    else:
        shapes = [workload.request_shapes(shapes_rng) for _ in range(count)]
    return [[synthetic_item(s, pixel_rng) for s in request] for request in shapes]
