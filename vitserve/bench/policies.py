"""`vitserve bench --compare-policies`: deadline-aware flushing against immediate dispatch and
against a fixed maximum delay (Triton's dynamic batcher), on one live engine and the same
arrivals.

A comparison of separate engines mixes the policies' effect with what differs between the
engines: graphs captured anew, costs learned anew, GPU clocks, a neighbour's load. Here one
engine serves every policy. The run is cut into rounds; each round draws one Poisson arrival
sequence and plays it once per policy, in an order that rotates from round to round, letting
the engine drain in between. Every policy thus sees the very same arrivals, and a slow drift
of the machine touches all of them alike. Miss rates come with a 95% upper bound (Wilson), so
that "at most 0.1%" is a claim about the policy, not about one lucky run.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import replace
from typing import Sequence

from .load import Job, LoadResult, closed_loop, open_loop, poisson_arrivals, until_settled

Z_95 = 1.959964  # two-sided 95% normal quantile


def wilson_upper(misses: int, trials: int, z: float = Z_95) -> float:
    """Upper end of the Wilson score interval of a binomial proportion (0..1)."""
    if trials == 0:
        return 1.0
    p = misses / trials
    centre = p + z * z / (2 * trials)
    spread = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials))
    return min(1.0, (centre + spread) / (1 + z * z / trials))


async def compare_policies(engine, jobs: Sequence[Job], load: float, seconds: float, policies: Sequence[str],
                           max_delay_ms: float, rounds: int = 4, saturation_requests: int = 400, seed: int = 0) -> dict:
    """Measure saturation once (closed loop, without deadlines), then play `rounds` Poisson arrival
    sequences at `load` x saturation, each through every policy on the started `engine`; `seconds`
    of arrivals per policy in all. Jobs of a class (mixed-slo) are also counted per class."""
    def encode(items, deadline, priority):
        return engine.encode(items, deadline, priority)

    await until_settled(engine.stats)  # graphs captured, standby loaded: full speed
    unbounded = [replace(job, deadline_ms=None) for job in jobs]
    await closed_loop(encode, unbounded, 64, 16)  # warm-up: first windows, learned costs
    saturation = await closed_loop(encode, unbounded, saturation_requests, 64, label="saturation")
    rate = load * saturation.completed / saturation.seconds
    segment = seconds / rounds
    totals = {policy: LoadResult(policy) for policy in policies}
    per_round: dict[str, list[float]] = {policy: [] for policy in policies}
    windows, items = Counter(), Counter()
    arrivals_sent = 0
    for round_index in range(rounds):
        arrivals = poisson_arrivals(rate, segment, seed + round_index)
        arrivals_sent += len(arrivals)
        shift = round_index % len(policies)
        for policy in [*policies[shift:], *policies[:shift]]:
            engine.scheduler.use_policy(policy, max_delay_ms)
            before = engine.stats()
            part = await open_loop(encode, jobs, arrivals, label=policy)  # returns drained
            after = engine.stats()
            windows[policy] += after["windows_sent"] - before["windows_sent"]
            items[policy] += after["items_sent"] - before["items_sent"]
            totals[policy].merge(part)
            per_round[policy].append(100.0 * part.misses / max(part.sent, 1))
    engine.scheduler.use_policy(policies[0])
    for total in totals.values():
        total.ended(segment * rounds)  # its classes' too
    rows = []
    for policy, total in totals.items():
        rows.append(total.row() | {
            "miss_pct_upper95": 100.0 * wilson_upper(total.misses, total.sent),
            "miss_pct_by_round": per_round[policy],
            "windows": windows[policy],
            "items_per_window": items[policy] / max(windows[policy], 1),
        })
    deadlines = sorted({job.deadline_ms for job in jobs}, key=lambda d: (d is None, d))
    return {"saturation_rps": saturation.completed / saturation.seconds, "rate_rps": rate, "load": load,
            "deadlines_ms": deadlines, "rounds": rounds, "arrivals": arrivals_sent,
            "scales": [worker.scale for worker in engine.scheduler.workers.values()], "policies": rows}


def policy_table(report: dict) -> str:
    lines = [f"open loop at {report['load']:.0%} of saturation ({report['saturation_rps']:.1f} req/s): "
             f"{report['rate_rps']:.1f} req/s, {report['arrivals']} arrivals per policy in {report['rounds']} "
             f"rounds on one engine, deadlines {report['deadlines_ms']} ms; "
             f"learned scale {max(report['scales']):.2f}",
             f"{'policy':<10} {'sent':>6} {'done':>6} {'miss %':>7} {'<=95%':>6} {'goodput/s':>10} {'img/s':>8} "
             f"{'p50 ms':>8} {'p99 ms':>8} {'items/win':>9}  miss % by round; errors"]
    for row in report["policies"]:
        rounds = " ".join(f"{m:.2f}" for m in row["miss_pct_by_round"])
        lines.append(f"{row['label']:<10} {row['sent']:>6} {row['completed']:>6} {row['miss_pct']:>7.2f} "
                     f"{row['miss_pct_upper95']:>6.2f} {row['goodput_rps']:>10.1f} {row['images_per_s']:>8.1f} "
                     f"{row['p50_ms']:>8.1f} {row['p99_ms']:>8.1f} {row['items_per_window']:>9.1f}  "
                     f"{rounds}; {row['errors'] or ''}")
        for kind, part in row.get("classes", {}).items():
            lines.append(f"  {kind:<12} {part['sent']:>4} {part['completed']:>6} {part['miss_pct']:>7.2f} "
                         f"{'':>6} {part['goodput_rps']:>10.1f} {part['images_per_s']:>8.1f} {part['p50_ms']:>8.1f} "
                         f"{part['p99_ms']:>8.1f}")
    return "\n".join(lines)

