"""The engine never imports Qiskit (nor PennyLane), and importing the package touches no CUDA."""

from __future__ import annotations

import subprocess
import sys

CHECK = """
import sys
import gpu_provider.engine.executor, gpu_provider.engine.statevector, gpu_provider.engine.devices
import gpu_provider.engine.program, gpu_provider.engine.observables, gpu_provider.errors
import gpu_provider.engine.expectation, gpu_provider.engine.batch, gpu_provider.engine.small_batch
import gpu_provider.engine.observables, gpu_provider.engine.adjoint, gpu_provider.engine.remote
try:
    import gpu_provider.engine.kernels
except ImportError:
    pass
leaked = sorted(name for name in sys.modules if name == "qiskit" or name.startswith("qiskit."))
print("QISKIT:" + ",".join(leaked))
print("PENNYLANE:" + ",".join(sorted(name for name in sys.modules if name == "pennylane" or name.startswith("pennylane."))))
print("CUPY:" + ",".join(sorted(name for name in sys.modules if name == "cupy" or name.startswith("cupy."))))
print("DASK:" + ",".join(sorted(name for name in sys.modules if name.split(".")[0] in ("dask", "distributed"))))
"""


def test_engine_imports_no_qiskit_and_no_cupy():
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, check=True).stdout
    lines = dict(line.split(":", 1) for line in out.strip().splitlines())
    assert lines["QISKIT"] == ""
    assert lines["PENNYLANE"] == ""
    assert lines["CUPY"] == ""
    assert lines["DASK"] == ""


def test_importing_the_package_does_not_probe_the_gpu():
    code = "import gpu_provider, gpu_provider.backend, sys; print('cupy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
