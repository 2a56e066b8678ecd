"""Small-circuit batch, end to end: many 12-qubit circuits in one job, against Qiskit Aer.

    python -m benchmarks.batch [--circuits 1000] [--qubits 12] [--device auto|gpu|cpu]
                               [--precision single|double] [--repeats 3] [--no-bulk] [--out DIR]

Both simulators get the same transpiled random circuits (u + cx layers with
terminal measurements, 1024 shots each) and are timed side by side on
``run(circuits).result()`` (median of --repeats after a warm-up). Prints the
times and the ratio Aer / gpu_provider; writes JSON to --out. On a GPU the
circuits run many per launch (``batch_small_circuits``); ``--no-bulk`` runs
them one at a time.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
from qiskit import QuantumCircuit, transpile

from benchmarks.report import emit
from gpu_provider import GPUSimulator


def random_circuit(num_qubits: int, layers: int, rng: np.random.Generator) -> QuantumCircuit:
    qc = QuantumCircuit(num_qubits)
    for layer in range(layers):
        for q in range(num_qubits):
            qc.u(*rng.uniform(-np.pi, np.pi, 3), q)
        for q in range(layer % 2, num_qubits - 1, 2):
            qc.cx(q, q + 1)
    qc.measure_all()
    return qc


def transpiled_batch(circuits: int, qubits: int, layers: int = 12, seed: int = 7) -> list:
    """The benchmark's circuits (:func:`random_circuit`), transpiled to the ``u, cx`` basis as every simulator gets them."""
    rng = np.random.default_rng(seed)
    return transpile([random_circuit(qubits, layers, rng) for _ in range(circuits)], basis_gates=["u", "cx"], optimization_level=0)


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up: compile kernels, fill caches
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(
    circuits: int, qubits: int, device: str, precision: str, repeats: int, layers: int = 12,
    fusion_threshold: int | None = None, aer: bool = True, bulk: bool = True,
) -> dict:
    batch = transpiled_batch(circuits, qubits, layers)
    options = {} if fusion_threshold is None else {"fusion_threshold": fusion_threshold}
    ours = GPUSimulator(device=device, precision=precision, batch_small_circuits=bulk, **options)
    report = {"circuits": circuits, "qubits": qubits, "precision": precision, "shots": 1024, "batch_small_circuits": bulk}
    report["fusion_threshold"] = ours.options.fusion_threshold
    first = ours.run(batch[:1], shots=8).result().results[0].metadata
    report["gpu_provider_device"] = first["device"]
    report["ops_per_circuit"] = first.get("fusion_ops_after")
    report["gpu_provider_s"] = _median_time(lambda: ours.run(batch, shots=1024, seed_simulator=1).result(), repeats)
    try:
        if not aer:
            raise ImportError("--no-aer")
        from qiskit_aer import AerSimulator
    except ImportError:
        report["aer_s"] = None
        return report
    aer = AerSimulator(method="statevector", precision=precision)
    report["aer_s"] = _median_time(lambda: aer.run(batch, shots=1024, seed_simulator=1).result(), repeats)
    report["aer_over_gpu_provider"] = report["aer_s"] / report["gpu_provider_s"]
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--circuits", type=int, default=1000)
    parser.add_argument("--qubits", type=int, default=12)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="single", choices=["single", "double"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--fusion-threshold", type=int, default=None, help="fuse circuits of at least this many qubits (default: the backend's)")
    parser.add_argument("--no-aer", action="store_true", help="time gpu_provider alone")
    parser.add_argument("--no-bulk", action="store_true", help="run the circuits one at a time (batch_small_circuits=False)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    report = measure(
        args.circuits, args.qubits, args.device, args.precision, args.repeats,
        fusion_threshold=args.fusion_threshold, aer=not args.no_aer, bulk=not args.no_bulk,
    )
    emit(report, args.out, "batch.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
