"""Discovery by host frameworks: the qiskit-neko entry point, read with importlib.metadata."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from qiskit import QuantumCircuit

from tests.helpers import bell
from gpu_provider.errors import InvalidOptionError
from gpu_provider.plugins import NEKO_GROUP, NekoBackendPlugin

ROOT = Path(__file__).resolve().parents[1]

DISCOVER_AND_RUN = """
import json, sys
from importlib.metadata import entry_points
from qiskit import QuantumCircuit
found = [ep for ep in entry_points(group="qiskit_neko.backend_plugins") if ep.name == "gpu_provider"]
plugin = found[0].load()()
backend = plugin.get_backend()
qc = QuantumCircuit(2, 2)
qc.h(0)
qc.cx(0, 1)
qc.measure([0, 1], [0, 1])
counts = backend.run(qc, shots=500, seed_simulator=11).result().get_counts()
import gpu_provider
print(json.dumps({"names": [ep.name for ep in found], "value": found[0].value, "counts": counts, "module": gpu_provider.__file__}))
"""


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The package installed (not imported from the checkout) into a fresh target folder."""
    target = tmp_path_factory.mktemp("site")
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target), str(ROOT)]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600)
    if completed.returncode != 0:
        pytest.fail(f"pip install of the package failed:\n{completed.stdout}\n{completed.stderr}")
    return target


def test_installed_package_is_found_through_entry_points_and_runs_bell(installed, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(installed))
    completed = subprocess.run(
        [sys.executable, "-c", DISCOVER_AND_RUN], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300
    )
    assert completed.returncode == 0, completed.stderr
    report = json.loads(completed.stdout.strip().splitlines()[-1])
    assert report["names"] == ["gpu_provider"]
    assert report["value"] == "gpu_provider.plugins:NekoBackendPlugin"
    assert report["module"].startswith(str(installed))  # the installed copy, not the checkout
    counts = report["counts"]
    assert set(counts) == {"00", "11"} and sum(counts.values()) == 500
    assert 150 < counts["00"] < 350


@pytest.mark.parametrize("selection, device", [(None, "auto"), ("cpu", "CPU"), ("CPU", "CPU"), ("auto", "auto"), ("gpu_simulator:cpu", "CPU")])
def test_plugin_selects_device(selection, device):
    backend = NekoBackendPlugin().get_backend(selection)
    assert backend.name == "gpu_simulator"
    assert backend.options.device == device
    counts = backend.run(bell(), shots=200, seed_simulator=2).result().get_counts()
    assert set(counts) <= {"00", "11"} and sum(counts.values()) == 200


def test_plugin_rejects_unknown_selection():
    with pytest.raises(InvalidOptionError, match="backend_selection"):
        NekoBackendPlugin().get_backend("tpu")


def test_plugin_gpu_selection_without_gpu_raises_on_run():
    from gpu_provider.engine.devices import probe_gpu
    from gpu_provider.errors import DeviceUnavailableError

    if probe_gpu().usable:
        pytest.skip("a GPU is usable here")
    backend = NekoBackendPlugin().get_backend("gpu")
    with pytest.raises(DeviceUnavailableError, match="no GPU is usable"):
        backend.run(bell())
    assert NEKO_GROUP == "qiskit_neko.backend_plugins"
