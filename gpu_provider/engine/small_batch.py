"""Small circuits in bulk on the GPU: whole circuits per block, many per launch.

Run one at a time, a job of many small circuits is bound by kernel launches:
a 12-qubit circuit's gate is a few microseconds of work behind a launch of its
own. Here a run of such circuits goes to the ``run_small_circuits`` kernel
(``kernels/statevector.cu``), which keeps each circuit's state in one block's
shared memory, applies all its ops there and writes its final amplitudes: one
launch per chunk of circuits instead of one per gate per circuit.

Which circuits (:func:`eligible`): on a device with the GPU kernels, one that
every shot can be drawn from (no mid-circuit measurement, reset or control
flow), of 1 to ``SMALL_MAX_QUBITS`` qubits (12 in complex64, 11 in
complex128), whose gates are dense matrices on 1 to ``MAX_MATRIX_QUBITS``
targets (any controls), diagonals on up to ``MAX_DIAGONAL_QUBITS`` and global
phases. :func:`runs` cuts a job's experiments into runs of consecutive
eligible ones and the rest, which keep their one-at-a-time path, in order.

How (:func:`run_small_batch`): circuits are packed into chunks of at most
``CHUNK_BYTES`` of device buffers (final amplitudes, op stream, circuit
headers, the pool of their matrices); each chunk is one launch and one copy
of the amplitudes back to the host. Each circuit's shots are then drawn from
its amplitudes by the same code and random stream as
:func:`~gpu_provider.engine.executor.run_program` (``default_rng(seed)``,
:func:`~gpu_provider.engine.executor.sample_counts`), on the host, where a
small state's sampling costs no launches; so a seed gives the same counts as
the one-at-a-time path up to rounding of the probabilities. Cancellation is
checked and progress recorded between chunks.
"""

from __future__ import annotations

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


def _op_supported(op) -> bool:
    if isinstance(op, (Measure, GlobalPhase)):
        return True
    if isinstance(op, Unitary):
        k = len(op.qubits)
        return 1 <= k <= MAX_MATRIX_QUBITS or (k == 0 and not op.controls)
    if isinstance(op, Diagonal):
        return len(op.qubits) <= MAX_DIAGONAL_QUBITS
    return False


def eligible(program: Program, config: RunConfig, device: Device) -> bool:
    """Whether ``program`` can run through the bulk kernel on ``device`` (see the module's notes)."""
    kernels = batch_kernels(device, config.dtype)
    if kernels is None or not 1 <= program.num_qubits <= SMALL_MAX_QUBITS[kernels.real]:
        return False
    return is_sampling_friendly(program) and all(_op_supported(op) for op in program.ops)


def runs(device: Device, items: Sequence[tuple[Program, RunConfig]]) -> list[tuple[int, int, bool]]:
    """``items`` cut into ``(start, stop, batched)`` runs: consecutive eligible items of one precision, and the rest."""
    out: list[tuple[int, int, bool]] = []
    for index, (program, config) in enumerate(items):
        batched = eligible(program, config, device)
        if out and out[-1][2] == batched and (not batched or items[out[-1][0]][1].precision == config.precision):
            out[-1] = (out[-1][0], index + 1, batched)
        else:
            out.append((index, index + 1, batched))
    return out


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


def _program_words(program: Program) -> int:
    return sum(1 for op in program.ops if not isinstance(op, Measure))


def _program_pool(program: Program) -> int:
    total = 0
    for op in program.ops:
        if isinstance(op, Unitary):
            total += op.matrix.size
        elif isinstance(op, Diagonal):
            total += op.diagonal.size
        elif isinstance(op, GlobalPhase):
            total += 1
    return total


def estimated_bytes(program: Program, itemsize: int) -> int:
    """Device bytes one circuit adds to a chunk at most (matrices shared with others count in full)."""
    words = SMALL_HEADER_WORDS + SMALL_OP_WORDS * _program_words(program)
    return words * _WORD_BYTES + ((1 << program.num_qubits) + _program_pool(program)) * itemsize


