"""Batches on an executor: the front end of the ``executor=`` run option.

A job whose backend has ``executor`` set (any ``concurrent.futures.Executor``,
or an object with a ``submit`` returning futures such as a
``dask.distributed.Client``) still compiles every circuit in ``run()``; its
execution then splits the experiments into chunks, submits each chunk to the
executor as :func:`gpu_provider.engine.remote.run_chunk`, and gathers the
plain outputs in circuit order. The job's status, progress, cancellation and
timeouts are those of its local :class:`~gpu_provider.engine.executor.Execution`.

This module imports neither Qiskit nor Dask at import time (workers unpickle
:class:`DaskStop` from here); Dask is imported only when the executor is a
Dask client, which means Dask is already loaded.
"""

from __future__ import annotations

import concurrent.futures
import logging
import math
import numbers
import sys
import threading
import time
import uuid
from typing import Any, Callable, Optional, Sequence

from .engine.executor import Execution, ExperimentOutput, RunConfig
from .engine.program import Program
from .engine.remote import run_chunk
from .errors import ExecutorError, GPUProviderError, InvalidOptionError, JobCancelledError

logger = logging.getLogger(__name__)

# The function each chunk runs on a worker (tests replace it to make a worker die).
CHUNK_FUNCTION: Callable = run_chunk
# Chunks per worker slot when max_job_size is None: a few each, so a slow chunk
# does not hold the job back and a cancel on an executor without a stop flag
# (process pools) waits for small chunks only.
CHUNKS_PER_SLOT = 2
# How often a Dask worker asks the scheduler whether its job was cancelled (one round trip each).
DASK_STOP_POLL_SECONDS = 0.2
# How often the job's thread looks for a cancel request while it waits for chunks.
WAIT_POLL_SECONDS = 0.05
# After a cancel, how long the job's Dask stop flag stays set before it is cleared (and so deleted from the
# scheduler): a running chunk polls it between ops, so this must outlast the longest op a chunk may be in.
STOP_LINGER_SECONDS = 60.0


def check_executor_options(executor: Any, max_job_size: Any) -> None:
    """Raise :class:`InvalidOptionError` unless ``executor`` and ``max_job_size`` are usable."""
    usable = isinstance(executor, concurrent.futures.Executor) or (
        not isinstance(executor, type) and callable(getattr(executor, "submit", None))
    )
    if executor is not None and not usable:
        raise InvalidOptionError(
            f"executor must be None, a concurrent.futures.Executor (ThreadPoolExecutor, ProcessPoolExecutor, ...) "
            f"or an object whose submit(fn, *args) returns futures, such as a dask.distributed.Client; "
            f"not {type(executor).__name__} {executor!r}"
        )
    if max_job_size is not None and (isinstance(max_job_size, bool) or not isinstance(max_job_size, numbers.Integral) or max_job_size < 1):
        raise InvalidOptionError(f"max_job_size must be a positive integer (circuits per chunk) or None, not {max_job_size!r}")


def is_dask_client(executor: Any) -> bool:
    distributed = sys.modules.get("distributed")
    return distributed is not None and isinstance(executor, getattr(distributed, "Client", ()))


def worker_slots(executor: Any) -> int:
    """How many chunks the executor runs at once: a Dask cluster's threads, a pool's workers, else 1."""
    if is_dask_client(executor):
        try:
            workers = executor.scheduler_info()["workers"]
            return max(sum(int(info.get("nthreads", 1)) for info in workers.values()), 1)
        except Exception:  # a cluster still starting answers later; one slot is a safe guess
            logger.debug("could not read the Dask cluster's workers", exc_info=True)
            return 1
    slots = getattr(executor, "_max_workers", None)
    return slots if isinstance(slots, int) and slots > 0 else 1


def split_chunks(count: int, slots: int, max_job_size: Optional[int]) -> list[list[int]]:
    """Experiment indices per chunk: at most ``max_job_size`` each, else ``CHUNKS_PER_SLOT`` chunks per slot.

    Indices are dealt round robin (chunk j holds j, j + k, ...), so circuits that
    grow along the list spread over the chunks; results are put back in order.
    """
    size = int(max_job_size) if max_job_size is not None else math.ceil(count / max(slots * CHUNKS_PER_SLOT, 1))
    chunks = math.ceil(count / max(size, 1))
    return [list(range(j, count, chunks)) for j in range(chunks)]


class DaskStop:
    """A picklable stop flag for Dask workers: a ``distributed.Event`` named per job.

    Called at every op of a chunk, it asks the scheduler at most every
    ``interval`` seconds (each question is a round trip) and remembers a set flag.
    """

    def __init__(self, name: str, interval: float = DASK_STOP_POLL_SECONDS) -> None:
        self.name = name
        self.interval = interval
        self._event = None
        self._next = 0.0
        self._set = False

    def __getstate__(self) -> dict:
        return {"name": self.name, "interval": self.interval}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    def __call__(self) -> bool:
        if self._set:
            return True
        now = time.monotonic()
        if now < self._next:
            return False
        self._next = now + self.interval
        try:
            if self._event is None:
                from distributed import Event

                self._event = Event(self.name)
            self._set = bool(self._event.is_set())
        except Exception:  # the scheduler is unreachable: run on; the client fails the job meanwhile
            logger.debug("polling the stop flag %s failed", self.name, exc_info=True)
        return self._set


