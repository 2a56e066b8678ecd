"""Shots of small dynamic circuits in bulk on the GPU: one shot per block, many per launch.

A circuit that measures mid-circuit, resets or branches on classical values
cannot be sampled from one final state. Shot branching
(:mod:`~gpu_provider.engine.trajectories`) runs it once per distinct path, but
on a GPU each op of each path is a launch of its own, and a circuit whose
outcomes differ from shot to shot (a monitored circuit, a random syndrome)
has about as many paths as shots. Here the ``run_small_shots`` kernel
(``kernels/statevector.cu``) runs the shots instead: each block keeps one
shot's state and clbits in shared memory and runs the whole circuit, drawing
its measurements from a counter-based generator (Philox4x64-10 keyed per
circuit, counter = (draw, shot)), so a launch runs every shot of a circuit
and the draws of a shot never depend on the launch's shape.

Which circuits (:func:`flatten`): of 1 to the device's
:meth:`~gpu_provider.engine.kernels.Kernels.small_max_qubits` qubits and at
most ``SMALL_CLBIT_WORDS`` x 64 clbits, whose ops are the bulk kernel's gates
(dense on 1 to 5 targets with any controls, diagonals on up to 10, global
phases), measurements, resets, and control flow whose conditions compare
clbits with constants: ``if_test``/``c_if`` on a clbit or register, ``==`` or
``!=`` a constant, their negations, ``switch`` on a register, ``while`` loops
(nested up to ``SMALL_LOOP_SLOTS`` deep; ``max_loop_iterations`` is checked
per loop as the interpreter does), ``for`` loops (unrolled), ``break`` and
``continue``. The program becomes one flat stream of op words with jumps;
anything else (stores, classical variables, other expressions,
``initialize``) keeps the interpreter.

When (:func:`trajectory_budget`, used by ``executor._run_trajectories``): with
shot branching on, the interpreter runs first and the kernel takes over only
when the paths begun pass a budget: the shots' kernel time, estimated from
``BATCHED_SHOTS_COST``, over a path's launches. Whichever way a circuit ends
up, it costs at most about twice the cheaper one (the ski-rental bound): the
paths run before the switch cost no more than the kernel does. With shot
branching off, every eligible circuit's shots run here.

A seed gives the same samples on every run and every launch shape, but other
samples than the interpreter's (the draws come from another generator), with
the same distribution.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from ..errors import InvalidInputError, SimulationError
from .kernels import (
    SMALL_CLBIT_WORDS,
    SMALL_JUMP,
    SMALL_JUMP_IF,
    SMALL_LOOP_COUNT,
    SMALL_LOOP_ENTER,
    SMALL_LOOP_SLOTS,
    SMALL_MEASURE,
    SMALL_OP_WORDS,
    SMALL_RESET,
)
from .program import (
    Binary,
    BreakLoop,
    Bits,
    Cast,
    Const,
    ContinueLoop,
    Diagonal,
    ExprOp,
    ForLoop,
    GlobalPhase,
    IfElse,
    Measure,
    Program,
    Reset,
    SwitchCase,
    Unary,
    Unitary,
    WhileLoop,
)
from .small_batch import OpEncoder
from .trajectories import iteration_limit_error

# The most ops a flat program may have (for loops unrolled): 3 MiB of op words.
FLAT_OPS_MAX = 1 << 16
# Rough costs that decide when the kernel takes over from branching (see trajectory_budget):
# "path_op_seconds", one op of one path of the interpreter on a GPU (a launch and its host work);
# "amplitude_seconds", one op on one amplitude of one shot in the kernel, spread over the GPU.
# Estimates from the H200's launch rate and shared-memory bandwidth, not yet measured:
# ``python -m benchmarks.dynamic --device gpu`` times both sides.
BATCHED_SHOTS_COST = {"path_op_seconds": 10e-6, "amplitude_seconds": 2e-12}
# The spawn key of the kernel's Philox key under the circuit's seed: a stream of its own.
_KEY_STREAM = 0x5107


class _Ineligible(Exception):
    """The program has an op or condition the flat form cannot hold."""


@dataclass(frozen=True)
class FlatProgram:
    """A program as run_small_shots' op stream: ``ops`` (uint64, ``SMALL_OP_WORDS`` per op),
    ``pool`` (the gates' numbers), ``words`` (the conditions' masks and patterns, uint64)."""

    ops: np.ndarray
    pool: np.ndarray
    words: np.ndarray
    num_qubits: int
    clbit_words: int

    @property
    def count(self) -> int:
        return self.ops.size // SMALL_OP_WORDS

    @property
    def device_bytes(self) -> int:
        return (self.ops.size + self.words.size) * 8 + self.pool.size * self.pool.dtype.itemsize


def clbit_words(num_clbits: int) -> int:
    """64-bit words of a shot's clbits (one at least)."""
    return max(1, -(-num_clbits // 64))


def flatten(program: Program, dtype) -> Optional[FlatProgram]:
    """``program`` as a flat op stream for run_small_shots, or None where it has an op or a
    condition the stream cannot hold (see the module's notes)."""
    words = clbit_words(program.num_clbits)
    if words > SMALL_CLBIT_WORDS or program.num_qubits < 1:
        return None
    flattener = _Flattener(program, words)
    try:
        flattener.body(program.ops)
    except _Ineligible:
        return None
    ops = np.array(flattener.ops, dtype=np.uint64).reshape(-1) if flattener.ops else np.zeros(0, dtype=np.uint64)
    masks = np.array(flattener.words, dtype=np.uint64) if flattener.words else np.zeros(1, dtype=np.uint64)
    return FlatProgram(ops, flattener.encoder.pool(np.dtype(dtype)), masks, program.num_qubits, words)


class _Loop:
    """A loop being flattened: where ``continue`` goes (None: patched later) and the jumps to patch."""

    __slots__ = ("top", "breaks", "continues")

    def __init__(self, top: Optional[int]) -> None:
        self.top = top
        self.breaks: list[int] = []
        self.continues: list[int] = []


class _Flattener:
    def __init__(self, program: Program, words: int) -> None:
        self.n = program.num_qubits
        self.name = program.name
        self.clbit_count = program.num_clbits
        self.width = words
        self.ops: list[list[int]] = []
        self.words: list[int] = []
        self.encoder = OpEncoder()
        self.loops: list[_Loop] = []
        self.while_depth = 0

    def emit(self, *fields: int) -> int:
        if len(self.ops) >= FLAT_OPS_MAX:
            raise _Ineligible(f"more than {FLAT_OPS_MAX} ops once flattened")
        self.ops.append(list(fields) + [0] * (SMALL_OP_WORDS - len(fields)))
        return len(self.ops) - 1

    def jump(self, target: Optional[int] = None) -> int:
        return self.emit(SMALL_JUMP, -1 if target is None else target)

    def patch(self, at: int, target: Optional[int] = None) -> None:
        self.ops[at][1] = len(self.ops) if target is None else target

    def jump_if(self, condition: tuple, jump_when: bool) -> int:
        """A jump taken where ``condition`` (see :func:`_condition`) is ``jump_when``; patch its target."""
        negate, clbits, value = condition
        offset = len(self.words)
        masks, patterns = [0] * self.width, [0] * self.width
        for position, clbit in enumerate(clbits):
            masks[clbit >> 6] |= 1 << (clbit & 63)
            patterns[clbit >> 6] |= ((value >> position) & 1) << (clbit & 63)
        self.words += masks + patterns
        # The kernel jumps where (match != flag); the condition holds where (match != negate).
        return self.emit(SMALL_JUMP_IF, -1, offset, int(negate != (not jump_when)))

    def body(self, ops) -> None:
        for op in ops:
            self.op(op)

    def op(self, op: Any) -> None:
        kind = type(op)
        if kind is Unitary or kind is Diagonal or kind is GlobalPhase:
            try:
                self.emit(*self.encoder.gate(op, self.n, self.name))
            except InvalidInputError as exc:
                raise _Ineligible(str(exc)) from None
        elif kind is Measure:
            self._check_bits(op.qubit, op.clbit)
            self.emit(SMALL_MEASURE, op.qubit, op.clbit)
        elif kind is Reset:
            self._check_bits(op.qubit, 0)
            self.emit(SMALL_RESET, op.qubit)
        elif kind is IfElse:
            self._if_else(op)
        elif kind is WhileLoop:
            self._while(op)
        elif kind is ForLoop:
            self._for(op)
        elif kind is SwitchCase:
            self._switch(op)
        elif kind is BreakLoop or kind is ContinueLoop:
            if not self.loops:
                raise _Ineligible("break or continue outside a loop")  # the interpreter's error
            loop = self.loops[-1]
            if kind is BreakLoop:
                loop.breaks.append(self.jump())
            elif loop.top is not None:
                self.jump(loop.top)
            else:
                loop.continues.append(self.jump())
        else:
            raise _Ineligible(f"{kind.__name__} ops")

    def _check_bits(self, qubit: int, clbit: int) -> None:
        if not (0 <= qubit < self.n and 0 <= clbit < max(self.clbit_count, 1)):
            raise _Ineligible(f"qubit {qubit} or clbit {clbit} out of range")

    def _if_else(self, op: IfElse) -> None:
        condition = _condition(op.condition)
        if isinstance(condition, bool):
            self.body(op.true_body if condition else op.false_body)
            return
        to_else = self.jump_if(condition, False)
        self.body(op.true_body)
        if op.false_body:
            to_end = self.jump()
            self.patch(to_else)
            self.body(op.false_body)
            self.patch(to_end)
        else:
            self.patch(to_else)

    def _while(self, op: WhileLoop) -> None:
        condition = _condition(op.condition)
        if condition is False:
            return
        if self.while_depth >= SMALL_LOOP_SLOTS:
            raise _Ineligible(f"while loops nested over {SMALL_LOOP_SLOTS} deep")
        slot = self.while_depth
        self.emit(SMALL_LOOP_ENTER, slot)
        top = len(self.ops)
        leave = None if condition is True else self.jump_if(condition, False)
        self.emit(SMALL_LOOP_COUNT, slot)
        loop = _Loop(top)
        self.loops.append(loop)
        self.while_depth += 1
        try:
            self.body(op.body)
        finally:
            self.while_depth -= 1
            self.loops.pop()
        self.jump(top)
        for at in loop.breaks + ([] if leave is None else [leave]):
            self.patch(at)

    def _for(self, op: ForLoop) -> None:
        iterations = op.iterations
        first = iterations[0] if len(iterations) else ()
        if len(iterations) * max(len(first), 1) > FLAT_OPS_MAX:
            raise _Ineligible(f"a for loop of {len(iterations)} iterations")
        loop = _Loop(None)
        self.loops.append(loop)
        try:
            for body in iterations:
                loop.continues = []
                self.body(body)
                for at in loop.continues:
                    self.patch(at)
        finally:
            self.loops.pop()
        for at in loop.breaks:
            self.patch(at)

    def _switch(self, op: SwitchCase) -> None:
        clbits = _value_bits(op.target)
        if clbits is None:
            raise _Ineligible("a switch on an expression")
        entries: list[tuple[int, tuple]] = []  # (jump to patch to the body, body)
        default_taken = False
        for values, body in op.cases:
            if values is None:
                entries.append((self.jump(), body))  # the interpreter takes a default where it stands
                default_taken = True
                break
            for value in values:
                condition = _equal(clbits, value, False)
                if condition is True:
                    entries.append((self.jump(), body))
                    default_taken = True
                    break
                if condition is not False:
                    entries.append((self.jump_if(condition, True), body))
            if default_taken:
                break
        to_end = [] if default_taken else [self.jump()]
        for at, body in entries:
            self.patch(at)
            self.body(body)
            to_end.append(self.jump())
        for at in to_end:
            self.patch(at)


def _value_bits(expr: Any) -> Optional[tuple[int, ...]]:
    """The clbits whose unsigned value ``expr`` is (least significant first), or None."""
    if type(expr) is Bits:
        clbits = expr.clbits
    elif type(expr) is Cast and expr.width and type(expr.operand) is Bits:
        clbits = expr.operand.clbits[: expr.width]
    else:
        return None
    return clbits if len(set(clbits)) == len(clbits) else None


def _equal(clbits: tuple[int, ...], value: Any, negate: bool) -> Any:
    """The condition ``value(clbits) == value`` (``!=`` with ``negate``): a bool where it is
    constant, else ``(negate, clbits, value)``; None where ``value`` is no integer."""
    if isinstance(value, (bool, np.bool_)):
        value = int(value)
    elif isinstance(value, (int, np.integer)):
        value = int(value)
    else:
        return None
    if value < 0 or value >> len(clbits):
        return negate  # never equal
    return (negate, clbits, value)


def _condition(expr: Any) -> Any:
    """``expr`` as a truth value of clbits: True or False where it is constant, else
    ``(negate, clbits, value)`` meaning ``(value(clbits) == value) != negate``.

    Raises:
        _Ineligible: any other expression (variables, arithmetic, comparisons but ``==``/``!=``).
    """
    kind = type(expr)
    if kind is Const:
        return bool(expr.value)
    if kind is Bits and expr.boolean:
        return (False, expr.clbits[:1], 1)
    clbits = _value_bits(expr)
    if clbits is not None:
        return (True, clbits, 0)  # an unsigned value is true where it is not 0
    if kind is Cast and expr.width == 0:
        return _condition(expr.operand)
    if kind is Unary and (expr.op is ExprOp.LOGIC_NOT or (expr.op is ExprOp.BIT_NOT and expr.width == 0)):
        inner = _condition(expr.operand)
        return (not inner) if isinstance(inner, bool) else (not inner[0], inner[1], inner[2])
    if kind is Binary and expr.op in (ExprOp.EQUAL, ExprOp.NOT_EQUAL):
        negate = expr.op is ExprOp.NOT_EQUAL
        for side, other in ((expr.left, expr.right), (expr.right, expr.left)):
            clbits = _value_bits(side) if type(side) is not Bits or not side.boolean else side.clbits[:1]
            if clbits is not None and type(other) is Const:
                found = _equal(clbits, other.value, negate)
                if found is not None:
                    return found
    raise _Ineligible(f"the condition {expr!r}")


# ---------------------------------------------------------------------------
# Running


def shot_kernels(device: Any, config: Any) -> Any:
    """The kernels with run_small_shots for ``config``'s precision on ``device``, or None (the CPU)."""
    from .executor import device_kernels

    kernels = device_kernels(device, config.dtype)
    return kernels if kernels is not None and hasattr(kernels, "run_small_shots") else None


def plan(program: Program, config: Any, device: Any) -> Optional[tuple[FlatProgram, Any]]:
    """``program`` flattened for run_small_shots on ``device`` with the kernels to run it, or None
    where its shots cannot run there (not a GPU, ``config.batched_shots`` off, too wide, an op or
    condition the flat form cannot hold)."""
    if not getattr(config, "batched_shots", False) or config.shots < 1:
        return None
    kernels = shot_kernels(device, config)
    if kernels is None or not 1 <= program.num_qubits <= kernels.small_max_qubits(device.device_id):
        return None
    flat = flatten(program, config.dtype)
    return None if flat is None else (flat, kernels)


def trajectory_budget(flat: FlatProgram, shots: int) -> int:
    """Paths shot branching may begin before the kernel takes over: as many as cost what the
    kernel would for all ``shots`` (``BATCHED_SHOTS_COST``; one path at least)."""
    cost = BATCHED_SHOTS_COST
    kernel = shots * (1 << flat.num_qubits) * cost["amplitude_seconds"]
    return max(1, int(kernel / cost["path_op_seconds"]))


def philox_key(seed: int) -> tuple[int, int]:
    """The kernel's Philox key for a circuit's ``seed``: a stream apart from the interpreter's."""
    state = np.random.SeedSequence(seed, spawn_key=(_KEY_STREAM,)).generate_state(2, np.uint64)
    return int(state[0]), int(state[1])


def shot_chunk(flat: FlatProgram, budget_bytes: int) -> int:
    """Shots per launch: their outputs (clbit words and status) within ``budget_bytes``."""
    return max(1, budget_bytes // (8 * (flat.clbit_words + 1)))


def run_shots(
    flat: FlatProgram,
    kernels: Any,
    device: Any,
    config: Any,
    weight: int,
    execution: Any = None,
    budget_bytes: int = 16 << 20,
) -> list:
    """Run ``config.shots`` shots of ``flat`` through run_small_shots, a chunk of shots per launch.

    Returns the shots' clbit values in shot order, a chunk per launch: uint64 arrays
    (one clbit word) or lists of Python ints (more). ``weight``: what one shot
    counts for in progress (the program's ops). Cancellation is checked and
    progress recorded between launches.

    Raises:
        IterationLimitError: a while loop of a shot ran past ``config.max_loop_iterations``.
        SimulationError: a shot measured a qubit whose outcome had zero probability.
        JobCancelledError: the job was cancelled.
    """
    xp = device.xp
    ops, pool, words = xp.asarray(flat.ops), xp.asarray(flat.pool), xp.asarray(flat.words)
    key = philox_key(config.seed)
    chunk = shot_chunk(flat, budget_bytes)
    width = flat.clbit_words + 1
    values: list = []
    for first in range(0, config.shots, chunk):
        if execution is not None:
            execution.poll_cancel()
        shots = min(chunk, config.shots - first)
        out = xp.empty(width * shots, dtype=np.uint64)
        kernels.run_small_shots(out, ops, pool, words, flat.num_qubits, flat.clbit_words, first, shots, key, config.max_loop_iterations)
        rows = device.to_host(out).reshape(shots, width)
        del out
        _check_status(rows[:, -1], config)
        if flat.clbit_words == 1:
            values.append(rows[:, 0].copy())
        else:
            values.append([int.from_bytes(row.tobytes(), "little") for row in rows[:, :-1]])
        if execution is not None:
            execution.advance(weight * shots)
    return values


def _check_status(status: np.ndarray, config: Any) -> None:
    if not status.any():
        return
    if (status == 1).any():
        raise iteration_limit_error(config.max_loop_iterations)
    raise SimulationError("a measured qubit's outcome had zero probability in a shot's state (the state lost its norm)")


def tally_shots(values: list, tally: Any) -> None:
    """Add :func:`run_shots`' values to ``tally`` (counts, and memory in shot order)."""
    for chunk in values:
        tally.add_many(chunk)


