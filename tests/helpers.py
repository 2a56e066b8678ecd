"""Shared oracles and builders for the correctness tests.

Every comparison here is against an independent oracle: ``qiskit.quantum_info``
(exact) or Qiskit Aer (sampled). Sampled comparisons use chi-square tests whose
threshold (``ALPHA``) is far below any plausible chance failure, yet a wrong
answer (a branch not taken, a wrong bit order) gives p-values near zero.
"""

from __future__ import annotations

import functools
import time
from typing import Iterable, Mapping, Optional, Sequence

import numpy as np
import pytest
from qiskit import QuantumCircuit
from qiskit.circuit import ControlledGate
from qiskit.circuit.library import UnitaryGate
from qiskit.quantum_info import Operator, Statevector, random_unitary
from scipy import stats

from gpu_provider import GPUSimulator

# The devices every correctness test runs on; GPU cases are skipped where no GPU is usable.
DEVICES = [pytest.param("CPU", id="CPU"), pytest.param("GPU", id="GPU", marks=pytest.mark.gpu)]
PRECISIONS = ["double", "single"]
# Required fidelity with the exact state (the acceptance criteria).
FIDELITY_TOLERANCE = {"double": 1e-12, "single": 1e-5}
# Required closeness of amplitudes, global phase included.
AMPLITUDE_TOLERANCE = {"double": 1e-10, "single": 1e-4}
# Significance level of the chi-square tests on sampled counts.
ALPHA = 1e-6


def report_from_forked_child(report, size: int, timeout: float = 30.0) -> bytes:
    """Fork; the child writes ``report()`` (at most ``size`` bytes) to a pipe and leaves without
    running the parent's cleanup. Returns what it wrote, or b"" if it wrote nothing within
    ``timeout`` seconds (then it is killed): a fork in a threaded process may wedge the child,
    so never wait on it for long."""
    import os
    import select
    import signal

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.write(write, report())
        finally:
            os._exit(0)
    os.close(write)
    ready, _, _ = select.select([read], [], [], timeout)
    reported = os.read(read, size) if ready else b""
    os.close(read)
    if not ready:
        os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return reported


def make_backend(device: str, **options) -> GPUSimulator:
    return GPUSimulator(device=device, **options)


# ---------------------------------------------------------------------------
# exact states


def fidelity(a, b) -> float:
    """|<a|b>|^2 / (|a|^2 |b|^2): 1 for equal states up to global phase."""
    a = np.asarray(a, dtype=np.complex128).ravel()
    b = np.asarray(b, dtype=np.complex128).ravel()
    return float(abs(np.vdot(a, b)) ** 2 / (np.vdot(a, a).real * np.vdot(b, b).real))


def run_statevector(backend: GPUSimulator, circuit: QuantumCircuit, **options) -> np.ndarray:
    """The backend's final statevector for ``circuit`` (``statevector=True, shots=1``)."""
    options.setdefault("shots", 1)
    result = backend.run(circuit, statevector=True, **options).result()
    return np.asarray(result.get_statevector(0))


def assert_state_matches(actual, circuit_or_expected, precision: str = "double", phase_sensitive: bool = True) -> None:
    """Assert the fidelity criterion and, unless told otherwise, amplitudes equal with global phase."""
    if isinstance(circuit_or_expected, QuantumCircuit):
        expected = Statevector(circuit_or_expected.remove_final_measurements(inplace=False)).data
    else:
        expected = np.asarray(circuit_or_expected)
    actual = np.asarray(actual)
    assert actual.shape == expected.shape, f"statevector shape {actual.shape}, expected {expected.shape}"
    f = fidelity(actual, expected)
    assert f >= 1 - FIDELITY_TOLERANCE[precision], f"fidelity {f!r} (1 - F = {1 - f:.3e}) in precision {precision}"
    if phase_sensitive:
        error = float(np.max(np.abs(actual - expected)))
        assert error <= AMPLITUDE_TOLERANCE[precision], f"max amplitude error {error:.3e} (global phase included)"


