"""Grouped Pauli expectation values (engine/expectation.py) against dense matrices."""

from __future__ import annotations

import functools

import numpy as np
import pytest

from gpu_provider.engine.expectation import PauliSum, expectation_values, pauli_sum
from gpu_provider.engine.statevector import StateVector
from gpu_provider.errors import InvalidInputError
from tests.engine.test_kernels_gpu import random_state, random_unitary

PAULI = {
    "I": np.eye(2),
    "X": np.array([[0, 1], [1, 0]]),
    "Y": np.array([[0, -1j], [1j, 0]]),
    "Z": np.diag([1, -1]),
}


def dense(label: str) -> np.ndarray:
    """The matrix of a Pauli label, Qiskit order (rightmost letter is qubit 0)."""
    return functools.reduce(np.kron, [PAULI[c] for c in label]).astype(np.complex128)


def masks(label: str) -> tuple[int, int]:
    x = z = 0
    for q, c in enumerate(reversed(label)):
        if c in "XY":
            x |= 1 << q
        if c in "ZY":
            z |= 1 << q
    return x, z


def observable(n: int, labels, coeffs) -> PauliSum:
    xz = [masks(label) for label in labels]
    return pauli_sum(n, [a for a, _ in xz], [b for _, b in xz], coeffs)


def random_labels(rng, n: int, count: int) -> list[str]:
    return ["".join(rng.choice(list("IXYZ"), size=n)) for _ in range(count)]


@pytest.mark.parametrize("dtype, tolerance", [(np.complex128, 1e-12), (np.complex64, 1e-5)])
@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_matches_dense_matrices_in_any_axis_order(dtype, tolerance, n):
    rng = np.random.default_rng(n)
    initial = random_state(rng, n)
    labels = random_labels(rng, n, 30) + ["I" * n, "Y" * n]
    coeffs = rng.normal(size=len(labels))
    state = StateVector(np, n, dtype)
    state.data[...] = initial
    # Apply a random wide unitary through the lazy-order path, so the axis order is not canonical.
    qubits = [int(q) for q in rng.permutation(n)[: min(n, 3)]]
    matrix = random_unitary(rng, 1 << len(qubits))
    state.apply_unitary(qubits, matrix)
    if n > 2:
        state._reorder([int(q) for q in rng.permutation(n)])
    reference = StateVector(np, n, np.complex128)
    reference.data[...] = initial
    reference.apply_unitary(qubits, matrix)
    psi = reference.to_host()
    values = expectation_values(state, [observable(n, labels, coeffs), observable(n, labels[:1], [1.0])])
    expected_sum = sum(c * np.vdot(psi, dense(label) @ psi) for label, c in zip(labels, coeffs))
    expected_first = np.vdot(psi, dense(labels[0]) @ psi)
    assert values.shape == (2,)
    assert abs(values[0] - expected_sum) <= tolerance * np.sum(np.abs(coeffs)) * 10
    assert abs(values[1] - expected_first) <= tolerance * 10
    assert abs(values.imag).max() <= tolerance * np.sum(np.abs(coeffs)) * 10  # Hermitian sums are real


