"""Running programs: the interpreter, the per-job execution record, the dispatcher.

An :class:`Execution` is one job's record on its device: a start event, a
checkpoint event every few ops (progress; at most every ``CHECKPOINT_OPS`` ops
or ``CHECKPOINT_SECONDS`` of host time, from a ring of ``CHECKPOINT_RING``
reused events, so a job holds a fixed number of events however long it runs),
an end event, a cancel request and the outcome. Events are CUDA events on the GPU and host events on the CPU, so
the job reads its status the same way on both and never blocks doing so.

A :class:`Dispatcher` per device runs executions on a bounded pool of worker
threads (one CUDA stream each on the GPU); the caller's thread stays free.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np

from ..errors import CircuitTooLargeError, InvalidInputError, JobCancelledError, SimulationError
from .devices import PRECISIONS, Device, byte_count, state_bytes
from .program import (
    CONTROL_FLOW,
    Diagonal,
    GlobalPhase,
    Initialize,
    Measure,
    PauliEvolution,
    Program,
    Unitary,
    any_op,
    count_ops,
    expand_state,
    gate_arrays,
    is_sampling_friendly,
    op_bodies,
    measurements_are_terminal,
)
from .statevector import StateVector
from .threads import BLAS_THREADS, DEFAULT_PARALLEL_THRESHOLD, threads_for
from .trajectories import Interpreter, TooManyPaths, Trajectory, saved_states

logger = logging.getLogger(__name__)

# A checkpoint event is recorded once this many ops were enqueued since the
# last one, or once this much host time has passed; cancellation is checked
# at every op regardless.
CHECKPOINT_OPS = 16
CHECKPOINT_SECONDS = 0.005
# Checkpoint events a job keeps outstanding; the oldest is re-recorded for the newest.
CHECKPOINT_RING = 8


@dataclass(frozen=True)
class RunConfig:
    """How to run a program: the engine's view of the run options."""

    shots: int = 1024
    seed: int = 0
    memory: bool = False
    statevector: bool = False
    precision: str = "double"
    max_loop_iterations: int = 100_000
    # Shots of a program that measures mid-circuit, resets or branches share one trajectory
    # until their outcomes differ (see engine/trajectories.py); False runs each shot alone.
    shot_branching: bool = True
    # Such a program's shots of a small circuit may run as one batch (see engine/small_shots.py:
    # on a GPU one launch, a shot per block; on the CPU one NumPy batch) where branching finds
    # many paths, and on a GPU without branching.
    batched_shots: bool = True
    # The widest circuit whose shots the GPU's kernel runs (its shared memory may allow fewer).
    batched_shots_max_qubits: int = 16
    # "statevector", or "stabilizer" for a Clifford program run as a tableau (engine/stabilizer.py).
    method: str = "statevector"
    # A state vector without its scratch buffer (StateVector.in_place): how the CPU (or a GPU whose
    # kernels do not cover the program) runs a state of which two copies do not fit. run() sets it
    # only then (on the CPU it costs about a pass per dense gate).
    in_place: bool = False
    # BLAS threads for CPU products (engine/threads.py; Aer's options of the same names): at most
    # max_parallel_threads (0: every core), and one for states of up to parallel_threshold qubits.
    max_parallel_threads: int = 0
    parallel_threshold: int = DEFAULT_PARALLEL_THRESHOLD

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


# The widest state any device is asked to hold (2^40 amplitudes is 8 TiB in complex64).
MAX_STATE_QUBITS = 40
# Scratch memory a job may use beside its state arrays (sampling chunks, small matrices, Python).
WORKSPACE_BYTES = 64 << 20


# ---------------------------------------------------------------------------
# The execution record