def random_layer(circuit: QuantumCircuit, rng: np.random.Generator, qubits: Optional[Iterable[int]] = None) -> None:
    """A layer of random ``u`` gates: a random product state to start from."""
    for q in range(circuit.num_qubits) if qubits is None else qubits:
        circuit.u(*rng.uniform(-np.pi, np.pi, 3), q)


def random_entangled_state(circuit: QuantumCircuit, rng: np.random.Generator) -> None:
    """Random u layer, a chain of cx, another u layer: a generic entangled start."""
    random_layer(circuit, rng)
    n = circuit.num_qubits
    for q in rng.permutation(n - 1) if n > 1 else []:
        circuit.cx(int(q), int(q) + 1)
    random_layer(circuit, rng)


# ---------------------------------------------------------------------------
# sampled counts


def exact_distribution(circuit: QuantumCircuit) -> dict[str, float]:
    """Exact outcome probabilities of a circuit whose measurements are all final.

    Keys are bitstrings as ``Result.get_counts`` formats them (registers separated by spaces).
    """
    body = circuit.remove_final_measurements(inplace=False)
    measured = {}  # clbit index -> qubit index; the last measure into a clbit wins
    for instruction in circuit.data:
        if instruction.operation.name == "measure":
            measured[circuit.find_bit(instruction.clbits[0]).index] = circuit.find_bit(instruction.qubits[0]).index
    probabilities = Statevector(body).probabilities()
    out: dict[str, float] = {}
    for index, p in enumerate(probabilities):
        if p < 1e-15:
            continue
        value = 0
        for clbit, qubit in measured.items():
            value |= ((index >> qubit) & 1) << clbit
        key = format_clbits(value, circuit)
        out[key] = out.get(key, 0.0) + float(p)
    return out


def format_clbits(value: int, circuit: QuantumCircuit) -> str:
    """An integer of clbits as ``get_counts`` shows it: one space-separated group per register."""
    bits = format(value, f"0{circuit.num_clbits}b")[::-1]  # bits[i] is clbit i
    if not circuit.cregs:
        return bits[::-1]
    groups = []
    for creg in circuit.cregs:
        groups.append("".join(bits[circuit.find_bit(bit).index] for bit in reversed(list(creg))))
    return " ".join(reversed(groups))


def _pool(observed: Sequence[np.ndarray], totals: np.ndarray, minimum: float):
    """Merge the bins whose pooled size is below ``minimum`` into one bin."""
    small = totals < minimum
    if small.sum() <= 1:
        return observed, totals
    keep = ~small
    merged = [np.append(o[keep], o[small].sum()) for o in observed]
    return merged, np.append(totals[keep], totals[small].sum())


def chi_square_goodness(counts: Mapping[str, int], probabilities: Mapping[str, float]) -> float:
    """p-value of ``counts`` being drawn from ``probabilities`` (0 if an impossible outcome occurs)."""
    shots = sum(counts.values())
    impossible = [key for key in counts if probabilities.get(key, 0.0) < 1e-12]
    if impossible:
        return 0.0
    keys = sorted(probabilities)
    observed = np.array([counts.get(k, 0) for k in keys], dtype=float)
    expected = np.array([probabilities[k] for k in keys], dtype=float) * shots
    (observed, expected), _ = _pool([observed, expected], expected, 5.0)
    if len(observed) < 2:
        return 1.0
    statistic = float(np.sum((observed - expected) ** 2 / expected))
    return float(stats.chi2.sf(statistic, len(observed) - 1))


def chi_square_homogeneity(counts_a: Mapping[str, int], counts_b: Mapping[str, int]) -> float:
    """p-value of two samples being drawn from one distribution (two-sample chi-square)."""
    keys = sorted(set(counts_a) | set(counts_b))
    a = np.array([counts_a.get(k, 0) for k in keys], dtype=float)
    b = np.array([counts_b.get(k, 0) for k in keys], dtype=float)
    (a, b), totals = _pool([a, b], a + b, 10.0)
    if len(totals) < 2:
        return 1.0
    n_a, n_b = a.sum(), b.sum()
    expected_a = totals * n_a / (n_a + n_b)
    expected_b = totals * n_b / (n_a + n_b)
    statistic = float(np.sum((a - expected_a) ** 2 / expected_a + (b - expected_b) ** 2 / expected_b))
    return float(stats.chi2.sf(statistic, len(totals) - 1))


