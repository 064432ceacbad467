"""The measured cost model is kept on disk: a later start with the same model, device and window
settings reuses it (no seconds of measuring), other settings measure their own, and a damaged
entry is measured again and replaced."""

from __future__ import annotations

import asyncio
import json

from vitserve import Engine, EngineConfig
from vitserve.workers import WindowConfig


def started_cost(cache_dir, window: WindowConfig):
    async def run():
        async with Engine(EngineConfig(window=window, cache_dir=cache_dir and str(cache_dir))) as engine:
            return engine.ready.cost

    return asyncio.run(run())


def test_a_later_start_reuses_the_kept_cost_model_and_other_settings_measure_their_own(tmp_path):
    window = WindowConfig(min_budget=64, max_budget=512)
    first = started_cost(tmp_path, window)
    (entry,) = (tmp_path / "cost").glob("*.json")
    kept = json.loads(entry.read_text())
    assert kept["attention_ms_per_token2"] == first.attention_ms_per_token2
    assert started_cost(tmp_path, window) == first  # timings measured again would not be bit-equal

    other = started_cost(tmp_path, WindowConfig(min_budget=64, max_budget=1024))
    assert len(list((tmp_path / "cost").glob("*.json"))) == 2
    assert {b for b, _, _ in other.padded_base_ms} != {b for b, _, _ in first.padded_base_ms}

    entry.write_text("{not json")
    measured = started_cost(tmp_path, window)
    assert measured != first and json.loads(entry.read_text())["padded_base_ms"] == [
        list(row) for row in measured.padded_base_ms]


def test_no_cache_dir_keeps_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "elsewhere"))
    monkeypatch.chdir(tmp_path)
    started_cost(None, WindowConfig(min_budget=64, max_budget=512))
    assert list(tmp_path.iterdir()) == []
