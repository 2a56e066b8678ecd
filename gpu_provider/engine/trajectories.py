"""The interpreter of a program's ops, and its shots as branches.

A :class:`Trajectory` is one path through a program: its state, its classical
memory (clbits and named variables), where it is (a stack of :class:`_Frame`,
one per body being run: the program, an ``if`` branch, a loop's iteration) and
how many of the job's shots follow it. Control flow is a push or pop of a
frame, never a Python call, so a trajectory can be copied at any op.

**Shot branching** (``RunConfig.shot_branching``, on by default): a program
that measures mid-circuit, resets or branches on classical values does not run
once per shot. All shots start on one trajectory; at a measurement (or reset)
of a trajectory that ``n`` shots follow, the number ``k`` of them that read 1
is drawn from Binomial(n, p1) (one uniform per shot, as the shots would draw
them alone, so the generator's stream never depends on the last bits of a
probability and a seed gives the same samples on both devices; one binomial
draw for trajectories of over ``UNIFORM_SHOTS`` shots). If all read the same
outcome the trajectory just collapses; otherwise it forks: a copy of the state
collapsed to one outcome takes the shots that read it, and the original goes
on with the rest.
Shots in a trajectory share their classical memory, so a condition reads the
same for all of them. The counts have exactly the distribution of ``n``
independent trajectories (splitting shots binomially at every measurement is
sampling the multinomial over paths), and the ops before a fork run once for
all the shots that share them. A circuit whose outcomes differ in every shot
costs at most one state copy per shot more than shot by shot; one with a few
likely paths costs a few runs instead of thousands. Per-shot memory
(``memory=True``) is returned in a random order drawn from the job's
generator, so shots in a list are as exchangeable as independent ones.

Memory: the trajectory that goes on is always the one with fewer shots, so at
most ``log2(shots)`` copies wait at once (:func:`saved_states`); the copies
are capped at ``BRANCH_BYTES`` in all. When no copy may be made, the shots
of the trajectory at hand run one at a time from that measurement on, from one
saved copy of the state there (the array the one-by-one path always reserved).
``shot_branching=False`` runs every shot as its own trajectory from a copy of
the gates before the first measurement, as before.

**Exact branching** (:func:`run_exact`): no sampling at all. At a measurement
or reset whose outcome is uncertain the trajectory forks into both outcomes,
each carrying its probability (``Trajectory.weight``); every path of the
program is visited depth first, and a front end combines what it reads at the
leaves by their weights (an expectation value of a circuit that measures or
resets mid-circuit is the weighted sum over its leaves). At most ``limit``
forked copies wait at once, one per uncertain measurement on the current path.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import numpy as np

from ..errors import IterationLimitError, SimulationError
from .devices import state_bytes
from .program import (
    BreakLoop,
    ContinueLoop,
    Diagonal,
    ForLoop,
    GlobalPhase,
    IfElse,
    Initialize,
    Measure,
    PauliEvolution,
    Reset,
    Store,
    SwitchCase,
    Unitary,
    Var,
    WhileLoop,
    evaluate,
)

# The most bytes of state copies that forked trajectories may keep waiting at once.
BRANCH_BYTES = 256 << 20


def saved_states(num_qubits: int, itemsize: int, shots: int, branching: bool = True, size: Optional[int] = None) -> int:
    """How many state copies shot branching may keep waiting at once for ``shots`` shots.

    The trajectory that goes on after a fork is the one with fewer shots, so its
    shots at least halve at each fork and no more than ``log2(shots)`` forks
    wait at once; ``BRANCH_BYTES`` caps their memory. Without branching, none.
    ``size``: a copy's bytes when the state is not a vector of ``2^num_qubits`` amplitudes
    (a stabilizer tableau).
    """
    if not branching or shots < 2:
        return 0
    return min(shots.bit_length(), BRANCH_BYTES // (state_bytes(num_qubits, itemsize) if size is None else size))


class _Frame:
    """A body being run: its ops, the next op's index, and the loop it is an iteration of (or None)."""

    __slots__ = ("ops", "index", "loop", "count")

    def __init__(self, ops, loop=None, count: int = 0) -> None:
        self.ops = ops
        self.index = 0
        self.loop = loop  # a WhileLoop or ForLoop op, for a loop body's frame
        self.count = count  # while: iterations begun; for: the iteration's index

    def copy(self) -> "_Frame":
        twin = _Frame(self.ops, self.loop, self.count)
        twin.index = self.index
        return twin


