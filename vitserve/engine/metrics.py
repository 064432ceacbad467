"""The engine's counters and gauges as Prometheus metrics: one table from each stat the engine keeps
(what `client.stats()` returns) to a metric name, type and help line. A scrape reads one snapshot
of them (engine/http_endpoint.py): nothing is recorded per item for it."""

from __future__ import annotations

from typing import Iterator, Mapping

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from .latencies import COUNTS, STAGES

PREFIX = "vitserve_"
SCALES = {"_ms": 1e-3}  # stats kept in milliseconds are exported in seconds, as Prometheus names them

# stat -> (metric name without the prefix, counter or gauge, help)
METRICS: dict[str, tuple[str, str, str]] = {
    "requests": ("requests", "counter", "Encode and lookup requests received"),
    "results": ("results", "counter", "Encode and lookup requests answered with their outputs"),
    "errors": ("errors", "counter", "Requests and messages answered with a coded error"),
    "replies_dropped": ("replies_dropped", "counter", "Replies that could not be sent (closed or full connection)"),
    "connections_opened": ("connections_opened", "counter", "Client connections accepted"),
    "connections_refused": ("connections_refused", "counter", "Client connections refused or shut"),
    "slabs_granted": ("slabs_granted", "counter", "Shared-memory slabs handed to local clients"),
    "slab_asks_refused": ("slab_asks_refused", "counter", "Slab requests refused"),
    "connections": ("connections", "gauge", "Client connections open"),
    "queued_items": ("queued_items", "gauge", "Items waiting for a window"),
    "queued_tokens": ("queued_tokens", "gauge", "Patch tokens of the items waiting for a window"),
    "requests_open": ("requests_open", "gauge", "Requests admitted and not yet released"),
    "windows_in_flight": ("windows_in_flight", "gauge", "Windows sent to workers and not yet done"),
    "slots_leased": ("output_slots_leased", "gauge", "Shared-memory output slots held by windows and results (a lost worker's too, until its results are released)"),
    "slots_total": ("output_slots", "gauge", "Shared-memory output slots of the workers up, leased or free"),
    "windows_sent": ("windows", "counter", "Windows sent to workers"),
    "items_sent": ("window_items", "counter", "Items sent to workers in windows"),
    "worker_ms": ("worker_seconds", "counter", "Time workers spent on windows, from receipt to reply"),
    "gpu_busy_ms": ("device_busy_seconds", "counter", "Time the devices spent running windows (CUDA events: 0 "
                    "for CPU workers)"),
    "leases_expired": ("leases_expired", "counter", "Results reclaimed because they were not released in time"),
    "late_results": ("late_results", "counter", "Results delivered after their request's deadline (a deadline miss "
                     "that still succeeded; those failed for it count as errors with code deadline_exceeded)"),
    "workers_ready": ("workers_ready", "gauge", "Workers up whose readiness probes pass (as health counts them)"),
    "workers_warming": ("workers_warming", "gauge", "Workers serving eagerly while they capture graphs"),
    "standby_loading": ("standby_loading", "gauge", "Standby worker processes still loading the model"),
    "worker_restarts": ("worker_restarts", "counter", "Workers started again after they were lost"),
    "windows_retried": ("windows_retried", "counter", "Windows sent again after their worker was lost"),
    "worker_hangs": ("worker_hangs", "counter", "Workers found silent past their heartbeat"),
    "probes_sent": ("readiness_probes", "counter", "Readiness probes sent to workers that had no window lately"),
    "workers_unproven": ("workers_unproven", "gauge", "Workers up whose readiness probe failed or is overdue, or whose windows are long overdue"),
    "internal_errors": ("internal_errors", "counter", "Faults of the engine contained to one request"),
    "queued_bytes": ("queued_input_bytes", "gauge", "Input bytes of unfinished requests"),
    "replies_polled": ("replies_polled", "counter", "Window replies that came while the engine polled for them "
                       "(busy_poll_ms), of vitserve_windows_total"),
    "input_slab_free_bytes": ("input_slab_free_bytes", "gauge", "Free bytes of the engine's input slab"),
    "input_arenas": ("input_arenas", "gauge", "Clients' input arenas mapped"),
    "input_arenas_refused": ("input_arenas_refused", "counter", "Input arenas refused to clients"),
    "kept_items": ("kept_items", "gauge", "Items kept under a name"),
    "kept_rows": ("kept_rows", "gauge", "Output rows held by kept items"),
    "kept_lookups": ("kept_lookups", "counter", "Lookups of kept items"),
    "kept_hits": ("kept_hits", "counter", "Lookups that found their item"),
    "kept_expired": ("kept_expired", "counter", "Kept items forgotten at their timeout"),
    "kept_evicted": ("kept_evicted", "counter", "Kept items forgotten to make room"),
}


