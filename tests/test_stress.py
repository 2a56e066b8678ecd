"""The stress script, run in full only on request: ``pytest -m slow tests/test_stress.py``."""

from __future__ import annotations

import pytest

from benchmarks.stress import stress


@pytest.mark.slow
def test_stress_200_jobs_8_threads_clean():
    report = stress(jobs=200, threads=8, device="CPU")
    assert report["hung_threads"] == 0
    assert report["failures"] == {}
    assert report["completed"] == report["correct"] > 100
    assert report["expected_errors"].get("UnboundParameterError", 0) > 0
    assert report["leftover_traced_bytes"] < 4_000_000
