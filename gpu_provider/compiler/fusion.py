"""Gate fusion: merge runs of gates into fewer, wider matrices.

Every gate costs at least one pass over the state, so fewer passes is faster
on both devices. Each pass is greedy: starting from the first pending op, it
pulls every later gate that fits in the block's width and commutes past the
ops it skipped (they share no qubit), then emits the block as one
:class:`Unitary`, or as one :class:`Diagonal` when its product is diagonal
(diagonal blocks may be wider: they cost one pass whatever their width). Ops
that are not gates (measure, reset, control flow, stores) are never moved
across each other and block the qubits they touch.

Two passes run: first into blocks of two qubits, then of the full width. The
first pass turns a controlled phase written as ``cx, phase, cx`` (as any
transpiler to a ``u, cx`` basis writes it) back into a two-qubit Diagonal, so
the second pass merges such phases into wide diagonal blocks instead of
spending dense-matrix width on them: a QFT then needs about a third of the
dense products.

The width is priced per device and precision (``DEFAULT_MAX_QUBITS``): on the
GPU it follows from the measured cost of one k-qubit pass, k = 1..5, per
precision (``GPU_PASS_COST``, see :func:`width_from_pass_costs`): complex64
gives 4 (its 5-qubit pass is arithmetic-bound), complex128 5; on the CPU a dense k-qubit product
costs 2^k multiply-adds per amplitude, so it stops being memory-bound sooner:
measured on 2 cores, a 5-qubit product costs about seven plain copies of the
state and a 4-qubit one four. 5 stays the CPU default: 6 was within noise on QV
and random circuits at 20-22 qubits and slower on QFT, 4 slower on all three.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Optional

import numpy as np

from ..engine import program as P
from ..engine.statevector import DENSE_CONTROLLED_MAX, controlled_matrix

DEFAULT_FUSION_THRESHOLD = 14
MIN_FUSION_QUBITS = 1
MAX_FUSION_QUBITS = 8
# The cost of one dense k-qubit pass on the GPU for k = 1..5, in device-to-device
# copies of the state (the copy's bandwidth over the pass's), per precision:
# the one table the GPU's default width comes from. Measured on an NVIDIA H200
# (2026-11-27, benchmarks.gpu_kernels) at n = 30 on high targets (n-k..n-1,
# the strided kernel "auto" runs there, most of a wide circuit's passes):
# docs/benchmarks.md, "One pass against a device-to-device copy", run 2, ratios
# to copy single 0.91, 0.92, 0.90, 0.84, 0.54 and double 0.90, 0.90, 0.89,
# 0.75, 0.50 ("The warp-shuffle kernel", run 3, re-timed low and split targets
# only; high targets were unchanged). A kernel that makes some width cheaper
# (apply_matrix_multi, not yet measured) changes that width's entry here.
GPU_PASS_COST: dict[str, tuple[float, ...]] = {
    "single": (1 / 0.91, 1 / 0.92, 1 / 0.90, 1 / 0.84, 1 / 0.54),
    "double": (1 / 0.90, 1 / 0.90, 1 / 0.89, 1 / 0.75, 1 / 0.50),
}
# Widening by one qubit pays while the wider pass costs at most this many times
# the narrower one. Fixed by the one end-to-end comparison there is: QV-30 on the
# H200 (benchmarks.fusion_width, 2026-11-27) took 1.43 s at width 4 against
# 1.48 s at 5 in single precision (pass cost 5/4: 1.56) and 2.28 s against
# 2.19 s in double (5/4: 1.50), so the limit lies between the two. Fewer passes
# alone would allow less (178 passes at width 4, 133 at 5: 1.34); the measured
# end-to-end times, not that model, set it. A table change that moves a
# precision's ratio across it flips that default: confirm with
# benchmarks.fusion_width.
WIDEN_LIMIT = 1.53


def width_from_pass_costs(costs: Sequence[float], limit: float = WIDEN_LIMIT) -> int:
    """The widest k (1-based index into ``costs``) reached by widening one qubit at a time
    while each pass costs at most ``limit`` times the one a qubit narrower."""
    if not costs or any(not cost > 0 for cost in costs):
        raise ValueError(f"pass costs must be positive, one per width from 1, not {list(costs)}")
    width = 1
    for k in range(2, len(costs) + 1):
        if costs[k - 1] > limit * costs[k - 2]:
            break
        width = k
    return width


# Default width per (device, precision). GPU: from GPU_PASS_COST (today 4 for
# complex64 and 5 for complex128, as QV-30 end to end measured). CPU: see above.
DEFAULT_MAX_QUBITS = {
    ("CPU", "double"): 5,
    ("CPU", "single"): 5,
    **{("GPU", precision): width_from_pass_costs(costs) for precision, costs in GPU_PASS_COST.items()},
}
DIAGONAL_MAX_QUBITS = 10
LOOKAHEAD = 128  # ops scanned past the block's start for gates to pull in
# A fused matrix whose off-diagonal entries are all below this is a Diagonal
# (products of permutations and phases give exact zeros; this only absorbs rounding).
DIAGONAL_TOLERANCE = 1e-14


def fusion_limits() -> tuple[int, int]:
    """The range of ``fusion_max_qubits`` the engine supports."""
    return MIN_FUSION_QUBITS, MAX_FUSION_QUBITS


def default_width(device_kind: str, precision: str = "double") -> int:
    """The fusion width used when ``fusion_max_qubits`` is None."""
    return DEFAULT_MAX_QUBITS.get((device_kind, precision), 5)


def fuse(
    program: P.Program,
    device_kind: str = "CPU",
    max_qubits: Optional[int] = None,
    threshold: int = DEFAULT_FUSION_THRESHOLD,
    sources: Optional[dict] = None,
    precision: str = "double",
) -> P.Program:
    """Return ``program`` with its gates fused for ``device_kind`` and ``precision``.

    With ``sources`` (a dict), every fused top-level op is recorded as
    ``sources[id(op)] = (op, gates)``, ``gates`` being the original gates it
    multiplies (in their fusable form, program order), so a caller can rebuild
    the block with :func:`merge_block` when some of those gates change. Global
    phases are then left as ops (they may depend on parameters), not folded.

    Below ``threshold`` qubits gates merge only into blocks of one or two qubits
    (:func:`_pair_fuse`, one linear pass whose products are computed together):
    on such states a pass costs its host overhead, not its arithmetic, and this
    fusion costs a few microseconds a gate where the greedy passes cost tens
    (``max_qubits=1``: one-qubit runs only); with ``sources`` nothing is merged
    there (parametrized gates stay rebindable).
    """
    if program.num_qubits < threshold:
        if sources is not None:
            return program
        return program.replace(ops=_fold_global_phases(_pair_fuse(program.ops, max_qubits is None or max_qubits >= 2)))
    width = max_qubits if max_qubits is not None else default_width(device_kind, precision)
    all_qubits = frozenset(range(program.num_qubits))
    return program.replace(ops=_fuse_ops(program.ops, width, all_qubits, sources))


def merge_block(gates: list):
    """One op for ``gates`` (program order), as fusion builds it: a Diagonal when it is one."""
    return _merge(gates, all(isinstance(gate, P.Diagonal) for gate in gates))


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
    if isinstance(op, (P.Unitary, P.Diagonal, P.Initialize, P.PauliEvolution, P.Measure, P.Reset)):
        return frozenset(P.op_qubits(op))
    if isinstance(op, P.GlobalPhase):
        return frozenset()
    return all_qubits  # control flow, stores, break/continue: a full barrier


def _fuse_ops(ops, width: int, all_qubits: frozenset, sources: Optional[dict] = None) -> tuple:
    items = []
    for op in ops:
        if isinstance(op, P.IfElse):
            op = P.IfElse(op.condition, _fuse_ops(op.true_body, width, all_qubits), _fuse_ops(op.false_body, width, all_qubits))
        elif isinstance(op, P.WhileLoop):
            op = P.WhileLoop(op.condition, _fuse_ops(op.body, width, all_qubits))
        elif isinstance(op, P.ForLoop) and isinstance(op.iterations, P.LoopBodies):
            op = P.ForLoop(op.iterations.map(lambda body: _fuse_ops(body, width, all_qubits)))
        elif isinstance(op, P.ForLoop):
            fused: dict = {}  # iterations often share one body: fuse it once
            for body in op.iterations:
                if id(body) not in fused:
                    fused[id(body)] = _fuse_ops(body, width, all_qubits)
            op = P.ForLoop(tuple(fused[id(body)] for body in op.iterations))
        elif isinstance(op, P.SwitchCase):
            op = P.SwitchCase(op.target, tuple((values, _fuse_ops(body, width, all_qubits)) for values, body in op.cases))
        gate = _as_fusable(op)
        items.append((op if gate is None else gate, gate is not None, _touches(op, all_qubits)))

    # Pairs first: a run of gates on two qubits whose product is diagonal (a
    # controlled phase written as cx, phase, cx) becomes a Diagonal, which the
    # wide pass then merges with other diagonals instead of into a dense block.
    if width >= 2:
        items = _greedy(items, 2, all_qubits, sources)
    fused = tuple(op for op, _, _ in _greedy(items, width, all_qubits, sources))
    return fused if sources is not None else _fold_global_phases(fused)


def _fold_global_phases(ops: tuple) -> tuple:
    """Multiply this sequence's global phases into one of its gates, saving their passes.

    A global phase is a scalar: it commutes with every op, so it may join any
    gate that always runs with it, that is one in the same sequence (not inside
    control flow, which may not run) and without controls (a phase on a
    controlled gate is relative). Without such a gate the phases stay as one op.
    """
    phases = [op for op in ops if isinstance(op, P.GlobalPhase)]
    if not phases:
        return ops
    total = sum(op.phase for op in phases)
    factor = complex(np.cos(total), np.sin(total))
    rest = [op for op in ops if not isinstance(op, P.GlobalPhase)]
    for position, op in enumerate(rest):
        if isinstance(op, P.Diagonal):
            rest[position] = P.Diagonal(op.qubits, op.diagonal * factor, op.label)
            return tuple(rest)
        if isinstance(op, P.Unitary) and not op.controls:
            rest[position] = P.Unitary(op.qubits, op.matrix * factor, label=op.label)
            return tuple(rest)
    if len(phases) == 1:
        return ops
    return (P.GlobalPhase(total),) + tuple(rest)


class _Block:
    """Gates gathered by :func:`_pair_fuse` on one or two qubits (ascending), in program order."""

    __slots__ = ("absorbed", "members", "qubits")

    def __init__(self, qubits: tuple, members: list) -> None:
        self.qubits = qubits
        self.members = members
        self.absorbed = False


def _pair_fuse(ops, pairs: bool = True) -> tuple:
    """Fusion for states below the threshold: gates on one or two qubits merged along their qubits.

    One linear pass. Each qubit remembers the block that last touched it. A
    one-qubit gate joins that block (whatever its width); a two-qubit gate joins
    the block both its qubits last touched, or starts one that takes in the
    one-qubit blocks its qubits last touched. Every move is across ops on other
    qubits only, so the order of everything else is kept; ops on more qubits,
    measurements, resets and control flow close the blocks of the qubits they
    touch. No block is wider than two qubits: on a small state a two-qubit pass
    costs what a one-qubit pass does (array-call overhead, not arithmetic), so
    every merge saves a pass. The blocks' products are then computed together,
    a few array calls for the whole sequence (:func:`_block_products`). Without
    ``pairs`` (``fusion_max_qubits=1``) two-qubit gates stay as they are and only
    runs of one-qubit gates merge.
    """
    out: list = []
    open_on: dict = {}  # qubit -> the _Block that last touched it
    for op in ops:
        kind = type(op)
        if kind is P.Unitary:
            gate = op if not op.controls else _as_fusable(op) if len(op.controls) + len(op.qubits) <= 2 else None
        elif kind is P.Diagonal:
            gate = op
        else:
            gate = None
            op = _pair_fuse_bodies(op, pairs)
        width = len(gate.qubits) if gate is not None else 0
        if width == 1:
            qubit = gate.qubits[0]
            block = open_on.get(qubit)
            if block is None:
                block = open_on[qubit] = _Block(gate.qubits, [])
                out.append(block)
            block.members.append(gate)
            if len(block.members) >= MAX_BLOCK_MEMBERS:
                _close(block, open_on)
            continue
        if width == 2 and pairs:
            first, second = gate.qubits
            block = open_on.get(first)
            if block is None or open_on.get(second) is not block:
                block = _Block((min(first, second), max(first, second)), [])
                for earlier in (open_on.get(first), open_on.get(second)):
                    if earlier is not None and len(earlier.qubits) == 1:
                        earlier.absorbed = True
                        block.members.extend(earlier.members)
                open_on[first] = open_on[second] = block
                out.append(block)
            block.members.append(gate)
            if len(block.members) >= MAX_BLOCK_MEMBERS:
                _close(block, open_on)
            continue
        if kind is P.GlobalPhase:
            out.append(op)
            continue
        touched = P.op_qubits(op) if kind in _QUBIT_OPS else tuple(open_on)
        for qubit in touched:
            open_on.pop(qubit, None)
        out.append(op)
    merged = _block_products([item for item in out if isinstance(item, _Block) and not item.absorbed and len(item.members) > 1])
    result = []
    for item in out:
        if not isinstance(item, _Block):
            result.append(item)
        elif not item.absorbed:
            result.append(merged[id(item)] if len(item.members) > 1 else item.members[0])
    return tuple(result)


def _close(block: _Block, open_on: dict) -> None:
    """Later gates on ``block``'s qubits start a new block."""
    for qubit in block.qubits:
        if open_on.get(qubit) is block:
            del open_on[qubit]


