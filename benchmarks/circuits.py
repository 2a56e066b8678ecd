"""Benchmark circuit families, all ending in measurements of every qubit.

Each builder takes the width ``n`` and a ``seed`` and returns a
``QuantumCircuit``; the same seed gives the same circuit, so every simulator in
a run sees identical work.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from qiskit import QuantumCircuit
from qiskit.circuit.library import QFTGate, QuantumVolume


def ghz(n: int, seed: int = 0) -> QuantumCircuit:
    """H on qubit 0, then a CX chain: the GHZ state."""
    circuit = QuantumCircuit(n, name=f"ghz_{n}")
    circuit.h(0)
    for q in range(n - 1):
        circuit.cx(q, q + 1)
    circuit.measure_all()
    return circuit


def qft(n: int, seed: int = 0) -> QuantumCircuit:
    """A random product state, then the n-qubit QFT (with its final swaps)."""
    rng = np.random.default_rng(seed)
    circuit = QuantumCircuit(n, name=f"qft_{n}")
    for q in range(n):
        circuit.u(*rng.uniform(0, 2 * np.pi, 3), q)
    circuit.append(QFTGate(n), range(n))
    circuit.measure_all()
    return circuit


def random_layers(n: int, seed: int = 0, depth: int | None = None) -> QuantumCircuit:
    """``depth`` (default n) layers: a random u on every qubit, then CX on a random pairing."""
    rng = np.random.default_rng(seed)
    circuit = QuantumCircuit(n, name=f"random_{n}")
    for _ in range(depth if depth is not None else n):
        for q in range(n):
            circuit.u(*rng.uniform(0, 2 * np.pi, 3), q)
        order = rng.permutation(n)
        for a, b in zip(order[0::2], order[1::2]):
            circuit.cx(int(a), int(b))
    circuit.measure_all()
    return circuit


def quantum_volume(n: int, seed: int = 0) -> QuantumCircuit:
    """Qiskit's square quantum-volume model circuit (depth n)."""
    circuit = QuantumCircuit(n, name=f"qv_{n}")
    circuit.compose(QuantumVolume(n, seed=seed), inplace=True)
    circuit.measure_all()
    return circuit


FAMILIES: dict[str, Callable[..., QuantumCircuit]] = {
    "ghz": ghz,
    "qft": qft,
    "random": random_layers,
    "qv": quantum_volume,
}