class _Stop:
    """The job's stop flag: what the workers poll, and how the job's thread raises it."""

    def __init__(self, executor: Any, job_id: str) -> None:
        self.check: Optional[Callable[[], bool]] = None
        self._raise: Optional[Callable[[], None]] = None
        self._clear: Optional[Callable[[], None]] = None
        if is_dask_client(executor):
            from distributed import Event

            name = f"gpu_provider-stop-{job_id}-{uuid.uuid4().hex[:8]}"
            event = Event(name, client=executor)
            self.check = DaskStop(name)
            self._raise = event.set
            self._clear = event.clear  # a cleared Event without waiters is deleted from the scheduler
        elif isinstance(executor, concurrent.futures.ThreadPoolExecutor):
            event = threading.Event()  # same process: nothing is pickled
            self.check = event.is_set
            self._raise = event.set
        # Other executors (process pools): no flag; pending chunks are cancelled and small chunks bound the wait.

    def set(self) -> None:
        if self._raise is not None:
            try:
                self._raise()
            except Exception:  # a disconnected scheduler: its workers' chunks end with it
                logger.debug("could not set the stop flag", exc_info=True)

    def release_later(self) -> None:
        """Clear the flag once running chunks have had ``STOP_LINGER_SECONDS`` to see it.

        A set Dask Event stays on the scheduler until cleared. A cancelled Dask
        future reads as done while its task still runs on a worker, so nothing on
        the client says when the chunks have stopped: each polls the flag between
        ops (every ``DASK_STOP_POLL_SECONDS`` at most) and remembers it once seen,
        so the flag stays up for a time longer than an op and then goes, cleared
        by a timer off the job's path.
        """
        if self._clear is None:
            return
        clear = self._clear

        def release() -> None:
            try:
                clear()
            except Exception:  # the client or scheduler is gone: so is the flag
                logger.debug("could not clear the stop flag", exc_info=True)

        timer = threading.Timer(STOP_LINGER_SECONDS, release)
        timer.daemon = True
        timer.name = "gpu_provider-stop-release"
        timer.start()


def _is_worker_failure(exc: BaseException) -> bool:
    if isinstance(exc, (concurrent.futures.CancelledError, concurrent.futures.BrokenExecutor)):
        return True
    name = type(exc).__name__
    return name in ("KilledWorker", "FutureCancelledError", "CommClosedError") or name.endswith("CancelledError")


def run_chunks(
    executor: Any,
    experiments: Sequence[tuple[Program, RunConfig, int]],
    execution: Execution,
    device: str,
    device_id: int,
    max_job_size: Optional[int],
    job_id: str,
    batch_small_circuits: bool = True,
) -> list[ExperimentOutput]:
    """Run ``(program, config, ops)`` experiments on ``executor`` in chunks; the outputs in their order.

    Each finished chunk advances ``execution``'s progress by its ops. A cancel
    request on ``execution`` sets the job's stop flag, cancels every future and
    raises :class:`JobCancelledError`.

    Raises:
        ExecutorError: a worker died, a chunk was cancelled from outside, or the
            executor refused work or lost its connection (the cause is chained).
        GPUProviderError: a chunk failed as a local run would have (the same error).
    """
    count = len(experiments)
    chunks = split_chunks(count, worker_slots(executor), max_job_size)
    dask = is_dask_client(executor)
    stop = _Stop(executor, job_id)
    wake = threading.Event()
    futures: dict = {}
    outputs: list = [None] * count
    try:
        for number, indices in enumerate(chunks):
            execution.poll_cancel()
            payload = [(index, experiments[index][0], experiments[index][1]) for index in indices]
            args = (CHUNK_FUNCTION, payload, device, device_id, stop.check, batch_small_circuits)
            try:
                if dask:
                    future = executor.submit(*args, pure=False, key=f"gpu_provider-{job_id}-chunk-{number}")
                else:
                    future = executor.submit(*args)
            except Exception as exc:
                raise ExecutorError(
                    f"the executor {type(executor).__name__} refused chunk {number} of {len(chunks)}: {type(exc).__name__}: {exc}"
                ) from exc
            futures[future] = (number, indices)
            future.add_done_callback(lambda _future: wake.set())
        pending = set(futures)
        while pending:
            wake.wait(WAIT_POLL_SECONDS)
            wake.clear()
            execution.poll_cancel()
            if dask and getattr(executor, "status", "running") in ("closing", "closed"):
                raise ExecutorError(
                    f"the Dask client was closed while {len(pending)} of the job's {len(chunks)} chunks were unfinished"
                )
            for future in [f for f in pending if f.done()]:
                pending.discard(future)
                number, indices = futures[future]
                for index, output in _chunk_outputs(future, number, len(chunks), executor):
                    outputs[index] = output
                execution.advance(sum(experiments[index][2] for index in indices))
        return outputs
    except BaseException:
        stop.set()
        for future in futures:
            try:
                future.cancel()
            except Exception:
                logger.debug("cancelling a chunk's future failed", exc_info=True)
        stop.release_later()
        raise


def _chunk_outputs(future, number: int, total: int, executor) -> list:
    try:
        return future.result()
    except JobCancelledError as exc:
        # Only this job sets its stop flag, and only on its way out: a stop seen here came from elsewhere.
        raise ExecutorError(f"chunk {number} of {total} was stopped on its worker: {exc}") from exc
    except GPUProviderError:
        raise  # a simulation error: the job fails as a local run would
    except BaseException as exc:
        if _is_worker_failure(exc):
            raise ExecutorError(
                f"chunk {number} of {total} was lost on the executor {type(executor).__name__}: its worker died, "
                f"or the executor was shut down or cancelled it ({type(exc).__name__}: {exc}); the job is failed "
                "rather than left waiting: run it again"
            ) from exc
        raise ExecutorError(f"chunk {number} of {total} failed on the executor {type(executor).__name__}: {type(exc).__name__}: {exc}") from exc
