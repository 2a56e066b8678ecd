"""Exact quantities read from a final state: marginal probabilities, amplitudes, and the
expectation value and variance of a tensor product of small Hermitian observables.

Written once against the state's ``xp`` (NumPy or CuPy): the state stays on its
device and only small results (2^k numbers) come back to the host. Qubit order
is the engine's: bit ``j`` of an outcome index belongs to ``qubits[j]``, and a
factor's matrix index bit ``i`` to its ``qubits[i]``.

These serve host plugins that ask for exact result types (Braket's
``shots=0``); a grouped Pauli pass for Qiskit's Estimator is separate.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..errors import InvalidInputError
from .statevector import StateVector


def _check_qubits(state: StateVector, qubits: Sequence[int]) -> None:
    if len(set(qubits)) != len(qubits):
        raise InvalidInputError(f"qubits {tuple(qubits)} repeat a qubit; each may appear once")
    for q in qubits:
        if not 0 <= q < state.num_qubits:
            raise InvalidInputError(f"qubit {q} is outside the {state.num_qubits}-qubit state")


def _to_host(xp, array) -> np.ndarray:
    return np.asarray(array if xp is np else array.get())


def marginal_probabilities(state: StateVector, qubits: Sequence[int]) -> np.ndarray:
    """Probabilities (float64, on the host) of the 2^k outcomes of measuring ``qubits``.

    Bit ``j`` of an outcome's index is the value of ``qubits[j]``.
    """
    _check_qubits(state, qubits)
    n = state.num_qubits
    kept = sorted(n - 1 - q for q in qubits)  # canonical order: axis a holds qubit n-1-a
    # Merge each run of summed-out axes into one dimension: a few long reductions, not many short ones.
    shape: list[int] = []
    summed: list[int] = []
    run = 0
    for axis in range(n + 1):
        if axis < n and axis not in kept:
            run += 1
            continue
        if run:
            summed.append(len(shape))
            shape.append(1 << run)
            run = 0
        if axis < n:
            shape.append(2)
    probabilities = state.probabilities().reshape(shape)
    marginal = probabilities.sum(axis=tuple(summed), dtype=np.float64) if summed else probabilities.astype(np.float64)
    # Leading axis = most significant bit = qubits[-1].
    order = [kept.index(n - 1 - q) for q in reversed(qubits)]
    return _to_host(state.xp, marginal.reshape((2,) * len(kept)).transpose(order).reshape(-1))


def amplitudes(state: StateVector, indices: Sequence[int]) -> np.ndarray:
    """The complex amplitudes (on the host) at canonical state ``indices`` (qubit 0 the low bit)."""
    size = 1 << state.num_qubits
    for index in indices:
        if not 0 <= index < size:
            raise InvalidInputError(f"amplitude index {index} is outside the {state.num_qubits}-qubit state")
    state.to_canonical()
    picked = state.data[state.xp.asarray(np.asarray(indices, dtype=np.int64))]
    return _to_host(state.xp, picked).astype(np.complex128)


def _is_diagonal(matrix: np.ndarray) -> bool:
    return bool(np.count_nonzero(matrix - np.diag(np.diagonal(matrix))) == 0)


def tensor_expectation(state: StateVector, factors: Sequence[tuple[Sequence[int], np.ndarray]]) -> tuple[float, float]:
    """``(<O>, <O^2> - <O>^2)`` for ``O`` the tensor product of Hermitian ``factors``.

    Each factor is ``(qubits, matrix)`` with a 2^k x 2^k Hermitian matrix; the
    factors act on disjoint qubits. Non-diagonal factors are rotated into their
    eigenbasis on the state in place and rotated back afterwards, so no copy of
    the state is made; the moments come from the marginal probabilities of the
    factors' qubits weighted by the product of eigenvalues.

    Raises:
        InvalidInputError: overlapping qubits, a matrix of the wrong size or not Hermitian.
    """
    all_qubits: list[int] = []
    eigenvalues = np.ones(1)
    rotations: list[tuple[tuple[int, ...], np.ndarray]] = []
    for qubits, matrix in factors:
        qubits = tuple(int(q) for q in qubits)
        matrix = np.asarray(matrix, dtype=np.complex128)
        if matrix.shape != (1 << len(qubits),) * 2:
            raise InvalidInputError(f"an observable on {len(qubits)} qubits needs a {1 << len(qubits)}-square matrix, not {matrix.shape}")
        if not np.allclose(matrix, matrix.conj().T, atol=1e-10):
            raise InvalidInputError(f"the observable on qubits {qubits} is not Hermitian")
        if _is_diagonal(matrix):
            values = np.diagonal(matrix).real
        else:
            values, vectors = np.linalg.eigh(matrix)
            rotations.append((qubits, vectors.conj().T))  # eigenbasis -> computational basis
        all_qubits.extend(qubits)
        eigenvalues = np.kron(values, eigenvalues)  # later factors take the higher bits
    _check_qubits(state, all_qubits)
    if not all_qubits:
        return float(eigenvalues[0]), 0.0
    for qubits, rotation in rotations:
        state.apply_unitary(qubits, rotation)
    try:
        probabilities = marginal_probabilities(state, all_qubits)
    finally:
        for qubits, rotation in reversed(rotations):
            state.apply_unitary(qubits, rotation.conj().T)
    mean = float(probabilities @ eigenvalues)
    second = float(probabilities @ (eigenvalues * eigenvalues))
    return mean, max(second - mean * mean, 0.0)
