"""Price a gate before building its matrix.

``to_matrix()`` can cost far more than the gate is worth: a ``PauliEvolutionGate``
builds its matrix with SciPy's sparse ``expm``, and a 10-qubit library block
(``QFTGate``, a permutation, ...) fills a 2^10 x 2^10 array that then costs
2^10 operations per amplitude to apply. :func:`price` looks at the gate first
and says what to do instead:

- Pauli evolutions are synthesized exactly, never approximated: terms that
  all commute become one small rotation each (a diagonal, or a basis change
  around one); terms that do not become one engine
  :class:`~gpu_provider.engine.program.PauliEvolution` (a Chebyshev expansion on the
  state), unless the gate is narrow enough that its dense exponential is cheap.
- Any other gate with a definition is expanded when applying its definition
  costs less than applying its dense matrix would.
"""

from __future__ import annotations

import functools
import math
from typing import Optional, Union

import numpy as np
from qiskit.circuit import Gate
from qiskit.circuit.library import PauliEvolutionGate

from ..engine import program as P
from ..errors import InvalidInputError

EXPAND = "expand"
# Evolutions of non-commuting terms on at most this many qubits use their dense exponential.
DENSE_EVOLUTION_MAX_QUBITS = 4
# Parity diagonals up to this width are one Diagonal; wider ones go through a CX ladder.
PARITY_DIAGONAL_MAX_QUBITS = 10
# Gates this narrow are always cheaper as a matrix (the kernels apply up to 5 qubits in one pass).
ALWAYS_DENSE_MAX_QUBITS = 5

_HADAMARD = np.array([[1, 1], [1, -1]], dtype=np.complex128) / math.sqrt(2)
# B with B Z B^dag = Y: S H.
_Y_BASIS = np.array([[1, 0], [0, 1j]], dtype=np.complex128) @ _HADAMARD
_CX = np.array([[1, 0, 0, 0], [0, 0, 0, 1], [0, 0, 1, 0], [0, 1, 0, 0]], dtype=np.complex128)
_PAULI = {
    (0, 0): np.eye(2, dtype=np.complex128),
    (1, 0): np.array([[0, 1], [1, 0]], dtype=np.complex128),
    (1, 1): np.array([[0, -1j], [1j, 0]], dtype=np.complex128),
    (0, 1): np.array([[1, 0], [0, -1]], dtype=np.complex128),
}
for _matrix in (_HADAMARD, _Y_BASIS, _CX, *_PAULI.values()):
    _matrix.setflags(write=False)


def price(op, qargs: tuple) -> Union[None, str, list]:
    """``None``: build the gate's matrix; ``EXPAND``: expand its definition; a list: these ops instead."""
    if isinstance(op, PauliEvolutionGate):
        terms = _pauli_terms(op)
        if terms is not None:
            return _evolution_ops(*terms, qargs)
    if not isinstance(op, Gate) or op.num_qubits <= ALWAYS_DENSE_MAX_QUBITS:
        return None
    if not hasattr(op, "__array__") or op.name == "unitary":
        return None  # no cheap matrix to weigh, or the matrix is the gate itself
    definition = op.definition
    if definition is None:
        return None
    # Per amplitude, a dense k-qubit matrix costs 2^k multiply-adds; the definition's
    # ops cost 2^(their width) each, and at least one pass over the state.
    dense = 2**op.num_qubits
    expanded = 0
    for instruction in definition.data:
        expanded += max(2, 2 ** min(instruction.operation.num_qubits, op.num_qubits))
        if expanded >= dense:
            return None
    return EXPAND


