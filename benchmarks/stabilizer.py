"""Clifford circuits as stabilizer states: ``gpu_provider`` against Aer's stabilizer method, side by side.

Run from the repository root::

    python -m benchmarks.stabilizer [--device cpu|gpu] [--families ghz,clifford,dynamic,feedback,repetition]
                                    [--sizes 100,500,1000] [--shots 1000] [--repeats 3] [--out bench-out]

Families: ``ghz`` (H and a CX chain, every qubit measured), ``clifford``
(Qiskit's ``random_clifford_circuit`` with 10 gates per qubit, every qubit
measured), ``dynamic`` (the clifford circuit with a mid-circuit measurement,
a reset and a conditioned CX every 50 qubits, then every qubit measured: a
path per shot), ``feedback`` (the same with Pauli feed-forward instead: every 50
qubits one is measured, then flipped back to |0> by a conditioned X (an active
reset) while its neighbour takes a conditioned Z; Pauli frames),
``repetition`` (a repetition code: n/2 data qubits in |+>, n/2 - 1 ancillas
measuring neighbouring parities and reset, 5 rounds, then the data measured:
random syndromes, no feed-forward, so Pauli frames here). One
timed call is ``backend.run(circuit, shots=...).result()`` for both, with
``method="stabilizer"``; Aer's circuit is transpiled to its basis beforehand
(not timed). Each simulator gets one warm-up call on the smallest size, then
they take turns for ``--repeats`` rounds; the median is reported with the
ratio ``Aer / gpu_provider`` (the speed-up). Timings are information only.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

from .report import emit


def circuit(family: str, n: int):
    from qiskit import QuantumCircuit
    from qiskit.circuit.random import random_clifford_circuit

    if family == "repetition":
        from qiskit import ClassicalRegister, QuantumRegister

        d = n // 2
        data, ancillas = QuantumRegister(d, "d"), QuantumRegister(d - 1, "a")
        qc = QuantumCircuit(data, ancillas)
        qc.h(data)
        for r in range(5):
            register = ClassicalRegister(d - 1, f"s{r}")
            qc.add_register(register)
            for i in range(d - 1):
                qc.cx(data[i], ancillas[i])
                qc.cx(data[i + 1], ancillas[i])
            qc.measure(ancillas, register)
            qc.reset(ancillas)
        final = ClassicalRegister(d, "out")
        qc.add_register(final)
        qc.measure(data, final)
        return qc
    if family == "ghz":
        qc = QuantumCircuit(n)
        qc.h(0)
        for q in range(n - 1):
            qc.cx(q, q + 1)
    else:
        qc = random_clifford_circuit(n, 10 * n, seed=n)
        if family in ("dynamic", "feedback"):
            from qiskit import ClassicalRegister

            register = ClassicalRegister(max(1, n // 50), "mid")
            qc.add_register(register)
            for i, q in enumerate(range(0, n - 1, 50)):
                qc.measure(q, register[i])
                if family == "dynamic":
                    qc.reset(q)
                    with qc.if_test((register[i], 1)):
                        qc.cx(q + 1, q)
                else:
                    with qc.if_test((register[i], 1)):
                        qc.x(q)
                        qc.z(q + 1)
                qc.h(q)
    qc.measure_all()
    return qc


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "gpu"])
    parser.add_argument("--families", default="ghz,clifford,dynamic,feedback,repetition")
    parser.add_argument("--sizes", default="100,500,1000")
    parser.add_argument("--shots", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-aer", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    from qiskit import transpile

    from gpu_provider import GPUSimulator

    ours = GPUSimulator(device=args.device.upper(), method="stabilizer")
    aer = None
    if not args.no_aer:
        from qiskit_aer import AerSimulator

        aer = AerSimulator(method="stabilizer")
    sizes = [int(s) for s in args.sizes.split(",")]
    rows = []
    for family in args.families.split(","):
        for n in sizes:
            qc = circuit(family, n)
            runners = {"gpu_provider": lambda qc=qc: ours.run(qc, shots=args.shots, seed_simulator=1).result()}
            if aer is not None:
                compiled = transpile(qc, aer, optimization_level=0)
                runners["aer"] = lambda compiled=compiled: aer.run(compiled, shots=args.shots, seed_simulator=1).result()
            times: dict = {name: [] for name in runners}
            if n == sizes[0]:
                for run in runners.values():
                    run()
            for _ in range(args.repeats):
                for name, run in runners.items():
                    start = time.perf_counter()
                    run()
                    times[name].append(time.perf_counter() - start)
            row = {"family": family, "qubits": n, "ops": qc.size()}
            row.update({f"{name}_s": statistics.median(values) for name, values in times.items()})
            if aer is not None:
                row["aer_over_gpu_provider"] = row["aer_s"] / row["gpu_provider_s"]
            rows.append(row)
            print(
                f"{family:9s} n={n:5d} ops={row['ops']:6d} gpu_provider {row['gpu_provider_s']:.3f} s"
                + (f"  aer {row['aer_s']:.3f} s  aer/ours {row['aer_over_gpu_provider']:.1f}" if aer is not None else ""),
                flush=True,
            )
    report = {
        "benchmark": "stabilizer",
        "device": args.device,
        "shots": args.shots,
        "repeats": args.repeats,
        "host": {"machine": platform.machine(), "cpus": os.cpu_count()},
        "rows": rows,
    }
    emit(report, args.out, "stabilizer.json")
    return report


if __name__ == "__main__":
    main()
