"""Exact quantities read from a state, on its device: marginal probabilities, amplitudes,
the expectation value and variance of a tensor product of small Hermitian observables,
and observables beyond Pauli sums (``O|psi>``, ``<phi|psi>``).

Written once against the state's ``xp`` (NumPy or CuPy): the state stays on its
device and only small results come back to the host. Qubit order is the engine's:
bit ``j`` of an outcome index belongs to ``qubits[j]``, and a matrix's index bit
``i`` to its ``qubits[i]``.

An :class:`Observable` is a :class:`~gpu_provider.engine.expectation.PauliSum` part
(evaluated by the grouped pass of ``expectation.py``) plus dense Hermitian terms:
``coeff * matrix`` on a few ``qubits``. A dense term's value is ``<psi|M|psi>`` from
one copy of the state with ``M`` applied; nothing moves to the host but the scalar.
Host plugins use these for exact result types (Braket's ``shots=0``, PennyLane's
analytic measurements and adjoint gradients); nothing here imports a host framework.
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
    """A scratch copy for a read: one array (its gates apply a chunk at a time, no buffer)."""
    return state.snapshot(in_place=True)


def inner(state: StateVector, other: StateVector) -> complex:
    """``<state|other>``, with ``other`` first moved to ``state``'s axis order if it differs."""
    if other.order != state.order:
        other._reorder(list(state.order))
    value = state.xp.vdot(state.data, other.data)
    return complex(value.get() if hasattr(value, "get") else value)


def expectations(state: StateVector, observables: Sequence[Observable]) -> np.ndarray:
    """``<psi|O|psi>`` for each observable (complex128 on the host); Pauli parts share one grouped pass."""
    out = np.zeros(len(observables), dtype=np.complex128)
    if getattr(state, "distributed", False) and any(o.dense for o in observables):
        raise InvalidInputError(
            "a state split over MPI ranks takes observables that are sums of Pauli words; "
            "Hermitian, Projector and sparse terms need the whole state: run them without mpi"
        )
    paulis = [(i, o.pauli) for i, o in enumerate(observables) if o.pauli is not None and o.pauli.num_terms]
    if paulis:
        values = expectation_values(state, [p for _, p in paulis])
        for (i, _), value in zip(paulis, values):
            out[i] += value
    scratch = None
    for i, observable in enumerate(observables):
        for term in observable.dense:
            if getattr(state, "in_place", False):
                # No room for a copy: rotate into the term's eigenbasis and back (Hermitian terms).
                out[i] += term.coeff * tensor_expectation(state, [(term.qubits, term.matrix)])[0]
                continue
            if scratch is None:
                scratch = _aligned_copy(state)
            else:
                scratch.copy_from(state)
            scratch.apply_unitary(term.qubits, term.matrix)  # any matrix: the product does not assume unitarity
            out[i] += term.coeff * inner(state, scratch)
    return out


def apply_observable(state: StateVector, observable: Observable, out: StateVector | None = None) -> StateVector:
    """``O|psi>`` as a new state on the same device (``out`` reused when given), with one
    scratch copy of the state.

    A Pauli term ``c X^x Z^z`` is two passes: ``c Z^z psi`` into the scratch (one multiply
    by a broadcast table of signs on the term's Z qubits), then added to ``out`` read on
    the state's axes reversed where ``x`` has a bit (``(X^x v)[i] = v[i ^ x]``). A dense
    term is the scratch copy with its matrix applied. A state split over MPI ranks applies
    each factor as a gate (an X on a rank bit is an exchange).
    """
    if out is None:
        out = _aligned_copy(state)
    out.copy_from(state)
    out.data.fill(0)
    work = _aligned_copy(state)
    xp = state.xp
    local = not getattr(state, "distributed", False)
    pauli = observable.pauli
    terms: list[tuple[complex, object]] = []
    if pauli is not None:
        for t in range(pauli.num_terms):
            terms.append((complex(pauli.coeffs[t]), (int(pauli.x[t]), int(pauli.z[t]))))
    for term in observable.dense:
        terms.append((complex(term.coeff), term))
    for coeff, term in terms:
        if coeff == 0:
            continue
        if local and not isinstance(term, DenseTerm):
            x, z = term
            shape, signs, flipped = _pauli_views(state, x, z, coeff)
            xp.multiply(state.data.reshape(shape), xp.asarray(signs), out=work.data.reshape(shape))
            out_view = out.data.reshape(shape)
            out_view += work.data.reshape(shape)[flipped]
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
        work.data *= out.dtype.type(coeff)  # in place: no state-sized temporary
        out.data += work.data
    return out