def metric_families(taken) -> Iterator[Metric]:
    """A snapshot (http_endpoint.Snapshot) as metric families."""
    up = GaugeMetricFamily(PREFIX + "ready", "1 when the engine admits requests with a worker up, else 0")
    up.add_metric([], 1.0 if taken.health.ready else 0.0)
    yield up
    by_code = CounterMetricFamily(PREFIX + "request_errors", "Errors answered, by their code", labels=["code"])
    for code, count in sorted(taken.error_codes.items()):
        by_code.add_metric([code], count)
    yield by_code
    runs, tokens, padding = taken.runs.runs, taken.runs.tokens, taken.runs.padding
    by_path = CounterMetricFamily(PREFIX + "runs", "Forward runs of the workers, by budget (0: unpadded) and path: "
                                  "graph, padded (the graph's buffers run eagerly) or why it ran eagerly",
                                  labels=["budget", "path"])
    for (budget, path), count in sorted(runs.items()):
        by_path.add_metric([str(budget), path], count)
    yield by_path
    yield CounterMetricFamily(PREFIX + "run_tokens", "Patch tokens the workers ran, padding not counted", value=tokens)
    yield CounterMetricFamily(PREFIX + "padding_tokens", "Padding tokens run to fill graph budgets", value=padding)
    windows = CounterMetricFamily(PREFIX + "worker_windows", "Windows each worker answered", labels=["worker"])
    busy = CounterMetricFamily(PREFIX + "worker_device_busy_seconds", "Device time each worker's windows kept busy "
                               "(CUDA events: 0 for CPU workers)",
                               labels=["worker"])
    for worker, count in sorted(taken.runs.worker_windows.items()):
        windows.add_metric([str(worker)], count)
        busy.add_metric([str(worker)], taken.runs.worker_busy_ms.get(worker, 0.0) / 1e3)
    yield windows
    yield busy
    yield from _histograms(taken.latencies)
    yield from _stats(taken.stats)


def _histograms(histograms: Mapping[str, tuple[tuple[float, ...], list[int], float]]) -> Iterator[Metric]:
    for name, (bounds, cumulative, total) in histograms.items():
        labels = [*(f"{bound:g}" for bound in bounds), "+Inf"]
        metric, text = (f"{name}_seconds", STAGES[name]) if name in STAGES else (name, COUNTS[name])
        yield HistogramMetricFamily(PREFIX + metric, text, buckets=list(zip(labels, cumulative)), sum_value=total)


def _stats(stats: Mapping[str, float]) -> Iterator[Metric]:
    for stat, value in stats.items():
        known = METRICS.get(stat)
        if known is None:  # a stat without a row here: still exported, as a gauge (a test keeps the table whole)
            known = (stat, "gauge", f"The engine's {stat}")
        name, kind, text = known
        scale = next((factor for suffix, factor in SCALES.items() if stat.endswith(suffix)), 1.0)
        family = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
        metric = family(PREFIX + name, text)
        metric.add_metric([], value * scale)
        yield metric