class Trajectory:
    """One path through a program, followed by ``shots`` shots; ``weight`` is its probability
    under exact branching (1 otherwise)."""

    __slots__ = ("state", "clbits", "variables", "frames", "shots", "weight")

    def __init__(self, state, clbits: list, variables: dict, frames: list, shots: int, weight: float = 1.0) -> None:
        self.state = state
        self.clbits = clbits
        self.variables = variables
        self.frames = frames
        self.shots = shots
        self.weight = weight

    @classmethod
    def start(cls, state, ops, num_clbits: int, shots: int) -> "Trajectory":
        return cls(state, [0] * num_clbits, {}, [_Frame(ops)], shots)

    def fork(self, state, shots: int) -> "Trajectory":
        """A copy of this trajectory's classical memory and position, on ``state``."""
        return Trajectory(state, list(self.clbits), dict(self.variables), [frame.copy() for frame in self.frames], shots, self.weight)


class TooManyPaths(Exception):
    """Shot branching began more paths than its budget (``Interpreter(max_paths=)``): the caller runs the shots another way."""


class _Consumed(Exception):
    """The trajectory's shots were all run one at a time from its last measurement (or, in exact
    branching, its path became too light to visit)."""


class Interpreter:
    """Runs trajectories to their end, forking at measurements while ``limit`` copies may wait.

    ``finish(trajectory)`` is called for every trajectory that reaches the end of
    the program. :meth:`run_all` runs one and every trajectory it forks. With
    ``max_paths``, beginning more paths than that raises :class:`TooManyPaths`.
    """

    def __init__(
        self,
        rng: np.random.Generator,
        max_loop_iterations: int,
        execution: Any = None,
        limit: int = 0,
        finish: Optional[Callable[[Trajectory], None]] = None,
        max_paths: Optional[int] = None,
        exact: bool = False,
    ) -> None:
        self.exact = exact  # fork into every outcome with its probability (rng unused)
        self.rng = rng
        self.max_loop_iterations = max_loop_iterations
        self.execution = execution
        self.limit = limit
        self.finish = finish
        self.waiting: list[Trajectory] = []
        self.trajectories = 0
        # Paths begun (the first, each fork, each shot run one by one); past max_paths, TooManyPaths.
        self.max_paths = max_paths
        self.paths = 1

    def run_all(self, trajectory: Trajectory) -> None:
        """Run ``trajectory`` and then every trajectory forked from it, the last forked first."""
        self.run(trajectory)
        while self.waiting:
            self.run(self.waiting.pop())

    def run(self, trajectory: Trajectory) -> None:
        """Run ``trajectory`` to the end of its program (forks wait in ``self.waiting``)."""
        if self.execution is not None:
            self.execution.poll_cancel()
        try:
            self._run(trajectory)
        except _Consumed:
            return
        self.trajectories += 1
        if self.finish is not None:
            self.finish(trajectory)

    def _run(self, trajectory: Trajectory) -> None:
        state = trajectory.state
        frames = trajectory.frames
        execution = self.execution
        while frames:
            frame = frames[-1]
            ops = frame.ops
            index = frame.index
            end = len(ops)
            shots = trajectory.shots  # progress counts an op once for each shot it is applied for
            while index < end:
                op = ops[index]
                index += 1
                if execution is not None:
                    execution.checkpoint(shots)
                kind = type(op)
                if kind is Unitary:
                    if op.controls:
                        state.apply_controlled(op.controls, op.ctrl_state, op.qubits, op.matrix)
                    else:
                        state.apply_unitary(op.qubits, op.matrix)
                elif kind is Diagonal:
                    state.apply_diagonal(op.qubits, op.diagonal)
                elif kind is GlobalPhase:
                    state.apply_phase(op.phase)
                elif kind is Initialize:
                    state.initialize(op.qubits, op.vector)
                elif kind is PauliEvolution:
                    state.apply_pauli_evolution(op.qubits, op.x_masks, op.z_masks, op.angles)
                else:
                    frame.index = index
                    self._step(trajectory, op)
                    break
            else:
                frame.index = index
                self._next_iteration(trajectory)

    # -- classical ops and control flow ------------------------------------------

    def _step(self, trajectory: Trajectory, op) -> None:
        kind = type(op)
        frames = trajectory.frames
        if kind is Measure:
            self._measure(trajectory, op.qubit, op.clbit, False)
        elif kind is Reset:
            self._measure(trajectory, op.qubit, None, True)
        elif kind is IfElse:
            body = op.true_body if evaluate(op.condition, trajectory.clbits, trajectory.variables) else op.false_body
            if body:
                frames.append(_Frame(body))
        elif kind is WhileLoop:
            if evaluate(op.condition, trajectory.clbits, trajectory.variables):
                self._check_iterations(1)
                frames.append(_Frame(op.body, op, 1))
        elif kind is ForLoop:
            if len(op.iterations):
                frames.append(_Frame(op.iterations[0], op, 0))
        elif kind is SwitchCase:
            value = evaluate(op.target, trajectory.clbits, trajectory.variables)
            for values, body in op.cases:
                if values is None or value in values:
                    if body:
                        frames.append(_Frame(body))
                    break
        elif kind is Store:
            _store(trajectory, op)
        elif kind is BreakLoop:
            _pop_to_loop(frames, "break_loop")
            frames.pop()
        elif kind is ContinueLoop:
            _pop_to_loop(frames, "continue_loop")
            self._next_iteration(trajectory)
        else:
            raise SimulationError(f"the engine cannot run op {op!r}")

    def _next_iteration(self, trajectory: Trajectory) -> None:
        """The top frame's body is done: start its loop's next iteration, or leave it."""
        frames = trajectory.frames
        frame = frames[-1]
        loop = frame.loop
        if loop is None:
            frames.pop()
            return
        if type(loop) is WhileLoop:
            if evaluate(loop.condition, trajectory.clbits, trajectory.variables):
                frame.count += 1
                self._check_iterations(frame.count)
                frame.index = 0
                return
        else:
            frame.count += 1
            if frame.count < len(loop.iterations):
                frame.ops = loop.iterations[frame.count]
                frame.index = 0
                return
        frames.pop()

    def _check_iterations(self, iterations: int) -> None:
        if iterations > self.max_loop_iterations:
            raise iteration_limit_error(self.max_loop_iterations)

    # -- measurement -------------------------------------------------------------

    def _measure(self, trajectory: Trajectory, qubit: int, clbit: Optional[int], reset: bool) -> None:
        state = trajectory.state
        p1 = min(max(state.probability_one(qubit), 0.0), 1.0)
        if self.exact:
            self._fork_both(trajectory, qubit, clbit, reset, p1)
            return
        shots = trajectory.shots
        if shots == 1:
            outcome = 1 if self.rng.random() < p1 else 0
        else:
            ones = _count_ones(self.rng, shots, p1)
            if ones == 0 or ones == shots:
                outcome = 1 if ones else 0
            elif len(self.waiting) < self.limit:
                self._begin_paths(1)
                # Fork: the outcome with fewer shots goes on here, the other waits on a copy.
                outcome = 1 if ones <= shots - ones else 0
                other = 1 - outcome
                twin = trajectory.fork(state.snapshot(), ones if other else shots - ones)
                _collapse(twin, qubit, clbit, other, p1, reset)
                self.waiting.append(twin)
                trajectory.shots = shots - twin.shots
            else:
                self._one_by_one(trajectory, qubit, clbit, reset)
                raise _Consumed()
        _collapse(trajectory, qubit, clbit, outcome, p1, reset)

    def _fork_both(self, trajectory: Trajectory, qubit: int, clbit: Optional[int], reset: bool, p1: float) -> None:
        """Exact branching: outcome 1 waits on a copy with its probability, outcome 0 goes on here.

        An outcome whose path would weigh less than ``EXACT_MIN_WEIGHT`` is not visited (a
        loop that repeats until an outcome would otherwise fork until its iteration limit).
        """
        # A probability within rounding of 0 or 1 is that: its branch's state would be rounding
        # noise (a postselection on it would read a value instead of NaN).
        rounding = _rounding(trajectory.state)
        if p1 < rounding:
            p1 = 0.0
        elif p1 > 1.0 - rounding:
            p1 = 1.0
        weight = trajectory.weight
        one, zero = weight * p1, weight * (1.0 - p1)
        if one >= EXACT_MIN_WEIGHT and zero >= EXACT_MIN_WEIGHT:
            if len(self.waiting) >= self.limit:
                raise SimulationError(
                    f"exact branching needs more than {self.limit} state copies waiting at once (one per uncertain "
                    "measurement or reset on a path); sample with shots instead, or use fewer mid-circuit measurements"
                )
            self._begin_paths(1)
            twin = trajectory.fork(trajectory.state.snapshot(), trajectory.shots)
            twin.weight = one
            _collapse(twin, qubit, clbit, 1, p1, reset)
            self.waiting.append(twin)
            trajectory.weight = zero
            _collapse(trajectory, qubit, clbit, 0, p1, reset)
            return
        outcome = 1 if one >= zero else 0  # the unvisited outcome's weight, if any, is dropped
        if max(one, zero) < EXACT_MIN_WEIGHT:
            # Both outcomes too light: the path ends here, unvisited (a repeat-until-success loop
            # whose repeat is the likelier outcome would otherwise run to its iteration limit).
            raise _Consumed()
        trajectory.weight = one if outcome else zero
        _collapse(trajectory, qubit, clbit, outcome, p1, reset)

    def _one_by_one(self, trajectory: Trajectory, qubit: int, clbit: Optional[int], reset: bool) -> None:
        """No copy may wait: run the trajectory's shots one at a time from this measurement on."""
        self._begin_paths(trajectory.shots - 1)
        state = trajectory.state
        restart = state.snapshot()
        for shot in range(trajectory.shots):
            if shot:
                state.copy_from(restart)
            single = trajectory.fork(state, 1)
            self._measure(single, qubit, clbit, reset)
            self.run(single)
        del restart


    def _begin_paths(self, count: int) -> None:
        self.paths += count
        if self.max_paths is not None and self.paths > self.max_paths:
            raise TooManyPaths(f"{self.paths} paths begun, over the budget of {self.max_paths}")


