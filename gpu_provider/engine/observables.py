"""Observables beyond Pauli sums, marginal probabilities, and ``O|psi>``, on the state's device.

An :class:`Observable` is a :class:`~gpu_provider.engine.expectation.PauliSum` part
(evaluated by the grouped pass of ``expectation.py``) plus dense Hermitian terms:
``coeff * matrix`` on a few ``qubits`` (``qubits[j]`` is bit j of the matrix index,
as for :class:`~gpu_provider.engine.program.Unitary`). A dense term's value is
``<psi|M|psi>`` from one copy of the state with ``M`` applied; nothing moves to the
host but the scalar. Written once against ``xp``; nothing here imports a host framework.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..errors import InvalidInputError
from .expectation import PauliSum, expectation_values
from .statevector import StateVector

# Widest dense observable term accepted (a 2^k x 2^k matrix applied to a copy of the state).
DENSE_MAX_QUBITS = 12

_X = np.array([[0, 1], [1, 0]], dtype=np.complex128)
_Z_DIAGONAL = np.array([1, -1], dtype=np.complex128)


@dataclass(frozen=True, eq=False)
class DenseTerm:
    """``coeff * matrix`` acting on ``qubits`` (``qubits[j]`` is bit j of the matrix index)."""

    qubits: tuple[int, ...]
    matrix: np.ndarray
    coeff: complex = 1.0


@dataclass(frozen=True, eq=False)
class Observable:
    """A Pauli sum (may be None) plus dense terms: ``pauli + sum_t dense[t]``."""

    num_qubits: int
    pauli: PauliSum | None = None
    dense: tuple[DenseTerm, ...] = ()

    def __post_init__(self) -> None:
        if self.pauli is not None and self.pauli.num_qubits != self.num_qubits:
            raise InvalidInputError(f"the Pauli part acts on {self.pauli.num_qubits} qubits, the observable on {self.num_qubits}")
        for term in self.dense:
            k = len(term.qubits)
            if k > DENSE_MAX_QUBITS:
                raise InvalidInputError(f"a dense observable term on {k} qubits is wider than the {DENSE_MAX_QUBITS} supported")
            if term.matrix.shape != (1 << k, 1 << k):
                raise InvalidInputError(f"a dense term on {k} qubits needs a {1 << k}x{1 << k} matrix, got {term.matrix.shape}")
            if any(not 0 <= q < self.num_qubits for q in term.qubits) or len(set(term.qubits)) != k:
                raise InvalidInputError(f"a dense term acts on qubits {term.qubits}, outside 0..{self.num_qubits - 1} or repeated")
            if not np.all(np.isfinite(term.matrix)):
                raise InvalidInputError("a dense observable matrix holds NaN or infinite entries")


def _aligned_copy(state: StateVector) -> StateVector:
    return state.snapshot()


def inner(state: StateVector, other: StateVector) -> complex:
    """``<state|other>``, with ``other`` first moved to ``state``'s axis order if it differs."""
    if other.order != state.order:
        other._reorder(list(state.order))
    value = state.xp.vdot(state.data, other.data)
    return complex(value.get() if hasattr(value, "get") else value)


def expectations(state: StateVector, observables: Sequence[Observable]) -> np.ndarray:
    """``<psi|O|psi>`` for each observable (complex128 on the host); Pauli parts share one grouped pass."""
    out = np.zeros(len(observables), dtype=np.complex128)
    paulis = [(i, o.pauli) for i, o in enumerate(observables) if o.pauli is not None and o.pauli.num_terms]
    if paulis:
        values = expectation_values(state, [p for _, p in paulis])
        for (i, _), value in zip(paulis, values):
            out[i] += value
    scratch = None
    for i, observable in enumerate(observables):
        for term in observable.dense:
            if scratch is None:
                scratch = _aligned_copy(state)
            else:
                scratch.copy_from(state)
            scratch.apply_unitary(term.qubits, term.matrix)  # any matrix: the product does not assume unitarity
            out[i] += term.coeff * inner(state, scratch)
    return out


def apply_observable(state: StateVector, observable: Observable, out: StateVector | None = None) -> StateVector:
    """``O|psi>`` as a new state on the same device (``out`` reused when given): one copy of
    ``psi`` per term, a Pauli term applied factor by factor, a dense term as one product."""
    if out is None:
        out = _aligned_copy(state)
    out.copy_from(state)
    out.data.fill(0)
    work = _aligned_copy(state)
    terms: list[tuple[complex, object]] = []
    if observable.pauli is not None:
        p = observable.pauli
        for t in range(p.num_terms):
            terms.append((complex(p.coeffs[t]), (int(p.x[t]), int(p.z[t]))))
    for term in observable.dense:
        terms.append((complex(term.coeff), term))
    for coeff, term in terms:
        if coeff == 0:
            continue
        work.copy_from(state)
        if isinstance(term, DenseTerm):
            work.apply_unitary(term.qubits, term.matrix)
        else:
            x, z = term
            # X^x Z^z: Z first (it acts first on the ket), then X; the Y factors' i is in coeff.
            for q in range(state.num_qubits):
                if (z >> q) & 1:
                    work.apply_diagonal((q,), _Z_DIAGONAL)
            for q in range(state.num_qubits):
                if (x >> q) & 1:
                    work.apply_unitary((q,), _X)
        if work.order != out.order:
            work._reorder(list(out.order))
        out.data += out.dtype.type(coeff) * work.data
    return out


def marginal_probabilities(state: StateVector, qubits: Sequence[int]) -> np.ndarray:
    """Probabilities of the outcomes of measuring ``qubits`` (bit j of an index is ``qubits[j]``),
    summed on the device; only 2^len(qubits) values come back, as float64."""
    xp = state.xp
    n = state.num_qubits
    if len(set(qubits)) != len(qubits) or any(not 0 <= q < n for q in qubits):
        raise InvalidInputError(f"qubits {tuple(qubits)} must be distinct and within 0..{n - 1}")
    real = np.float64 if state.dtype == np.complex128 else np.float32
    tensor = state.data.reshape((2,) * n) if n else state.data
    probs = xp.abs(tensor).astype(real) ** 2
    kept_axes = [state.axis(q) for q in qubits]
    summed = tuple(a for a in range(n) if a not in kept_axes)
    reduced = xp.sum(probs, axis=summed) if summed else probs
    # Axes left are the kept ones in increasing axis order; put qubits[-1] first (most significant).
    remaining = sorted(kept_axes)
    reduced = xp.transpose(reduced, [remaining.index(a) for a in reversed(kept_axes)]) if kept_axes else reduced
    flat = reduced.reshape(-1).astype(np.float64)
    return np.asarray(flat.get() if xp is not np else flat)
