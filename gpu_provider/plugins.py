"""Plugins that host frameworks discover through entry points.

``qiskit_neko.backend_plugins`` (Qiskit's integration suite) loads
:class:`NekoBackendPlugin` with ``importlib.metadata`` and asks it for a backend.
"""

from __future__ import annotations

from importlib import metadata

from .qiskit_errors import raises_qiskit_errors

NEKO_GROUP = "qiskit_neko.backend_plugins"
_SELECTIONS = {None: "auto", "": "auto", "auto": "auto", "cpu": "CPU", "gpu": "GPU"}


class NekoBackendPlugin:
    """qiskit-neko's backend plugin: ``get_backend(backend_selection=None)``.

    ``backend_selection`` may name the device: ``"cpu"``, ``"gpu"`` or ``"auto"``
    (also ``"gpu_simulator"`` or ``"gpu_simulator:cpu"``).
    """

    @raises_qiskit_errors
    def get_backend(self, backend_selection: str | None = None):
        from .errors import InvalidOptionError
        from .provider import GPUProvider

        selection = backend_selection
        if selection and selection.startswith("gpu_simulator"):
            selection = selection.partition(":")[2]
        key = selection.lower() if isinstance(selection, str) else selection
        if key not in _SELECTIONS:
            raise InvalidOptionError(
                f"backend_selection {backend_selection!r} is not known; use None, 'auto', 'cpu' or 'gpu'"
            )
        return GPUProvider().get_backend("gpu_simulator", device=_SELECTIONS[key])


def discover(group: str = NEKO_GROUP) -> dict:
    """The plugins installed under ``group``, by name, read with ``importlib.metadata``."""
    return {entry.name: entry for entry in metadata.entry_points(group=group)}
