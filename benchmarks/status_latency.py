"""status() latency while a long job runs.

    python -m benchmarks.status_latency [--qubits 24] [--layers 4] [--device CPU] [--out DIR]

Runs one long job and calls ``job.status()`` and ``job.progress()`` every 5 ms
from the caller's thread until it ends; prints the median, 99th percentile and
maximum latency, and how many status/progress changes were seen.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from qiskit import QuantumCircuit

from benchmarks.report import emit
from gpu_provider import GPUSimulator


def long_circuit(num_qubits: int = 20, layers: int = 40) -> QuantumCircuit:
    """A circuit that keeps a CPU busy for seconds when fusion is off."""
    rng = np.random.default_rng(0)
    qc = QuantumCircuit(num_qubits)
    for _ in range(layers):
        for q in range(num_qubits):
            qc.rx(float(rng.uniform(0, 6)), q)
        for q in range(0, num_qubits - 1, 2):
            qc.cx(q, q + 1)
    qc.measure_all()
    return qc


def measure(num_qubits: int, layers: int, device: str) -> dict:
    backend = GPUSimulator(device=device, fusion_enable=False)
    job = backend.run(long_circuit(num_qubits, layers), shots=100)
    status_times, progress_times, statuses, progress = [], [], [], []
    start = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        status = job.status()
        status_times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        done = job.progress()
        progress_times.append(time.perf_counter() - t0)
        if not statuses or statuses[-1] != status.name:
            statuses.append(status.name)
        if not progress or progress[-1] != done[0]:
            progress.append(done[0])
        if job.in_final_state():
            break
        time.sleep(0.005)
    wall = time.perf_counter() - start
    ms = lambda values, q: float(np.percentile(values, q) * 1e3)  # noqa: E731
    return {
        "qubits": num_qubits,
        "device": job.result().results[0].metadata["device"],
        "job_seconds": round(wall, 3),
        "status_calls": len(status_times),
        "status_ms_median": ms(status_times, 50),
        "status_ms_p99": ms(status_times, 99),
        "status_ms_max": float(max(status_times) * 1e3),
        "progress_ms_median": ms(progress_times, 50),
        "states_seen": statuses,
        "progress_updates_seen": len(progress),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--qubits", type=int, default=24)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--device", default="CPU")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    report = measure(args.qubits, args.layers, args.device)
    emit(report, args.out, "status_latency.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
