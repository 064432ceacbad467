"""The soak's summary table (markdown, so that it can go into notes as it is)."""

from __future__ import annotations

from .ledger import Ledger
from .resources import Footprint


def summary(config, ledger: Ledger, seconds: float, start: Footprint | None, end: Footprint | None) -> str:
    rows = [
        ("duration", f"{seconds:.0f} s of load at {config.rate:g} req/s ({config.workload}, {config.clients} clients)"),
        ("requests", f"{ledger.sent} sent, {ledger.ended} ended"),
    ]
    rows += [(f"outcome: {code}", str(count)) for code, count in sorted(ledger.outcomes.items())]
    rows += [(f"fault: {kind}", str(count)) for kind, count in sorted(ledger.faults.items())]
    rows += [
        ("latency of results", f"p50 {ledger.percentile(50):.1f} ms, p99 {ledger.percentile(99):.1f} ms"),
        ("repeated inputs compared", str(ledger.compared)),
    ]
    if start is not None and end is not None:
        rows += [
            ("baseline", "settled after one round of every fault (or after the warm-up)"),
            ("engine + workers RSS", f"{start.rss_mib:.0f} MiB at start, {end.rss_mib:.0f} MiB at end (engine "
                                     f"{start.engine_rss_mib:.0f}, {end.engine_rss_mib:.0f}; growth allowed: "
                                     f"{config.growth.rss_mib:.0f})"),
            ("GPU memory used", "n/a" if start.gpu_mib is None or end.gpu_mib is None else
             f"{start.gpu_mib:.0f} MiB at start, {end.gpu_mib:.0f} MiB at end (growth allowed: "
             f"{config.growth.gpu_mib:.0f})"),
            ("output slabs", f"{_files(start.shm_files)}, {start.shm_mib:.0f} MiB at start; "
                               f"{_files(end.shm_files)}, {end.shm_mib:.0f} MiB at end (growth allowed: none)"),
        ]
    rows.append(("violations", str(len(ledger.violations))))
    width = max(len(name) for name, _ in rows)
    lines = ["", f"| {'what'.ljust(width)} | value |", f"| {'-' * width} | --- |"]
    lines += [f"| {name.ljust(width)} | {value} |" for name, value in rows]
    lines += [f"violation: {problem}" for problem in ledger.violations]
    lines.append("soak: " + ("FAILED" if ledger.violations else "passed"))
    return "\n".join(lines)


def _files(count: int) -> str:
    return f"{count} file" if count == 1 else f"{count} files"
