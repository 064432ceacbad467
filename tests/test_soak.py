"""`vitserve soak`: a 60-second CPU soak with every fault passes; and the checks it relies on find
what they are meant to find."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest

from vitserve.soak import SoakConfig
from vitserve.choices import SOAK_FAULTS as FAULTS
from vitserve.soak.ledger import Ledger
from vitserve.soak.report import summary
from vitserve.soak.resources import Footprint, Growth


def test_a_60_second_cpu_soak_with_every_fault_passes():
    command = [sys.executable, "-m", "vitserve.cli", "soak", "--duration", "60", "--rate", "12",
               "--fault-interval", "6", "--overload-burst", "300", "--min-budget", "64", "--max-budget", "512"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr[-4000:]
    out = done.stdout
    assert "soak: passed" in out and "violation:" not in out
    for fault in FAULTS:  # each injected at least once, and possible when it was due
        assert re.search(rf"\| fault: {fault} +\| [1-9]", out), out
    sent, ended = map(int, re.search(r"\| requests +\| (\d+) sent, (\d+) ended", out).groups())
    assert sent == ended > 600
    assert re.search(r"\| outcome: result +\| \d{3,}", out)
    assert re.search(r"\| repeated inputs compared +\| [1-9]", out)
    assert "soak" in done.stderr  # the progress line


def test_unknown_codes_hangs_and_differing_repeats_are_violations():
    ledger = Ledger()
    ledger.error("overloaded", "queue full")
    assert ledger.violations == []
    ledger.error("oops", "what")
    assert "unknown code 'oops'" in ledger.violations[0]
    embeddings = np.random.default_rng(0).normal(size=(4, 8)).astype(np.float32)
    ledger.check_repeat(0, 0, embeddings)
    ledger.check_repeat(0, 0, embeddings + 1e-6)
    assert ledger.compared == 1 and len(ledger.violations) == 1
    ledger.check_repeat(0, 0, embeddings * 1.5)
    ledger.check_repeat(0, 0, embeddings[:2])
    assert len(ledger.violations) == 3 and "differs" in ledger.violations[1] and "shape" in ledger.violations[2]


def test_growth_beyond_the_allowance_and_slabs_left_are_violations():
    growth = Growth(rss_mib=100, gpu_mib=100)
    start = Footprint(rss_mib=1000, engine_rss_mib=400, gpu_mib=5000, shm_mib=64, shm_files=1)
    assert growth.violations(start, Footprint(1090, 400, 5090, 64, 1)) == []
    problems = growth.violations(start, Footprint(1200, 500, 5200, 128, 2))
    assert len(problems) == 3 and "resident" in problems[0] and "GPU" in problems[1] and "output slabs" in problems[2]


def test_the_summary_lists_outcomes_faults_and_violations():
    ledger = Ledger()
    ledger.sent = 3
    ledger.result(10.0)
    ledger.result(30.0)
    ledger.error("worker_failed", "lost")
    ledger.faults["kill-worker"] += 1
    ledger.violate("something leaked")
    text = summary(SoakConfig(), ledger, 60.0, Footprint(1, 1, None, 2, 1), Footprint(1, 1, None, 2, 1))
    assert "| output slabs" in text and "1 file, 2 MiB at start; 1 file, 2 MiB at end" in text
    assert "GPU memory used" in text and "n/a" in text and "growth allowed: 256)" in text
    assert re.search(r"\| outcome: worker_failed +\| 1 \|", text) and "| fault: kill-worker" in text
    assert "violation: something leaked" in text and text.endswith("soak: FAILED")


@pytest.mark.parametrize(("changes", "message"), [
    ({"faults": ("kill-everything",)}, "unknown faults"),
    ({"endpoint": "tcp://10.0.0.1:5555", "faults": ("kill-worker",)}, "ipc://"),
    ({"rate": 0}, "rate"),
    ({"clients": 0}, "clients"),
])
def test_soak_settings_are_checked(changes, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        SoakConfig(**changes)
