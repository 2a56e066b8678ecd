"""The engine's input: a frozen, flat program of numeric operations.

A :class:`Program` is what every front end compiles to. Its matrices are plain
NumPy arrays; nothing here knows about Qiskit. Qubit order is Qiskit's: qubit 0
is the least significant bit of a state index, and for an op on ``qubits``
``(q0, q1, ...)`` the matrix index bit ``i`` belongs to ``qubits[i]``.

Classical data lives in a per-shot memory of clbits (0/1) plus named variables.
Control flow holds nested op tuples and :class:`ClassicalExpr` conditions.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from collections.abc import Sequence
from typing import Any, Callable, Optional, Union

import numpy as np

# ---------------------------------------------------------------------------
# Classical expressions


class ExprOp(str, enum.Enum):
    """Operators of classical expressions (the same set OpenQASM 3 offers)."""

    BIT_NOT = "bit_not"
    LOGIC_NOT = "logic_not"
    NEGATE = "negate"
    BIT_AND = "bit_and"
    BIT_OR = "bit_or"
    BIT_XOR = "bit_xor"
    LOGIC_AND = "logic_and"
    LOGIC_OR = "logic_or"
    EQUAL = "equal"
    NOT_EQUAL = "not_equal"
    LESS = "less"
    LESS_EQUAL = "less_equal"
    GREATER = "greater"
    GREATER_EQUAL = "greater_equal"
    SHIFT_LEFT = "shift_left"
    SHIFT_RIGHT = "shift_right"
    ADD = "add"
    SUB = "sub"
    MUL = "mul"
    DIV = "div"


@dataclass(frozen=True)
class Bits:
    """The unsigned integer read from clbits, ``clbits[0]`` least significant.

    ``boolean`` marks a single bit used as a truth value.
    """

    clbits: tuple[int, ...]
    boolean: bool = False


@dataclass(frozen=True)
class Var:
    """A named classical variable; ``width`` 0 means a Boolean, ``None`` a float."""

    name: str
    width: int | None = 0


@dataclass(frozen=True)
class Const:
    value: Union[bool, int, float]


@dataclass(frozen=True)
class Unary:
    op: ExprOp
    operand: "ClassicalExpr"
    width: int | None = None  # result width for unsigned results, else None


@dataclass(frozen=True)
class Binary:
    op: ExprOp
    left: "ClassicalExpr"
    right: "ClassicalExpr"
    width: int | None = None


@dataclass(frozen=True)
class Cast:
    """Convert to ``bool`` (``width == 0``), to an unsigned of ``width`` bits, or float (None)."""

    operand: "ClassicalExpr"
    width: int | None


@dataclass(frozen=True)
class Index:
    """Bit ``index`` of an unsigned value, as a Boolean."""

    target: "ClassicalExpr"
    index: "ClassicalExpr"


ClassicalExpr = Union[Bits, Var, Const, Unary, Binary, Cast, Index]


def _mask(value: int, width: int | None) -> int:
    return value & ((1 << width) - 1) if width else value


def evaluate(expr: ClassicalExpr, clbits, variables: dict) -> Union[bool, int, float]:
    """Evaluate ``expr`` against one shot's classical memory."""
    if isinstance(expr, Bits):
        if expr.boolean:
            return bool(clbits[expr.clbits[0]])
        value = 0
        for position, clbit in enumerate(expr.clbits):
            value |= int(clbits[clbit]) << position
        return value
    if isinstance(expr, Const):
        return expr.value
    if isinstance(expr, Var):
        return variables.get(expr.name, False if expr.width == 0 else 0)
    if isinstance(expr, Cast):
        value = evaluate(expr.operand, clbits, variables)
        if expr.width == 0:
            return bool(value)
        if expr.width is None:
            return float(value)
        return _mask(int(value), expr.width)
    if isinstance(expr, Index):
        return bool((int(evaluate(expr.target, clbits, variables)) >> int(evaluate(expr.index, clbits, variables))) & 1)
    if isinstance(expr, Unary):
        value = evaluate(expr.operand, clbits, variables)
        if expr.op is ExprOp.LOGIC_NOT:
            return not value
        if expr.op is ExprOp.BIT_NOT:
            return (not value) if expr.width == 0 else _mask(~int(value), expr.width)
        if expr.op is ExprOp.NEGATE:
            return -value
        raise ValueError(f"unknown unary operator {expr.op!r}")
    if isinstance(expr, Binary):
        op = expr.op
        if op is ExprOp.LOGIC_AND:  # short-circuit like the languages it models
            return bool(evaluate(expr.left, clbits, variables)) and bool(evaluate(expr.right, clbits, variables))
        if op is ExprOp.LOGIC_OR:
            return bool(evaluate(expr.left, clbits, variables)) or bool(evaluate(expr.right, clbits, variables))
        left = evaluate(expr.left, clbits, variables)
        right = evaluate(expr.right, clbits, variables)
        return _BINARY[op](left, right, expr.width)
    raise TypeError(f"not a classical expression: {expr!r}")


