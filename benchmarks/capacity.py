"""The widest CPU states: gpu_provider with its scratch buffer, in place, and Qiskit Aer, side by side.

Run from the repository root::

    python -m benchmarks.capacity [--sizes 26,28,30] [--layers 3] [--shots 1000] [--precision double]
                                  [--front backend|estimator] [--out bench-out]

Each size runs one circuit (``--layers`` layers of a random ``u`` on every qubit and a ``cx`` on
alternate neighbours, every qubit measured; not Clifford, so no stabilizer state) in a fresh
child process per simulator, one after the other, so each has the machine's memory to itself.
With ``--front estimator`` the circuit is not measured and each side's ``EstimatorV2`` (Aer's
``qiskit_aer.primitives.EstimatorV2``) takes one observable: ``Z Z`` on every neighbouring pair
plus ``X X`` on three pairs and a ``Y`` (five passes over the state, grouped by X part).

- ``buffered``: gpu_provider as it runs when two copies of the state fit (skipped where they
  do not: the child would be refused);
- ``in_place``: gpu_provider under an address-space limit of one state plus 512 MiB, so run()
  picks the state without its scratch buffer (``"in_place"`` in the result's metadata);
- ``aer``: ``AerSimulator(method="statevector")`` on the circuit transpiled to its basis.

Reported per run: wall seconds of ``backend.run(...).result()`` (circuit construction and the
import not timed) and the child's peak resident memory. Timings are information only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

from .report import emit

CHILD = """
import json, resource, sys, time
import numpy as np
from qiskit import QuantumCircuit, transpile

from qiskit.quantum_info import SparsePauliOp

n, layers, shots, precision, who, front = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5], sys.argv[6]
rng = np.random.default_rng(n)
qc = QuantumCircuit(n)
for layer in range(layers):
    for q in range(n):
        qc.u(*rng.uniform(0, 3, 3), q)
    for q in range(layer % 2, n - 1, 2):
        qc.cx(q, q + 1)
terms = [("ZZ", [q, q + 1], 1.0) for q in range(n - 1)] + [("XX", [q, q + 1], 0.5) for q in (0, n // 2, n - 2)] + [("Y", [n // 3], 0.25)]
observable = SparsePauliOp.from_sparse_list(terms, num_qubits=n)
if front == "backend":
    qc.measure_all()
if who == "aer":
    from qiskit_aer import AerSimulator
    backend = AerSimulator(method="statevector", precision=precision)
    qc = transpile(qc, backend, optimization_level=0)
    if front == "estimator":
        from qiskit_aer.primitives import EstimatorV2
        estimator = EstimatorV2(options={"backend_options": {"method": "statevector", "precision": precision}})
else:
    from gpu_provider import EstimatorV2, GPUSimulator
    from gpu_provider.engine import devices
    backend = GPUSimulator(device="CPU", precision=precision, method="statevector")
    backend.run(QuantumCircuit(1), shots=1).result()  # the worker thread and its arenas exist before any limit
    estimator = EstimatorV2(backend=backend)
    estimator.run([(QuantumCircuit(1), "Z")]).result()
    if who == "in_place":
        used = devices._proc_status_bytes(("VmSize",))["VmSize"]
        itemsize = 16 if precision == "double" else 8
        resource.setrlimit(resource.RLIMIT_AS, (used + (itemsize << n) + (1 << 29), resource.RLIM_INFINITY))
start = time.perf_counter()
if front == "estimator":
    result = estimator.run([(qc, observable)]).result()[0]
    seconds = time.perf_counter() - start
    metadata = result.metadata.get("simulator_metadata", {}) if who != "aer" else {}
    value = {"value": float(result.data.evs)}
else:
    result = backend.run(qc, shots=shots, seed_simulator=1).result()
    seconds = time.perf_counter() - start
    metadata = result.results[0].metadata if who != "aer" else {}
    value = {"outcomes": len(result.get_counts())}
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
print(json.dumps({"seconds": round(seconds, 2), "in_place": bool(metadata.get("in_place")), **value, "peak_gib": round(peak, 2)}))
"""


def run_child(args, n: int, who: str) -> dict:
    process = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(CHILD), str(n), str(args.layers), str(args.shots), args.precision, who, args.front],
        capture_output=True,
        text=True,
        env={**os.environ, "GPU_PROVIDER_DISABLE_GPU": "1"},
    )
    if process.returncode != 0:
        return {"error": process.stderr.strip().splitlines()[-1][:300] if process.stderr.strip() else f"exit {process.returncode}"}
    return json.loads(process.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="26,28,30")
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--shots", type=int, default=1000)
    parser.add_argument("--precision", default="double", choices=["double", "single"])
    parser.add_argument("--simulators", default="buffered,in_place,aer")
    parser.add_argument("--front", default="backend", choices=["backend", "estimator"])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    from gpu_provider.engine.devices import CPUDevice, state_bytes

    total = CPUDevice().total_bytes()
    itemsize = 16 if args.precision == "double" else 8
    rows = []
    for n in [int(s) for s in args.sizes.split(",")]:
        row = {"qubits": n, "state_gib": round(state_bytes(n, itemsize) / 2**30, 2)}
        for who in args.simulators.split(","):
            if who == "buffered" and 2 * state_bytes(n, itemsize) > total:
                row[who] = {"skipped": "two copies of the state exceed the machine's memory"}
            else:
                row[who] = run_child(args, n, who)
            print(f"n={n:3d} {who:9s} {row[who]}", flush=True)
        rows.append(row)
    report = {
        "benchmark": "capacity",
        "front": args.front,
        "precision": args.precision,
        "layers": args.layers,
        "shots": args.shots,
        "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "memory_gib": round(total / 2**30, 1)},
        "note": "peak_gib: the child's peak resident memory (imports included)",
        "rows": rows,
    }
    emit(report, args.out, "capacity.json")
    return report


if __name__ == "__main__":
    main()
