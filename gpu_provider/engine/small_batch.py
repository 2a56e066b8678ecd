"""Small circuits in bulk on the GPU: whole circuits per block, many per launch.

Run one at a time, a job of many small circuits is bound by kernel launches:
a 12-qubit circuit's gate is a few microseconds of work behind a launch of its
own. Here a run of such circuits goes to the ``run_small_circuits`` kernel
(``kernels/statevector.cu``), which keeps each circuit's state in one block's
shared memory, applies all its ops there and writes its final amplitudes: one
launch per chunk of circuits instead of one per gate per circuit.

Which circuits (:func:`eligible`): on a device with the GPU kernels, one that
every shot can be drawn from (no mid-circuit measurement, reset or control
flow), of 1 to :meth:`~gpu_provider.engine.kernels.Kernels.small_max_qubits`
qubits (what the device's shared memory per block holds: 14 in complex64 and
13 in complex128 on sm_80 and sm_90, never fewer than 12 and 11), whose gates
are dense matrices on 1 to ``MAX_MATRIX_QUBITS`` targets (any controls),
diagonals on up to ``MAX_DIAGONAL_QUBITS`` and global phases. :func:`plan`
cuts a job's experiments into runs of consecutive eligible ones and the rest,
which keep their one-at-a-time path, in order.

How (:func:`run_small_batch`): a run's circuits are grouped by width class
(all those that fit the default 48 KiB of shared memory per block together,
each wider width on its own, so one wide circuit never sets the shared memory
and block of a launch of narrow ones) and packed into chunks of at most
``CHUNK_BYTES`` of device buffers (final amplitudes, op stream, circuit
headers, the pool of their matrices); each chunk is one launch, its shared
memory sized for its widest circuit, and one copy of the amplitudes back to
the host. Outputs come back in the job's order whatever the chunks' grouping.
Each circuit's shots are then drawn from
its amplitudes by the same code and random stream as
:func:`~gpu_provider.engine.executor.run_program` (``default_rng(seed)``,
:func:`~gpu_provider.engine.executor.sample_counts`), on the host, where a
small state's sampling costs no launches; so a seed gives the same counts as
the one-at-a-time path up to rounding of the probabilities. Cancellation is
checked and progress recorded between chunks.
"""

from __future__ import annotations

import array
import functools
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import InvalidInputError
from .devices import Device, too_large_error
from .executor import (
    WORKSPACE_BYTES,
    Execution,
    ExperimentOutput,
    RunConfig,
    device_kernels,
    experiment_output,
    sample_counts,
)
from .kernels import (
    MAX_DIAGONAL_QUBITS,
    MAX_MATRIX_QUBITS,
    SMALL_DEFAULT_QUBITS,
    SMALL_DIAGONAL,
    SMALL_HEADER_WORDS,
    SMALL_MATRIX,
    SMALL_MAX_QUBITS,
    SMALL_OP_WORDS,
    SMALL_PHASE,
    pack_bits,
)
from .program import (
    Diagonal,
    GlobalPhase,
    Measure,
    Program,
    Unitary,
    count_ops,
    is_sampling_friendly,
)
from .statevector import StateVector

# Device bytes one launch's buffers take at most (a single circuit larger than this runs alone).
CHUNK_BYTES = 64 << 20
_WORD_BYTES = 8


def batch_kernels(device: Device, dtype) -> Any:
    """The kernels that run small circuits in bulk on ``device`` in ``dtype``, or None (the CPU)."""
    kernels = device_kernels(device, dtype)
    return kernels if kernels is not None and hasattr(kernels, "run_small_circuits") else None


def _scan(program: Program, itemsize: int) -> int | None:
    """Device bytes ``program`` adds to a chunk at most (shared matrices counted in full), or None if an op is not the kernel's."""
    words = SMALL_HEADER_WORDS
    numbers = 1 << program.num_qubits
    for op in program.ops:
        kind = type(op)
        if kind is Measure:
            continue
        if kind is Unitary:
            k = len(op.qubits)
            if not (1 <= k <= MAX_MATRIX_QUBITS or (k == 0 and not op.controls)):
                return None
            numbers += op.matrix.size
        elif kind is Diagonal:
            if len(op.qubits) > MAX_DIAGONAL_QUBITS:
                return None
            numbers += op.diagonal.size
        elif kind is GlobalPhase:
            numbers += 1
        else:
            return None
        words += SMALL_OP_WORDS
    return words * _WORD_BYTES + numbers * itemsize