def _bitwise(fn):
    def apply(left, right, width):
        if width == 0:
            return bool(fn(int(left), int(right)))
        return _mask(fn(int(left), int(right)), width)

    return apply


_BINARY = {
    ExprOp.BIT_AND: _bitwise(lambda a, b: a & b),
    ExprOp.BIT_OR: _bitwise(lambda a, b: a | b),
    ExprOp.BIT_XOR: _bitwise(lambda a, b: a ^ b),
    ExprOp.EQUAL: lambda a, b, w: a == b,
    ExprOp.NOT_EQUAL: lambda a, b, w: a != b,
    ExprOp.LESS: lambda a, b, w: a < b,
    ExprOp.LESS_EQUAL: lambda a, b, w: a <= b,
    ExprOp.GREATER: lambda a, b, w: a > b,
    ExprOp.GREATER_EQUAL: lambda a, b, w: a >= b,
    ExprOp.SHIFT_LEFT: lambda a, b, w: _mask(int(a) << int(b), w),
    ExprOp.SHIFT_RIGHT: lambda a, b, w: int(a) >> int(b),
    ExprOp.ADD: lambda a, b, w: _mask(a + b, w) if w else a + b,
    ExprOp.SUB: lambda a, b, w: _mask(a - b, w) if w else a - b,
    ExprOp.MUL: lambda a, b, w: _mask(a * b, w) if w else a * b,
    ExprOp.DIV: lambda a, b, w: (int(a) // int(b)) if w else a / b,
}


# ---------------------------------------------------------------------------
# Operations


@dataclass(frozen=True, eq=False)
class Unitary:
    """Apply ``matrix`` (2^k x 2^k) to ``qubits``; ``qubits[0]`` is the matrix's low bit.

    ``controls`` (with ``ctrl_state``, bit ``i`` for ``controls[i]``) restrict the
    action to the subspace where the controls hold that state.
    """

    qubits: tuple[int, ...]
    matrix: np.ndarray
    controls: tuple[int, ...] = ()
    ctrl_state: int = 0
    label: str = ""


@dataclass(frozen=True, eq=False)
class Diagonal:
    """Multiply amplitudes by ``diagonal[i]``, ``i`` the bits of ``qubits`` (low first)."""

    qubits: tuple[int, ...]
    diagonal: np.ndarray
    label: str = ""


def gate_op(qubits: tuple, numbers: np.ndarray, label: str, diagonal: bool) -> Union[Unitary, Diagonal]:
    """``Diagonal(qubits, numbers, label)`` or ``Unitary(qubits, numbers, label=label)``, built faster.

    For hot loops (a translator makes one per gate): the same object the
    dataclass constructor makes, without its per-field ``object.__setattr__``
    calls, which cost more than the rest of a cached gate's translation.
    """
    op = _new(Diagonal if diagonal else Unitary)
    if diagonal:
        op.__dict__.update(qubits=qubits, diagonal=numbers, label=label)
    else:
        op.__dict__.update(qubits=qubits, matrix=numbers, controls=(), ctrl_state=0, label=label)
    return op


_new = object.__new__


@dataclass(frozen=True, eq=False)
class Initialize:
    """``qubits`` hold |0...0>; put them in ``vector`` (Qiskit order)."""

    qubits: tuple[int, ...]
    vector: np.ndarray


@dataclass(frozen=True, eq=False)
class PauliEvolution:
    """Apply exp(-i sum_j angles[j] P_j) to ``qubits``, exactly; the terms need not commute.

    Term j is the Pauli whose X part is ``x_masks[j]`` and Z part ``z_masks[j]``
    (bit i for ``qubits[i]``; X and Z both set is Y), ``angles`` are real.
    """

    qubits: tuple[int, ...]
    x_masks: tuple[int, ...]
    z_masks: tuple[int, ...]
    angles: tuple[float, ...]


@dataclass(frozen=True)
class GlobalPhase:
    phase: float


@dataclass(frozen=True)
class Measure:
    qubit: int
    clbit: int


@dataclass(frozen=True)
class Reset:
    qubit: int


@dataclass(frozen=True)
class Store:
    """Write a value to a variable (``target`` a :class:`Var`) or to clbits (:class:`Bits`)."""

    target: Union[Var, Bits]
    value: ClassicalExpr


@dataclass(frozen=True)
class IfElse:
    condition: ClassicalExpr
    true_body: tuple
    false_body: tuple = ()


@dataclass(frozen=True)
class WhileLoop:
    condition: ClassicalExpr
    body: tuple


class LoopBodies(Sequence):
    """The bodies of a wide ``for`` loop, one per iteration, built when first read.

    ``make(value)`` builds the body of the iteration with loop value ``value``;
    ``make`` may be None when every iteration runs the same ``first`` body.
    ``first`` is the body of the first iteration, built up front: it stands for
    all of them when counting ops or finding the qubits the loop touches (the
    iterations differ only in their parameter). Memory stays that of a few bodies
    whatever the number of iterations.
    """

    __slots__ = ("values", "make", "first", "_built")

    # Bodies of the first iterations kept once built, so a loop rerun shot after shot builds them once.
    CACHED_BODIES = 8192

    def __init__(self, values: Sequence, make: Optional[Callable[[Any], tuple]], first: tuple) -> None:
        self.values = values
        self.make = make
        self.first = first
        self._built: dict = {0: first}

    def __len__(self) -> int:
        return len(self.values)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return tuple(self[i] for i in range(*index.indices(len(self))))
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        if self.make is None:
            return self.first
        body = self._built.get(index)
        if body is None:
            body = self.make(self.values[index])
            if index < self.CACHED_BODIES:
                self._built[index] = body
        return body

    def map(self, transform: Callable[[tuple], tuple]) -> "LoopBodies":
        """The same loop with ``transform`` applied to each body as it is built."""
        make = None if self.make is None else (lambda value, make=self.make: transform(make(value)))
        return LoopBodies(self.values, make, transform(self.first))

    def __repr__(self) -> str:
        return f"LoopBodies({len(self)} iterations)"

    def __reduce__(self):
        # Bodies built on demand come from a closure over the front end's circuit: they
        # cannot travel to another process (an executor's worker). run() refuses such a
        # program first (see :func:`lazy_loop`); this is the backstop with the same reason.
        if self.make is not None:
            raise TypeError(
                f"a for_loop over {len(self)} values builds its bodies on demand and cannot be sent to another "
                "process; run the circuit without executor=, or loop over fewer values"
            )
        return (LoopBodies, (self.values, None, self.first))


def lazy_loop(ops) -> Optional["ForLoop"]:
    """The first ``for`` loop in ``ops`` (nested bodies included) whose bodies are built on demand, or None."""
    for op in ops:
        if isinstance(op, ForLoop) and isinstance(op.iterations, LoopBodies) and op.iterations.make is not None:
            return op
        for body in op_bodies(op):
            found = lazy_loop(body)
            if found is not None:
                return found
    return None


@dataclass(frozen=True)
class ForLoop:
    """One op tuple per iteration (the loop parameter is already bound in each).

    ``iterations`` is a tuple, or a :class:`LoopBodies` for wide loops.
    """

    iterations: Sequence


@dataclass(frozen=True)
class SwitchCase:
    """``cases`` pairs a tuple of values (``None`` for default) with a body."""

    target: ClassicalExpr
    cases: tuple


@dataclass(frozen=True)
class BreakLoop:
    pass


@dataclass(frozen=True)
class ContinueLoop:
    pass


GateOp = Union[Unitary, Diagonal]
Op = Union[Unitary, Diagonal, Initialize, PauliEvolution, GlobalPhase, Measure, Reset, Store, IfElse, WhileLoop, ForLoop, SwitchCase, BreakLoop, ContinueLoop]
CONTROL_FLOW = (IfElse, WhileLoop, ForLoop, SwitchCase)


@dataclass(frozen=True)
class Program:
    """A whole circuit: ``ops`` act on ``num_qubits`` qubits and ``num_clbits`` clbits.

    After :func:`compact`, ``num_qubits`` is the width of the state really
    simulated and ``layout[i]`` is the circuit qubit that state qubit ``i``
    stands for, out of ``circuit_qubits``; ``layout`` is ``None`` when every
    circuit qubit is simulated.
    """

    num_qubits: int
    num_clbits: int
    ops: tuple
    name: str = ""
    metadata: dict = field(default_factory=dict, compare=False)
    layout: tuple[int, ...] | None = None
    circuit_qubits: int | None = None

    def replace(self, **changes) -> "Program":
        return dataclasses.replace(self, **changes)

    @property
    def num_ops(self) -> int:
        return count_ops(self.ops)

    @property
    def width(self) -> int:
        """Qubits of the circuit this program came from (idle ones included)."""
        return self.num_qubits if self.circuit_qubits is None else self.circuit_qubits

    @property
    def active_qubits(self) -> tuple[int, ...]:
        """The circuit qubits that are simulated, in state order."""
        return tuple(range(self.num_qubits)) if self.layout is None else self.layout


# Ops without nested bodies.
_LEAF_OPS = frozenset({Unitary, Diagonal, Initialize, PauliEvolution, GlobalPhase, Measure, Reset, Store, BreakLoop, ContinueLoop})


def count_ops(ops) -> int:
    """Number of ops, counting nested control-flow bodies once each (every iteration of a for loop)."""
    total = 0
    for op in ops:
        total += 1
        if type(op) in _LEAF_OPS:  # most ops: no bodies to look into
            continue
        if isinstance(op, ForLoop) and isinstance(op.iterations, LoopBodies):
            total += len(op.iterations) * count_ops(op.iterations.first)
        else:
            total += sum(count_ops(body) for body in op_bodies(op))
    return total


def op_qubits(op) -> tuple[int, ...]:
    """Every qubit an op may touch (control-flow ops: all qubits of their bodies)."""
    if isinstance(op, Unitary):
        return op.controls + op.qubits
    if isinstance(op, (Diagonal, Initialize, PauliEvolution)):
        return op.qubits
    if isinstance(op, (Measure, Reset)):
        return (op.qubit,)
    return tuple(sorted({q for body in op_bodies(op) for inner in body for q in op_qubits(inner)}))


def gate_arrays(ops):
    """The matrices and diagonals of the gates in ``ops`` (not inside control flow), in order."""
    for op in ops:
        if isinstance(op, Unitary):
            yield op.matrix
        elif isinstance(op, Diagonal):
            yield op.diagonal


def any_op(ops, kind, where=None) -> bool:
    """Whether an op of type ``kind`` (for which ``where(op)`` holds, if given) is in ``ops`` or in a control-flow body."""
    return any((isinstance(op, kind) and (where is None or where(op))) or any(any_op(body, kind, where) for body in op_bodies(op)) for op in ops)


def used_qubits(ops) -> tuple[int, ...]:
    """Sorted qubits that some op in ``ops`` (or in a control-flow body) touches."""
    used: set[int] = set()
    for op in ops:
        kind = type(op)
        if kind is Unitary:
            used.update(op.qubits)
            if op.controls:
                used.update(op.controls)
        elif kind is Diagonal:
            used.update(op.qubits)
        else:
            used.update(op_qubits(op))
    return tuple(sorted(used))


def compact(program: Program) -> Program:
    """``program`` on only the qubits its ops touch, renumbered in their order.

    An idle qubit stays in |0> and is never measured, so dropping it changes no
    outcome; it only halves the state per qubit dropped. The relabelling keeps
    the qubits' relative order, so the state's index order is unchanged for the
    qubits that remain. :func:`expand_state` puts idle qubits back.
    """
    if program.layout is not None:
        return program
    active = used_qubits(program.ops)
    if len(active) == program.num_qubits:
        return program
    mapping = {qubit: index for index, qubit in enumerate(active)}
    return program.replace(
        num_qubits=len(active),
        ops=_relabel(program.ops, mapping),
        layout=active,
        circuit_qubits=program.num_qubits,
    )


def _relabel(ops, mapping: dict) -> tuple:
    return tuple(_relabel_op(op, mapping) for op in ops)


def _relabel_op(op, mapping: dict):
    if isinstance(op, Unitary):
        return dataclasses.replace(op, qubits=tuple(mapping[q] for q in op.qubits), controls=tuple(mapping[q] for q in op.controls))
    if isinstance(op, (Diagonal, Initialize, PauliEvolution)):
        return dataclasses.replace(op, qubits=tuple(mapping[q] for q in op.qubits))
    if isinstance(op, (Measure, Reset)):
        return dataclasses.replace(op, qubit=mapping[op.qubit])
    if isinstance(op, IfElse):
        return IfElse(op.condition, _relabel(op.true_body, mapping), _relabel(op.false_body, mapping))
    if isinstance(op, WhileLoop):
        return WhileLoop(op.condition, _relabel(op.body, mapping))
    if isinstance(op, ForLoop) and isinstance(op.iterations, LoopBodies):  # a wide loop stays lazy
        return ForLoop(op.iterations.map(lambda body: _relabel(body, mapping)))
    if isinstance(op, ForLoop):
        done: dict = {}  # iterations often share one body: relabel it once
        for body in op.iterations:
            if id(body) not in done:
                done[id(body)] = _relabel(body, mapping)
        return ForLoop(tuple(done[id(body)] for body in op.iterations))
    if isinstance(op, SwitchCase):
        return SwitchCase(op.target, tuple((values, _relabel(body, mapping)) for values, body in op.cases))
    return op  # GlobalPhase, Store, BreakLoop, ContinueLoop: no qubits


def expand_state(vector: np.ndarray, layout: tuple[int, ...], width: int) -> np.ndarray:
    """The ``width``-qubit state with ``vector`` on ``layout`` and every other qubit in |0>."""
    index = np.zeros(1 << len(layout), dtype=np.int64)
    positions = np.arange(1 << len(layout), dtype=np.int64)
    for bit, qubit in enumerate(layout):
        index |= ((positions >> bit) & 1) << qubit
    full = np.zeros(1 << width, dtype=vector.dtype)
    full[index] = vector
    return full


def op_bodies(op):
    """The op tuples nested in a control-flow op (a wide for loop: its first body stands for all)."""
    if isinstance(op, IfElse):
        return (op.true_body, op.false_body)
    if isinstance(op, WhileLoop):
        return (op.body,)
    if isinstance(op, ForLoop):
        if isinstance(op.iterations, LoopBodies):
            return (op.iterations.first,)
        return op.iterations
    if isinstance(op, SwitchCase):
        return tuple(body for _, body in op.cases)
    return ()


def measurements_are_terminal(program: Program) -> bool:
    """True when no op acts on a qubit after it was measured and nothing is classical.

    Then removing the measurements leaves the rest of the evolution unchanged,
    and a shot's outcome can be drawn from that shot's final state.
    """
    return _only_terminal_measures(program, allow_reset=True)


def is_sampling_friendly(program: Program) -> bool:
    """True when every shot can be drawn from one final state.

    That holds when the program has no control flow, no classical stores, no
    reset, and no gate acts on a qubit after it was measured.
    """
    return _only_terminal_measures(program, allow_reset=False)


def _only_terminal_measures(program: Program, allow_reset: bool) -> bool:
    measured: set[int] = set()
    stops = (Store, BreakLoop, ContinueLoop) + CONTROL_FLOW
    for op in program.ops:
        kind = type(op)
        if kind is Unitary or kind is Diagonal:  # most ops: a gate, fine unless it touches a measured qubit
            if measured and (measured.intersection(op.qubits) or (kind is Unitary and measured.intersection(op.controls))):
                return False
            continue
        if isinstance(op, Measure):
            measured.add(op.qubit)
        elif isinstance(op, stops):
            return False
        elif isinstance(op, Reset) and not allow_reset:
            return False
        elif not measured or isinstance(op, GlobalPhase):
            continue  # nothing measured yet: no op can come after a measurement
        elif measured.intersection(op_qubits(op)):
            return False
    return True
