"""Dense observables, O|psi>, marginal probabilities (engine/observables.py) and the adjoint
sweep (engine/adjoint.py) against dense linear algebra and finite differences; no host framework."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.linalg import expm

from gpu_provider.engine.adjoint import AdjointStep, adjoint_jacobian, apply_gate
from gpu_provider.engine.expectation import pauli_sum, transition_expectation
from gpu_provider.engine.observables import DenseTerm, Observable, apply_observable, expectations, marginal_probabilities
from gpu_provider.engine.program import Diagonal, GlobalPhase, Unitary
from gpu_provider.engine.statevector import StateVector
from gpu_provider.errors import InvalidInputError
from tests.engine.test_expectation import dense, masks
from tests.engine.test_kernels_gpu import random_state, random_unitary

X = np.array([[0, 1], [1, 0]], dtype=np.complex128)
Y = np.array([[0, -1j], [1j, 0]], dtype=np.complex128)
Z = np.diag([1.0, -1.0]).astype(np.complex128)


def embed(n: int, qubits, matrix) -> np.ndarray:
    """The 2^n matrix of ``matrix`` on ``qubits`` (bit j of its index is qubits[j])."""
    dim = 1 << n
    full = np.zeros((dim, dim), dtype=np.complex128)
    k = len(qubits)
    for col in range(dim):
        sub_col = sum(((col >> q) & 1) << j for j, q in enumerate(qubits))
        rest = col & ~sum(1 << q for q in qubits)
        for sub_row in range(1 << k):
            row = rest | sum(((sub_row >> j) & 1) << q for j, q in enumerate(qubits))
            full[row, col] += matrix[sub_row, sub_col]
    return full


def hermitian(rng, k: int) -> np.ndarray:
    a = rng.normal(size=(1 << k, 1 << k)) + 1j * rng.normal(size=(1 << k, 1 << k))
    return a + a.conj().T


def mixed_observable(rng, n: int):
    labels = ["".join(rng.choice(list("IXYZ"), size=n)) for _ in range(5)]
    coeffs = rng.normal(size=5)
    xz = [masks(label) for label in labels]
    pauli = pauli_sum(n, [a for a, _ in xz], [b for _, b in xz], coeffs)
    qubits = tuple(int(q) for q in rng.permutation(n)[:2])
    matrix = hermitian(rng, 2)
    observable = Observable(n, pauli, (DenseTerm(qubits, matrix, 0.7),))
    full = sum(c * dense(label) for label, c in zip(labels, coeffs)) + 0.7 * embed(n, qubits, matrix)
    return observable, full


def state_from(psi: np.ndarray, dtype=np.complex128) -> StateVector:
    n = psi.shape[0].bit_length() - 1
    state = StateVector(np, n, dtype)
    state.data[...] = psi
    return state


@pytest.mark.parametrize("n, dtype, in_place", [(1, np.complex128, False), (3, np.complex128, False), (6, np.complex128, False),
                                                (6, np.complex64, False), (7, np.complex128, True)])
def test_expectations_and_apply_observable_match_dense(n, dtype, in_place):
    rng = np.random.default_rng(n)
    psi = random_state(rng, n)
    observable, full = mixed_observable(rng, n) if n >= 2 else (Observable(1, None, (DenseTerm((0,), hermitian(rng, 1), 1.0),)), None)
    if full is None:
        full = observable.dense[0].matrix
    state = state_from(psi, dtype)
    if n > 2:  # a non-canonical axis order must not matter
        state._reorder([int(q) for q in rng.permutation(n)])
    state.in_place = in_place
    tolerance = 1e-10 if dtype == np.complex128 else 2e-5
    value = expectations(state, [observable])[0]
    assert abs(value - np.vdot(psi, full @ psi)) < tolerance * 10
    applied = apply_observable(state, observable)
    applied.to_canonical()
    np.testing.assert_allclose(applied.data, full @ psi, atol=tolerance * 10)
    # Into a given state, whatever it held, and with every Pauli term sharing one X mask or none.
    labels = ["ZIY" + "I" * (n - 3), "XZX" + "Z" * (n - 3), "YIX" + "I" * (n - 3), "Z" * n] if n >= 3 else ["Z" * n]
    coeffs = rng.normal(size=len(labels)) + 0.3j * rng.normal(size=len(labels))
    xz = [masks(label) for label in labels]
    paulis = Observable(n, pauli_sum(n, [a for a, _ in xz], [b for _, b in xz], coeffs))
    expected = sum(c * dense(label) for label, c in zip(labels, coeffs)) @ psi
    out = state.snapshot()
    out.data[...] = 7.0
    again = apply_observable(state, paulis, out=out)
    assert again is out
    again.to_canonical()
    np.testing.assert_allclose(again.data, expected, atol=tolerance * 10)


def test_marginal_probabilities_follow_the_qubit_order():
    rng = np.random.default_rng(3)
    n = 5
    psi = random_state(rng, n)
    state = state_from(psi)
    state._reorder([2, 0, 4, 1, 3])
    probs = np.abs(psi) ** 2
    for qubits in ([0], [3, 1], [4, 0, 2], list(range(n))):
        expected = np.zeros(1 << len(qubits))
        for index, p in enumerate(probs):
            expected[sum(((index >> q) & 1) << j for j, q in enumerate(qubits))] += p
        np.testing.assert_allclose(marginal_probabilities(state, qubits), expected, atol=1e-12)


def test_bad_observables_are_refused():
    with pytest.raises(InvalidInputError):
        Observable(2, None, (DenseTerm((0, 2), np.eye(4)),))
    with pytest.raises(InvalidInputError):
        Observable(2, None, (DenseTerm((0,), np.eye(4)),))
    with pytest.raises(InvalidInputError):
        marginal_probabilities(StateVector(np, 2, np.complex128), [0, 0])


# ---------------------------------------------------------------------------
# the adjoint sweep


PAULI_OF = {id(X): "X", id(Y): "Y", id(Z): "Z"}
MODE = {"derivative": True}


def generator_sum(n: int, qubits, generator: np.ndarray):
    """-G/2 as a PauliSum (U = exp(-i theta G/2) = exp(i theta (-G/2))), for G = X, Y, Z or Z (x) Z."""
    x = z = 0
    letters = [PAULI_OF[id(generator)]] if generator.shape == (2, 2) else ["Z", "Z"]
    for q, letter in zip(qubits, letters):
        if letter in "XY":
            x |= 1 << q
        if letter in "YZ":
            z |= 1 << q
    return pauli_sum(n, [x], [z], [-0.5])


def rotation_step(n: int, qubits, generator: np.ndarray, theta: float, column: int | None):
    """exp(-i theta/2 G) on ``qubits`` as a step; derivative -i/2 G U (a matrix, or the generator)."""
    u = expm(-0.5j * theta * generator)
    du = -0.5j * generator @ u
    diagonal = np.count_nonzero(generator - np.diag(np.diag(generator))) == 0
    if diagonal:
        gate, inverse, derivative = Diagonal(qubits, np.diag(u).copy()), Diagonal(qubits, np.diag(u).conj().copy()), Diagonal(qubits, np.diag(du).copy())
    else:
        gate, inverse, derivative = Unitary(qubits, u), Unitary(qubits, u.conj().T.copy()), Unitary(qubits, du)
    if column is None:
        return AdjointStep(gate, inverse)
    if MODE["derivative"]:
        return AdjointStep(gate, inverse, ((column, derivative),))
    return AdjointStep(gate, inverse, generators=((column, generator_sum(n, qubits, generator)),))


def build_circuit(n: int, thetas, rng):
    """Random layers of RX, RY, RZ (diagonal), ZZ (diagonal) and a fixed entangler; thetas[i]
    feeds column i, and the last parameter is used by two gates (its derivatives add up)."""
    steps = []
    column = 0
    for layer in range(2):
        for q in range(n):
            generator = (X, Y, Z)[(q + layer) % 3]
            steps.append(rotation_step(n, (q,), generator, thetas[column], column))
            column += 1
        for q in range(n - 1):
            steps.append(rotation_step(n, (q, q + 1), np.kron(Z, Z), thetas[column], column))
            column += 1
        fixed = random_unitary(rng, 4)
        steps.append(AdjointStep(Unitary((0, n - 1), fixed), Unitary((0, n - 1), fixed.conj().T.copy())))
    steps.append(AdjointStep(GlobalPhase(0.3), GlobalPhase(-0.3)))
    steps.append(rotation_step(n, (1,), X, thetas[0], 0))  # reuses parameter 0
    return steps, column


def forward(n: int, steps, dtype=np.complex128) -> StateVector:
    state = StateVector(np, n, dtype)
    for step in steps:
        apply_gate(state, step.gate)
    return state


@pytest.mark.parametrize("mode", ["derivative", "generator"])
@pytest.mark.parametrize("n", [3, 5])
def test_adjoint_jacobian_matches_central_differences(n, mode, monkeypatch):
    monkeypatch.setitem(MODE, "derivative", mode == "derivative")
    rng = np.random.default_rng(10 + n)
    num = 2 * (n + n - 1)
    thetas = rng.uniform(-np.pi, np.pi, size=num)
    steps, columns = build_circuit(n, thetas, np.random.default_rng(1))
    assert columns == num
    observables = [mixed_observable(np.random.default_rng(5), n)[0], Observable(n, pauli_sum(n, [0], [1], [1.0]))]
    jac = adjoint_jacobian(forward(n, steps), steps, observables, num)

    def values(t):
        s, _ = build_circuit(n, t, np.random.default_rng(1))
        return expectations(forward(n, s), observables).real

    h = 1e-6
    expected = np.zeros_like(jac)
    for j in range(num):
        step = np.zeros(num)
        step[j] = h
        expected[:, j] = (values(thetas + step) - values(thetas - step)) / (2 * h)
    np.testing.assert_allclose(jac, expected, atol=1e-6)


def test_adjoint_in_single_precision_and_on_a_reordered_state():
    n = 4
    rng = np.random.default_rng(2)
    thetas = rng.uniform(-1, 1, size=2 * (n + n - 1))
    steps, num = build_circuit(n, thetas, np.random.default_rng(1))
    observables = [mixed_observable(np.random.default_rng(6), n)[0]]
    exact = adjoint_jacobian(forward(n, steps), steps, observables, num)
    state = forward(n, steps, np.complex64)
    state._reorder([1, 3, 0, 2])
    single = adjoint_jacobian(state, steps, observables, num)
    np.testing.assert_allclose(single, exact, atol=2e-4)


@pytest.mark.parametrize("chunk_bytes", [None, 64, 16])
@pytest.mark.parametrize("dtype, tolerance", [(np.complex128, 1e-10), (np.complex64, 2e-5)])
def test_transition_expectation_matches_dense(monkeypatch, chunk_bytes, dtype, tolerance):
    """Against the dense matrix, with the state in one chunk or cut into chunks of 2^2 and 2^0
    amplitudes (X flipping leading bits, terms sharing an X mask), in a non-canonical axis order."""
    from gpu_provider.engine import expectation as E
    from gpu_provider.engine import statevector as S

    if chunk_bytes is not None:
        monkeypatch.setattr(S, "IN_PLACE_CHUNK_BYTES", chunk_bytes * np.dtype(dtype).itemsize // 16)
        monkeypatch.setattr(E, "PARITY_LOW_BITS", 1)
    rng = np.random.default_rng(4)
    n = 5
    bra_psi, ket_psi = random_state(rng, n), random_state(rng, n)
    labels = ["".join(rng.choice(list("IXYZ"), size=n)) for _ in range(12)] + ["XZIIY", "XIZZY", "IIIII", "ZZZZZ"]
    coeffs = rng.normal(size=len(labels)) + 1j * rng.normal(size=len(labels))
    xz = [masks(label) for label in labels]
    observable = pauli_sum(n, [a for a, _ in xz], [b for _, b in xz], coeffs)
    full = sum(c * dense(label) for label, c in zip(labels, coeffs))
    bra, ket = StateVector(np, n, dtype), StateVector(np, n, dtype)
    bra.data[:] = bra_psi.astype(dtype)
    ket.data[:] = ket_psi.astype(dtype)
    ket._reorder([3, 1, 4, 0, 2])  # the bra is moved to the ket's order
    ket._buffer = None  # the reorder's: the read itself allocates none
    expected = np.vdot(bra_psi, full @ ket_psi)
    assert abs(transition_expectation(bra, ket, observable) - expected) < tolerance
    for label, c in zip(labels, coeffs):  # one term at a time too
        a, b = masks(label)
        single = transition_expectation(bra, ket, pauli_sum(n, [a], [b], [c]))
        assert abs(single - c * np.vdot(bra_psi, dense(label) @ ket_psi)) < tolerance, label
    assert ket._buffer is None  # no scratch buffer allocated for the read


def test_transition_expectation_of_no_qubits():
    bra, ket = StateVector(np, 0, np.complex128), StateVector(np, 0, np.complex128)
    bra.data[:] = 0.6 - 0.8j
    ket.data[:] = 1j
    assert abs(transition_expectation(bra, ket, pauli_sum(0, [0], [0], [2.0])) - 2 * (0.6 + 0.8j) * 1j) < 1e-12


def test_adjoint_refuses_non_gates_and_bad_columns():
    state = StateVector(np, 1, np.complex128)
    obs = [Observable(1, pauli_sum(1, [0], [1], [1.0]))]
    step = rotation_step(1, (0,), X, 0.1, 3)
    with pytest.raises(InvalidInputError):
        adjoint_jacobian(state, [step], obs, 1)
    assert adjoint_jacobian(state, [], obs, 0).shape == (1, 0)