def estimated_bytes(program: Program, itemsize: int) -> int:
    """Device bytes one eligible circuit adds to a chunk at most (matrices shared with others count in full)."""
    size = _scan(program, itemsize)
    if size is None:
        raise InvalidInputError(f"circuit {program.name!r} has ops the bulk kernel cannot run")
    return size


def eligible_bytes(program: Program, config: RunConfig, device: Device) -> int | None:
    """Device bytes ``program`` adds to a bulk chunk (see :func:`estimated_bytes`), or None where
    it cannot run through the bulk kernel on ``device`` (see the module's notes)."""
    if config.method != "statevector":
        return None
    kernels = batch_kernels(device, config.dtype)
    if kernels is None or not is_sampling_friendly(program):
        return None
    if not 1 <= program.num_qubits <= kernels.small_max_qubits(device.device_id):
        return None
    return _scan(program, np.dtype(config.dtype).itemsize)


def eligible(program: Program, config: RunConfig, device: Device) -> bool:
    """Whether ``program`` can run through the bulk kernel on ``device`` (see the module's notes)."""
    return eligible_bytes(program, config, device) is not None


@dataclass(frozen=True)
class Chunk:
    """One launch of a batched run: its circuits (``indices``, ascending, relative to the run's start),
    all of one width class, and the device bytes their buffers take at most."""

    indices: tuple[int, ...]
    bytes: int


@dataclass(frozen=True)
class Run:
    """Experiments ``start..stop-1`` of a job: a run of eligible ones (``batched``, cut into
    ``chunks``, launched in order of their first circuit) or ones that run one at a time."""

    start: int
    stop: int
    batched: bool
    chunks: tuple[Chunk, ...] = ()


def width_class(program: Program, config: RunConfig) -> int:
    """The widest circuit of ``program``'s launch class: every width that fits the default shared
    memory shares one class (``SMALL_DEFAULT_QUBITS``); each wider one is its own."""
    return max(program.num_qubits, SMALL_DEFAULT_QUBITS["float" if np.dtype(config.dtype) == np.complex64 else "double"])


def plan(
    device: Device, items: Sequence[tuple[Program, RunConfig]], limit: int | None = None, sizes: Sequence[int | None] | None = None
) -> list[Run]:
    """``items`` cut into runs: consecutive eligible items of one precision, grouped by
    :func:`width_class` into chunks of at most ``limit`` (``CHUNK_BYTES``) device bytes each, one
    circuit at least; and the rest, in order.

    ``sizes``: per item, its :func:`eligible_bytes` on ``device`` where the caller has it already, or
    None where it does not (then it is found here).
    """
    limit = CHUNK_BYTES if limit is None else limit
    bounds: list[list] = []  # [start, stop, sizes or None]
    for index, (program, config) in enumerate(items):
        size = sizes[index] if sizes is not None else None
        if size is None:
            size = eligible_bytes(program, config, device)
        last = bounds[-1] if bounds else None
        if last is not None and (last[2] is None) == (size is None) and (size is None or items[last[0]][1].precision == config.precision):
            last[1] = index + 1
            if size is not None:
                last[2].append(size)
        else:
            bounds.append([index, index + 1, None if size is None else [size]])
    runs = []
    for start, stop, sizes in bounds:
        if sizes is None:
            runs.append(Run(start, stop, False))
            continue
        classes = [width_class(program, config) for program, config in items[start:stop]]
        runs.append(Run(start, stop, True, _chunks(sizes, classes, limit)))
    return runs