def chunks(programs: Sequence[Program], itemsize: int, limit: int | None = None) -> list[tuple[int, int]]:
    """``(start, stop)`` chunks of ``programs`` whose device buffers stay within ``limit`` (``CHUNK_BYTES``; one circuit at least)."""
    limit = CHUNK_BYTES if limit is None else limit
    out: list[tuple[int, int]] = []
    start, total = 0, 0
    for index, program in enumerate(programs):
        size = estimated_bytes(program, itemsize)
        if index > start and total + size > limit:
            out.append((start, index))
            start, total = index, 0
        total += size
    if start < len(programs):
        out.append((start, len(programs)))
    return out


def reserve_bytes(device: Device, items: Sequence[tuple[Program, RunConfig]]) -> int:
    """Peak device bytes the bulk path takes for ``items`` (its largest chunk) plus the workspace; 0 if none is eligible."""
    peak = 0
    for start, stop, batched in runs(device, items):
        if not batched:
            continue
        programs = [program for program, _ in items[start:stop]]
        itemsize = np.dtype(items[start][1].dtype).itemsize
        for first, last in chunks(programs, itemsize):
            peak = max(peak, sum(estimated_bytes(p, itemsize) for p in programs[first:last]))
    return peak + WORKSPACE_BYTES if peak else 0


def pack(programs: Sequence[Program], dtype) -> _Packed:
    """The headers, op stream and matrix pool of ``programs`` (each checked by :func:`eligible`'s rules).

    Matrices and diagonals shared between ops (the translator caches gates by
    name and parameters) are stored once.

    Raises:
        InvalidInputError: a program the bulk kernel cannot run.
    """
    dtype = np.dtype(dtype)
    headers = np.zeros((len(programs), SMALL_HEADER_WORDS), dtype=np.uint64)
    words: list[tuple[int, int, int, int, int, int]] = []
    arrays: list[np.ndarray] = []
    where: dict[Any, int] = {}  # id of a matrix (or a phase's value) -> its offset in the pool
    pool_size = 0
    offset = 0

    def place(key: Any, array: np.ndarray) -> int:
        nonlocal pool_size
        found = where.get(key)
        if found is None:
            found = where[key] = pool_size
            arrays.append(np.asarray(array).reshape(-1))
            pool_size += arrays[-1].size
        return found

    def phase(value: complex) -> tuple:
        return (SMALL_PHASE, 0, 0, place(("phase", value), np.array([value])), 0, 0)

    widest = 0
    for index, program in enumerate(programs):
        n = program.num_qubits
        limit = SMALL_MAX_QUBITS["float" if dtype == np.complex64 else "double"]
        if not 1 <= n <= limit:
            raise InvalidInputError(f"the bulk kernel runs circuits of 1 to {limit} qubits in {dtype}, not {n} ({program.name!r})")
        first = len(words)
        for op in program.ops:
            if isinstance(op, Measure):
                continue
            if not _op_supported(op) or any(not 0 <= q < n for q in _qubits(op)):
                raise InvalidInputError(f"the bulk kernel cannot run {type(op).__name__} on {_qubits(op)} in {program.name!r}")
            if isinstance(op, GlobalPhase):
                words.append(phase(complex(math.cos(op.phase), math.sin(op.phase))))
            elif isinstance(op, Unitary) and not op.qubits:
                words.append(phase(complex(op.matrix[0, 0])))
            elif isinstance(op, Diagonal) and not op.qubits:
                words.append(phase(complex(op.diagonal[0])))
            elif isinstance(op, Diagonal):
                k = len(op.qubits)
                _check_shape(op.diagonal, (1 << k,), program)
                words.append((SMALL_DIAGONAL | k << 8, pack_bits(op.qubits), 0, place(id(op.diagonal), op.diagonal), 0, 0))
            else:
                k = len(op.qubits)
                _check_shape(op.matrix, (1 << k, 1 << k), program)
                mask = sum(1 << c for c in op.controls)
                value = sum(((op.ctrl_state >> i) & 1) << c for i, c in enumerate(op.controls))
                words.append(
                    (SMALL_MATRIX | k << 8, pack_bits(op.qubits), pack_bits(sorted(op.qubits)), place(id(op.matrix), op.matrix), mask, value)
                )
        headers[index] = (first, len(words) - first, n, offset)
        offset += 1 << n
        widest = max(widest, n)
    ops = np.array(words, dtype=np.uint64).reshape(-1) if words else np.zeros(0, dtype=np.uint64)
    pool = np.concatenate(arrays).astype(dtype) if arrays else np.zeros(1, dtype=dtype)
    return _Packed(headers.reshape(-1), ops, pool, [int(h) for h in headers[:, 3]], offset, widest)