def assert_counts_match(counts: Mapping[str, int], probabilities: Mapping[str, float], shots: Optional[int] = None) -> None:
    """``counts`` are a plausible sample of ``probabilities``: no impossible outcome, chi-square p > ALPHA."""
    if shots is not None:
        assert sum(counts.values()) == shots, f"counts sum to {sum(counts.values())}, not {shots}"
    impossible = {k: v for k, v in counts.items() if probabilities.get(k, 0.0) < 1e-12}
    assert not impossible, f"outcomes with probability 0 occurred: {impossible}; expected {probabilities}"
    p = chi_square_goodness(counts, probabilities)
    assert p > ALPHA, f"counts {dict(counts)} do not fit {probabilities} (chi-square p = {p:.3g})"


def assert_counts_agree(counts: Mapping[str, int], reference: Mapping[str, int]) -> None:
    """Two samples (ours and Aer's) agree: the same support when large, chi-square p > ALPHA."""
    p = chi_square_homogeneity(counts, reference)
    assert p > ALPHA, f"counts {dict(counts)} disagree with the reference {dict(reference)} (chi-square p = {p:.3g})"


def aer_counts(circuit: QuantumCircuit, shots: int, seed: int = 1234) -> dict[str, int]:
    from qiskit import transpile
    from qiskit_aer import AerSimulator

    aer = AerSimulator(method="statevector")
    # Aer runs only gates it knows (no qft, ...): lower the circuit to its target first.
    compiled = transpile(circuit, aer, optimization_level=0)
    return aer.run(compiled, shots=shots, seed_simulator=seed).result().get_counts(0)


def total_variation(counts_a: Mapping[str, int], counts_b: Mapping[str, int]) -> float:
    n_a, n_b = sum(counts_a.values()), sum(counts_b.values())
    keys = set(counts_a) | set(counts_b)
    return 0.5 * sum(abs(counts_a.get(k, 0) / n_a - counts_b.get(k, 0) / n_b) for k in keys)


def random_positions(rng: np.random.Generator, num_qubits: int, k: int) -> list[int]:
    """``k`` distinct qubits of ``num_qubits`` in random order (non-adjacent, reversed orders included)."""
    return [int(q) for q in rng.choice(num_qubits, size=k, replace=False)]


# ---------------------------------------------------------------------------
# an independent reference for Programs made of gates


def reference_evolve(program, initial=None) -> np.ndarray:
    """Apply a gate-only :class:`Program` with ``qiskit.quantum_info``: an oracle for translate and fuse.

    Handles ``Unitary`` (with controls), ``Diagonal``, ``GlobalPhase`` and ``Initialize``.
    """
    from gpu_provider.engine import program as P
    from gpu_provider.engine.statevector import controlled_matrix

    n = program.num_qubits
    state = Statevector.from_int(0, 2**n) if initial is None else Statevector(np.asarray(initial, dtype=complex))
    for op in program.ops:
        if isinstance(op, P.Unitary):
            matrix = op.matrix
            qubits = op.qubits
            if op.controls:
                matrix = controlled_matrix(matrix, len(op.controls), op.ctrl_state)
                qubits = op.controls + op.qubits
            state = state.evolve(Operator(matrix), qargs=list(qubits)) if qubits else state * complex(matrix[0, 0])
        elif isinstance(op, P.Diagonal):
            state = state.evolve(Operator(np.diag(op.diagonal)), qargs=list(op.qubits)) if op.qubits else state * complex(op.diagonal[0])
        elif isinstance(op, P.GlobalPhase):
            state = Statevector(state.data * np.exp(1j * op.phase))
        elif isinstance(op, P.Initialize):
            k = len(op.qubits)
            tensor = state.data.reshape((2,) * n)
            axes = [n - 1 - q for q in reversed(op.qubits)]  # qubits[k-1] .. qubits[0]
            moved = np.moveaxis(tensor, axes, list(range(n - k, n)))
            rest = moved.reshape(-1, 2**k)
            assert np.allclose(rest[:, 1:], 0), "Initialize on qubits that are not in |0>"
            new = np.outer(rest[:, 0], op.vector).reshape(moved.shape)
            state = Statevector(np.moveaxis(new, list(range(n - k, n)), axes).reshape(-1))
        else:
            raise TypeError(f"reference_evolve handles gates only, not {op!r}")
    return state.data