def _chunks(sizes: Sequence[int], classes: Sequence[int], limit: int) -> tuple[Chunk, ...]:
    """Each class's circuits, in order, cut into chunks of at most ``limit`` bytes; all chunks by first circuit."""
    members: dict[int, list[int]] = {}
    for index, width in enumerate(classes):
        members.setdefault(width, []).append(index)
    out = []
    for indices in members.values():
        current: list[int] = []
        total = 0
        for index in indices:
            if current and total + sizes[index] > limit:
                out.append(Chunk(tuple(current), total))
                current, total = [], 0
            current.append(index)
            total += sizes[index]
        out.append(Chunk(tuple(current), total))
    return tuple(sorted(out, key=lambda chunk: chunk.indices[0]))


def reserve_bytes(runs: Sequence[Run]) -> int:
    """Peak device bytes the bulk path takes for a job's :func:`plan` (its largest chunk; chunks run
    one after another) plus the workspace; 0 if none."""
    peak = max((chunk.bytes for run in runs for chunk in run.chunks), default=0)
    return peak + WORKSPACE_BYTES if peak else 0


# ---------------------------------------------------------------------------
# Packing


@dataclass
class _Packed:
    """One chunk laid out for run_small_circuits: host arrays and each circuit's amplitude offset."""

    headers: np.ndarray
    ops: np.ndarray
    pool: np.ndarray
    offsets: list
    amplitudes: int
    num_qubits: int  # the widest circuit's

    @property
    def device_bytes(self) -> int:
        return (self.headers.size + self.ops.size) * _WORD_BYTES + (self.pool.size + self.amplitudes) * self.pool.dtype.itemsize


class OpEncoder:
    """Gate ops as the bulk kernels' op words (``SMALL_OP_WORDS`` each), their numbers placed
    once in a pool: matrices and diagonals shared between ops (the translator caches gates by
    name and parameters) and equal phase factors are stored once."""

    def __init__(self) -> None:
        self.arrays: list[np.ndarray] = []
        self.where: dict[Any, int] = {}  # id of a matrix (or a phase's value) -> its offset in the pool
        self.gates: dict[tuple, tuple] = {}  # this encoder's _gate_words, without the cache's call
        self.size = 0

    def place(self, key: Any, numbers: np.ndarray) -> int:
        found = self.where[key] = self.size
        self.arrays.append(np.asarray(numbers).reshape(-1))
        self.size += self.arrays[-1].size
        return found

    def phase(self, value: complex) -> tuple:
        key = ("phase", value)
        found = self.where.get(key)
        return (SMALL_PHASE, 0, 0, self.place(key, np.array([value])) if found is None else found, 0, 0)

    def gate(self, op: Any, n: int, name: str) -> tuple | None:
        """``op``'s words in an ``n``-qubit circuit; None for a Measure (the kernels' callers handle those).

        Raises:
            InvalidInputError: an op that is not a gate the kernels apply, or one that does not fit ``n``.
        """
        kind = type(op)
        if kind is Unitary:
            numbers, gate = op.matrix, (False, op.qubits, op.controls, op.ctrl_state)
        elif kind is Diagonal:
            numbers, gate = op.diagonal, (True, op.qubits, (), 0)
        elif kind is Measure:
            return None
        elif kind is GlobalPhase:
            return self.phase(complex(math.cos(op.phase), math.sin(op.phase)))
        else:
            raise InvalidInputError(f"the bulk kernel cannot run {kind.__name__} (in {name!r})")
        layout = self.gates.get(gate)
        if layout is None:
            layout = self.gates[gate] = _gate_words(*gate)
        word, packed, packed_sorted, mask, value, shape, top = layout
        if top >= n or numbers.shape != shape:
            raise InvalidInputError(
                f"the bulk kernel cannot run {kind.__name__} on {gate[2] + gate[1]} with numbers of shape "
                f"{numbers.shape} in the {n}-qubit {name!r}"
            )
        if not gate[1]:
            return self.phase(complex(numbers.reshape(-1)[0]))
        found = self.where.get(id(numbers))
        return (word, packed, packed_sorted, self.place(id(numbers), numbers) if found is None else found, mask, value)

    def pool(self, dtype) -> np.ndarray:
        """The numbers placed so far, in ``dtype`` (one zero where there are none: never an empty device array)."""
        return np.concatenate(self.arrays).astype(dtype) if self.arrays else np.zeros(1, dtype=dtype)


