"""Exact observables read from a final state, against qiskit.quantum_info."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from qiskit.circuit.random import random_circuit
from qiskit.quantum_info import DensityMatrix, Operator, SparsePauliOp, Statevector, partial_trace, random_hermitian

from gpu_provider.compiler.translate import translate
from gpu_provider.engine.devices import resolve_device
from gpu_provider.engine.executor import RunConfig, final_state
from gpu_provider.engine.observables import amplitudes, marginal_probabilities, reduced_density_matrix, tensor_expectation
from gpu_provider.errors import InvalidInputError, SimulationError

PAULI = {"I": np.eye(2), "X": np.array([[0, 1], [1, 0]]), "Y": np.array([[0, -1j], [1j, 0]]), "Z": np.diag([1.0, -1.0])}


@pytest.fixture(scope="module", params=["double", "single"])
def case(request):
    circuit = random_circuit(6, 5, seed=11)
    device, _ = resolve_device("CPU", 0)
    state = final_state(translate(circuit), device, RunConfig(precision=request.param))
    tol = 1e-10 if request.param == "double" else 1e-5
    return state, Statevector(circuit), tol


def test_marginal_probabilities_match_statevector(case):
    state, exact, tol = case
    for qubits in ([0], [3, 1], [5, 0, 2], list(range(6))):
        np.testing.assert_allclose(marginal_probabilities(state, qubits), exact.probabilities(qubits), atol=tol)


def test_amplitudes_match_statevector(case):
    state, exact, tol = case
    np.testing.assert_allclose(amplitudes(state, [0, 5, 63]), exact.data[[0, 5, 63]], atol=tol)


def test_reduced_density_matrices_match_qiskit_partial_trace(case):
    state, exact, tol = case
    for qubits in ([0], [3, 1], [5, 0, 2], list(range(6))):
        traced = [q for q in range(6) if q not in qubits]
        # Qiskit orders the kept qubits ascending (lowest = bit 0); ours puts qubits[j] at bit j.
        reference = partial_trace(exact, traced).data if traced else DensityMatrix(exact).data
        ascending = sorted(qubits)
        k = len(qubits)
        axes = [k - 1 - ascending.index(q) for q in reversed(qubits)]  # our axis a holds qubits[k-1-a]
        expected = reference.reshape((2,) * 2 * k).transpose(axes + [k + a for a in axes]).reshape(1 << k, 1 << k)
        np.testing.assert_allclose(reduced_density_matrix(state, qubits), expected, atol=tol)


def test_fold_into_zero_is_braket_reset():
    device, _ = resolve_device("CPU", 0)
    circuit = random_circuit(4, 4, seed=5)
    for qubit in range(4):
        state = final_state(translate(circuit), device, RunConfig())
        vector = Statevector(circuit).data.reshape((2,) * 4)  # axis a holds qubit 3-a
        axis = 3 - qubit
        zero = np.take(vector, 0, axis=axis) + np.take(vector, 1, axis=axis)
        expected = np.stack([zero, np.zeros_like(zero)], axis=axis).reshape(-1)
        expected /= np.linalg.norm(expected)
        state.fold_into_zero(qubit)
        np.testing.assert_allclose(state.to_host(), expected, atol=1e-12)


def test_pauli_products_match_statevector(case):
    state, exact, tol = case
    for label in ("ZIIIIZ", "XYZIIX", "IIIYII", "XXXXXX"):
        factors = [((q,), PAULI[p]) for q, p in enumerate(reversed(label)) if p != "I"]
        mean, variance = tensor_expectation(state, factors)
        expected = exact.expectation_value(SparsePauliOp(label)).real
        assert mean == pytest.approx(expected, abs=tol)
        assert variance == pytest.approx(1 - expected**2, abs=10 * tol)


def test_hermitian_factors_match_statevector(case):
    state, exact, tol = case
    before = state.to_host()
    h2 = random_hermitian(4, seed=3).data
    h1 = random_hermitian(2, seed=4).data
    mean, variance = tensor_expectation(state, [((4, 1), h2), ((2,), h1)])
    # Operator on qargs (4, 1, 2): matrix index bit 0 -> qubit 4, bit 1 -> qubit 1, bit 2 -> qubit 2.
    op = Operator(np.kron(h1, h2))
    expected = exact.expectation_value(op, [4, 1, 2]).real
    second = exact.expectation_value(op @ op, [4, 1, 2]).real
    assert mean == pytest.approx(expected, abs=10 * tol)
    assert variance == pytest.approx(second - expected**2, abs=100 * tol)
    # The state is rotated back after the measurement basis change.
    np.testing.assert_allclose(state.to_host(), before, atol=10 * tol)


def test_bad_observables_raise():
    device, _ = resolve_device("CPU", 0)
    state = final_state(translate(random_circuit(2, 2, seed=1)), device, RunConfig())
    with pytest.raises(InvalidInputError, match="Hermitian"):
        tensor_expectation(state, [((0,), np.array([[0, 1], [0, 0]]))])
    with pytest.raises(InvalidInputError, match="repeat"):
        tensor_expectation(state, [((0,), PAULI["Z"]), ((0,), PAULI["X"])])
    with pytest.raises(InvalidInputError, match="outside"):
        marginal_probabilities(state, [2])


def test_evolve_refuses_measurements():
    from qiskit import QuantumCircuit

    qc = QuantumCircuit(1, 1)
    qc.measure(0, 0)
    device, _ = resolve_device("CPU", 0)
    with pytest.raises(SimulationError, match="gates only"):
        final_state(translate(qc), device, RunConfig())


@pytest.mark.parametrize("precision", ["double", "single"])
def test_readouts_of_a_state_in_place_need_no_second_array(device, precision, monkeypatch):
    """A state in place (no scratch buffer: how a state of which two copies do not fit runs) is
    read a chunk at a time: Pauli sums (X masks on the chunks' leading bits pair chunk j with
    chunk j ^ x), marginal probabilities, and a dense Hermitian term through its eigenbasis and
    back. Chunks of 4 KiB here, so a 16-qubit state takes 128 or 256 of them. Oracle:
    qiskit.quantum_info on the same amplitudes; no buffer nor copy may be allocated."""
    from gpu_provider.engine import expectation as E
    from gpu_provider.engine import statevector as S
    from gpu_provider.engine.devices import PRECISIONS
    from gpu_provider.engine.executor import new_state
    from gpu_provider.engine.observables import DenseTerm, Observable, expectations

    monkeypatch.setattr(S, "IN_PLACE_CHUNK_BYTES", 4096)
    n = 16
    dev, _ = resolve_device(device)
    state = new_state(dev, n, PRECISIONS[precision], in_place=True)
    rng = np.random.default_rng(8)
    for q in range(n):
        state.apply_unitary([q], np.linalg.qr(rng.normal(size=(2, 2)) + 1j * rng.normal(size=(2, 2)))[0])
    for step in range(12):
        qubits = [int(q) for q in rng.choice(n, 3, replace=False)]
        state.apply_unitary(qubits, Operator(random_circuit(3, 2, seed=step)).data if step % 2 else np.linalg.qr(rng.normal(size=(8, 8)) + 1j * rng.normal(size=(8, 8)))[0])
    exact = Statevector(state.to_host().astype(np.complex128))
    tol = 1e-10 if precision == "double" else 2e-5
    labels = ["".join(rng.choice(list("IXYZ"), n)) for _ in range(24)] + ["X" + "I" * (n - 2) + "X", "Y" * n, "Z" * n, "I" * n]
    operators = [SparsePauliOp(labels[:10], rng.normal(size=10)), SparsePauliOp(labels[10:], rng.normal(size=len(labels) - 10))]
    sums = []
    for operator in operators:
        x = [int(sum(int(b) << q for q, b in enumerate(p.x))) for p in operator.paulis]
        z = [int(sum(int(b) << q for q, b in enumerate(p.z))) for p in operator.paulis]
        sums.append(E.pauli_sum(n, x, z, operator.coeffs))
    E.expectation_values(state, sums)  # first calls import what NumPy loads lazily
    expectations(state, [Observable(n, None, (DenseTerm((1,), np.diag([1.0, -1.0])),))])
    tracemalloc.start()
    values = E.expectation_values(state, sums)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    np.testing.assert_allclose(values, [exact.expectation_value(o) for o in operators], atol=tol * 10)
    for qubits in ([0], [n - 1], [9, 2, 15, 0], list(range(n))[::-1]):
        np.testing.assert_allclose(marginal_probabilities(state, qubits), exact.probabilities(qubits), atol=tol)
    hermitian = random_hermitian(8, seed=4).data
    observable = Observable(n, sums[0], (DenseTerm((14, 3, 6), hermitian, 0.5),))
    expected = exact.expectation_value(operators[0]) + 0.5 * exact.expectation_value(Operator(hermitian), [14, 3, 6])
    tracemalloc.start()
    value = expectations(state, [observable])
    peak = max(peak, tracemalloc.get_traced_memory()[1])
    tracemalloc.stop()
    np.testing.assert_allclose(value, [expected], atol=tol * 10)
    assert state._buffer is None
    if device == "CPU":  # NumPy's allocations are traced: nothing near a copy of the state (1 MiB or 512 KiB)
        assert peak < state.data.nbytes // 2, peak
