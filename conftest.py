"""Project-wide pytest set-up: the ``gpu`` marker skips where no GPU is usable."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if not gpu_items:
        return
    from gpu_provider.engine.devices import probe_gpu

    probe = probe_gpu()
    if probe.usable:
        return
    skip = pytest.mark.skip(reason=f"no usable GPU: {probe.reason}")
    for item in gpu_items:
        item.add_marker(skip)