class Execution:
    """One job's life on a device, read through events; never blocks to answer."""

    def __init__(
        self,
        device: Device,
        ops_total: int,
        run: Callable[["Execution"], Any],
        reserve_bytes: int = 0,
        num_qubits: int = 0,
        threads: Optional[int] = None,
    ) -> None:
        self.device = device
        self.num_qubits = num_qubits
        # The BLAS threads the job's CPU products may use (engine/threads.py): by default one for a
        # state of up to DEFAULT_PARALLEL_THRESHOLD qubits, else every core; 0 leaves the count alone.
        self.threads = threads_for(num_qubits) if threads is None else int(threads)
        self.ops_total = max(int(ops_total), 1)
        # Device memory the job may use at its peak; the dispatcher admits it only where that fits.
        self.reserve_bytes = int(reserve_bytes)
        self._run = run
        self.start_event = None  # recorded on the job's stream before its first op
        # The end: a host event set once the results (copied back from the device) are built.
        self._finished = threading.Event()
        self._cancel = threading.Event()
        self._checkpoints: collections.deque = collections.deque()
        self._ops_done = 0
        self._ops_enqueued = 0
        self._calls_unrecorded = 0  # checkpoint() calls since the last recorded event
        self._recorded_at = 0.0
        self.result: Any = None
        self.error: Optional[BaseException] = None
        self.cancelled = False
        self.started_at: Optional[float] = None
        self.finished_at: Optional[float] = None
        # Called with (kind, message) when the job ends without running ("cancel" while queued,
        # "error" when refused): a distributed job tells its other ranks so none waits for this one.
        self.on_abandon: Optional[Callable[[str, str], None]] = None
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
        self._abandon("cancel", "cancelled while queued")
        return True

    def checkpoint(self, ops: int = 1, poll: bool = True) -> None:
        """Count ``ops`` more enqueued, recording an event every few calls; stop here if cancelled.

        One call is one op enqueued; ``ops`` is what it counts for in progress (an
        op of a trajectory counts once for each of the shots that share it). An
        event is recorded every ``CHECKPOINT_OPS`` calls or ``CHECKPOINT_SECONDS``.
        With ``poll=False`` only progress is recorded: a distributed run checks
        cancellation itself, on every rank at once (see ``distributed.RankGroup``).
        """
        if poll and self._cancel.is_set():
            raise JobCancelledError("cancelled at a checkpoint")
        self._ops_enqueued += ops
        self._calls_unrecorded += 1
        now = time.perf_counter()
        if self._calls_unrecorded < CHECKPOINT_OPS and now - self._recorded_at < CHECKPOINT_SECONDS:
            return
        self._record(now)

    def advance(self, ops: int) -> None:
        """Count ``ops`` done elsewhere (a chunk an executor's worker finished) and record a checkpoint now."""
        if self._cancel.is_set():
            raise JobCancelledError("cancelled at a checkpoint")
        self._ops_enqueued += ops
        self._record(time.perf_counter())

    def _record(self, now: float) -> None:
        """Record a checkpoint event for the ops enqueued so far, reusing the ring's oldest."""
        checkpoints = self._checkpoints
        event = None
        if len(checkpoints) >= CHECKPOINT_RING:
            try:
                _, event = checkpoints.popleft()  # progress() may have taken it meanwhile
            except IndexError:
                event = None
        if event is None:
            event = self.device.new_event()
        # Re-recording moves an event forward: a reader that still holds its old
        # pair sees it not done yet, so progress only ever under-reports.
        event.record()
        checkpoints.append((self._ops_enqueued, event))
        self._calls_unrecorded, self._recorded_at = 0, now

    def refuse(self, error: BaseException) -> None:
        """End a queued job that can never be admitted, with ``error``."""
        with self._lock:
            if self.finished:
                return
            self.finish(error=error)
        self._abandon("error", f"{type(error).__name__}: {error}")

    def _abandon(self, kind: str, message: str) -> None:
        callback, self.on_abandon = self.on_abandon, None
        if callback is not None:
            try:
                callback(kind, message)
            except Exception:  # telling other ranks must never break this job's own ending
                logger.debug("on_abandon callback failed", exc_info=True)

    @property
    def enqueued(self) -> int:
        """Ops counted so far (see :meth:`checkpoint`): a mark for :meth:`rewind`."""
        return self._ops_enqueued

    def rewind(self, mark: int) -> None:
        """Count from ``mark`` again (work that is thrown away and redone another way); progress
        already read never goes back, it waits until the new count passes it."""
        self._ops_enqueued = min(self._ops_enqueued, int(mark))

    def poll_cancel(self) -> None:
        """Stop here if the job was cancelled (a checkpoint between chunks of work that are not ops)."""
        if self._cancel.is_set():
            raise JobCancelledError("cancelled at a checkpoint")

    def finish(self, result: Any = None, error: Optional[BaseException] = None) -> None:
        self.result, self.error = result, error
        self.finished_at = time.time()
        self._checkpoints.clear()
        self._run = None  # the closure holds the job's programs; a finished job needs none of it
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
    """A bounded pool of daemon worker threads for one device, with admission control.

    Jobs start in submission order. The head of the queue starts only when its
    ``reserve_bytes`` fit next to the reservations of the jobs already running
    here (against the device's capacity measured when none was running) and in
    what the device has free now; otherwise it waits. A job that could not fit
    even alone fails with :class:`CircuitTooLargeError` instead of running out
    of memory mid-run.
    """

    # How often a job waiting for memory looks again (memory freed elsewhere, cancels).
    ADMISSION_POLL_SECONDS = 0.05

    def __init__(self, device: Device, workers: int) -> None:
        self.device = device
        self._pending: collections.deque = collections.deque()
        self._workers = workers
        self._threads: list[threading.Thread] = []
        self._cond = threading.Condition()
        self._running = 0
        self._reserved = 0
        self._baseline = 0  # the device's capacity when the first running job was admitted

    def submit(self, execution: Execution) -> None:
        with self._cond:
            if len(self._threads) < self._workers:
                thread = threading.Thread(target=self._work, name=f"gpu_provider-{self.device.name}-{len(self._threads)}", daemon=True)
                self._threads.append(thread)
                thread.start()
            self._pending.append(execution)
            self._cond.notify()

    def queued(self) -> int:
        """Jobs submitted here that wait to start (cancelled ones not counted)."""
        with self._cond:
            return sum(1 for execution in self._pending if not execution.finished)

    def capacity(self) -> int:
        """Bytes a job may reserve here at most: all that jobs of this process can share.

        With jobs running: what was free when the first of them started, but never
        more than what is free now plus what they hold (the process's limits may
        have shrunk since, or a finished job may not have been counted out yet).
        """
        with self._cond:
            free = self.device.memory_capacity()
            return min(self._baseline, self._reserved + free) if self._running else free

    def _admit(self) -> Execution:
        """The next queued execution once its memory fits (called holding the lock)."""
        while True:
            while self._pending and self._pending[0].finished:  # cancelled while queued
                self._pending.popleft()
            if not self._pending:
                self._cond.wait()
                continue
            execution = self._pending[0]
            need = execution.reserve_bytes
            # Measured even for a job that reserves nothing: it becomes the
            # baseline against which run() checks the jobs submitted meanwhile.
            free = self.device.memory_capacity()
            if not self._running:
                self._baseline = free
                if need > free:
                    self._pending.popleft()
                    execution.refuse(
                        CircuitTooLargeError(
                            f"the job needs {byte_count(need)} bytes on the {self.device.kind} at its peak (its largest circuit has "
                            f"{execution.num_qubits} qubits) but only {byte_count(free)} bytes are free with no other job of this "
                            "process running; use fewer qubits or another device",
                            num_qubits=execution.num_qubits,
                            bytes_needed=need,
                            bytes_free=free,
                        )
                    )
                    continue
            if self._reserved + need <= self._baseline and need <= free:
                self._pending.popleft()
                self._running += 1
                self._reserved += need
                return execution
            self._cond.wait(self.ADMISSION_POLL_SECONDS)

    def _work(self) -> None:
        while True:
            with self._cond:
                execution = self._admit()
            try:
                run_execution(execution)
            except BaseException:  # never let a worker die: the job records the error
                logger.exception("gpu_provider worker caught an unexpected error")
            finally:
                with self._cond:
                    self._running -= 1
                    self._reserved -= execution.reserve_bytes
                    self._cond.notify_all()
            del execution  # an idle worker must not keep the last job's memory alive


