"""What the engine says of itself: its counters (`stats`), whether it serves (`health`), and both with
its latencies and runs for an HTTP probe (`snapshot`).

A mixin of `Engine` (engine.py), which owns the state read here.
"""

from __future__ import annotations

import os

from vitserve.ipc.messages import Health

from .http_endpoint import Snapshot


class EngineReports:
    def stats(self) -> dict[str, float]:
        """Counts for health checks and tests: queue, requests not yet released, windows and slots in use."""
        return {
            "queued_items": float(len(self.scheduler.queue)) if self.scheduler else 0.0,
            "queued_tokens": float(self.scheduler.queue.tokens) if self.scheduler else 0.0,
            "requests_open": float(len(self._pending)),
            "windows_in_flight": float(len(self._windows)),
            "slots_leased": float(sum(p.total_slots - p.free_slots() for p in self._all_pools())),
            "slots_total": float(sum(p.total_slots for p in self._pools.values())),
            "windows_sent": float(self._windows_sent),
            "items_sent": float(self._items_sent),
            "worker_ms": self._worker_ms,
            "gpu_busy_ms": self._gpu_busy_ms,
            "leases_expired": float(self._leases_expired),
            "late_results": float(self._late_results),
            "workers_ready": float(self._workers_serving(self._unproven())),  # as health counts them
            "workers_warming": float(len(self._warming)),  # serving, graphs not all captured yet
            "standby_loading": float(len(self._standby) - len(self._standby_loaded)),  # standby processes
            "worker_restarts": float(self._worker_restarts),
            "windows_retried": float(self._windows_retried),
            "worker_hangs": float(self._worker_hangs),
            "probes_sent": float(self._probes_sent),
            "workers_unproven": float(len(self._unproven())),
            "internal_errors": float(self._internal_errors),
            "queued_bytes": float(self._queued_bytes),
            "replies_polled": float(self._busy_polling.replies_polled),  # busy_poll.py: found by polling
        } | (self.inputs.stats() if self.inputs is not None else {}) | self._kept_stats()

    def snapshot(self, stats: dict[str, float] | None = None, error_codes: dict[str, int] | None = None) -> Snapshot:
        """What an HTTP probe reads (engine/http_endpoint.py), taken on the engine's loop: `stats` (a
        frontend's, which include the engine's) or the engine's own, and the errors answered by code."""
        return Snapshot(self.stats() if stats is None else stats, self.health(), self.latencies.snapshot(),
                        dict(error_codes or {}), self.run_counts.snapshot())

    def health(self) -> Health:
        """Ready while admitting requests with a worker up that answers its readiness probes (probes.py);
        not while starting, shutting down or restarting. The detail names workers that stopped
        responding (hung) until they are back, and those that failed or have not answered a probe."""
        taking, unproven = self.workers_ready(), self._unproven()
        up = self._workers_serving(unproven)  # (the same count as the stats', in every state)
        if self._draining or self._closing:
            problems = ["shutting down"]
        elif not self.started:
            problems = ["starting: loading the model"]
        else:
            problems = [f"worker {w} is not responding" for w in sorted(self._hung)]
            problems += [unproven[w] for w in sorted(unproven)]
            problems += [f"worker {w} is capturing graphs (serving eagerly meanwhile)" for w in sorted(self._warming)]
            if taking:  # (with none up, the line below says it for all)
                problems += [f"worker {w} is {'restarting' if w in self._restarting else 'down'}"
                             for w, state in sorted(self.scheduler.workers.items())
                             if not state.ready and w not in self._hung]
            else:
                problems.append("no worker is up; restarting" if self._restarting else "no worker is up")
        ready = up > 0 and self.started and not (self._draining or self._closing)
        running = {h.worker: h.process.pid for h in self._handles if h.alive()}
        return Health(ready, up, len(self.config.devices), "; ".join(problems), list(running.values()), os.getpid(),
                      running)

    def _workers_serving(self, unproven: dict[int, str]) -> int:
        """Workers up whose readiness is proven (what health calls ready and the metric counts)."""
        if self.scheduler is None:
            return 0
        return sum(1 for w, state in self.scheduler.workers.items() if state.ready and w not in unproven)
