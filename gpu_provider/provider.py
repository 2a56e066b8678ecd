"""``GPUProvider``: hands out :class:`~gpu_provider.GPUSimulator` backends."""

from __future__ import annotations

import logging

from qiskit.providers import QiskitBackendNotFoundError

from .backend import GPUSimulator

logger = logging.getLogger(__name__)

BACKEND_NAMES = ("gpu_simulator",)


class GPUProvider:
    """The provider of gpu_provider's simulators.

    ``backends(name=None, **filters)`` lists backends; a filter matches a backend
    attribute or option by value (``device="CPU"`` selects, and configures, a
    backend running on that device). ``get_backend(name=None, **filters)``
    returns the single match.
    """

    version = 1

    def __init__(self) -> None:
        self._cache: dict = {}

    def backends(self, name: str | None = None, **filters) -> list[GPUSimulator]:
        if name is not None and name not in BACKEND_NAMES:
            return []
        option_filters = {key: value for key, value in filters.items() if key in GPUSimulator._default_options()}
        backend = GPUSimulator(provider=self, **option_filters)
        for key, value in filters.items():
            if key in option_filters:
                continue
            if getattr(backend, key, object()) != value:
                return []
        return [backend]

    def get_backend(self, name: str | None = None, **filters) -> GPUSimulator:
        matches = self.backends(name, **filters)
        if not matches:
            raise QiskitBackendNotFoundError(
                f"no backend matches name={name!r} and filters {filters}; available: {list(BACKEND_NAMES)}"
            )
        return matches[0]

    def __repr__(self) -> str:
        return "GPUProvider()"