def pack(programs: Sequence[Program], dtype) -> _Packed:
    """The headers, op stream and matrix pool of ``programs`` (each checked by :func:`eligible`'s rules),
    numbers shared between ops stored once (:class:`OpEncoder`).

    Widths are checked against the engine's most (``SMALL_MAX_QUBITS``); the launch checks its device's.

    Raises:
        InvalidInputError: a program the bulk kernel cannot run.
    """
    dtype = np.dtype(dtype)
    headers = np.zeros((len(programs), SMALL_HEADER_WORDS), dtype=np.uint64)
    words = array.array("Q")  # SMALL_OP_WORDS per op, flat (uint64)
    extend = words.extend
    encoder = OpEncoder()
    encode = encoder.gate
    offset = 0
    limit = SMALL_MAX_QUBITS["float" if dtype == np.complex64 else "double"]
    widest = 0
    for index, program in enumerate(programs):
        n = program.num_qubits
        if not 1 <= n <= limit:
            raise InvalidInputError(f"the bulk kernel runs circuits of 1 to {limit} qubits in {dtype}, not {n} ({program.name!r})")
        first = len(words)
        name = program.name
        for op in program.ops:
            op_words = encode(op, n, name)
            if op_words is not None:
                extend(op_words)
        headers[index] = (first // SMALL_OP_WORDS, (len(words) - first) // SMALL_OP_WORDS, n, offset)
        offset += 1 << n
        widest = max(widest, n)
    ops = np.frombuffer(words, dtype=f"u{words.itemsize}").astype(np.uint64, copy=False) if words else np.zeros(0, dtype=np.uint64)
    return _Packed(headers.reshape(-1), ops, encoder.pool(dtype), [int(h) for h in headers[:, 3]], offset, widest)


@functools.lru_cache(maxsize=4096)
def _gate_words(diagonal: bool, qubits: tuple, controls: tuple, ctrl_state: int) -> tuple:
    """A gate's op words but its pool offset, its numbers' shape and its highest qubit (cached: circuits repeat targets).

    Raises:
        InvalidInputError: more targets than the kernel takes, a repeated qubit or a control on a gate of no targets.
    """
    k = len(qubits)
    widest = MAX_DIAGONAL_QUBITS if diagonal else MAX_MATRIX_QUBITS
    if k > widest or len(set(qubits + controls)) != k + len(controls) or (controls and not k) or min(qubits + controls, default=0) < 0:
        kind = "diagonal" if diagonal else "gate"
        raise InvalidInputError(f"the bulk kernel cannot run a {kind} on targets {qubits} with controls {controls}")
    top = max(qubits + controls, default=-1)
    if diagonal:
        return (SMALL_DIAGONAL | k << 8, pack_bits(qubits), 0, 0, 0, (1 << k,), top)
    mask = sum(1 << c for c in controls)
    value = sum(((ctrl_state >> i) & 1) << c for i, c in enumerate(controls))
    return (SMALL_MATRIX | k << 8, pack_bits(qubits), pack_bits(sorted(qubits)), mask, value, (1 << k, 1 << k), top)


# ---------------------------------------------------------------------------
# Running


def final_amplitudes(programs: Sequence[Program], device: Device, dtype, kernels: Any = None) -> tuple[np.ndarray, list]:
    """One launch for ``programs``: their final amplitudes on the host (flat) and each one's offset there."""
    kernels = kernels if kernels is not None else batch_kernels(device, dtype)
    if kernels is None:
        raise InvalidInputError(f"the bulk kernel needs a GPU with its kernels, not the {device.kind}")
    packed = pack(programs, dtype)
    xp = device.xp
    out = xp.empty(packed.amplitudes, dtype=np.dtype(dtype))
    kernels.run_small_circuits(out, xp.asarray(packed.headers), xp.asarray(packed.ops), xp.asarray(packed.pool), packed.num_qubits)
    return device.to_host(out), packed.offsets


def outputs_in_order(
    runs: Sequence[Run], items: Sequence[tuple[Program, RunConfig]], device: Device, execution: Any, run_one: Any, check_fits: bool = False
):
    """Each item's output, in order: the runs :func:`plan` batched through the bulk kernel, the others by ``run_one(index)``.

    ``check_fits``: check each bulk chunk against the device's free memory even with an ``execution`` (a
    worker of an executor, where no dispatcher reserved it).
    """
    for run in runs:
        if run.batched:
            yield from run_small_batch(items[run.start : run.stop], device, execution, run.chunks, check_fits=check_fits)
            continue
        for index in range(run.start, run.stop):
            yield run_one(index)


def run_small_batch(
    items: Sequence[tuple[Program, RunConfig]],
    device: Device,
    execution: Execution | None = None,
    chunks: Sequence[Chunk] | None = None,
    check_fits: bool = False,
) -> list[ExperimentOutput]:
    """Run eligible ``(program, config)`` items (one precision) in bulk; their outputs, as :func:`run_program` gives them.

    ``chunks``: the items' :attr:`Run.chunks` from :func:`plan`, which checked them; without it they are checked here.
    The outputs are in the items' order, whichever chunk ran each.
    ``check_fits``: check each chunk's memory even with an ``execution`` (see :func:`outputs_in_order`).

    Raises:
        InvalidInputError: an item that is not eligible, or items of mixed precision.
        CircuitTooLargeError: without a dispatcher's reservation (``execution`` None), a chunk that does not fit.
        JobCancelledError: the job was cancelled (checked between chunks and sampling chunks).
    """
    if not items:
        return []
    if chunks is None:
        runs = plan(device, items)
        if len(runs) != 1 or not runs[0].batched:
            bad = next((run for run in runs if not run.batched), None)
            if bad is not None:
                raise InvalidInputError(f"circuit {items[bad.start][0].name!r} cannot run through the bulk kernel on the {device.kind}")
            raise InvalidInputError(f"one bulk run takes one precision, not {sorted({c.precision for _, c in items})}")
        chunks = runs[0].chunks
    dtype = items[0][1].dtype
    kernels = batch_kernels(device, dtype)
    outputs: list[ExperimentOutput | None] = [None] * len(items)
    for planned in chunks:
        chunk = [items[index] for index in planned.indices]
        if execution is not None:
            execution.poll_cancel()
        if execution is None or check_fits:
            _check_chunk_fits(device, chunk, planned.bytes)
        started = time.perf_counter()
        amplitudes, offsets = final_amplitudes([program for program, _ in chunk], device, dtype, kernels)
        share = (time.perf_counter() - started) / len(chunk)
        if execution is not None:
            execution.advance(sum(count_ops(program.ops) for program, _ in chunk))
        for index, (program, config), offset in zip(planned.indices, chunk, offsets):
            started = time.perf_counter()
            state = StateVector.view(np, amplitudes[offset : offset + (1 << program.num_qubits)], dtype)
            tally = sample_counts(state, program, config, np.random.default_rng(config.seed), execution)
            statevector = state.to_host() if config.statevector else None
            outputs[index] = experiment_output(program, device, config, tally, statevector, True, share + time.perf_counter() - started)
        del amplitudes
    missing = [index for index, output in enumerate(outputs) if output is None]
    if missing:
        raise InvalidInputError(f"the bulk chunks leave items {missing[:10]} of {len(items)} without a launch")
    return outputs  # type: ignore[return-value]


def _check_chunk_fits(device: Device, chunk: Sequence[tuple[Program, RunConfig]], size: int) -> None:
    needed = size + WORKSPACE_BYTES
    free = device.memory_capacity()
    if needed > free:
        widest = max(program.num_qubits for program, _ in chunk)
        itemsize = np.dtype(chunk[0][1].dtype).itemsize
        raise too_large_error(device.kind, widest, itemsize, needed, free, f"a bulk launch of {len(chunk)} circuits")
