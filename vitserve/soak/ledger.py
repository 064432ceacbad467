"""What the soak run saw: every request's one outcome, latencies, faults, and the violations found.

A request ends exactly once when its encode call returns a result or raises an EngineError with a
known code; one that does not end within its hang limit is a violation, and so is any reply the
client could not match to a waiting request (a second reply). Results of the same input must agree
within a tolerance: the first result of each input is its reference.
"""

from __future__ import annotations

import statistics
import typing
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from vitserve.ipc.messages import ErrorCode

KNOWN_CODES = frozenset(typing.get_args(ErrorCode))
# Relative tolerance of repeated inputs: windows pack an item with different neighbours, and in
# half precision matmul tiling then differs in the last bits.
TOLERANCE = {"float32": 1e-4, "bfloat16": 5e-2, "float16": 2e-2}


@dataclass
class Ledger:
    dtype: str = "float32"
    sent: int = 0
    outcomes: Counter = field(default_factory=Counter)  # "result", "cancelled" or an error code -> count
    latencies_ms: list[float] = field(default_factory=list)  # of results
    faults: Counter = field(default_factory=Counter)  # kind -> injected
    violations: list[str] = field(default_factory=list)
    compared: int = 0  # results checked against an earlier result of the same input
    _references: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)  # (input, item) -> embeddings

    @property
    def ended(self) -> int:
        return sum(self.outcomes.values())

    def result(self, latency_ms: float) -> None:
        self.outcomes["result"] += 1
        self.latencies_ms.append(latency_ms)

    def error(self, code: str, message: str) -> None:
        self.outcomes[code] += 1
        if code not in KNOWN_CODES:
            self.violate(f"an error with an unknown code {code!r}: {message}")

    def violate(self, what: str) -> None:
        if len(self.violations) < 100:  # the first ones say enough
            self.violations.append(what)

    def check_repeat(self, input_index: int, item: int, embeddings: np.ndarray) -> None:
        """The first result of an input is kept; later ones must agree with it."""
        key = (input_index, item)
        reference = self._references.get(key)
        if reference is None:
            self._references[key] = np.array(embeddings, dtype=np.float32)
            return
        self.compared += 1
        if reference.shape != embeddings.shape:
            self.violate(f"input {input_index} item {item}: shape {embeddings.shape}, earlier {reference.shape}")
            return
        scale = max(float(np.abs(reference).max()), 1e-6)
        error = float(np.abs(embeddings.astype(np.float32) - reference).max()) / scale
        if error > TOLERANCE.get(self.dtype, 5e-2):
            self.violate(f"input {input_index} item {item}: differs from its earlier result by {error:.3g} "
                         f"(relative), over {TOLERANCE.get(self.dtype, 5e-2):g}")

    def percentile(self, q: int) -> float:
        if len(self.latencies_ms) < 2:
            return float("nan")
        return statistics.quantiles(self.latencies_ms, n=100)[q - 1]

    def progress(self) -> dict[str, object]:
        """The live progress line's fields."""
        errors = self.ended - self.outcomes["result"] - self.outcomes["cancelled"]
        return {"sent": self.sent, "ok": self.outcomes["result"], "err": errors, "faults": sum(self.faults.values()),
                "violations": len(self.violations)}
