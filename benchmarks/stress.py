"""Stress: many jobs from many threads, with bad input and cancellations mixed in.

    python -m benchmarks.stress [--jobs 200] [--threads 8] [--device cpu|auto|gpu] [--out DIR]

Every job's answer is checked against qiskit.quantum_info.Statevector. Prints
jobs completed, failures by type, cancellations, peak traced host memory and
peak RSS, and whether memory went back to its baseline; writes JSON to --out.
Exit code 1 if any job gave a wrong answer, an unexpected error, or hung.
"""

from __future__ import annotations

import argparse
import collections
import gc
import resource
import threading
import time
import tracemalloc
from pathlib import Path

import numpy as np
from qiskit import QuantumCircuit
from qiskit.circuit import Parameter
from qiskit.providers import JobError, JobStatus
from qiskit.quantum_info import Statevector

from benchmarks.report import emit
from gpu_provider import GPUSimulator
from gpu_provider.errors import GPUProviderError


def _circuit(rng: np.random.Generator, max_qubits: int) -> QuantumCircuit:
    n = int(rng.integers(1, max_qubits + 1))
    qc = QuantumCircuit(n)
    for _ in range(int(rng.integers(1, 4))):
        for q in range(n):
            qc.u(*rng.uniform(-np.pi, np.pi, 3), q)
        for q in range(0, n - 1):
            qc.cx(q, q + 1)
    return qc


def stress(jobs: int = 200, threads: int = 8, device: str = "CPU", max_qubits: int = 14, seed: int = 1) -> dict:
    backends = [GPUSimulator(device=device), GPUSimulator(device=device, precision="single")]
    stats: dict = {"completed": 0, "correct": 0, "cancelled": 0, "expected_errors": collections.Counter(), "failures": collections.Counter(), "hung": 0}
    lock = threading.Lock()
    per_thread = [jobs // threads + (1 if i < jobs % threads else 0) for i in range(threads)]

    def record(key: str, value=None) -> None:
        with lock:
            if value is None:
                stats[key] += 1
            else:
                stats[key][value] += 1

    def worker(index: int) -> None:
        rng = np.random.default_rng(seed * 1000 + index)
        for j in range(per_thread[index]):
            backend = backends[(index + j) % 2]
            kind = rng.choice(["good", "good", "good", "good", "cancel", "bad"])
            try:
                if kind == "bad":
                    qc = QuantumCircuit(1)
                    qc.rx(Parameter("unbound"), 0)
                    try:
                        backend.run(qc)
                        record("failures", "bad input accepted")
                    except GPUProviderError as exc:
                        record("expected_errors", type(exc).__name__)
                    continue
                qc = _circuit(rng, max_qubits)
                job = backend.run(qc, shots=1, statevector=True)
                if kind == "cancel":
                    time.sleep(float(rng.uniform(0, 0.01)))
                    job.cancel()
                try:
                    result = job.result(timeout=300)
                except JobError as exc:
                    if job.status() == JobStatus.CANCELLED:
                        record("cancelled")
                    else:
                        record("failures", f"JobError: {exc}")
                    continue
                record("completed")
                fidelity = abs(np.vdot(Statevector(qc).data, result.get_statevector())) ** 2
                tolerance = 1e-5 if backend.options.precision == "single" else 1e-12
                if fidelity >= 1 - tolerance:
                    record("correct")
                else:
                    record("failures", "wrong answer")
            except Exception as exc:  # anything else is a failure of the simulator
                record("failures", type(exc).__name__)

    gc.collect()
    tracemalloc.start()
    baseline = tracemalloc.get_traced_memory()[0]
    start = time.perf_counter()
    pool = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join(timeout=1800)
        if thread.is_alive():
            stats["hung"] += 1
    elapsed = time.perf_counter() - start
    gc.collect()
    current, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    report = {
        "jobs": jobs,
        "threads": threads,
        "device": device,
        "seconds": round(elapsed, 2),
        "completed": stats["completed"],
        "correct": stats["correct"],
        "cancelled": stats["cancelled"],
        "expected_errors": dict(stats["expected_errors"]),
        "failures": dict(stats["failures"]),
        "hung_threads": stats["hung"],
        "peak_traced_bytes": peak - baseline,
        "leftover_traced_bytes": current - baseline,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    report["clean"] = not report["failures"] and not report["hung_threads"] and report["completed"] == report["correct"]
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--device", default="CPU")
    parser.add_argument("--max-qubits", type=int, default=14)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    report = stress(args.jobs, args.threads, args.device, args.max_qubits)
    emit(report, args.out, "stress.json")
    return 0 if report["clean"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