def _qubits(op) -> tuple:
    return (op.controls + op.qubits) if isinstance(op, Unitary) else getattr(op, "qubits", ())


def _check_shape(array: np.ndarray, shape: tuple, program: Program) -> None:
    if np.shape(array) != shape:
        raise InvalidInputError(f"a gate of {program.name!r} has numbers of shape {np.shape(array)}, not {shape}")


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


def run_small_batch(items: Sequence[tuple[Program, RunConfig]], device: Device, execution: Execution | None = None) -> list[ExperimentOutput]:
    """Run eligible ``(program, config)`` items (one precision) in bulk; their outputs, as :func:`run_program` gives them.

    Raises:
        InvalidInputError: an item that is not eligible, or items of mixed precision.
        CircuitTooLargeError: without a dispatcher's reservation (``execution`` None), a chunk that does not fit.
        JobCancelledError: the job was cancelled (checked between chunks and sampling chunks).
    """
    if not items:
        return []
    precision = items[0][1].precision
    dtype = items[0][1].dtype
    for program, config in items:
        if config.precision != precision:
            raise InvalidInputError(f"one bulk run takes one precision, not {precision!r} and {config.precision!r}")
        if not eligible(program, config, device):
            raise InvalidInputError(f"circuit {program.name!r} cannot run through the bulk kernel on the {device.kind}")
    kernels = batch_kernels(device, dtype)
    itemsize = np.dtype(dtype).itemsize
    programs = [program for program, _ in items]
    outputs: list[ExperimentOutput] = []
    for first, last in chunks(programs, itemsize):
        if execution is not None:
            execution.poll_cancel()
        else:
            _check_chunk_fits(device, programs[first:last], itemsize)
        started = time.perf_counter()
        amplitudes, offsets = final_amplitudes(programs[first:last], device, dtype, kernels)
        share = (time.perf_counter() - started) / (last - first)
        if execution is not None:
            execution.advance(sum(count_ops(program.ops) for program in programs[first:last]))
        for (program, config), offset in zip(items[first:last], offsets):
            started = time.perf_counter()
            state = StateVector.view(np, amplitudes[offset : offset + (1 << program.num_qubits)], dtype)
            tally = sample_counts(state, program, config, np.random.default_rng(config.seed), execution)
            statevector = state.to_host() if config.statevector else None
            outputs.append(experiment_output(program, device, config, tally, statevector, True, share + time.perf_counter() - started))
        del amplitudes
    return outputs


def _check_chunk_fits(device: Device, programs: Sequence[Program], itemsize: int) -> None:
    needed = sum(estimated_bytes(p, itemsize) for p in programs) + WORKSPACE_BYTES
    free = device.memory_capacity()
    if needed > free:
        widest = max(p.num_qubits for p in programs)
        raise too_large_error(device.kind, widest, itemsize, needed, free, f"a bulk launch of {len(programs)} circuits")
