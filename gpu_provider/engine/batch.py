"""Many parameter sets of one small circuit as a batch of states, evolved together.

A primitive's parameter sweep binds one program per parameter set; those
programs have the same ops on the same qubits and differ only in the numbers
of their parameter-dependent ops. :func:`evolve_batch` stacks them: the states
are the rows of one ``(B, 2^n)`` array on the device, and each op position
is one ``xp`` call for all B states (a batched matrix product, a gathered
diagonal product), instead of B calls. That pays for narrow states, where a
single state's op is too small to keep the device (or NumPy) busy; wider
states run one at a time. Each row is then read through
:meth:`StateVector.view` (expectation values, sampling) without copying.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

from .program import Diagonal, GlobalPhase, Measure, Program, Unitary, is_sampling_friendly
from .statevector import DENSE_CONTROLLED_MAX, StateVector, controlled_matrix

# States of at most this many qubits are batched: on a GPU, where a single small state's op is a
# launch that leaves the device idle; on the CPU only up to BATCH_MAX_QUBITS_CPU, where the
# batch's products beat one state at a time (`python -m benchmarks.batch_crossover` on the 2-core
# development machine, 64 sets of efficient_su2: batched 0.33x of one at a time at 10 qubits,
# 0.64x at 11, 1.04x at 12, 1.8x at 13; docs/benchmarks.md).
BATCH_MAX_QUBITS = 14
BATCH_MAX_QUBITS_CPU = 11
# Gates this narrow with a matrix per state are applied as multiply-adds on views rather than a
# batched product (one-qubit gates always: there it is as fast as a contraction).
ELEMENTWISE_MAX_QUBITS = 2
# A batch holds at most this many amplitudes in all (64 MiB in double precision).
BATCH_MAX_AMPLITUDES = 1 << 22


def batch_size(num_qubits: int, device_kind: str) -> int:
    """How many states of ``num_qubits`` one batch on a ``device_kind`` ("CPU" or "GPU") holds (1: do not batch)."""
    if num_qubits > (BATCH_MAX_QUBITS_CPU if device_kind == "CPU" else BATCH_MAX_QUBITS):
        return 1
    return max(1, BATCH_MAX_AMPLITUDES >> num_qubits)


def _gates(program: Program) -> list:
    return [op for op in program.ops if not isinstance(op, Measure)]


def gate_span(op) -> Optional[tuple]:
    """The qubits a gate acts on as one dense block, or None if it is not batchable."""
    if isinstance(op, Diagonal):
        return op.qubits
    if isinstance(op, Unitary):
        if op.controls and len(op.controls) + len(op.qubits) > DENSE_CONTROLLED_MAX:
            return None
        return op.controls + op.qubits
    return None


def batchable(programs: Sequence[Program]) -> bool:
    """Whether ``programs`` can run as one batch: the same gates on the same qubits, in order."""
    if len(programs) < 2:
        return False
    first = programs[0]
    if first.num_qubits > BATCH_MAX_QUBITS or not all(is_sampling_friendly(p) for p in programs):
        return False
    reference = _gates(first)
    for op in reference:
        if not isinstance(op, GlobalPhase) and gate_span(op) is None:
            return False
    for program in programs[1:]:
        gates = _gates(program)
        if program.num_qubits != first.num_qubits or len(gates) != len(reference):
            return False
        for mine, theirs in zip(gates, reference):
            if mine is theirs:
                continue
            if isinstance(theirs, GlobalPhase) != isinstance(mine, GlobalPhase):
                return False
            if not isinstance(theirs, GlobalPhase) and gate_span(mine) != gate_span(theirs):
                return False
    return True


def dense_matrix(op) -> np.ndarray:
    if isinstance(op, Diagonal):
        return np.diag(op.diagonal)
    if op.controls:
        return controlled_matrix(op.matrix, len(op.controls), op.ctrl_state)
    return op.matrix


@functools.lru_cache(maxsize=256)
def _diagonal_index(num_qubits: int, qubits: tuple) -> np.ndarray:
    """For every amplitude index, its index into a diagonal on ``qubits`` (bit j is qubits[j])."""
    i = np.arange(1 << num_qubits)
    index = np.zeros(1 << num_qubits, dtype=np.intp)
    for j, q in enumerate(qubits):
        index |= ((i >> q) & 1) << j
    index.setflags(write=False)
    return index


class StateBatch:
    """``batch`` states of ``num_qubits`` qubits, the rows of one array, in canonical order."""

    def __init__(self, xp: Any, num_qubits: int, batch: int, dtype, kernels: Any = None) -> None:
        self.xp = xp
        self.num_qubits = num_qubits
        self.batch = batch
        self.dtype = np.dtype(dtype)
        self.kernels = kernels
        self.data = xp.zeros((batch, 1 << num_qubits), dtype=self.dtype)
        self.data[:, 0] = 1
        self._scratch = None

    @classmethod
    def over(cls, xp: Any, data, dtype) -> "StateBatch":
        """A batch over the existing rows ``data`` (B, 2^n, canonical order); nothing is copied."""
        batch = cls.__new__(cls)
        batch.xp = xp
        batch.num_qubits = int(data.shape[1]).bit_length() - 1
        batch.batch = int(data.shape[0])
        batch.dtype = np.dtype(dtype)
        batch.kernels = None
        batch.data = data
        batch._scratch = None
        return batch

    def apply_unitary(self, qubits: Sequence[int], matrices: np.ndarray) -> None:
        """``matrices``: one (2^k, 2^k) for every state, or (B, 2^k, 2^k); matrix bit j is ``qubits[j]``."""
        xp, n, k = self.xp, self.num_qubits, len(qubits)
        tensor = self.data.reshape((self.batch,) + (2,) * n)
        matrices = np.asarray(matrices)
        if k == 1 or (k <= ELEMENTWISE_MAX_QUBITS and matrices.ndim == 3):
            self._apply_elementwise(tensor, qubits, matrices)
            return
        if matrices.ndim == 2:
            # One matrix for every state: one tensor contraction over the target axes (for two
            # targets about half the time of the multiply-adds on views, measured on the CPU).
            axes = [1 + n - 1 - q for q in reversed(qubits)]
            m = xp.asarray(matrices.astype(self.dtype, copy=False)).reshape((2,) * (2 * k))
            product = xp.tensordot(tensor, m, axes=(axes, list(range(k, 2 * k))))
            self.data[...] = xp.moveaxis(product, list(range(-k, 0)), axes).reshape(self.batch, -1)
            return
        # Trailing axes ordered q_{k-1} ... q_0 flatten to the matrix index.
        source = [1 + (n - 1 - q) for q in reversed(qubits)]
        target = list(range(n + 1 - k, n + 1))
        moved = xp.moveaxis(tensor, source, target)
        shape = moved.shape
        vectors = xp.ascontiguousarray(moved).reshape(self.batch, -1, 1 << k)
        m = xp.asarray(np.asarray(matrices).astype(self.dtype, copy=False))
        product = xp.matmul(vectors, m.T if m.ndim == 2 else xp.swapaxes(m, 1, 2))
        self.data[...] = xp.moveaxis(product.reshape(shape), target, source).reshape(self.batch, -1)

    def _apply_elementwise(self, tensor, qubits: Sequence[int], matrices: np.ndarray) -> None:
        """out_i = sum_j m[:, i, j] * v_j over the 2^k views ``v_j`` (target bits fixed to j):
        2^k multiply-adds per amplitude on whole views, cheaper than a batched product of
        tiny matrices."""
        xp, n, k = self.xp, self.num_qubits, len(qubits)
        dim = 1 << k
        views = []
        for j in range(dim):
            index = [slice(None)] * (n + 1)
            for b, q in enumerate(qubits):
                index[1 + n - 1 - q] = (j >> b) & 1
            views.append(tensor[tuple(index)])
        stacked = matrices.ndim == 3
        coefficients = xp.asarray(matrices.astype(self.dtype, copy=False))
        shape = (self.batch,) + (1,) * (n - k)

        def coefficient(i: int, j: int):
            return coefficients[:, i, j].reshape(shape) if stacked else coefficients[i, j]

        outs = []
        for i in range(dim):
            out = views[0] * coefficient(i, 0)
            for j in range(1, dim):
                out += views[j] * coefficient(i, j)
            outs.append(out)
        for view, out in zip(views, outs):
            view[...] = out

    def apply_diagonal(self, qubits: Sequence[int], diagonals: np.ndarray) -> None:
        """``diagonals``: one (2^k,) for every state, or (B, 2^k)."""
        xp = self.xp
        index = _diagonal_index(self.num_qubits, tuple(qubits))
        factors = xp.asarray(np.asarray(diagonals).astype(self.dtype, copy=False))
        if xp is not np:
            index = xp.asarray(index)  # gather on the device: only the small diagonals travel
        self.data *= factors[index] if factors.ndim == 1 else factors[:, index]

    def apply_phase(self, phases: np.ndarray) -> None:
        factors = np.exp(1j * np.asarray(phases, dtype=np.float64)).astype(self.dtype)
        self.data *= self.xp.asarray(factors)[:, None]

    def state(self, row: int) -> StateVector:
        """Row ``row`` as a :class:`StateVector` (no copy), sharing one scratch buffer."""
        if self._scratch is None:
            self._scratch = self.xp.empty(1 << self.num_qubits, dtype=self.dtype)
        return StateVector.view(self.xp, self.data[row], self.dtype, self.kernels, self._scratch)


@dataclass(frozen=True)
class Column:
    """One op position of a batch: the same kind of op on the same qubits in every state.

    ``kind`` is "unitary" (``data`` a matrix, bit j of its index is ``qubits[j]``),
    "diagonal" or "phase" (an angle); with ``stacked`` the data has a leading
    axis with one entry per state, else one value serves all.
    """

    kind: str
    qubits: tuple
    data: np.ndarray
    stacked: bool = False


def column_of(op) -> Column:
    """The column of one op shared by every state."""
    if isinstance(op, GlobalPhase):
        return Column("phase", (), np.asarray(op.phase))
    if isinstance(op, Diagonal):
        return Column("diagonal", op.qubits, op.diagonal)
    return Column("unitary", gate_span(op), dense_matrix(op))


def columns_of(programs: Sequence[Program]) -> list[Column]:
    """The columns of :func:`batchable` programs, stacking what differs between them."""
    columns = []
    for ops in zip(*(_gates(p) for p in programs)):
        first = ops[0]
        if all(op is first for op in ops):
            columns.append(column_of(first))
        elif isinstance(first, GlobalPhase):
            columns.append(Column("phase", (), np.array([op.phase for op in ops]), True))
        elif all(isinstance(op, Diagonal) for op in ops):
            columns.append(Column("diagonal", first.qubits, np.stack([op.diagonal for op in ops]), True))
        else:
            columns.append(Column("unitary", gate_span(first), np.stack([dense_matrix(op) for op in ops]), True))
    return columns


def evolve_columns(columns: Sequence[Column], num_qubits: int, size: int, xp: Any, dtype, kernels: Any = None, execution: Any = None) -> StateBatch:
    """Evolve ``size`` states from |0...0> through ``columns``, one ``xp`` call per column."""
    batch = StateBatch(xp, num_qubits, size, dtype, kernels)
    for column in columns:
        if execution is not None:
            execution.checkpoint(size)
        if column.kind == "phase":
            batch.apply_phase(np.broadcast_to(column.data, (size,)))
        elif column.kind == "diagonal":
            batch.apply_diagonal(column.qubits, column.data)
        else:
            batch.apply_unitary(column.qubits, column.data)
    return batch


def evolve_batch(programs: Sequence[Program], xp: Any, dtype, kernels: Any = None, execution: Any = None) -> StateBatch:
    """Evolve every program (see :func:`batchable`) from |0...0>, one ``xp`` call per op for all."""
    return evolve_columns(columns_of(programs), programs[0].num_qubits, len(programs), xp, dtype, kernels, execution)
