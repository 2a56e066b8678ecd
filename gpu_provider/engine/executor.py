"""Running programs: the interpreter, the per-job execution record, the dispatcher.

An :class:`Execution` is one job's record on its device: a start event, a
checkpoint event every few ops (progress), an end event, a cancel request and
the outcome. Events are CUDA events on the GPU and host events on the CPU, so
the job reads its status the same way on both and never blocks doing so.

A :class:`Dispatcher` per device runs executions on a bounded pool of worker
threads (one CUDA stream each on the GPU); the caller's thread stays free.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np

from ..errors import GPUProviderError, IterationLimitError, JobCancelledError, SimulationError
from .devices import PRECISIONS, Device
from .program import (
    CONTROL_FLOW,
    Bits,
    BreakLoop,
    ContinueLoop,
    Diagonal,
    ForLoop,
    GlobalPhase,
    IfElse,
    Initialize,
    Measure,
    PauliEvolution,
    Program,
    Reset,
    Store,
    SwitchCase,
    Unitary,
    Var,
    WhileLoop,
    count_ops,
    evaluate,
    expand_state,
    is_sampling_friendly,
    measurements_are_terminal,
    scratch_states,
)
from .statevector import StateVector

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunConfig:
    """How to run a program: the engine's view of the run options."""

    shots: int = 1024
    seed: int = 0
    memory: bool = False
    statevector: bool = False
    precision: str = "double"
    max_loop_iterations: int = 100_000

    @property
    def dtype(self):
        return PRECISIONS[self.precision]


@dataclass
class ExperimentOutput:
    """Plain results of one program: clbit values as integers, no Qiskit types."""

    counts: dict
    memory: Optional[list] = None
    statevector: Optional[np.ndarray] = None
    metadata: dict = field(default_factory=dict)


class _Break(Exception):
    pass


class _Continue(Exception):
    pass


# ---------------------------------------------------------------------------
# The execution record


class Execution:
    """One job's life on a device, read through events; never blocks to answer."""

    def __init__(self, device: Device, ops_total: int, run: Callable[["Execution"], Any]) -> None:
        self.device = device
        self.ops_total = max(int(ops_total), 1)
        self._run = run
        self.start_event = None  # recorded on the job's stream before its first op
        # The end: a host event set once the results (copied back from the device) are built.
        self._finished = threading.Event()
        self._cancel = threading.Event()
        self._checkpoints: collections.deque = collections.deque()
        self._ops_done = 0
        self._ops_enqueued = 0
        self.result: Any = None
        self.error: Optional[BaseException] = None
        self.cancelled = False
        self.started_at: Optional[float] = None
        self.finished_at: Optional[float] = None
        self._lock = threading.Lock()

    # -- called by the worker ------------------------------------------------

    def begin(self) -> bool:
        """Record the start event; False if the job was cancelled while queued."""
        with self._lock:
            if self._cancel.is_set() or self.finished:
                return False
            event = self.device.new_event()
            event.record()
            self.start_event = event
            self.started_at = time.time()
            return True

    def cancel_if_queued(self) -> bool:
        """End a job that has not started yet, so it never runs; True if it did."""
        with self._lock:
            self._cancel.set()
            if self.start_event is not None or self.finished:
                return False
            self.cancelled = True
            self.finish()
            return True

    def checkpoint(self, ops: int = 1) -> None:
        """Count ``ops`` more enqueued and record a checkpoint event; stop here if cancelled."""
        if self._cancel.is_set():
            raise JobCancelledError("cancelled at a checkpoint")
        self._ops_enqueued += ops
        event = self.device.new_event()
        event.record()
        self._checkpoints.append((self._ops_enqueued, event))

    def finish(self, result: Any = None, error: Optional[BaseException] = None) -> None:
        self.result, self.error = result, error
        self.finished_at = time.time()
        self._finished.set()

    # -- read by the job -----------------------------------------------------

    @property
    def started(self) -> bool:
        return self.start_event is not None and self.start_event.done

    @property
    def finished(self) -> bool:
        return self._finished.is_set()

    def wait(self, timeout: Optional[float] = None) -> bool:
        return self._finished.wait(timeout)

    def request_cancel(self) -> None:
        self._cancel.set()

    @property
    def cancel_requested(self) -> bool:
        return self._cancel.is_set()

    def progress(self) -> tuple[int, int]:
        """``(ops_done, ops_total)`` from the checkpoint events reached so far."""
        if self.finished and self.error is None and not self.cancelled:
            return self.ops_total, self.ops_total
        done = self._ops_done
        checkpoints = self._checkpoints
        while checkpoints:
            try:
                ops, event = checkpoints[0]
            except IndexError:
                break
            if not event.done:
                break
            done = ops
            try:
                checkpoints.popleft()
            except IndexError:
                break
        self._ops_done = max(self._ops_done, done)
        return min(self._ops_done, self.ops_total), self.ops_total


# ---------------------------------------------------------------------------
# The dispatcher