@pytest.mark.parametrize("dtype, tolerance", [(np.complex128, 1e-12), (np.complex64, 1e-5)])
def test_parity_sums_split_into_high_and_low_bits_and_blocks_of_terms(dtype, tolerance, monkeypatch):
    """The parity sums as one product of the state's high-by-low matrix with sign tables: forced
    here to split 9 bits into 2 low and 7 high and to take one term per block, many terms to a
    Z-only group and one X group with real and imaginary parts, the batch path (two rows) too."""
    from gpu_provider.engine import expectation as E

    monkeypatch.setattr(E, "PARITY_LOW_BITS", 2)
    monkeypatch.setattr(E, "PARITY_BLOCK_BYTES", 8)
    n = 9
    rng = np.random.default_rng(12)
    labels = ["".join(rng.choice(list("IZ"), size=n)) for _ in range(12)]
    labels += ["XIYZIIXZY", "XIYZZIXIY", "YIXZIIXZY", "XIYIIIXZX"]  # one X mask: even and odd x & z
    coeffs = rng.normal(size=len(labels))
    rows = [random_state(rng, n) for _ in range(2)]
    for psi in rows:
        state = StateVector(np, n, dtype)
        state.data[...] = psi
        expected = sum(c * np.vdot(psi, dense(label) @ psi) for label, c in zip(labels, coeffs))
        assert abs(expectation_values(state, [observable(n, labels, coeffs)])[0] - expected) <= tolerance * 10 * np.sum(np.abs(coeffs))
    data = np.stack(rows).astype(dtype)  # two rows at once, as a batch of states reads them
    for group in (labels[:12], labels[12:]):
        x = masks(group[0])[0]
        values = E._group_values(np, data, n, x, [masks(label)[1] for label in group], np.empty(data.size, dtype=dtype))
        for row, psi in enumerate(rows):
            # <X^x Z^z> (the Y factors' i not folded in): psi^dagger X^x Z^z psi
            exact = []
            for label in group:
                xz = "".join("X" if c in "XY" else "I" for c in label), "".join("Z" if c in "ZY" else "I" for c in label)
                exact.append(np.vdot(psi, dense(xz[0]) @ dense(xz[1]) @ psi))
            np.testing.assert_allclose(values[row], exact, atol=tolerance * 10)


def test_duplicate_terms_and_shared_terms_between_observables():
    n = 3
    rng = np.random.default_rng(1)
    state = StateVector(np, n, np.complex128)
    state.data[...] = random_state(rng, n)
    psi = state.to_host()
    a = observable(n, ["XYZ", "XYZ", "ZZI"], [1.0, 2.0, -1.0])
    b = observable(n, ["ZZI"], [0.5])
    values = expectation_values(state, [a, b, observable(n, [], [])])
    zz = np.vdot(psi, dense("ZZI") @ psi)
    assert np.allclose(values, [3 * np.vdot(psi, dense("XYZ") @ psi) - zz, 0.5 * zz, 0.0])


def test_bad_observables_are_refused():
    state = StateVector(np, 2, np.complex128)
    with pytest.raises(InvalidInputError, match="acts on 3 qubits"):
        expectation_values(state, [observable(3, ["ZZZ"], [1.0])])
    with pytest.raises(InvalidInputError, match="outside"):
        pauli_sum(2, [4], [0], [1.0])
    with pytest.raises(InvalidInputError, match="NaN"):
        pauli_sum(2, [1], [0], [np.nan])
    with pytest.raises(InvalidInputError, match="one entry per term"):
        pauli_sum(2, [1, 2], [0], [1.0])


def test_many_terms_of_one_group_stay_within_the_workspace():
    """3000 terms sharing one X mask (and 3000 Z-only terms) on a 14-qubit state: the parity
    sums' sign tables and products go in blocks of terms, so the read's temporaries stay well
    inside the 64 MiB workspace the memory checks allow it (traced by tracemalloc), and the
    values match term-by-term sums of the dense state."""
    import tracemalloc

    from gpu_provider.engine.executor import WORKSPACE_BYTES

    n, terms = 14, 3000
    rng = np.random.default_rng(3)
    psi = random_state(rng, n)
    state = StateVector(np, n, np.complex128, in_place=True)
    state.data[...] = psi
    index = np.arange(1 << n)
    for x in (0b1011 << (n - 4) | 0b101, 0):
        z = rng.integers(0, 1 << n, size=terms)
        coeffs = rng.normal(size=terms) / terms
        observable = pauli_sum(n, np.full(terms, x), z, coeffs)
        expectation_values(state, [observable])  # warm-up: lazy imports
        tracemalloc.start()
        value = expectation_values(state, [observable])[0]
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < WORKSPACE_BYTES // 2, peak
        pairs = np.conj(psi[index ^ x]) * psi
        expected = 0j
        for start in range(0, terms, 250):  # (-1)^popcount(i & z) for a block of terms
            bits = z[start : start + 250, None] & index[None, :]
            for shift in (8, 4, 2, 1):
                bits ^= bits >> shift
            # observable.coeffs has each Y's i folded in, as the engine reads it
            expected += np.sum(observable.coeffs[start : start + 250] * ((1 - 2 * (bits & 1)) @ pairs))
        assert abs(value - expected) <= 1e-10
