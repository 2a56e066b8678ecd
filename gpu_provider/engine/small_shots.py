"""Shots of small dynamic circuits as one batch: on the GPU one shot per block, many per launch.

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

On the CPU (:func:`run_shots_host`) the same stream runs on NumPy: a chunk
of shots are the rows of one batch of states, each op runs once for all the
shots at it, and the draws are the kernel's (:func:`philox_uniforms`), so a
seed gives the GPU's samples, up to rounding of the probabilities.

When (:class:`ShotPlan`, used by ``executor._run_trajectories``): on a GPU,
where the launch costs less than one path's launches, the kernel runs at
once; otherwise, with shot branching on, the interpreter runs first and the
batch takes over only when the paths begun pass a budget: the batch's cost, from ``BATCHED_SHOTS_COST``
for the device's kind, over a path's. Whichever way a circuit ends up, it
costs at most about twice the cheaper one (the ski-rental bound): the paths
run before the switch cost no more than the batch does. With shot branching
off, every eligible circuit's shots run in the GPU's kernel (the CPU then
keeps every shot alone).

A seed gives the same samples on every run and every launch shape, but other
samples than the interpreter's (the draws come from another generator), with
the same distribution.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from ..errors import InvalidInputError, SimulationError
from .batch import StateBatch
from .kernels import (
    SMALL_CLBIT_WORDS,
    SMALL_DIAGONAL,
    SMALL_JUMP,
    SMALL_JUMP_IF,
    SMALL_LOOP_COUNT,
    SMALL_LOOP_ENTER,
    SMALL_LOOP_SLOTS,
    SMALL_MEASURE,
    SMALL_OP_WORDS,
    SMALL_PHASE,
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
from .statevector import DENSE_CONTROLLED_MAX, controlled_matrix
from .trajectories import iteration_limit_error

# The most ops a flat program may have (for loops unrolled): 3 MiB of op words.
FLAT_OPS_MAX = 1 << 16
# Rough costs that decide when the shots' batch takes over from branching (see trajectory_budget),
# per device kind: "path_op_seconds", one op of one path of the interpreter (on a GPU a launch and
# its host work); "amplitude_seconds", one op on one amplitude of one shot in the batch (on a GPU
# the kernel, spread over the device). The GPU's are estimates from the H200's launch rate and
# shared-memory bandwidth, not yet measured (``python -m benchmarks.dynamic --device gpu`` times
# both sides); the CPU's are measured on the 2-core machine (docs/benchmarks.md).
BATCHED_SHOTS_COST = {
    "GPU": {"path_op_seconds": 10e-6, "amplitude_seconds": 2e-12},
    "CPU": {"path_op_seconds": 5e-6, "amplitude_seconds": 8e-9},
}
# A chunk of shots (a launch, a host batch) is cut to take about CHUNK_SECONDS by those costs, so a
# cancel waits no longer than that; never fewer shots than fill the device (MIN_CHUNK_SHOTS).
CHUNK_SECONDS = 0.25
MIN_CHUNK_SHOTS = {"GPU": 4096, "CPU": 64}
# On the CPU: the widest state batched (as engine/batch.py), and the bytes of one batch of shots'
# states (the interpreter's copies may take BRANCH_BYTES; a batch and its temporaries stay below).
HOST_MAX_QUBITS = 14
HOST_BATCH_BYTES = 32 << 20
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


@dataclass(frozen=True)
class ShotPlan:
    """A program's shots as one batch on ``device``: ``flat`` through the GPU's ``kernels``, or,
    where ``kernels`` is None, through :func:`run_shots_host` (the CPU)."""

    flat: FlatProgram
    kernels: Any
    device: Any

    def _paths_worth(self, shots: int) -> float:
        """How many paths of the interpreter cost what the batch costs for ``shots`` shots
        (``BATCHED_SHOTS_COST`` of the device's kind)."""
        cost = BATCHED_SHOTS_COST["GPU" if self.kernels is not None else "CPU"]
        return shots * (1 << self.flat.num_qubits) * cost["amplitude_seconds"] / cost["path_op_seconds"]

    def budget(self, shots: int) -> int:
        """Paths shot branching may begin before this batch takes over: as many as cost what the
        batch would for all ``shots`` (one at least). So a circuit costs at most about twice the
        cheaper of the two ways (the ski-rental bound). At ``shots`` or more the batch never takes
        over (branching begins at most a path a shot), as it should: it would cost more than a
        path a shot."""
        return max(1, int(self._paths_worth(shots)))

    def first(self, shots: int) -> bool:
        """Whether the batch runs without branching first: on a GPU, where the whole launch costs
        less than one path (every op of a path is a launch of its own). On the CPU a batch op has
        a fixed cost the estimate leaves out, so branching always goes first there."""
        return self.kernels is not None and self._paths_worth(shots) < 1.0

    def chunk_shots(self) -> int:
        """Shots per launch (or host batch) for about ``CHUNK_SECONDS`` of work by the costs, so
        cancellation is checked that often; ``MIN_CHUNK_SHOTS`` at least."""
        kind = "GPU" if self.kernels is not None else "CPU"
        per_shot = (1 << self.flat.num_qubits) * max(self.flat.count, 1) * BATCHED_SHOTS_COST[kind]["amplitude_seconds"]
        return max(MIN_CHUNK_SHOTS[kind], int(CHUNK_SECONDS / per_shot))

    def run(self, config: Any, weight: int, execution: Any = None) -> list:
        """The shots' clbit values (see :func:`run_shots`)."""
        if self.kernels is not None:
            return run_shots(self.flat, self.kernels, self.device, config, weight, execution, max_chunk=self.chunk_shots())
        return run_shots_host(self.flat, self.device.xp, config, weight, execution, max_chunk=self.chunk_shots())


def plan(program: Program, config: Any, device: Any) -> Optional[ShotPlan]:
    """How ``program``'s shots run as one batch on ``device``, or None where they cannot
    (``config.batched_shots`` off, too wide, an op or condition the flat form cannot hold).
    On a GPU, through run_small_shots (at most the device's ``small_max_qubits`` and
    ``config.batched_shots_max_qubits``); on the CPU, as rows of one NumPy batch (at most
    ``HOST_MAX_QUBITS``)."""
    if not config.batched_shots or config.shots < 1:
        return None
    kernels = shot_kernels(device, config)
    if kernels is not None:
        widest = min(kernels.small_max_qubits(device.device_id), config.batched_shots_max_qubits)
    elif device.kind == "CPU":
        widest = HOST_MAX_QUBITS
    else:
        return None
    if not 1 <= program.num_qubits <= widest:
        return None
    flat = flatten(program, config.dtype)
    return None if flat is None else ShotPlan(flat, kernels, device)


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
    max_chunk: Optional[int] = None,
) -> list:
    """Run ``config.shots`` shots of ``flat`` through run_small_shots, a chunk of shots per launch
    (their outputs within ``budget_bytes``, at most ``max_chunk`` shots); see :func:`_in_chunks`
    for what it returns and raises."""
    xp = device.xp
    ops, pool, words = xp.asarray(flat.ops), xp.asarray(flat.pool), xp.asarray(flat.words)
    key = philox_key(config.seed)
    width = flat.clbit_words + 1

    def launch(first: int, shots: int) -> np.ndarray:
        out = xp.empty(width * shots, dtype=np.uint64)
        kernels.run_small_shots(out, ops, pool, words, flat.num_qubits, flat.clbit_words, first, shots, key, config.max_loop_iterations)
        return device.to_host(out).reshape(shots, width)

    chunk = shot_chunk(flat, budget_bytes)
    return _in_chunks(flat, config, weight, execution, chunk if max_chunk is None else min(chunk, max_chunk), launch)