class Dispatcher:
    """A bounded pool of daemon worker threads for one device."""

    def __init__(self, device: Device, workers: int) -> None:
        self.device = device
        self._queue: queue.Queue = queue.Queue()
        self._workers = workers
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def submit(self, execution: Execution) -> None:
        with self._lock:
            if len(self._threads) < self._workers:
                thread = threading.Thread(target=self._work, name=f"gpu_provider-{self.device.name}-{len(self._threads)}", daemon=True)
                self._threads.append(thread)
                thread.start()
        self._queue.put(execution)

    def _work(self) -> None:
        while True:
            execution = self._queue.get()
            try:
                run_execution(execution)
            except BaseException:  # never let a worker die: the job records the error
                logger.exception("gpu_provider worker caught an unexpected error")
            del execution  # an idle worker must not keep the last job's memory alive


def run_execution(execution: Execution) -> None:
    """Run one execution to its end, whatever happens; release memory after."""
    device = execution.device
    if execution.finished:  # cancelled while queued
        return
    try:
        with device.stream():
            if not execution.begin():
                return
            result = execution._run(execution)
        execution.finish(result=result)
    except JobCancelledError:
        execution.cancelled = True
        execution.finish()
    except BaseException as exc:  # the job reports it; the worker lives on
        # Drop the frames' locals (the state vectors) but keep the traceback's text.
        traceback.clear_frames(exc.__traceback__)
        execution.finish(error=exc)
    finally:
        try:
            device.release_memory()
        except Exception:  # releasing cached blocks must never fail a job
            logger.debug("releasing device memory failed", exc_info=True)


_DISPATCHERS: dict = {}
_DISPATCHERS_LOCK = threading.Lock()


def dispatcher_for(device: Device) -> Dispatcher:
    with _DISPATCHERS_LOCK:
        key = (device.kind, device.device_id)
        if key not in _DISPATCHERS:
            workers = 2 if device.kind == "CPU" else 4
            _DISPATCHERS[key] = Dispatcher(device, workers)
        return _DISPATCHERS[key]


# ---------------------------------------------------------------------------
# The interpreter


def new_state(device: Device, num_qubits: int, dtype) -> StateVector:
    kernels = None
    if device.kind == "GPU":
        from .kernels import kernels_for

        kernels = kernels_for(np.dtype(dtype))
    return StateVector(device.xp, num_qubits, dtype, kernels)


def estimated_ops(program: Program, config: RunConfig) -> int:
    ops = count_ops(program.ops)
    return ops if is_sampling_friendly(program) else ops * config.shots


class _Shot:
    """Classical memory and the random stream of one trajectory."""

    __slots__ = ("clbits", "variables", "rng", "config", "execution")

    def __init__(self, num_clbits: int, rng: np.random.Generator, config: RunConfig, execution: Optional[Execution]):
        self.clbits = [0] * num_clbits
        self.variables: dict = {}
        self.rng = rng
        self.config = config
        self.execution = execution


def _apply_gate(state: StateVector, op) -> None:
    if isinstance(op, Diagonal):
        state.apply_diagonal(op.qubits, op.diagonal)
    elif op.controls:
        state.apply_controlled(op.controls, op.ctrl_state, op.qubits, op.matrix)
    else:
        state.apply_unitary(op.qubits, op.matrix)


def _store(shot: _Shot, op: Store) -> None:
    value = evaluate(op.value, shot.clbits, shot.variables)
    if isinstance(op.target, Var):
        shot.variables[op.target.name] = value
    else:
        for position, clbit in enumerate(op.target.clbits):
            shot.clbits[clbit] = (int(value) >> position) & 1


def run_ops(state: StateVector, ops, shot: _Shot) -> None:
    """Interpret ``ops`` on ``state`` for one trajectory."""
    execution = shot.execution
    for op in ops:
        if execution is not None:
            execution.checkpoint()
        kind = type(op)
        if kind is Unitary or kind is Diagonal:
            _apply_gate(state, op)
        elif kind is Measure:
            shot.clbits[op.clbit] = state.measure(op.qubit, shot.rng.random())
        elif kind is Reset:
            state.measure(op.qubit, shot.rng.random(), reset=True)
        elif kind is GlobalPhase:
            state.apply_phase(op.phase)
        elif kind is Initialize:
            state.initialize(op.qubits, op.vector)
        elif kind is PauliEvolution:
            state.apply_pauli_evolution(op.qubits, op.x_masks, op.z_masks, op.angles)
        elif kind is IfElse:
            body = op.true_body if evaluate(op.condition, shot.clbits, shot.variables) else op.false_body
            run_ops(state, body, shot)
        elif kind is WhileLoop:
            iterations = 0
            while evaluate(op.condition, shot.clbits, shot.variables):
                iterations += 1
                if iterations > shot.config.max_loop_iterations:
                    raise IterationLimitError(
                        f"a while_loop ran more than max_loop_iterations={shot.config.max_loop_iterations} "
                        "iterations; check its condition can become false, or raise the option"
                    )
                try:
                    run_ops(state, op.body, shot)
                except _Break:
                    break
                except _Continue:
                    continue
        elif kind is ForLoop:
            for body in op.iterations:
                try:
                    run_ops(state, body, shot)
                except _Break:
                    break
                except _Continue:
                    continue
        elif kind is SwitchCase:
            value = evaluate(op.target, shot.clbits, shot.variables)
            for values, body in op.cases:
                if values is None or value in values:
                    run_ops(state, body, shot)
                    break
        elif kind is Store:
            _store(shot, op)
        elif kind is BreakLoop:
            raise _Break()
        elif kind is ContinueLoop:
            raise _Continue()
        else:
            raise SimulationError(f"the engine cannot run op {op!r}")