def _pair_fuse_bodies(op, pairs: bool):
    """``op`` with :func:`_pair_fuse` applied to the bodies of its control flow, if any."""
    if isinstance(op, P.IfElse):
        return P.IfElse(op.condition, _pair_fuse(op.true_body, pairs), _pair_fuse(op.false_body, pairs))
    if isinstance(op, P.WhileLoop):
        return P.WhileLoop(op.condition, _pair_fuse(op.body, pairs))
    if isinstance(op, P.ForLoop) and isinstance(op.iterations, P.LoopBodies):
        return P.ForLoop(op.iterations.map(functools.partial(_pair_fuse, pairs=pairs)))
    if isinstance(op, P.ForLoop):
        done: dict = {}
        for body in op.iterations:
            if id(body) not in done:
                done[id(body)] = _pair_fuse(body, pairs)
        return P.ForLoop(tuple(done[id(body)] for body in op.iterations))
    if isinstance(op, P.SwitchCase):
        return P.SwitchCase(op.target, tuple((values, _pair_fuse(body, pairs)) for values, body in op.cases))
    return op


def _block_products(blocks: list) -> dict:
    """``{id(block): op}``: each block's product as a Unitary, or a Diagonal when it is one.

    Every member is first written as a matrix on its block's qubits (members of
    a kind together: a one-qubit gate on the block's low or high qubit becomes
    a Kronecker product with the identity, a two-qubit gate on the qubits in
    descending order gets its index bits exchanged), then the blocks multiply
    their members in lockstep, longest first: step s is one stacked product over
    the blocks with more than s members. A few array calls per member kind and
    per step, whatever the number of blocks.
    """
    products: dict = {}
    for dim in (2, 4):
        group = sorted((block for block in blocks if 1 << len(block.qubits) == dim), key=lambda block: -len(block.members))
        # In batches of about PRODUCT_BATCH_MEMBERS members, so the stacked factors stay small on long circuits.
        start, members = 0, 0
        for end, block in enumerate(group, 1):
            members += len(block.members)
            if members >= PRODUCT_BATCH_MEMBERS or end == len(group):
                products.update(_stacked_products(group[start:end], dim))
                start, members = end, 0
    return products