def _pauli_terms(op) -> Optional[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(x, z, angles) of exp(-i t H), one row per term of H with its phase folded in; None if unknown."""
    from qiskit.quantum_info import SparsePauliOp

    operators = op.operator if isinstance(op.operator, (list, tuple)) else [op.operator]
    parts = []
    for operator in operators:
        if isinstance(operator, SparsePauliOp):
            parts.append(operator)
        elif hasattr(SparsePauliOp, "from_sparse_observable") and type(operator).__name__ == "SparseObservable":
            parts.append(SparsePauliOp.from_sparse_observable(operator))
        else:
            try:
                parts.append(SparsePauliOp(operator))
            except Exception:  # an operator we do not know: let its matrix decide
                return None
    total = SparsePauliOp.sum(parts).simplify(atol=0) if len(parts) > 1 else parts[0]
    try:
        coefficients = np.asarray(total.coeffs, dtype=np.complex128)
        time = complex(op.params[0])
    except (TypeError, ValueError):
        return None
    paulis = total.paulis
    # The label phase q of each Pauli: its matrix is (-i)^q times the plain product.
    angles = coefficients * (-1j) ** paulis.phase * time
    if np.any(np.abs(angles.imag) > 1e-12 * max(1.0, float(np.max(np.abs(angles))))):
        raise InvalidInputError(
            f"{op.name} evolves a non-Hermitian operator (complex coefficients); exp(-iHt) is then not unitary"
        )
    return np.asarray(paulis.x, dtype=bool), np.asarray(paulis.z, dtype=bool), angles.real


def _masks(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.int64) << np.arange(bits.shape[1], dtype=np.int64)).sum(axis=1)


def _evolution_ops(x: np.ndarray, z: np.ndarray, angles: np.ndarray, qargs: tuple) -> list:
    ops: list = []
    identity = ~(x | z).any(axis=1)
    phase = -float(angles[identity].sum())
    x, z, angles = x[~identity], z[~identity], angles[~identity]
    keep = angles != 0
    x, z, angles = x[keep], z[keep], angles[keep]
    if len(angles):
        xi, zi = x.astype(np.int64), z.astype(np.int64)
        anticommute = (xi @ zi.T + zi @ xi.T) % 2
        if not anticommute.any():  # commuting terms: a product of exact rotations
            for row in range(len(angles)):
                ops.extend(_rotation(x[row], z[row], float(angles[row]), qargs))
        else:
            support = np.flatnonzero((x | z).any(axis=0))
            x, z = x[:, support], z[:, support]
            qubits = tuple(qargs[i] for i in support)
            if len(qubits) <= DENSE_EVOLUTION_MAX_QUBITS:
                ops.append(P.Unitary(qubits, _dense_evolution(x, z, angles), label="PauliEvolution"))
            else:
                ops.append(P.PauliEvolution(qubits, tuple(int(m) for m in _masks(x)), tuple(int(m) for m in _masks(z)), tuple(float(a) for a in angles)))
    if phase:
        ops.append(P.GlobalPhase(phase))
    return ops


def _pauli_matrix(x_row: np.ndarray, z_row: np.ndarray) -> np.ndarray:
    matrix = np.ones((1, 1), dtype=np.complex128)
    for xb, zb in zip(x_row, z_row):  # qubit i is bit i: it goes on the left of the lower ones
        matrix = np.kron(_PAULI[(int(xb), int(zb))], matrix)
    return matrix


def _dense_evolution(x: np.ndarray, z: np.ndarray, angles: np.ndarray) -> np.ndarray:
    hamiltonian = sum(angle * _pauli_matrix(x[row], z[row]) for row, angle in enumerate(angles))
    values, vectors = np.linalg.eigh(hamiltonian)
    return (vectors * np.exp(-1j * values)) @ vectors.conj().T


def _rotation(x_row: np.ndarray, z_row: np.ndarray, angle: float, qargs: tuple) -> list:
    """exp(-i angle P) for one Pauli P, exactly, as small engine ops."""
    support = [i for i in range(len(x_row)) if x_row[i] or z_row[i]]
    qubits = tuple(qargs[i] for i in support)
    if not x_row.any():  # Z only: a diagonal of the parity
        return _parity_rotation(qubits, angle)
    if len(support) <= 2:  # cos(angle) I - i sin(angle) P, directly
        bits = tuple((int(x_row[i]), int(z_row[i])) for i in support)
        return [P.Unitary(qubits, _small_rotation(bits, angle), label="PauliEvolution")]
    # Rotate X and Y into Z, turn by the parity, rotate back.
    into, back = [], []
    for i, q in zip(support, qubits):
        if x_row[i]:
            basis = _Y_BASIS if z_row[i] else _HADAMARD
            into.append(P.Unitary((q,), np.ascontiguousarray(basis.conj().T), label="basis"))
            back.append(P.Unitary((q,), basis, label="basis"))
    return into + _parity_rotation(qubits, angle) + back


# Rotations repeat across layers and circuits (QAOA, Trotter steps): build each once.
@functools.lru_cache(maxsize=4096)
def _small_rotation(bits: tuple, angle: float) -> np.ndarray:
    pauli = np.ones((1, 1), dtype=np.complex128)
    for x, z in bits:
        pauli = np.kron(_PAULI[(x, z)], pauli)
    matrix = math.cos(angle) * np.eye(len(pauli)) - 1j * math.sin(angle) * pauli
    matrix.setflags(write=False)
    return matrix


@functools.lru_cache(maxsize=4096)
def _parity_diagonal(width: int, angle: float) -> np.ndarray:
    index = np.arange(1 << width)
    parity = np.zeros_like(index)
    for bit in range(width):
        parity ^= (index >> bit) & 1
    diagonal = np.exp(-1j * angle * (1 - 2 * parity))
    diagonal.setflags(write=False)
    return diagonal


def _parity_rotation(qubits: tuple, angle: float) -> list:
    """exp(-i angle Z...Z) on ``qubits``."""
    if len(qubits) <= PARITY_DIAGONAL_MAX_QUBITS:
        return [P.Diagonal(qubits, _parity_diagonal(len(qubits), angle), "PauliEvolution")]
    # Wider: gather the parity onto the last qubit with CX gates, rotate it, undo.
    target = qubits[-1]
    ladder = [P.Unitary((control, target), _CX, label="cx") for control in qubits[:-1]]
    return ladder + [P.Diagonal((target,), np.exp(-1j * angle * np.array([1.0, -1.0])), "PauliEvolution")] + ladder[::-1]