def run_execution(execution: Execution) -> None:
    """Run one execution to its end, whatever happens; release memory after."""
    device = execution.device
    if execution.finished:  # cancelled while queued
        return
    device.job_started()
    try:
        with device.stream(), blas_threads(device, execution.threads):
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
        device.job_ended()
        try:
            device.release_memory()
        except Exception:  # releasing cached blocks must never fail a job
            logger.debug("releasing device memory failed", exc_info=True)


def config_threads(num_qubits: int, config: RunConfig) -> int:
    """The BLAS threads a ``num_qubits``-qubit program under ``config`` asks for."""
    return threads_for(num_qubits, config.max_parallel_threads, config.parallel_threshold)


def blas_threads(device: Device, threads: int):
    """Hold the job's BLAS thread count while it runs on the CPU (nothing on a GPU, or for 0)."""
    if device.kind != "CPU" or threads <= 0:
        return contextlib.nullcontext()
    return BLAS_THREADS.hold(threads)


_DISPATCHERS: dict = {}
_DISPATCHERS_LOCK = threading.Lock()


def _after_fork_in_child() -> None:
    # The parent's worker threads do not exist in a forked child; start afresh there.
    global _DISPATCHERS, _DISPATCHERS_LOCK
    _DISPATCHERS = {}
    _DISPATCHERS_LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def dispatcher_for(device: Device) -> Dispatcher:
    with _DISPATCHERS_LOCK:
        key = (device.kind, device.device_id)
        if key not in _DISPATCHERS or _DISPATCHERS[key].device is not device:  # a re-probed device starts afresh
            workers = 2 if device.kind == "CPU" else 4
            _DISPATCHERS[key] = Dispatcher(device, workers)
        return _DISPATCHERS[key]


# ---------------------------------------------------------------------------
# The interpreter


def device_kernels(device: Device, dtype) -> Any:
    """The compiled kernels for ``dtype`` on a GPU device; None on the CPU."""
    if device.kind != "GPU":
        return None
    from .kernels import kernels_for

    return kernels_for(np.dtype(dtype))


def new_state(device: Device, num_qubits: int, dtype, in_place: bool = False) -> StateVector:
    return StateVector(device.xp, num_qubits, dtype, device_kernels(device, dtype), in_place=in_place)


def estimated_ops(program: Program, config: RunConfig) -> int:
    ops = count_ops(program.ops)
    return ops if is_sampling_friendly(program) else ops * config.shots


def run_ops(state: StateVector, ops, rng: np.random.Generator, config: RunConfig, execution: Optional[Execution] = None, num_clbits: int = 0) -> None:
    """Interpret ``ops`` on ``state`` as one trajectory (a single shot: measurements draw from ``rng``)."""
    Interpreter(rng, config.max_loop_iterations, execution).run(Trajectory.start(state, ops, num_clbits, 1))


