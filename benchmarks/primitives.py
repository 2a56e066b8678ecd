"""Estimator primitives side by side: gpu_provider's EstimatorV2 against Qiskit and Aer.

    python -m benchmarks.primitives [--qubits 22] [--reps 3] [--bindings 1] [--device auto|gpu|cpu]
                                    [--repeats 2] [--terms 0] [--out DIR]

The workload is the issue's: ``efficient_su2(n, reps)`` (22 qubits, 3 reps:
239 gates) with random parameter values, and a transverse-field Ising
Hamiltonian, ``sum ZZ`` on neighbours plus ``sum X`` (43 terms at 22 qubits);
with ``--terms N``, N random Pauli words instead (about N X-mask groups;
``backend_estimator`` is then left out: a sampled circuit per basis).
One PUB with ``--bindings`` parameter sets. Timed, each after one warm-up on a
4-qubit PUB and taking turns for ``--repeats`` rounds (median reported):

- ``gpu_provider``: ``gpu_provider.EstimatorV2`` (exact);
- ``backend_estimator``: Qiskit's ``BackendEstimatorV2(backend=GPUSimulator)``
  with its default precision (shots per measurement basis);
- ``aer``: ``qiskit_aer.primitives.EstimatorV2`` (exact by default).

Prints the times, the ratios to gpu_provider, and the largest difference of
the exact values (gpu_provider vs Aer); writes JSON to --out.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import numpy as np
from qiskit.circuit.library import efficient_su2
from qiskit.primitives import BackendEstimatorV2
from qiskit.quantum_info import SparsePauliOp

from benchmarks.report import emit
from gpu_provider import EstimatorV2, GPUSimulator


def ising(n: int) -> SparsePauliOp:
    """``sum_i Z_i Z_{i+1} + 0.7 sum_i X_i``: 2n - 1 terms."""
    terms = [("ZZ", [i, i + 1], 1.0) for i in range(n - 1)] + [("X", [i], 0.7) for i in range(n)]
    return SparsePauliOp.from_sparse_list(terms, n)


def random_words(n: int, count: int, seed: int = 5) -> SparsePauliOp:
    """``count`` random Pauli words on ``n`` qubits with random coefficients (about one X-mask
    group each: the many-group case, as a molecular Hamiltonian's X and Y terms are)."""
    rng = np.random.default_rng(seed)
    return SparsePauliOp(["".join(rng.choice(list("IXYZ"), n)) for _ in range(count)], rng.normal(size=count))


def workload(n: int, reps: int, bindings: int, seed: int = 3, terms: int = 0):
    circuit = efficient_su2(n, reps=reps)
    values = np.random.default_rng(seed).uniform(-np.pi, np.pi, size=(bindings, circuit.num_parameters))
    return circuit, random_words(n, terms) if terms else ising(n), values if bindings > 1 else values[0]


def measure(qubits: int, reps: int, bindings: int, device: str, repeats: int, terms: int = 0) -> dict:
    circuit, hamiltonian, values = workload(qubits, reps, bindings, terms=terms)
    small = workload(4, 1, 1)
    estimators = {"gpu_provider": EstimatorV2(backend_options={"device": device})}
    if not terms:  # with random words: a sampled circuit per measurement basis, too slow to compare
        estimators["backend_estimator"] = BackendEstimatorV2(backend=GPUSimulator(device=device))
    try:
        from qiskit_aer.primitives import EstimatorV2 as AerEstimatorV2

        estimators["aer"] = AerEstimatorV2()
    except ImportError:
        pass
    report = {
        "qubits": qubits,
        "gates": circuit.decompose().size(),
        "terms": len(hamiltonian),
        "bindings": bindings,
        "cpus": os.cpu_count(),
        "load_average_before": os.getloadavg()[0],
    }
    for estimator in estimators.values():
        estimator.run([small]).result()  # warm-up
    times: dict = {name: [] for name in estimators}
    values_of: dict = {}
    for _ in range(repeats):
        for name, estimator in estimators.items():  # turns, so background load hits all alike
            start = time.perf_counter()
            result = estimator.run([(circuit, hamiltonian, values)]).result()
            times[name].append(time.perf_counter() - start)
            values_of[name] = np.asarray(result[0].data.evs)
    report["load_average_after"] = os.getloadavg()[0]
    metadata = estimators["gpu_provider"].run([small]).result()[0].metadata["simulator_metadata"]
    report["gpu_provider_device"] = metadata["device"]
    for name in estimators:
        report[f"{name}_s"] = statistics.median(times[name])
    for name in estimators:
        if name != "gpu_provider":
            report[f"{name}_over_gpu_provider"] = report[f"{name}_s"] / report["gpu_provider_s"]
    if "aer" in values_of:
        report["max_abs_diff_vs_aer"] = float(np.max(np.abs(values_of["gpu_provider"] - values_of["aer"])))
    if "backend_estimator" in values_of:
        report["max_abs_diff_backend_estimator"] = float(np.max(np.abs(values_of["gpu_provider"] - values_of["backend_estimator"])))
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--qubits", type=int, default=22)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--bindings", type=int, default=1)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--terms", type=int, default=0, help="random Pauli words instead of the Ising Hamiltonian")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    report = measure(args.qubits, args.reps, args.bindings, args.device, args.repeats, args.terms)
    emit(report, args.out, "primitives.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
