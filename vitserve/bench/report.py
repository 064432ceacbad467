"""Benchmark output: a table with ratios against Hugging Face eager, JSON, and a PNG plot."""

from __future__ import annotations

import json
from pathlib import Path

BASELINE = "hf-eager"


def table(result: dict) -> str:
    rows = result["rows"]
    baseline = {r["workload"]: r for r in rows if r["method"] == BASELINE}
    lines = [
        f"{result['model']} on {result['device']}, bf16, attention {result.get('attention')}; matmul {result['matmul_tflops']:.0f} TFLOP/s; "
        f"{result['capture']['graphs']} graphs captured in {result['capture']['seconds']:.1f} s "
        f"({result['capture']['graph_mib']:.0f} MiB graphs, {result['capture']['buffer_mib']:.0f} MiB buffers)",
        f"{'workload':<11} {'method':<16} {'mean ms':>8} {'p50 ms':>8} {'p99 ms':>8} {'floor ms':>8} "
        f"{'p50/floor':>9} {'img/s':>8} {'TFLOP/s':>8} {'x HF lat':>8} {'x HF thr':>8}",
    ]
    for r in rows:
        base = baseline.get(r["workload"])
        lat = f"{base['p50_ms'] / r['p50_ms']:.2f}" if base else "-"
        thr = f"{r['images_per_s'] / base['images_per_s']:.2f}" if base else "-"
        lines.append(
            f"{r['workload']:<11} {r['method']:<16} {r['mean_ms']:8.2f} {r['p50_ms']:8.2f} {r['p99_ms']:8.2f} "
            f"{r['floor_ms']:8.2f} {r['p50_ms'] / r['floor_ms']:9.2f} {r['images_per_s']:8.1f} "
            f"{r['tflops']:8.0f} {lat:>8} {thr:>8}"
        )
    for method, why in result["failures"].items():
        lines.append(f"{method}: not measured ({why})")
    for workload, stats in result["graph_stats"].items():
        lines.append(f"graphs on {workload}: {stats}")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    workloads = list(dict.fromkeys(r["workload"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    figure, (latency, throughput) = plt.subplots(1, 2, figsize=(13, 4.5))
    width = 0.8 / len(methods)
    for i, method in enumerate(methods):
        by_workload = {r["workload"]: r for r in rows if r["method"] == method}
        xs = [w + i * width for w in range(len(workloads))]
        latency.bar(xs, [by_workload.get(w, {}).get("p50_ms", 0) for w in workloads], width, label=method)
        throughput.bar(xs, [by_workload.get(w, {}).get("images_per_s", 0) for w in workloads], width, label=method)
    floors = {r["workload"]: r["floor_ms"] for r in rows}
    latency.scatter([w + 0.4 - width / 2 for w in range(len(workloads))], [floors[w] for w in workloads],
                    marker="_", s=400, color="black", label="compute floor", zorder=3)
    for axis, title in ((latency, "p50 latency per request (ms, log)"), (throughput, "images/s at saturation")):
        axis.set_xticks([w + 0.4 - width / 2 for w in range(len(workloads))], workloads)
        axis.set_title(title)
    latency.set_yscale("log")
    latency.legend(fontsize=8)
    figure.suptitle(f"{result['model']} on {result['device']}")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    return path


def paired_bars(path: Path, workloads: list[str], bars: tuple[list[float], list[float]], labels: tuple[str, str],
                notes: list[str], title: str) -> Path:
    """Two bars per workload (a baseline, then what is compared with it), a note over the second."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 4.5))
    xs = range(len(workloads))
    axis.bar([x - 0.2 for x in xs], bars[0], 0.4, label=labels[0])
    axis.bar([x + 0.2 for x in xs], bars[1], 0.4, label=labels[1])
    for x, value, note in zip(xs, bars[1], notes):
        axis.annotate(note, (x + 0.2, value), ha="center", va="bottom", fontsize=8)
    axis.set_xticks(list(xs), workloads)
    axis.set_title(title)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    return path


def write(result: dict, directory: Path, stem: str = "bench", table=table, plot=plot) -> list[Path]:
    """`stem`.json, .txt (`table(result)`) and .png (`plot(result, path)`, when matplotlib is there)."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = [directory / f"{stem}.json", directory / f"{stem}.txt"]
    paths[0].write_text(json.dumps(result, indent=2))
    paths[1].write_text(table(result) + "\n")
    try:
        paths.append(plot(result, directory / f"{stem}.png"))
    except ImportError:
        pass  # matplotlib is optional (pip install 'vitserve[bench]')
    return paths