def _clbit_value(clbits) -> int:
    value = 0
    for i, bit in enumerate(clbits):
        if bit:
            value |= 1 << i
    return value


def _is_prefix_op(op) -> bool:
    """Ops that act the same in every shot: run them once before the shot loop."""
    return isinstance(op, (Unitary, Diagonal, GlobalPhase, Initialize, PauliEvolution))


# The most full-size arrays state_arrays counts for any program, the copies that forked
# trajectories wait on aside: the state, its scratch buffer and the copy shots restart from,
# a Pauli evolution's recurrence, a host copy of the state, a wide controlled gate's temporary.
MAX_STATE_ARRAYS = 3 + 4 + 1 + 1
# memory_needed returns its bound without reading the program's ops while MAX_STATE_ARRAYS
# states take at most this many bytes: over-reserving that little costs less than the scan.
SMALL_STATE_BOUND_BYTES = 16 << 20


def state_arrays(program: Program, config: RunConfig, in_place: bool = False) -> int:
    """How many full-size arrays a program's run holds at its peak.

    With ``in_place`` (the GPU kernels apply every op of the program, see
    :func:`kernels_cover`): the state alone. With ``config.in_place`` (a state
    without its buffer): the state, a host copy for ``statevector=True``, and the
    Chebyshev recurrence of a Pauli evolution too wide for a dense matrix. Otherwise
    the state and its scratch buffer, a host copy for ``statevector=True``, and the
    recurrence of any Pauli evolution. A program whose shots run as trajectories (it
    measures mid-circuit, resets or branches) also holds the copy its shots restart
    from when they run one by one, and the copies that forked trajectories wait on
    (:func:`~gpu_provider.engine.trajectories.saved_states`). Wide controlled gates
    work on a slice of the state in place, a chunk at a time.
    """
    from .statevector import IN_PLACE_EVOLUTION_QUBITS

    sampling = is_sampling_friendly(program)
    waiting = 0 if sampling else 1 + saved_states(program.num_qubits, np.dtype(config.dtype).itemsize, config.shots, config.shot_branching)
    if in_place:
        return 1 + waiting
    arrays = (1 if config.in_place else 2) + waiting
    widest = IN_PLACE_EVOLUTION_QUBITS if config.in_place else -1
    if any_op(program.ops, PauliEvolution, lambda op: len(op.qubits) > widest):
        arrays += 4  # its Chebyshev recurrence: three terms and one product temporary
    if config.statevector:
        arrays += 1
    return arrays


def kernels_cover(program: Program, device: Device, dtype) -> bool:
    """Whether every op of ``program`` runs in place through ``device``'s GPU kernels.

    Dense gates of up to MAX_MATRIX_QUBITS qubits (controls included), diagonals
    of up to MAX_DIAGONAL_QUBITS, measure, reset, global phase and classical ops:
    none of them needs the scratch buffer. Initialize and wider gates do.
    """
    kernels = device_kernels(device, dtype)
    if kernels is None:
        return False
    return _covered(program.ops, kernels)


def _covered(ops, kernels) -> bool:
    for op in ops:
        if isinstance(op, Unitary):
            if not kernels.can_apply(len(op.qubits) + len(op.controls)):
                return False
        elif isinstance(op, Diagonal):
            if not kernels.can_apply_diagonal(len(op.qubits)):
                return False
        elif isinstance(op, (Initialize, PauliEvolution)):
            return False
        elif isinstance(op, CONTROL_FLOW) and not all(_covered(body, kernels) for body in op_bodies(op)):
            return False
    return True


def sampling_table_bytes(num_qubits: int) -> int:
    """The per-row probabilities and their cumulative sum that sampling keeps (float64 each)."""
    from .statevector import ROW_QUBITS

    return 2 * 8 * (1 << max(num_qubits - ROW_QUBITS, 0))


def need_detail(arrays: int, num_qubits: int, itemsize: int) -> str:
    """What :func:`memory_needed` counts for a state vector, in words (for a refusal's message)."""
    table = sampling_table_bytes(num_qubits)
    detail = f"{arrays} array{'s' if arrays > 1 else ''} of 2^{num_qubits} x {itemsize} bytes, "
    if table >= 1 << 20:
        detail += f"{byte_count(table)} bytes of sampling table and "
    return detail + f"{WORKSPACE_BYTES >> 20} MiB of workspace"


