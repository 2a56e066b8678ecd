"""What a job holds in memory, while it runs and after it ends, against its shots and ops.

    python -m benchmarks.job_memory [--out DIR]

For each case, traced host memory (``tracemalloc``: Python objects and NumPy
arrays) is read before ``backend.run``, at its peak while the job runs, and
after ``result()`` with the finished job still referenced. A bounded engine
shows the same figures whatever the shots (sampled, or shot by shot) and the
number of ops run (a for loop).
"""

from __future__ import annotations

import argparse
import gc
import tracemalloc
from pathlib import Path

from qiskit import QuantumCircuit

from benchmarks.report import emit
from gpu_provider import GPUSimulator


def _sampled() -> QuantumCircuit:
    qc = QuantumCircuit(1, 1)
    qc.h(0)
    qc.measure(0, 0)
    return qc


def _shot_by_shot() -> QuantumCircuit:
    qc = QuantumCircuit(2, 2)
    qc.h(0)
    qc.measure(0, 0)
    qc.reset(0)
    qc.h(0)
    qc.cx(0, 1)
    qc.measure([0, 1], [0, 1])
    return qc


def _ghz(n: int) -> QuantumCircuit:
    qc = QuantumCircuit(n)
    qc.h(0)
    for q in range(n - 1):
        qc.cx(q, q + 1)
    qc.measure_all()
    return qc


def _loop(iterations: int) -> QuantumCircuit:
    qc = QuantumCircuit(1, 1)
    with qc.for_loop(range(iterations)):
        qc.x(0)
    qc.measure(0, 0)
    return qc


def measure(backend: GPUSimulator, circuit: QuantumCircuit, shots: int) -> tuple[float, float]:
    """(peak MiB while running, MiB held after the end) above the traced memory before run()."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        job = backend.run(circuit, shots=shots, seed_simulator=1)
        job.result()
        gc.collect()
        held, peak = tracemalloc.get_traced_memory()
        assert sum(job.result().get_counts().values()) == shots
        return round((peak - before) / 2**20, 2), round((held - before) / 2**20, 3)
    finally:
        tracemalloc.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--wide", type=int, default=26, help="qubits of the GHZ state sampled 10^3 and 10^6 times (0 skips it)")
    args = parser.parse_args(argv)
    backend = GPUSimulator(device="CPU")
    report = {}
    for shots in (10**3, 10**5, 10**7):
        report[f"sampled {shots:.0e} shots (peak, held MiB)"] = measure(backend, _sampled(), shots)
    for shots in (10**3, 10**5):
        report[f"shot-by-shot {shots:.0e} shots"] = measure(backend, _shot_by_shot(), shots)
    for iterations in (10**3, 10**6):
        report[f"for loop {iterations:.0e} ops"] = measure(backend, _loop(iterations), 1)
    if args.wide:
        # Issue 11's target: 10^6 shots of a 26-qubit state use no more memory than 10^3 (complex64:
        # the state is 512 MiB and its scratch buffer as much again, the same in both).
        wide = GPUSimulator(device="CPU", precision="single")
        for shots in (10**3, 10**6):
            report[f"GHZ-{args.wide} complex64, {shots:.0e} shots"] = measure(wide, _ghz(args.wide), shots)
    emit(report, args.out, "job_memory.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