def _rounding(state) -> float:
    """Probabilities this close to 0 or 1 are rounding in ``state``'s precision (64 ulps of its
    real type; a stabilizer state's probabilities are exact)."""
    dtype = getattr(state, "dtype", None)
    if dtype is None:
        return 0.0
    return 64 * float(np.finfo(np.dtype(dtype)).eps)


def branch_points(ops) -> int:
    """Measurements and resets in ``ops``, loop and branch bodies counted once: the forks exact
    branching makes along one path of a program without loops, so the copies it keeps waiting."""
    count = 0
    for op in ops:
        kind = type(op)
        if kind is Measure or kind is Reset:
            count += 1
        elif kind is IfElse:
            count += max(branch_points(op.true_body), branch_points(op.false_body or ()))
        elif kind is SwitchCase:
            count += max((branch_points(body) for _, body in op.cases), default=0)
        elif kind is WhileLoop:
            count += branch_points(op.body)
        elif kind is ForLoop and len(op.iterations):  # every iteration's body has the same ops
            count += len(op.iterations) * branch_points(op.iterations[0])
    return count


# Exact branching: paths lighter than this are not visited; more paths than this are an error.
EXACT_MIN_WEIGHT = 2.0**-64
EXACT_MAX_PATHS = 1 << 18


def run_exact(state, program, max_loop_iterations: int, finish: Callable[[Trajectory], None], limit: int, execution: Any = None) -> None:
    """Every path of ``program`` from ``state``, each with its probability, depth first.

    ``finish(trajectory)`` is called at each leaf: ``trajectory.weight`` is the path's
    probability, ``trajectory.clbits`` its outcomes, ``trajectory.state`` its final state
    (reused afterwards: read it inside ``finish``). The weights sum to 1 but for paths
    lighter than ``EXACT_MIN_WEIGHT``, which are not visited: divide by their sum.
    ``limit`` state copies may wait at once (see :func:`branch_points`).

    Raises:
        SimulationError: more than ``EXACT_MAX_PATHS`` paths, or more than ``limit`` copies waiting.
    """
    interpreter = Interpreter(None, max_loop_iterations, execution, limit, finish, max_paths=EXACT_MAX_PATHS, exact=True)
    try:
        interpreter.run_all(Trajectory.start(state, program.ops, program.num_clbits, 1))
    except TooManyPaths:
        raise SimulationError(
            f"exact branching over this circuit's mid-circuit outcomes visits more than {EXACT_MAX_PATHS:,} paths; "
            "sample it with shots instead"
        ) from None