def _pauli_views(state: StateVector, x: int, z: int, coeff: complex) -> tuple:
    """How to apply ``coeff X^x Z^z`` to ``state`` on a view of few axes: the state's shape with
    each run of axes that no factor touches merged into one, ``coeff Z^z`` as a table that
    broadcasts over it (+1 and -1 on each Z qubit's axis, 1 elsewhere), and the index that
    reverses each X qubit's axis."""
    shape: list[int] = []
    pattern: list[int] = []  # per axis of ``shape``: 0 untouched, else 1 | 2 (X) | 4 (Z)
    for q in state.order:
        kind = 1 | (2 if (x >> q) & 1 else 0) | (4 if (z >> q) & 1 else 0)
        if kind == 1:
            if shape and pattern[-1] == 0:
                shape[-1] *= 2
            else:
                shape.append(2)
                pattern.append(0)
        else:
            shape.append(2)
            pattern.append(kind)
    signs = np.full((1,) * len(shape), coeff, dtype=state.dtype)
    for axis, kind in enumerate(pattern):
        if kind & 4:
            one_axis = [1] * len(shape)
            one_axis[axis] = 2
            signs = signs * np.array([1, -1], dtype=state.dtype).reshape(one_axis)
    flipped = tuple(slice(None, None, -1) if kind & 2 else slice(None) for kind in pattern)
    return tuple(shape), signs, flipped


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

    Bit ``j`` of an outcome's index is the value of ``qubits[j]``. Read a chunk of at most
    ``IN_PLACE_CHUNK_BYTES`` of the state at a time (its leading bits fixed), so no
    state-sized temporary is made: a state in place or on the GPU kernels' single array
    needs nothing more.
    """
    _check_qubits(state, qubits)
    if getattr(state, "distributed", False):  # split over MPI ranks: reduced over them
        return state.marginal_probabilities(qubits)
    n = state.num_qubits
    state.to_canonical()
    xp = state.xp
    kept = sorted(n - 1 - q for q in qubits)  # canonical order: axis a holds qubit n-1-a
    inner = state.chunk_qubits()
    lead = n - inner
    lead_kept = [a for a in kept if a < lead]
    inner_kept = [a - lead for a in kept if a >= lead]
    # Merge each run of summed-out axes into one dimension: a few long reductions, not many short ones.
    shape: list[int] = []
    summed: list[int] = []
    run = 0
    for axis in range(inner + 1):
        if axis < inner and axis not in inner_kept:
            run += 1
            continue
        if run:
            summed.append(len(shape))
            shape.append(1 << run)
            run = 0
        if axis < inner:
            shape.append(2)
    real = np.float64 if state.dtype == np.complex128 else np.float32
    rows = state.data.reshape(1 << lead, 1 << inner)
    scratch = xp.empty(1 << inner, dtype=real)
    marginal = np.zeros((2,) * len(kept), dtype=np.float64)
    for j in range(1 << lead):
        xp.abs(rows[j], out=scratch)
        xp.square(scratch, out=scratch)
        part = scratch.reshape(shape)
        part = part.sum(axis=tuple(summed), dtype=np.float64) if summed else part.astype(np.float64)
        # The chunk's own bits pick where its marginal lands: leading axis a is bit lead-1-a of j.
        marginal[tuple((j >> (lead - 1 - a)) & 1 for a in lead_kept)] += _to_host(xp, part).reshape((2,) * len(inner_kept))
    # Leading axis = most significant bit = qubits[-1].
    order = [kept.index(n - 1 - q) for q in reversed(qubits)]
    return marginal.transpose(order).reshape(-1)


def amplitudes(state: StateVector, indices: Sequence[int]) -> np.ndarray:
    """The complex amplitudes (on the host) at canonical state ``indices`` (qubit 0 the low bit)."""
    size = 1 << state.num_qubits
    for index in indices:
        if not 0 <= index < size:
            raise InvalidInputError(f"amplitude index {index} is outside the {state.num_qubits}-qubit state")
    state.to_canonical()
    picked = state.data[state.xp.asarray(np.asarray(indices, dtype=np.int64))]
    return _to_host(state.xp, picked).astype(np.complex128)


# Widest reduced density matrix returned (2^k x 2^k complex128 on the host: 4 GiB at 14),
# and the state-sized copies computing one takes.
DENSITY_MATRIX_MAX_QUBITS = 14
DENSITY_MATRIX_COPIES = 2


def density_matrix_arrays(k: int, num_qubits: int, itemsize: int) -> int:
    """State-sized arrays a density matrix of ``k`` of ``num_qubits`` qubits holds (4^k complex128
    entries), for a memory check; one of at most 1 MiB fits in the workspace and counts none."""
    entries = 16 << (2 * k)
    return 0 if entries <= 1 << 20 else -(-entries // ((1 << num_qubits) * itemsize))


def reduced_density_matrix(state: StateVector, qubits: Sequence[int]) -> np.ndarray:
    """The density matrix of ``qubits`` (the rest traced out), complex128 on the host.

    Bit ``j`` of a row or column index is ``qubits[j]``. Computed on the state's device in
    its precision as ``A A^dagger``, ``A`` the state reordered to 2^k x 2^(n-k): the reorder
    and the conjugate are two state-sized copies (``DENSITY_MATRIX_COPIES``).
    """
    _check_qubits(state, qubits)
    k = len(qubits)
    if k > DENSITY_MATRIX_MAX_QUBITS:
        raise InvalidInputError(
            f"a density matrix of {k} qubits has 4^{k} entries ({(16 << (2 * k)) / 2**30:.0f} GiB); "
            f"ask for at most {DENSITY_MATRIX_MAX_QUBITS} qubits, or for probabilities or amplitudes instead"
        )
    if getattr(state, "distributed", False):
        raise InvalidInputError("a density matrix of a state split over MPI ranks is not available; ask for probabilities")
    n = state.num_qubits
    state.to_canonical()
    xp = state.xp
    tensor = state.data.reshape((2,) * n) if n else state.data
    # Canonical order: axis a holds qubit n-1-a. Rows: qubits[-1] most significant.
    front = [n - 1 - q for q in reversed(qubits)]
    matrix = xp.moveaxis(tensor, front, list(range(k))).reshape(1 << k, -1)
    return _to_host(xp, matrix @ matrix.conj().T).astype(np.complex128)


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