def _in_chunks(flat: FlatProgram, config: Any, weight: int, execution: Any, chunk: int, run: Any) -> list:
    """``config.shots`` shots, ``chunk`` at a time through ``run(first, shots)`` (rows of clbit words
    and a status word, as run_small_shots writes them).

    Returns the shots' clbit values in shot order, a list per chunk: uint64 arrays (one clbit
    word) or lists of Python ints (more). ``weight``: what one shot counts for in progress (the
    program's ops). Cancellation is checked and progress recorded between chunks.

    Raises:
        IterationLimitError: a while loop of a shot ran past ``config.max_loop_iterations``.
        SimulationError: a shot measured a qubit whose outcome had zero probability.
        JobCancelledError: the job was cancelled.
    """
    values: list = []
    for first in range(0, config.shots, chunk):
        if execution is not None:
            execution.poll_cancel()
        shots = min(chunk, config.shots - first)
        rows = run(first, shots)
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


# ---------------------------------------------------------------------------
# The same op stream on the host: every shot a row of one NumPy batch


_MASK64 = (1 << 64) - 1
_PHILOX_M = (0xD2E7470EE14C6C93, 0xCA5A826395121157)
_PHILOX_W = (0x9E3779B97F4A7C15, 0xBB67AE8584CAA73B)