def _clbit_value(clbits) -> int:
    value = 0
    for i, bit in enumerate(clbits):
        if bit:
            value |= 1 << i
    return value


def _is_prefix_op(op) -> bool:
    """Ops that act the same in every shot: run them once before the shot loop."""
    return isinstance(op, (Unitary, Diagonal, GlobalPhase, Initialize, PauliEvolution))


def run_program(program: Program, device: Device, config: RunConfig, execution: Optional[Execution] = None) -> ExperimentOutput:
    """Simulate ``program`` and return counts (and memory / statevector when asked)."""
    start = time.perf_counter()
    dtype = config.dtype
    rng = np.random.default_rng(config.seed)
    sampling = is_sampling_friendly(program)
    device.check_fits(program.num_qubits, np.dtype(dtype).itemsize, arrays=scratch_states(program, sampling))
    state = new_state(device, program.num_qubits, dtype)
    shot = _Shot(program.num_clbits, rng, config, execution)
    measures = [op for op in program.ops if isinstance(op, Measure)]
    measured = sorted({m.qubit for m in measures})
    memory: list[int] = []
    statevector = None
    if sampling:
        # One simulation; every shot drawn from the final probabilities.
        run_ops(state, tuple(op for op in program.ops if not isinstance(op, Measure)), shot)
        if config.statevector:
            statevector = state.to_host()
        if measures:
            outcomes = state.sample(measured, config.shots, rng)
            memory = _sampled_clbit_values(outcomes, measured, measures, program.num_clbits)
        else:
            memory = [0] * config.shots
    else:
        # Shot by shot, from a copy of the common prefix of gates.
        terminal = measurements_are_terminal(program)
        ops = tuple(op for op in program.ops if not isinstance(op, Measure)) if terminal else program.ops
        prefix_len = 0
        while prefix_len < len(ops) and _is_prefix_op(ops[prefix_len]):
            prefix_len += 1
        run_ops(state, ops[:prefix_len], shot)
        prefix = state.snapshot() if config.shots > 1 else None
        rest = ops[prefix_len:]
        for index in range(config.shots):
            if index:
                state.copy_from(prefix)
            shot.clbits = [0] * program.num_clbits
            shot.variables = {}
            run_ops(state, rest, shot)
            if terminal and measures:
                # Terminal measurements of a trajectory with resets: one draw from its final state.
                outcome = state.sample(measured, 1, rng)
                memory.extend(_sampled_clbit_values(outcome, measured, measures, program.num_clbits))
            else:
                memory.append(_clbit_value(shot.clbits))
        if config.statevector:
            # The last trajectory's state, its terminal measurements removed (as Aer does).
            statevector = state.to_host()
    counts: dict[int, int] = {}
    for value in memory:
        counts[value] = counts.get(value, 0) + 1
    if statevector is not None and program.layout is not None:
        statevector = expand_state(statevector, program.layout, program.width)
    if program.num_clbits == 0:
        # Nothing is recorded without classical bits: empty counts, as Qiskit's BasicSimulator.
        counts, memory = {}, []
    return ExperimentOutput(
        counts=counts,
        memory=memory if config.memory else None,
        statevector=statevector,
        metadata={
            "method": "statevector",
            "device": device.name,
            "precision": config.precision,
            "measure_sampling": sampling,
            "num_qubits": program.width,
            "active_qubits": list(program.active_qubits),
            "simulated_qubits": program.num_qubits,
            "time_taken": time.perf_counter() - start,
        },
    )


def _sampled_clbit_values(outcomes: np.ndarray, qubits: list[int], measures, num_clbits: int) -> list[int]:
    """Clbit integers from sampled outcomes (bit j of an outcome is ``qubits[j]``).

    Measures are applied in program order, so the last one into a clbit wins.
    """
    position = {q: j for j, q in enumerate(qubits)}
    if num_clbits <= 62:
        values = np.zeros(outcomes.shape[0], dtype=np.int64)
        for m in measures:
            bit = (outcomes >> position[m.qubit]) & 1
            values = (values & ~np.int64(1 << m.clbit)) | (bit << m.clbit)
        return values.tolist()
    result = []
    for outcome in outcomes.tolist():
        value = 0
        for m in measures:
            value = (value & ~(1 << m.clbit)) | (((outcome >> position[m.qubit]) & 1) << m.clbit)
        result.append(value)
    return result