def _stacked_products(group: list, dim: int) -> dict:
    """:func:`_block_products` for blocks on ``log2(dim)`` qubits, sorted by falling member count."""
    products: dict = {}
    # factors[i]: the i-th member of the group's blocks (block by block) on its block's qubits.
    owners = [(member, block.qubits[0]) for block in group for member in block.members]
    members = [member for member, _ in owners]
    factors = np.zeros((len(members), dim, dim), dtype=np.complex128)
    kinds: dict = {}
    for index, (member, low) in enumerate(owners):
        if len(member.qubits) == 2:
            kind = "pair" if member.qubits[0] == low else "swapped"
        else:
            kind = "low" if member.qubits[0] == low else "high"
        kind = (kind, isinstance(member, P.Diagonal))
        kinds.setdefault(kind, []).append(index)
    for (kind, diagonal), where in kinds.items():
        where = np.asarray(where)
        chosen = [members[i] for i in where]
        size = 2 if kind in ("low", "high") else 4
        if diagonal:
            values = np.stack([member.diagonal for member in chosen])
            stacked = np.zeros((len(chosen), size, size), dtype=np.complex128)
            stacked[:, np.arange(size), np.arange(size)] = values
        else:
            stacked = np.stack([member.matrix for member in chosen])
        if kind == "swapped":
            stacked = stacked[:, _BIT_SWAP][:, :, _BIT_SWAP]
        if dim == 2 or kind in ("pair", "swapped"):
            factors[where] = stacked
        elif kind == "low":  # identity on the high qubit: the 2x2 on each half
            factors[where, 0:2, 0:2] = stacked
            factors[where, 2:4, 2:4] = stacked
        else:  # identity on the low qubit: the 2x2 on the even and on the odd indices
            factors[where, 0::2, 0::2] = stacked
            factors[where, 1::2, 1::2] = stacked
    starts = np.cumsum([0] + [len(block.members) for block in group])
    lengths = np.diff(starts)
    product = factors[starts[:-1]]
    for step in range(1, int(lengths[0])):
        active = int(np.count_nonzero(lengths > step))
        product[:active] = factors[starts[:active] + step] @ product[:active]
    off = np.abs(product.reshape(len(group), -1)[:, _off_diagonal(dim)]).max(axis=1) <= DIAGONAL_TOLERANCE
    for block, matrix, diagonal in zip(group, product, off):
        if diagonal:
            products[id(block)] = P.Diagonal(block.qubits, np.diagonal(matrix).copy(), "fused")
        else:
            products[id(block)] = P.Unitary(block.qubits, matrix, label="fused")
    return products