def _mulhilo(a: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
    """The high and low 64-bit words of ``a * m`` (uint64 arrays), through 32-bit halves."""
    low32 = np.uint64(0xFFFFFFFF)
    shift = np.uint64(32)
    m_hi, m_lo = np.uint64(m >> 32), np.uint64(m & 0xFFFFFFFF)
    a_hi, a_lo = a >> shift, a & low32
    t = a_lo * m_lo
    u = a_hi * m_lo + (t >> shift)
    w = a_lo * m_hi + (u & low32)
    return a_hi * m_hi + (u >> shift) + (w >> shift), a * np.uint64(m)


def philox_uniforms(key: tuple[int, int], draws: np.ndarray, shots: np.ndarray) -> np.ndarray:
    """The uniforms run_small_shots draws: Philox4x64-10 of counters (draws[i], shots[i], 0, 0)
    under ``key``, the first word's top 53 bits as doubles in [0, 1)."""
    c0 = np.asarray(draws, dtype=np.uint64).copy()
    c1 = np.asarray(shots, dtype=np.uint64).copy()
    c2 = np.zeros_like(c0)
    c3 = np.zeros_like(c0)
    k0, k1 = key[0] & _MASK64, key[1] & _MASK64
    with np.errstate(over="ignore"):
        for round_ in range(10):
            if round_:
                k0, k1 = (k0 + _PHILOX_W[0]) & _MASK64, (k1 + _PHILOX_W[1]) & _MASK64
            hi0, lo0 = _mulhilo(c0, _PHILOX_M[0])
            hi1, lo1 = _mulhilo(c2, _PHILOX_M[1])
            c0, c1, c2, c3 = hi1 ^ c1 ^ np.uint64(k0), lo1, hi0 ^ c3 ^ np.uint64(k1), lo0
    return (c0 >> np.uint64(11)).astype(np.float64) * 2.0**-53


def run_shots_host(
    flat: FlatProgram, xp: Any, config: Any, weight: int, execution: Any = None, budget_bytes: int = HOST_BATCH_BYTES, max_chunk: Optional[int] = None
) -> list:
    """:func:`run_shots` on the host: each chunk of shots is the rows of one batch of states
    (:class:`~gpu_provider.engine.batch.StateBatch`), and every op runs once for all the rows at
    it. Shots whose paths part run their ops in turn (the lowest position first, so paths meet
    again after a branch), each drawing its uniforms from the same Philox counters as
    run_small_shots: a seed gives the GPU kernel's samples, up to rounding of the probabilities."""
    key = philox_key(config.seed)
    dtype = np.dtype(config.dtype)
    chunk = max(1, budget_bytes // (3 * dtype.itemsize << flat.num_qubits))
    if max_chunk is not None:
        chunk = min(chunk, max_chunk)

    def run(first: int, shots: int) -> np.ndarray:
        return _host_chunk(flat, xp, dtype, key, first, shots, config.max_loop_iterations)

    return _in_chunks(flat, config, weight, execution, chunk, run)


def _host_chunk(flat: FlatProgram, xp: Any, dtype, key: tuple[int, int], first: int, shots: int, max_iterations: int) -> np.ndarray:
    """Shots ``first`` .. ``first + shots - 1``: rows of their clbit words and a status word, as run_small_shots writes them."""
    n, width, end = flat.num_qubits, flat.clbit_words, flat.count
    ops, words, pool = flat.ops.reshape(-1, SMALL_OP_WORDS), flat.words, flat.pool
    data = xp.zeros((shots, 1 << n), dtype=dtype)
    data[:, 0] = 1
    clbits = np.zeros((shots, width), dtype=np.uint64)
    status = np.zeros(shots, dtype=np.uint64)
    pc = np.zeros(shots, dtype=np.int64)
    draws = np.zeros(shots, dtype=np.uint64)
    loops = np.zeros((shots, SMALL_LOOP_SLOTS), dtype=np.int64)
    while True:
        live = pc < end
        if not live.any():
            break
        p = int(pc[live].min())
        at = np.nonzero(pc == p)[0]
        whole = at.size == shots
        word = [int(w) for w in ops[p]]
        kind = word[0] & 0xFF
        following = p + 1
        if kind <= SMALL_PHASE:
            rows = data if whole else data[at]  # a copy where only some shots are here
            _apply_gate(StateBatch.over(xp, rows, dtype), word, pool, n)
            if not whole:
                data[at] = rows
        elif kind in (SMALL_MEASURE, SMALL_RESET):
            rows = data if whole else data[at]
            outcome, lost = _measure_rows(xp, rows, word[1], kind == SMALL_RESET, philox_uniforms(key, draws[at], first + at))
            if not whole:
                data[at] = rows
            draws[at] += np.uint64(1)
            if kind == SMALL_MEASURE:
                clbit = word[2]
                bit = np.uint64(1 << (clbit & 63))
                column = clbits[at, clbit >> 6]
                clbits[at, clbit >> 6] = np.where(outcome, column | bit, column & ~bit)
            if lost.any():
                status[at[lost]] = 2
                pc[at[lost]] = end
                at = at[~lost]
        elif kind == SMALL_JUMP:
            pc[at] = word[1]
            continue
        elif kind == SMALL_JUMP_IF:
            offset = word[2]
            masks, patterns = words[offset : offset + width], words[offset + width : offset + 2 * width]
            match = ((clbits[at] & masks) == patterns).all(axis=1)
            pc[at] = np.where(match != bool(word[3]), word[1], following)
            continue
        elif kind == SMALL_LOOP_ENTER:
            loops[at, word[1] % SMALL_LOOP_SLOTS] = 0
        elif kind == SMALL_LOOP_COUNT:
            slot = word[1] % SMALL_LOOP_SLOTS
            loops[at, slot] += 1
            over = loops[at, slot] > max_iterations
            status[at[over]] = 1
            pc[at[over]] = end
            at = at[~over]
        pc[at] = following
    return np.concatenate([clbits, status[:, None]], axis=1)


def _apply_gate(batch: StateBatch, word: list, pool: np.ndarray, n: int) -> None:
    """One gate op's words (see run_small_circuits) on every row of ``batch``."""
    kind, k, offset = word[0] & 0xFF, word[0] >> 8, word[3]
    if kind == SMALL_PHASE:
        batch.data *= pool[offset]
        return
    qubits = tuple((word[1] >> (6 * j)) & 63 for j in range(k))
    if kind == SMALL_DIAGONAL:
        batch.apply_diagonal(qubits, pool[offset : offset + (1 << k)])
        return
    matrix = pool[offset : offset + (1 << 2 * k)].reshape(1 << k, 1 << k)
    mask, value = word[4], word[5]
    controls = tuple(q for q in range(n) if (mask >> q) & 1)
    if not controls:
        batch.apply_unitary(qubits, matrix)
        return
    state = sum(((value >> c) & 1) << i for i, c in enumerate(controls))
    if len(controls) + k <= DENSE_CONTROLLED_MAX:
        batch.apply_unitary(controls + qubits, controlled_matrix(matrix, len(controls), state))
        return
    # Many controls: the gate on every amplitude of a copy, kept where the controls hold.
    xp = batch.xp
    before = batch.data.copy()
    batch.apply_unitary(qubits, matrix)
    index = np.arange(1 << n)
    keep = xp.asarray((index & mask) != value)
    batch.data[:, keep] = before[:, keep]


def _measure_rows(xp: Any, rows: Any, bit: int, reset: bool, uniforms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Measure qubit ``bit`` of every row with its uniform: collapse and renormalize each row (a
    reset moves the kept half to 0); the outcomes, and the rows whose outcome had no probability.
    p1 is summed in double, as the kernel sums it."""
    count = rows.shape[0]
    halves = rows.reshape(count, -1, 2, 1 << bit)
    ones = halves[:, :, 1, :]
    parts = ones.view(rows.real.dtype)  # re, im interleaved: |a|^2 summed over them, in one pass
    if parts.dtype != np.float64:
        parts = parts.astype(np.float64)
    p1 = xp.einsum("sab,sab->s", parts, parts)
    p1 = np.clip(xp.asnumpy(p1) if hasattr(xp, "asnumpy") else p1, 0.0, 1.0)
    outcome = uniforms < p1
    probability = np.where(outcome, p1, 1.0 - p1)
    lost = probability <= 0.0
    scale = 1.0 / np.sqrt(np.where(lost, 1.0, probability))
    real = rows.real.dtype
    halves[:, :, 0, :] *= xp.asarray(np.where(outcome, 0.0, scale).astype(real))[:, None, None]
    halves[:, :, 1, :] *= xp.asarray(np.where(outcome, scale, 0.0).astype(real))[:, None, None]
    if reset and outcome.any():
        moved = xp.asarray(np.nonzero(outcome)[0])
        halves[moved, :, 0, :] = halves[moved, :, 1, :]
        halves[moved, :, 1, :] = 0
    return outcome, lost
