"""EngineConfig and SlabPool settings go through the shared checks: each wrong value is refused
with the setting's name, the value and what to pass instead."""

from __future__ import annotations

import re

import pytest

from vitserve import EngineConfig
from vitserve.checks import check_int, check_seconds


@pytest.mark.parametrize(("setting", "message"), [
    ({"output_windows": 1}, "output_windows must be an integer >= 2, got 1: one window fills while clients read"),
    ({"output_windows": True}, "output_windows must be an integer >= 2, got True"),
    ({"max_item_tokens": 0}, "max_item_tokens must be an integer >= 1, got 0: or None"),
    ({"cpu_threads_per_worker": 1.5}, "cpu_threads_per_worker must be an integer >= 1, got 1.5"),
    ({"max_request_bytes": 0}, "max_request_bytes must be an integer >= 1, got 0"),
    ({"worker_restarts": -1}, "worker_restarts must be an integer >= 0, got -1: 0: a worker that dies stays down"),
    ({"lease_timeout_s": 0}, "lease_timeout_s must be a number of seconds > 0 (or None: leases never expire), got 0"),
    ({"lease_timeout_s": float("inf")}, "lease_timeout_s must be a number of seconds > 0"),
    ({"window_timeout_s": "60"}, "window_timeout_s must be a number of seconds > 0 (or None: no watchdog), got '60'"),
    ({"drain_timeout_s": -1}, "drain_timeout_s must be a number of seconds >= 0 (0: fail what is pending"),
    ({"drain_timeout_s": float("nan")}, "drain_timeout_s must be a number of seconds >= 0"),
    ({"startup_timeout_s": 0}, "startup_timeout_s must be a number of seconds > 0"),
])
def test_wrong_settings_are_refused_with_what_to_change(setting, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        EngineConfig(**setting)


def test_edge_values_that_are_allowed():
    config = EngineConfig(output_windows=2, worker_restarts=0, drain_timeout_s=0, lease_timeout_s=None,
                          window_timeout_s=None, max_item_tokens=None, cpu_threads_per_worker=None)
    assert config.drain_timeout_s == 0 and config.window_timeout_s is None


def test_checks_refuse_bools_and_allow_their_bounds():
    check_int("n", 0, 0, "hint")
    check_seconds("t", 0, "hint", zero_ok=True)
    check_seconds("t", None, "hint", none_ok=True)
    with pytest.raises(ValueError, match=r"n must be an integer >= 0, got False: hint"):
        check_int("n", False, 0, "hint")
    with pytest.raises(ValueError, match=r"t must be a number of seconds > 0 \(hint\), got True"):
        check_seconds("t", True, "hint")
    with pytest.raises(ValueError, match=r"t must be a number of seconds > 0 \(hint\), got None"):
        check_seconds("t", None, "hint")
