"""Fixtures shared by the tests: the device each correctness test runs on."""

from __future__ import annotations

import pytest

from tests.helpers import DEVICES, make_backend


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    """"CPU", and "GPU" (marked ``gpu``: skipped where no GPU is usable)."""
    return request.param


@pytest.fixture
def backend(device):
    """A fresh backend pinned to ``device``."""
    return make_backend(device)
