"""Dynamic circuits (mid-circuit measurement, reset, a condition), end to end, against Qiskit Aer.

    python -m benchmarks.dynamic [--data 5,8] [--rounds 3] [--shots 1024,8192] [--device auto|gpu|cpu]
                                 [--circuit syndrome|monitored]
                                 [--precision single|double] [--repeats 3] [--pennylane] [--out DIR]

The circuit: ``--data`` data qubits in a product of ``ry`` states, ``--rounds``
rounds of parity checks of neighbouring data qubits, each on an ancilla that
is measured and reset (``data - 1`` ancillas, reused every round), an ``rx``
layer between rounds, one ``if_test`` on the first check, final measurements:
``2 * data - 1`` qubits and ``rounds * (data - 1)`` mid-circuit measurements.
With ``--circuit monitored``: ``--data`` qubits, ``--rounds`` brickwork layers
of random two-qubit unitaries each followed by mid-circuit measurements of a
third of the qubits (:func:`monitored_circuit`): outcomes scatter, so nearly
every shot takes a path of its own (the case branching cannot help).
Timed on ``run(circuit).result()`` (median of --repeats after a warm-up):
gpu_provider with shot branching (the default: on a GPU, handing over to
one launch of all the shots once branching has begun enough paths) and
without (``shot_branching_enable=False``, ``batched_shots_gpu=False``: every
shot alone); on a GPU also branching without the hand-over and the one launch
alone (``batched_shots_gpu``); and Aer, shot by shot (its
default) and with its own ``shot_branching_enable=True``, all on the same
transpiled circuit and shots. Prints one row per case with the ratios
Aer / gpu_provider; writes JSON to --out.

With ``--pennylane`` the same circuit is also written as a PennyLane QNode
(``qml.measure(..., reset=True)``, ``qml.cond``, ``qml.counts`` of the data
wires) and timed with ``mcm_method="one-shot"`` on ``gpu_provider.qubit``
and on PennyLane's ``default.qubit``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
from qiskit import ClassicalRegister, QuantumCircuit, QuantumRegister, transpile

from benchmarks.report import emit
from gpu_provider import GPUSimulator


def syndrome_circuit(data: int, rounds: int) -> QuantumCircuit:
    qd, qa = QuantumRegister(data, "d"), QuantumRegister(data - 1, "a")
    checks, final = ClassicalRegister(rounds * (data - 1), "s"), ClassicalRegister(data, "f")
    circuit = QuantumCircuit(qd, qa, checks, final)
    for q, angle in enumerate(np.linspace(0.3, 1.9, data)):
        circuit.ry(float(angle), qd[q])
    for r in range(rounds):
        for a in range(data - 1):
            circuit.cx(qd[a], qa[a])
            circuit.cx(qd[a + 1], qa[a])
            circuit.measure(qa[a], checks[r * (data - 1) + a])
            circuit.reset(qa[a])
        circuit.rx(0.1, qd)
    with circuit.if_test((checks[0], 1)):
        circuit.x(qd[0])
    circuit.measure(qd, final)
    return circuit


def monitored_circuit(qubits: int, layers: int, seed: int = 7) -> QuantumCircuit:
    """A monitored random circuit: brickwork layers of random two-qubit unitaries, each followed by
    mid-circuit measurements of about a third of the qubits (a fixed random pattern), final
    measurements of all. Outcomes scatter: nearly every shot takes a path of its own."""
    from qiskit.circuit.library import UnitaryGate
    from qiskit.quantum_info import random_unitary

    rng = np.random.default_rng(seed)
    marks = [sorted(rng.choice(qubits, size=max(1, qubits // 3), replace=False).tolist()) for _ in range(layers)]
    mid = ClassicalRegister(sum(len(m) for m in marks), "m")
    final = ClassicalRegister(qubits, "f")
    circuit = QuantumCircuit(QuantumRegister(qubits, "q"), mid, final)
    clbit = 0
    for layer, measured in enumerate(marks):
        for q in range(layer % 2, qubits - 1, 2):
            circuit.append(UnitaryGate(random_unitary(4, seed=int(rng.integers(1 << 30)))), [q, q + 1])
        for q in measured:
            circuit.measure(q, mid[clbit])
            clbit += 1
    circuit.measure(range(qubits), final)
    return circuit


def _median_time(fn, repeats: int) -> tuple[float, object]:
    result = fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def measure(
    data: int, rounds: int, shots: int, device: str, precision: str, repeats: int, aer: bool = True, kind: str = "syndrome"
) -> dict:
    circuit = syndrome_circuit(data, rounds) if kind == "syndrome" else monitored_circuit(data, rounds)
    row = {"circuit": kind, "data": data, "rounds": rounds, "qubits": circuit.num_qubits, "shots": shots, "precision": precision}
    modes = [("branching", True, True), ("shot_by_shot", False, False)]
    for name, branching, batched in modes:
        backend = GPUSimulator(device=device, precision=precision, shot_branching_enable=branching, batched_shots_gpu=batched)
        seconds, result = _median_time(lambda: backend.run(circuit, shots=shots, seed_simulator=1).result(), repeats)
        metadata = result.results[0].metadata
        row[f"gpu_provider_{name}_s"] = round(seconds, 4)
        row["device"] = metadata["device"]
        row[f"trajectories_{name}"] = metadata.get("trajectories")
        row[f"batched_shots_{name}"] = metadata.get("batched_shots", False)
        if name == "branching" and "GPU" in metadata["device"]:
            # On a GPU, also each side of the hand-over alone: the interpreter's branching, and
            # every shot in one launch of run_small_shots (engine/small_shots.py).
            modes += [("branching_no_kernel", True, False), ("kernel", False, True)]
    if aer:
        try:
            from qiskit_aer import AerSimulator
        except ImportError:
            return row
        compiled = transpile(circuit, AerSimulator(), optimization_level=0)
        for name, branching in (("shot_by_shot", False), ("branching", True)):
            simulator = AerSimulator(method="statevector", precision=precision, shot_branching_enable=branching)
            seconds, _ = _median_time(lambda: simulator.run(compiled, shots=shots, seed_simulator=1).result(), repeats)
            row[f"aer_{name}_s"] = round(seconds, 4)
        best_aer = min(row["aer_shot_by_shot_s"], row["aer_branching_s"])
        row["best_aer_over_gpu_provider"] = round(best_aer / row["gpu_provider_branching_s"], 2)
    return row


def pennylane_times(data: int, rounds: int, shots: int, device: str, repeats: int) -> dict:
    """The circuit as a PennyLane QNode, one-shot, on gpu_provider.qubit and default.qubit (seconds)."""
    import pennylane as qml

    wires = 2 * data - 1

    def circuit():
        for q, angle in enumerate(np.linspace(0.3, 1.9, data)):
            qml.RY(float(angle), q)
        first = None
        for _ in range(rounds):
            for a in range(data - 1):
                qml.CNOT([a, data + a])
                qml.CNOT([a + 1, data + a])
                value = qml.measure(data + a, reset=True)
                first = value if first is None else first
            for q in range(data):
                qml.RX(0.1, q)
        qml.cond(first, qml.PauliX)(0)
        return qml.counts(wires=range(data))

    row = {}
    for name, dev in (
        ("pennylane_gpu_provider_s", qml.device("gpu_provider.qubit", wires=wires, seed=1, device=device)),
        ("pennylane_default_qubit_s", qml.device("default.qubit", wires=wires, seed=1)),
    ):
        node = qml.set_shots(qml.QNode(circuit, dev, mcm_method="one-shot"), shots)
        seconds, _ = _median_time(node, repeats)
        row[name] = round(seconds, 4)
    row["default_qubit_over_gpu_provider"] = round(row["pennylane_default_qubit_s"] / row["pennylane_gpu_provider_s"], 1)
    return row


def _ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=_ints, default=[5, 8])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--circuit", default="syndrome", choices=["syndrome", "monitored"],
        help="monitored: --data qubits, --rounds layers of random two-qubit gates and mid-circuit measurements",
    )
    parser.add_argument("--shots", type=_ints, default=[1024, 8192])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="double", choices=["single", "double"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-aer", action="store_true", help="time gpu_provider alone")
    parser.add_argument("--pennylane", action="store_true", help="also time the circuit as a PennyLane QNode, one-shot")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    rows = []
    for data in args.data:
        for shots in args.shots:
            row = measure(data, args.rounds, shots, args.device, args.precision, args.repeats, aer=not args.no_aer, kind=args.circuit)
            if args.pennylane and args.circuit == "syndrome":
                row.update(pennylane_times(data, args.rounds, shots, args.device, args.repeats))
            print(row, flush=True)
            rows.append(row)
    emit({"rows": rows}, args.out, "dynamic.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