def memory_needed(program: Program, config: RunConfig, device: Optional[Device] = None, num_qubits: Optional[int] = None) -> int:
    """Peak bytes a program's run may use on its device: state arrays, the sampling table, a fixed workspace.

    With ``device`` given, a GPU program that its kernels cover counts its state
    once (the kernels work in place); without it, the general count holds.
    ``num_qubits`` overrides the state's width (one rank's part of a distributed state).
    States so small that ``MAX_STATE_ARRAYS`` of them fit in ``SMALL_STATE_BOUND_BYTES``
    get that bound instead: a many-circuit job of small states then pays no
    per-circuit scan of its ops, and reserves at most 16 MiB more than it uses
    (with the copies that forked trajectories may keep, which only a program that
    measures mid-circuit, resets or branches makes: ``log2(shots)`` small states).
    """
    n = program.num_qubits if num_qubits is None else num_qubits
    itemsize = np.dtype(config.dtype).itemsize
    if config.method == "stabilizer":
        return stabilizer_bytes(program, config)
    size = state_bytes(n, itemsize)
    if MAX_STATE_ARRAYS * size <= SMALL_STATE_BOUND_BYTES:  # a small state: the bound, without a scan of the ops
        waiting = saved_states(program.num_qubits, itemsize, config.shots, config.shot_branching)
        return (MAX_STATE_ARRAYS + waiting) * size + sampling_table_bytes(n) + WORKSPACE_BYTES
    in_place = device is not None and kernels_cover(program, device, config.dtype)
    arrays = state_arrays(program, config, in_place)
    return arrays * size + sampling_table_bytes(n) + WORKSPACE_BYTES


def stabilizer_bytes(program: Program, config: RunConfig) -> int:
    """Peak bytes of a program run as stabilizer tableaux: the state, the copies forked trajectories
    keep, the sampling elimination's copy of the stabilizers, a chunk of draws, a fixed workspace."""
    from .stabilizer import FRAME_BYTES, SAMPLE_CHUNK_BYTES, tableau_bytes

    n = program.num_qubits
    size = tableau_bytes(n)
    if is_sampling_friendly(program):
        return 2 * size + SAMPLE_CHUNK_BYTES + WORKSPACE_BYTES
    waiting = saved_states(n, 1, config.shots, config.shot_branching, size=size)
    # Forked tableaux (with feed-forward), or a chunk of Pauli frames (without).
    return (1 + waiting) * size + size + max(SAMPLE_CHUNK_BYTES, FRAME_BYTES) + WORKSPACE_BYTES


def max_qubits_for(device: Device, itemsize: int) -> int:
    """The widest circuit of gates and final measurements the device's memory holds.

    The state, its sampling table and the workspace: on a GPU the kernels work in
    place (so an H200's 141 GB hold 34 qubits in complex64, 33 in complex128), and
    a CPU state too wide for its scratch buffer runs in place
    (:attr:`RunConfig.in_place`). A circuit that needs more (shot by shot, wide
    Pauli evolutions) is checked by ``run()``.
    """
    total = device.total_bytes()
    arrays = 1  # the GPU kernels, or a CPU state in place (RunConfig.in_place)
    n = 1
    while n < MAX_STATE_QUBITS and arrays * state_bytes(n + 1, itemsize) + sampling_table_bytes(n + 1) + WORKSPACE_BYTES <= total:
        n += 1
    return n


class _Tally:
    """Outcomes as counts, and as a per-shot list only when memory=True asked for one."""

    def __init__(self, keep_memory: bool) -> None:
        self.counts: dict = {}
        self.memory: Optional[list] = [] if keep_memory else None

    def add(self, value: int, shots: int = 1) -> None:
        self.counts[value] = self.counts.get(value, 0) + shots
        if self.memory is not None:
            self.memory.extend([value] * shots)

    def add_many(self, values) -> None:
        if self.memory is not None:
            self.memory.extend(values.tolist() if isinstance(values, np.ndarray) else values)
        if isinstance(values, np.ndarray):
            keys, numbers = np.unique(values, return_counts=True)
            pairs = zip(keys.tolist(), numbers.tolist())
        else:
            pairs = collections.Counter(values).items()
        if not self.counts:
            self.counts = dict(pairs)
            return
        counts = self.counts
        for key, number in pairs:
            counts[key] = counts.get(key, 0) + number


def check_program_fits(program: Program, config: RunConfig, device: Device) -> None:
    """Raise :class:`CircuitTooLargeError` unless ``program``'s state (a vector, or a stabilizer
    tableau) fits on ``device`` now."""
    if config.method == "stabilizer":
        needed, free = stabilizer_bytes(program, config), device.memory_capacity()
        if needed > free:
            raise CircuitTooLargeError(
                f"a {program.num_qubits}-qubit stabilizer state needs {needed:,} bytes on the {device.kind} "
                f"but only {free:,} are free; use fewer qubits or another device",
                num_qubits=program.num_qubits,
                bytes_needed=needed,
                bytes_free=free,
            )
        return
    arrays = state_arrays(program, config, kernels_cover(program, device, config.dtype))
    device.check_fits(program.num_qubits, np.dtype(config.dtype).itemsize, arrays=arrays)


