"""The worker side of a batch run on an executor (``concurrent.futures`` or a Dask client).

:func:`run_chunk` runs a few experiments of one job on whatever machine the
executor picked. It takes plain picklable data (``Program`` s, ``RunConfig`` s,
the device option) and returns plain :class:`ExperimentOutput` s: no Qiskit
object crosses the wire and nothing here imports Qiskit or Dask. A front end
that can signal a stop to its workers passes ``stop``, a picklable callable
that answers True once the job was cancelled; it is polled at the engine's
checkpoints (every op), so it must be cheap or throttle itself.
"""

from __future__ import annotations

import os
import socket
from typing import Callable, Optional, Sequence

from ..errors import JobCancelledError
from . import small_batch
from .devices import resolve_device
from .executor import ExperimentOutput, RunConfig, blas_threads, check_program_fits, config_threads, run_program
from .program import Program


class ChunkRun:
    """What ``run_program`` needs of an execution, on a worker: checkpoints that honour ``stop``."""

    __slots__ = ("_stop",)

    def __init__(self, stop: Optional[Callable[[], bool]]) -> None:
        self._stop = stop

    def checkpoint(self, ops: int = 1) -> None:
        self.poll_cancel()

    def advance(self, ops: int) -> None:  # the job counts progress per finished chunk, on its side
        self.poll_cancel()

    enqueued = 0  # no count here to mark or rewind (see Execution.rewind)

    def rewind(self, mark: int) -> None:
        pass

    def poll_cancel(self) -> None:
        stop = self._stop
        if stop is not None and stop():
            raise JobCancelledError("cancelled: the job's stop flag was set while this chunk ran on its worker")


def _chunk_threads(items) -> int:
    """The BLAS threads of a chunk: what its widest program asks (the job's options are the same in each)."""
    if not items:
        return 0
    program, config = max(items, key=lambda item: item[0].num_qubits)
    return config_threads(program.num_qubits, config)


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def run_chunk(
    experiments: Sequence[tuple[int, Program, RunConfig]],
    device: str = "auto",
    device_id: int = 0,
    stop: Optional[Callable[[], bool]] = None,
    batch_small_circuits: bool = True,
) -> list[tuple[int, ExperimentOutput]]:
    """Run ``(index, program, config)`` experiments in order on this worker's device.

    ``device`` is the job's device option, resolved here ("auto" takes this
    worker's GPU if it has a usable one); each output's metadata names the
    device that ran it and the worker (``host:pid``). Each program's memory is
    checked against this worker's device before it runs. On a GPU, runs of
    small circuits go through the bulk kernel as a local job's do
    (:mod:`~gpu_provider.engine.small_batch`), unless ``batch_small_circuits`` is False.

    Raises:
        JobCancelledError: ``stop`` answered True (checked before the first op too).
        CircuitTooLargeError: a program does not fit on this worker's device.
        SimulationError: as a local run would raise it.
    """
    run = ChunkRun(stop)
    run.poll_cancel()  # a chunk that starts after its job was cancelled ends at once
    resolved, fallback_reason = resolve_device(device, device_id)
    outputs = []
    resolved.job_started()
    items = [(program, config) for _, program, config in experiments]

    def run_one(position: int) -> ExperimentOutput:
        program, config = items[position]
        check_program_fits(program, config, resolved)
        return run_program(program, resolved, config, run)

    try:
        with resolved.stream(), blas_threads(resolved, _chunk_threads(items)):
            runs = small_batch.plan(resolved, items) if batch_small_circuits else [small_batch.Run(0, len(items), False)]
            for (index, _, _), output in zip(experiments, small_batch.outputs_in_order(runs, items, resolved, run, run_one, check_fits=True)):
                output.metadata["worker"] = worker_name()
                if fallback_reason:
                    output.metadata["gpu_unavailable_reason"] = fallback_reason
                outputs.append((index, output))
    finally:
        resolved.job_ended()
        try:
            resolved.release_memory()
        except Exception:  # releasing cached blocks must never fail a chunk
            pass
    return outputs