# ---------------------------------------------------------------------------
# Qiskit's standard gate library

NOT_GATES = ("measure", "reset", "delay", "barrier")


def standard_gate_names() -> list[str]:
    from qiskit.circuit.library import get_standard_gate_name_mapping

    return sorted(name for name in get_standard_gate_name_mapping() if name not in NOT_GATES)


def standard_gate(name: str, rng: np.random.Generator, ctrl_state: Optional[int] = None):
    """A fresh instance of standard gate ``name`` with random parameters (and ``ctrl_state`` if controlled)."""
    from qiskit.circuit import ControlledGate
    from qiskit.circuit.library import get_standard_gate_name_mapping

    template = get_standard_gate_name_mapping()[name]
    params = [float(x) for x in rng.uniform(-2 * np.pi, 2 * np.pi, len(template.params))]
    if ctrl_state is not None and isinstance(template, ControlledGate):
        return template.base_class(*params, ctrl_state=ctrl_state)
    return template.base_class(*params)


# ---------------------------------------------------------------------------
# controlled unitaries


@functools.lru_cache(maxsize=None)
def controlled_unitary(num_ctrl: int, ctrl_state: int) -> tuple:
    """A random 2-qubit unitary and a controlled gate of it (cached: Qiskit's control() is slow)."""
    base = random_unitary(4, seed=num_ctrl).data
    if num_ctrl <= 4:
        return base, UnitaryGate(base).control(num_ctrl, ctrl_state=ctrl_state)
    # Qiskit synthesizes a definition for control(), which takes minutes at this size; a
    # ControlledGate that only names its base gate is what such a gate is to a simulator.
    unitary = UnitaryGate(base)
    gate = ControlledGate(f"c{num_ctrl}u", num_ctrl + 2, unitary.params, num_ctrl_qubits=num_ctrl, ctrl_state=ctrl_state, base_gate=unitary)
    return base, gate


def controlled_operator(base: np.ndarray, num_ctrl: int, ctrl_state: int) -> Operator:
    """|s><s| (x) U + (I - |s><s|) (x) I on (controls..., targets...), controls the low bits."""
    projector = np.zeros((2**num_ctrl, 2**num_ctrl))
    projector[ctrl_state, ctrl_state] = 1
    identity = np.eye(2**num_ctrl)
    return Operator(np.kron(base, projector) + np.kron(np.eye(base.shape[0]), identity - projector))


def bell() -> QuantumCircuit:
    """A measured Bell pair: counts only ever '00' and '11'."""
    circuit = QuantumCircuit(2, 2)
    circuit.h(0)
    circuit.cx(0, 1)
    circuit.measure([0, 1], [0, 1])
    return circuit


def import_host(module: str):
    """Import a host framework's module, or skip where its extra is not installed.

    CI sets GPU_PROVIDER_REQUIRE_HOSTS=1 (it installs every host extra): there a
    missing host fails the run instead of hiding its tests.
    """
    import importlib
    import os

    if os.environ.get("GPU_PROVIDER_REQUIRE_HOSTS") == "1":
        return importlib.import_module(module)
    return pytest.importorskip(module)


def wait_for(predicate, timeout: float = 30.0) -> bool:
    """Poll ``predicate`` until it holds (True) or ``timeout`` seconds pass (False)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.002)
    return False