def run_program(
    program: Program, device: Device, config: RunConfig, execution: Optional[Execution] = None, group: Any = None
) -> ExperimentOutput:
    """Simulate ``program`` and return counts (and memory / statevector when asked).

    Memory beyond the state does not grow with the shots: samples are drawn in
    chunks and tallied as counts (a per-shot list is kept only for memory=True).
    With ``group`` (a :class:`~gpu_provider.engine.distributed.RankGroup`) the
    state is split over its MPI ranks and every rank returns the same output;
    the same interpreter runs, the state type is all that changes.
    """
    start = time.perf_counter()
    dtype = config.dtype
    rng = np.random.default_rng(config.seed)
    sampling = is_sampling_friendly(program)
    if execution is None and group is None:  # under a dispatcher, admission control has reserved the memory
        check_program_fits(program, config, device)
    batched = None
    if config.method == "stabilizer":
        if group is not None:
            raise SimulationError("method='stabilizer' runs on one process; a stabilizer state is not split over MPI ranks")
        from .stabilizer import StabilizerState, frames_fit, sample_frames

        if not sampling and config.shots > 1 and frames_fit(program):
            # Mid-circuit measurements and resets without feed-forward: all shots at once as Pauli frames.
            tally = _Tally(config.memory)
            for values in sample_frames(program, config.shots, rng, execution, xp=device.xp):
                tally.add_many(values)
            return experiment_output(program, device, config, tally, None, sampling, time.perf_counter() - start, {"pauli_frames": True})
        state = StabilizerState(device.xp, program.num_qubits)
    elif group is not None:
        from .distributed import DistributedStateVector

        group.execution = execution
        execution = group  # checkpoints and cancel checks go through the ranks' control channel
        state = DistributedStateVector(device.xp, program.num_qubits, dtype, device_kernels(device, dtype), group, program.ops)
    else:
        batched = None if sampling else _shot_plan(program, config, device)
        if batched is not None and batched.kernels is not None and (batched.first(config.shots) or not config.shot_branching):
            # The kernel runs every shot from |0...0> itself: no state, no interpreter.
            tally, extra = _run_batch(batched, program, config, execution)
            return experiment_output(program, device, config, tally, None, sampling, time.perf_counter() - start, extra)
        state = new_state(device, program.num_qubits, dtype, in_place=config.in_place)
    if config.method != "stabilizer":
        state.preload(gate_arrays(program.ops))  # one host-to-device copy for the gates' matrices
    statevector = None
    extra = {}
    if sampling:
        # One simulation; every shot drawn from the final probabilities, a chunk at a time.
        run_ops(state, tuple(op for op in program.ops if not isinstance(op, Measure)), rng, config, execution, program.num_clbits)
        if config.statevector:
            statevector = state.to_host()
        tally = sample_counts(state, program, config, rng, execution)
    else:
        tally, last, extra = _run_trajectories(program, state, config, rng, execution, None if group is not None else batched)
        if config.statevector:
            # The last trajectory's state, its terminal measurements removed (as Aer does).
            statevector = last.to_host()
    if group is not None:
        extra["mpi"] = state.metadata()
    if config.in_place:
        extra["in_place"] = True  # the state had no scratch buffer (two copies did not fit)
    return experiment_output(program, device, config, tally, statevector, sampling, time.perf_counter() - start, extra)


def _run_trajectories(program: Program, state, config: RunConfig, rng: np.random.Generator, execution, batched: Any = None) -> tuple:
    """Counts (and memory) of a program that measures mid-circuit, resets or branches.

    With ``config.shot_branching`` its shots share trajectories until their
    outcomes differ (:mod:`gpu_provider.engine.trajectories`); otherwise each
    shot runs alone from a copy of the state after the gates before the first
    other op. With ``batched`` (:func:`_shot_plan`), the program's shots may run as
    one batch instead (:mod:`gpu_provider.engine.small_shots`; on a GPU one launch,
    one shot per block; on the CPU the rows of one NumPy batch): once the paths
    that branching began pass the budget where the batch costs less; on a GPU
    without branching, or where the launch costs less than one path, at once.
    Returns the tally, the state of the last trajectory run, and metadata on the
    trajectories.
    """
    if batched is None:
        return _branch_or_shot_by_shot(program, state, config, rng, execution)
    if config.shot_branching and not batched.first(config.shots):
        mark = execution.enqueued if execution is not None else 0
        try:
            return _branch_or_shot_by_shot(program, state, config, rng, execution, batched.budget(config.shots))
        except TooManyPaths:
            if execution is not None:
                execution.rewind(mark)  # the shots start over: progress counts them once
    tally, extra = _run_batch(batched, program, config, execution)
    return tally, state, extra


def _shot_plan(program: Program, config: RunConfig, device: Optional[Device]) -> Any:
    """How ``program``'s shots may run as one batch on ``device`` (a :class:`~gpu_provider.engine.
    small_shots.ShotPlan`), or None: no device (a split MPI state), ``batched_shots`` off, not
    eligible, or the CPU without shot branching (that option keeps every CPU shot alone)."""
    if device is None or not config.batched_shots:
        return None
    from . import small_shots

    batched = small_shots.plan(program, config, device)
    if batched is not None and batched.kernels is None and not config.shot_branching:
        return None
    return batched