# Ops that touch only their own qubits (the rest, control flow and stores, touch every qubit).
_QUBIT_OPS = frozenset((P.Unitary, P.Diagonal, P.Initialize, P.PauliEvolution, P.Measure, P.Reset))
# Blocks' products are stacked in batches of about this many members (a 4x4 factor is 256 bytes).
PRODUCT_BATCH_MEMBERS = 1 << 14
# A block closes once it has this many members: long runs on one pair become several ops, each built from a bounded stack.
MAX_BLOCK_MEMBERS = 64
# Exchanges bits 0 and 1 of a 4-entry index: a two-qubit matrix on (b, a) as one on (a, b).
_BIT_SWAP = np.array([0, 2, 1, 3])


def _greedy(items: list, width: int, all_qubits: frozenset, sources: Optional[dict] = None) -> list:
    """One greedy pass over ``(op, fusable, qubits)`` items; returns items.

    From the first item not yet taken, the block pulls in every later fusable
    item (within ``LOOKAHEAD`` untaken items) that fits the width and shares no
    qubit with the items it skipped; taken items are marked, not copied out, so
    a pass is linear in the items scanned.
    """
    out = []
    count = len(items)
    taken = [False] * count
    every = len(all_qubits)
    for start in range(count):
        if taken[start]:
            continue
        first, fusable, first_qubits = items[start]
        if not fusable:
            out.append(items[start])
            continue
        block = [first]
        block_qubits = set(first_qubits)
        diagonal = isinstance(first, P.Diagonal)
        blocked: set = set()
        scanned = 0
        for position in range(start + 1, count):
            if taken[position]:
                continue
            scanned += 1
            if scanned > LOOKAHEAD or (len(blocked) >= every and blocked >= all_qubits):
                break
            op, can_fuse, qubits = items[position]
            if not can_fuse or (blocked and not blocked.isdisjoint(qubits)):
                blocked |= qubits
                if not diagonal and len(block_qubits) >= width and blocked >= block_qubits:
                    break  # a full dense block whose qubits are all blocked can take nothing more
                continue
            merged = block_qubits | qubits
            merged_diagonal = diagonal and isinstance(op, P.Diagonal)
            if len(merged) <= (max(width, DIAGONAL_MAX_QUBITS) if merged_diagonal else width):
                block.append(op)
                block_qubits = merged
                diagonal = merged_diagonal
                taken[position] = True
            else:
                blocked |= qubits
                if not diagonal and len(block_qubits) >= width and blocked >= block_qubits:
                    break
        if len(block) == 1:
            out.append(items[start])
        else:
            op = _merge(block, diagonal)
            if sources is not None:
                gates = []
                for member in block:  # a block of the first pass stands for its own gates
                    gates.extend(sources[id(member)][1] if id(member) in sources else [member])
                sources[id(op)] = (op, tuple(gates))
            out.append((op, True, frozenset(op.qubits)))
    return out