# Up to this many shots a trajectory's measurement draws one uniform per shot; above, one binomial.
UNIFORM_SHOTS = 1 << 20
# Uniforms drawn at once (512 KiB): the memory of a split does not grow with the shots.
UNIFORM_CHUNK = 1 << 16


def _count_ones(rng: np.random.Generator, shots: int, p1: float) -> int:
    """How many of ``shots`` read 1 with probability ``p1``: Binomial(shots, p1), exactly.

    Up to ``UNIFORM_SHOTS`` shots it is drawn as the shots would draw alone (one
    uniform each, below ``p1``), so the generator advances by ``shots`` whatever
    ``p1`` is and the draws that follow do not depend on the last bits of a
    probability (0 on one device, 1e-33 on another). Above, where drawing a
    uniform per shot would cost seconds a measurement, one binomial draw.
    """
    if shots > UNIFORM_SHOTS:
        return int(rng.binomial(shots, p1))
    ones = 0
    for first in range(0, shots, UNIFORM_CHUNK):  # the same draws as one call, in bounded memory
        ones += int(np.count_nonzero(rng.random(min(UNIFORM_CHUNK, shots - first)) < p1))
    return ones


def iteration_limit_error(limit: int) -> IterationLimitError:
    """The error of a while loop that ran more than ``limit`` iterations (in any path of the engine)."""
    return IterationLimitError(
        f"a while_loop ran more than max_loop_iterations={limit} iterations; check its condition can become false, or raise the option"
    )


def _pop_to_loop(frames: list, name: str) -> None:
    """Leave the bodies inside the innermost loop's iteration (``if`` branches, cases)."""
    while frames and frames[-1].loop is None:
        frames.pop()
    if not frames:
        raise SimulationError(f"a {name} outside any loop")


def _collapse(trajectory: Trajectory, qubit: int, clbit: Optional[int], outcome: int, p1: float, reset: bool) -> None:
    probability = p1 if outcome else 1.0 - p1
    if probability <= 0.0:
        raise SimulationError(f"qubit {qubit} was measured in a state of zero norm")
    trajectory.state.collapse(qubit, outcome, probability, flip=reset)
    if clbit is not None:
        trajectory.clbits[clbit] = outcome


def _store(trajectory: Trajectory, op: Store) -> None:
    value = evaluate(op.value, trajectory.clbits, trajectory.variables)
    if isinstance(op.target, Var):
        trajectory.variables[op.target.name] = value
    else:
        for position, clbit in enumerate(op.target.clbits):
            trajectory.clbits[clbit] = (int(value) >> position) & 1