def _run_batch(batched: Any, program: Program, config: RunConfig, execution) -> tuple:
    """The tally and metadata of ``program``'s shots run as one batch."""
    tally = _Tally(config.memory)
    for values in batched.run(config, count_ops(program.ops), execution):
        tally.add_many(values)
    return tally, {"shot_branching": config.shot_branching, "batched_shots": True}


def _branch_or_shot_by_shot(
    program: Program, state, config: RunConfig, rng: np.random.Generator, execution, max_paths: Optional[int] = None
) -> tuple:
    """:func:`_run_trajectories` through the interpreter (branching stops past ``max_paths`` paths)."""
    tally = _Tally(config.memory)
    # Terminal measurements (after resets, say) are drawn from each trajectory's final state; so are
    # the measurements that end a program that measured or branched before (a measure_all after
    # feed-forward), on top of each trajectory's clbits: a draw per shot, not a collapse per qubit.
    terminal = measurements_are_terminal(program)
    if terminal:
        ops = tuple(op for op in program.ops if not isinstance(op, Measure))
        final = [op for op in program.ops if isinstance(op, Measure)]
    else:
        cut = len(program.ops)
        while cut and type(program.ops[cut - 1]) is Measure:
            cut -= 1
        ops, final = program.ops[:cut], list(program.ops[cut:])
    measured = sorted({m.qubit for m in final})
    written = 0  # the clbits the final measurements write (a clbit written twice counts once)
    for m in final:
        written |= 1 << m.clbit
    last = [state]

    def finish(trajectory: Trajectory) -> None:
        last[0] = trajectory.state
        if not final:
            tally.add(_clbit_value(trajectory.clbits), trajectory.shots)
            return
        if execution is not None:  # progress counts the final measurements once for each shot, as ops
            execution.checkpoint(len(final) * trajectory.shots)
        kept = 0 if terminal else _clbit_value(trajectory.clbits) & ~written
        for outcomes in sample_outcomes(trajectory.state, measured, trajectory.shots, rng, execution):
            values = _sampled_clbit_values(outcomes, measured, final, program.num_clbits)
            if kept:
                values = values | kept if isinstance(values, np.ndarray) and program.num_clbits <= 62 else [v | kept for v in values]
            tally.add_many(values)

    limit = saved_states(program.num_qubits, np.dtype(config.dtype).itemsize, config.shots, config.shot_branching, size=getattr(state, "nbytes", None))
    interpreter = Interpreter(rng, config.max_loop_iterations, execution, limit, finish, max_paths)
    if config.shot_branching:
        interpreter.run_all(Trajectory.start(state, ops, program.num_clbits, config.shots))
        if tally.memory is not None and len(tally.memory) > 1:
            # Shots come out grouped by trajectory: give them the order of independent shots.
            tally.memory = [tally.memory[i] for i in rng.permutation(len(tally.memory)).tolist()]
    else:
        # Shot by shot, from a copy of the common prefix of gates.
        prefix_len = 0
        while prefix_len < len(ops) and _is_prefix_op(ops[prefix_len]):
            prefix_len += 1
        # Gates only, run once for all the shots (and counted in progress for each of them).
        Interpreter(rng, config.max_loop_iterations, execution).run(Trajectory.start(state, ops[:prefix_len], program.num_clbits, config.shots))
        prefix = state.snapshot() if config.shots > 1 else None
        rest = ops[prefix_len:]
        for index in range(config.shots):
            if index:
                state.copy_from(prefix)
            interpreter.run(Trajectory.start(state, rest, program.num_clbits, 1))
    extra = {"shot_branching": config.shot_branching, "trajectories": interpreter.trajectories}
    if max_paths is not None:
        extra["batched_shots"] = False
    return tally, last[0], extra


def sample_counts(state: StateVector, program: Program, config: RunConfig, rng: np.random.Generator, execution: Execution | None = None) -> _Tally:
    """``config.shots`` outcomes of the sampling-friendly ``program``'s measurements, drawn from its final ``state``.

    Every path that samples a final state (:func:`run_program`, the bulk path of
    :mod:`gpu_provider.engine.small_batch`) goes through here, so a seed gives the same counts on each.
    """
    measures = [op for op in program.ops if isinstance(op, Measure)]
    tally = _Tally(config.memory)
    if not measures:
        tally.counts = {0: config.shots}
        if tally.memory is not None:
            tally.memory = [0] * config.shots
        return tally
    measured = sorted({m.qubit for m in measures})
    for outcomes in sample_outcomes(state, measured, config.shots, rng, execution):
        tally.add_many(_sampled_clbit_values(outcomes, measured, measures, program.num_clbits))
    return tally


