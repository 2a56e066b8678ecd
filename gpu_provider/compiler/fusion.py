"""Gate fusion: merge runs of gates into fewer, wider matrices.

Every gate costs at least one pass over the state, so fewer passes is faster
on both devices. The pass is greedy: starting from the first pending op, it
pulls every later gate that fits in the block's width and commutes past the
ops it skipped (they share no qubit), then emits the block as one
:class:`Unitary`, or as one :class:`Diagonal` when every gate in it is
diagonal (diagonal blocks may be wider: they cost one pass whatever their
width). Ops that are not gates (measure, reset, control flow, stores) are
never moved across each other and block the qubits they touch.

The width is priced per device: a GPU pass costs about the same up to the
kernels' widest matrix (5 qubits), while on the CPU a dense k-qubit product
costs 2^k multiply-adds per amplitude, so it stops being memory-bound sooner.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from ..engine import program as P
from ..engine.statevector import DENSE_CONTROLLED_MAX, controlled_matrix

DEFAULT_FUSION_THRESHOLD = 14
MIN_FUSION_QUBITS = 1
MAX_FUSION_QUBITS = 8
DEFAULT_MAX_QUBITS = {"CPU": 5, "GPU": 5}
DIAGONAL_MAX_QUBITS = 10
LOOKAHEAD = 128  # ops scanned past the block's start for gates to pull in


def fusion_limits() -> tuple[int, int]:
    """The range of ``fusion_max_qubits`` the engine supports."""
    return MIN_FUSION_QUBITS, MAX_FUSION_QUBITS


def fuse(program: P.Program, device_kind: str = "CPU", max_qubits: Optional[int] = None, threshold: int = DEFAULT_FUSION_THRESHOLD) -> P.Program:
    """Return ``program`` with its gates fused for ``device_kind``."""
    if program.num_qubits < threshold:
        return program
    width = max_qubits if max_qubits is not None else DEFAULT_MAX_QUBITS.get(device_kind, 5)
    all_qubits = frozenset(range(program.num_qubits))
    return program.replace(ops=_fuse_ops(program.ops, width, all_qubits))


def _as_fusable(op):
    """The op as a plain gate on its full qubit list, or None if it is not fusable."""
    if isinstance(op, P.Diagonal):
        return op
    if isinstance(op, P.Unitary):
        if op.controls:
            if len(op.controls) + len(op.qubits) > DENSE_CONTROLLED_MAX:
                return None
            return P.Unitary(op.controls + op.qubits, controlled_matrix(op.matrix, len(op.controls), op.ctrl_state), label=op.label)
        return op
    return None


def _touches(op, all_qubits: frozenset) -> frozenset:
    if isinstance(op, (P.Unitary, P.Diagonal, P.Initialize, P.Measure, P.Reset)):
        return frozenset(P.op_qubits(op))
    if isinstance(op, P.GlobalPhase):
        return frozenset()
    return all_qubits  # control flow, stores, break/continue: a full barrier


def _fuse_ops(ops, width: int, all_qubits: frozenset) -> tuple:
    items = []
    for op in ops:
        if isinstance(op, P.IfElse):
            op = P.IfElse(op.condition, _fuse_ops(op.true_body, width, all_qubits), _fuse_ops(op.false_body, width, all_qubits))
        elif isinstance(op, P.WhileLoop):
            op = P.WhileLoop(op.condition, _fuse_ops(op.body, width, all_qubits))
        elif isinstance(op, P.ForLoop):
            fused: dict = {}
            op = P.ForLoop(tuple(fused.setdefault(id(body), _fuse_ops(body, width, all_qubits)) for body in op.iterations))
        elif isinstance(op, P.SwitchCase):
            op = P.SwitchCase(op.target, tuple((values, _fuse_ops(body, width, all_qubits)) for values, body in op.cases))
        gate = _as_fusable(op)
        items.append((op if gate is None else gate, gate is not None, _touches(op, all_qubits)))

    out = []
    pending = items
    while pending:
        first, fusable, first_qubits = pending[0]
        if not fusable:
            out.append(first)
            pending = pending[1:]
            continue
        block = [first]
        block_qubits = set(first_qubits)
        diagonal = isinstance(first, P.Diagonal)
        blocked: set = set()
        kept = []
        for position, item in enumerate(pending[1:], start=1):
            op, can_fuse, qubits = item
            if position > LOOKAHEAD or blocked >= all_qubits:
                kept.extend(pending[position:])
                break
            if not can_fuse or qubits & blocked:
                blocked |= qubits
                kept.append(item)
                continue
            merged = block_qubits | qubits
            merged_diagonal = diagonal and isinstance(op, P.Diagonal)
            if len(merged) <= (max(width, DIAGONAL_MAX_QUBITS) if merged_diagonal else width):
                block.append(op)
                block_qubits = merged
                diagonal = merged_diagonal
            else:
                blocked |= qubits
                kept.append(item)
        out.append(block[0] if len(block) == 1 else _merge(block, diagonal))
        pending = kept
    return tuple(out)


def _merge(block: list, diagonal: bool):
    qubits = tuple(sorted({q for op in block for q in op.qubits}))
    position = {q: i for i, q in enumerate(qubits)}
    dim = 1 << len(qubits)
    indices = np.arange(dim)
    label = "fused"
    if diagonal:
        values = np.ones(dim, dtype=np.complex128)
        for op in block:
            sub = np.zeros(dim, dtype=np.int64)
            for j, q in enumerate(op.qubits):
                sub |= ((indices >> position[q]) & 1) << j
            values *= op.diagonal[sub]
        return P.Diagonal(qubits, values, label)
    k = len(qubits)
    # Columns of the fused unitary, evolved gate by gate: a (2,)*k tensor of row bits, then the column.
    tensor = np.eye(dim, dtype=np.complex128).reshape((2,) * k + (dim,))
    for op in block:
        axes = [k - 1 - position[q] for q in op.qubits]  # axis of each gate qubit, low bit first
        g = len(op.qubits)
        if isinstance(op, P.Diagonal):
            gate = np.diag(op.diagonal)
        else:
            gate = op.matrix
        gate_tensor = gate.reshape((2,) * (2 * g))  # out bits high..low, in bits high..low
        in_axes = list(range(2 * g - 1, g - 1, -1))  # in bit j (low first)
        product = np.tensordot(gate_tensor, tensor, axes=(in_axes, axes))
        # product axes: out bits high..low, then the remaining tensor axes in order.
        out_axes = [axes[j] for j in range(g - 1, -1, -1)]
        tensor = np.moveaxis(product, list(range(g)), out_axes)
    return P.Unitary(qubits, np.ascontiguousarray(tensor.reshape(dim, dim)), label=label)