def _merge(block: list, diagonal: bool):
    """One op for ``block`` (gates in program order) on the union of their qubits."""
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
    # Each gate embedded in the block as a full 2^k matrix (by cached index
    # arrays), multiplied on from the left: a few microseconds per gate.
    matrix = None
    for op in block:
        places = tuple(position[q] for q in op.qubits)
        rows, cols, same_rest = _embedding(k, places)
        if isinstance(op, P.Diagonal):
            factors = op.diagonal[rows[:, 0]]
            matrix = np.diag(factors) if matrix is None else factors[:, None] * matrix
        else:
            full = np.where(same_rest, op.matrix[rows, cols], 0)
            matrix = full if matrix is None else full @ matrix
    matrix = np.ascontiguousarray(matrix, dtype=np.complex128)
    if np.abs(matrix.reshape(-1)[_off_diagonal(dim)]).max() <= DIAGONAL_TOLERANCE:
        return P.Diagonal(qubits, np.ascontiguousarray(np.diagonal(matrix)), label)
    return P.Unitary(qubits, matrix, label=label)


@functools.lru_cache(maxsize=16)
def _off_diagonal(dim: int) -> np.ndarray:
    """Flat positions of a dim x dim matrix's off-diagonal entries."""
    index = np.arange(dim * dim)
    return index[index // dim != index % dim]


@functools.lru_cache(maxsize=4096)
def _embedding(k: int, places: tuple[int, ...]):
    """Index arrays that embed a gate on bits ``places`` of a k-bit block.

    ``full = where(same_rest, gate[rows, cols], 0)``: ``rows``/``cols`` are the
    gate's own row/column index for each block entry, ``same_rest`` is True where
    the bits outside the gate agree.
    """
    dim = 1 << k
    index = np.arange(dim)
    sub = np.zeros(dim, dtype=np.intp)
    mask = 0
    for j, place in enumerate(places):
        sub |= ((index >> place) & 1) << j
        mask |= 1 << place
    rest = index & ~mask
    rows = np.ascontiguousarray(np.broadcast_to(sub[:, None], (dim, dim)))
    cols = np.ascontiguousarray(np.broadcast_to(sub[None, :], (dim, dim)))
    return rows, cols, rest[:, None] == rest[None, :]