def experiment_output(
    program: Program, device: Device, config: RunConfig, tally: _Tally, statevector, sampling: bool, seconds: float, extra: dict | None = None
) -> ExperimentOutput:
    """One program's plain output from its tally and (asked for) final state, with the metadata every path reports."""
    counts, memory = tally.counts, tally.memory
    if statevector is not None and program.layout is not None:
        statevector = expand_state(statevector, program.layout, program.width)
    if program.num_clbits == 0:
        # Nothing is recorded without classical bits: empty counts, as Qiskit's BasicSimulator.
        counts, memory = {}, ([] if config.memory else None)
    return ExperimentOutput(
        counts=counts,
        memory=memory if config.memory else None,
        statevector=statevector,
        metadata={
            "method": config.method,
            "device": device.name,
            "precision": config.precision,
            "measure_sampling": sampling,
            "num_qubits": program.width,
            "active_qubits": list(program.active_qubits),
            "simulated_qubits": program.num_qubits,
            "time_taken": seconds,
            **(extra or {}),
        },
    )


def evolve(program: Program, state: StateVector, config: RunConfig, execution: Optional[Execution] = None) -> StateVector:
    """Run ``program`` (no measurement but terminal ones, which are dropped; no reset or
    control flow) on ``state`` from |0...0>; returns the state, left on its device.

    Raises:
        InvalidInputError: the program measures mid-circuit, resets or branches, so it has no
            single final state.
    """
    if not is_sampling_friendly(program):
        raise InvalidInputError(
            f"circuit {program.name!r} has no single final state: it measures mid-circuit, resets or uses "
            "control flow; exact expectation values need a circuit without them (final measurements are ignored)"
        )
    state.reset_to_zero()
    ops = tuple(op for op in program.ops if not isinstance(op, Measure))
    run_ops(state, ops, np.random.default_rng(config.seed), config, execution, program.num_clbits)
    return state


def sample_outcomes(state: StateVector, qubits, shots: int, rng: np.random.Generator, execution: Optional[Execution] = None):
    """Draw ``shots`` outcomes of measuring ``qubits`` from ``state``, yielded a chunk at a time.

    Bit j of an outcome is ``qubits[j]``. Scratch memory is bounded by the chunk
    (:meth:`StateVector.sample_chunk_shots`), not by ``shots``; the draws are the
    same as one call of :meth:`StateVector.sample` with the same generator.
    Cancellation is checked between chunks. Every front end samples through this.
    """
    table = state.sampling_table()
    chunk = state.sample_chunk_shots()
    for first in range(0, shots, chunk):
        if execution is not None:
            execution.poll_cancel()
        yield state.sample(qubits, min(chunk, shots - first), rng, table)


def sample_memory(program: Program, state: StateVector, shots: int, rng: np.random.Generator) -> list[int]:
    """Each shot's clbit integer, drawn from ``state``, the final state of the sampling-friendly
    ``program`` (as :func:`run_program` draws them: the same generator gives the same shots)."""
    measures = [op for op in program.ops if isinstance(op, Measure)]
    if not measures:
        return [0] * shots
    measured = sorted({m.qubit for m in measures})
    memory: list[int] = []
    for outcomes in sample_outcomes(state, measured, shots, rng):
        values = _sampled_clbit_values(outcomes, measured, measures, program.num_clbits)
        memory.extend(values.tolist() if isinstance(values, np.ndarray) else values)
    return memory


def _sampled_clbit_values(outcomes: np.ndarray, qubits: list[int], measures, num_clbits: int):
    """Clbit integers from sampled outcomes (bit j of an outcome is ``qubits[j]``).

    Measures are applied in program order, so the last one into a clbit wins.
    """
    position = {q: j for j, q in enumerate(qubits)}
    if len(measures) == len(qubits) == num_clbits and all(position[m.qubit] == m.clbit for m in measures):
        return outcomes  # each measured qubit into the clbit of its own outcome bit (measure_all)
    if num_clbits <= 62:
        values = np.zeros(outcomes.shape[0], dtype=np.int64)
        for m in measures:
            bit = (outcomes >> position[m.qubit]) & 1
            values = (values & ~np.int64(1 << m.clbit)) | (bit << m.clbit)
        return values
    result = []
    for outcome in outcomes.tolist():
        value = 0
        for m in measures:
            value = (value & ~(1 << m.clbit)) | (((outcome >> position[m.qubit]) & 1) << m.clbit)
        result.append(value)
    return result


def final_state(program: Program, device: Device, config: RunConfig, execution: Optional[Execution] = None) -> StateVector:
    """Run a program of gates only on a new state and return it, still on the device.

    For front ends that read exact quantities from the state (see
    :mod:`gpu_provider.engine.observables`) or draw their own samples from it.

    Raises:
        SimulationError: the program measures, resets or branches.
    """
    for op in program.ops:
        if not _is_prefix_op(op):
            raise SimulationError(f"final_state() runs gates only; the program holds {type(op).__name__}")
    device.check_fits(program.num_qubits, np.dtype(config.dtype).itemsize, arrays=2)
    state = new_state(device, program.num_qubits, config.dtype)
    run_ops(state, program.ops, np.random.default_rng(config.seed), config, execution, program.num_clbits)
    return state
