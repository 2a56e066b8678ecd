"""``GPUJob``: Qiskit's asynchronous job contract over an engine execution.

The status is derived, in one fixed order, from the events the execution
records on its device (CUDA events on the GPU, host events on the CPU):
cancelled, then the end event (done or error), then the start event (running),
else queued. Reading it never synchronizes or blocks.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Optional

from qiskit.providers import JobError, JobStatus, JobTimeoutError, JobV1
from qiskit.providers.jobstatus import JOB_FINAL_STATES

from .engine.executor import Execution, dispatcher_for

logger = logging.getLogger(__name__)

# How long cancel() waits for a running job to reach its next checkpoint.
CANCEL_WAIT_SECONDS = 60.0


class GPUJob(JobV1):
    """A simulation job on a :class:`~gpu_provider.GPUSimulator`.

    ``backend.run()`` returns it already submitted. ``status()`` answers at once,
    ``result(timeout)`` waits, ``cancel()`` stops it at its next checkpoint and
    ``progress()`` says how many ops have run.
    """

    _async = True

    def __init__(self, backend, job_id: str, execution: Execution, circuits=None, **kwargs) -> None:
        super().__init__(backend, job_id, **kwargs)
        self._execution = execution
        self._circuits = circuits
        self._submitted = False

    def submit(self) -> None:
        """Hand the job to its device's dispatcher; a job is submitted once only.

        Raises:
            JobError: if the job was already submitted.
        """
        if self._submitted:
            raise JobError(f"job {self.job_id()} has already been submitted; a job runs once, call backend.run() again")
        self._submitted = True
        dispatcher_for(self._execution.device).submit(self._execution)

    def status(self) -> JobStatus:
        """The job's state, read from its events without blocking."""
        execution = self._execution
        if not self._submitted:
            return JobStatus.INITIALIZING
        if execution.finished:
            if execution.cancelled:
                return JobStatus.CANCELLED
            return JobStatus.ERROR if execution.error is not None else JobStatus.DONE
        if execution.started:
            return JobStatus.RUNNING
        return JobStatus.QUEUED

    def result(self, timeout: Optional[float] = None):
        """Wait for the job and return its :class:`~qiskit.result.Result`.

        Args:
            timeout: seconds to wait; ``None`` waits for as long as it takes.

        Raises:
            JobTimeoutError: if the job is not finished within ``timeout`` (it keeps running).
            JobError: if the job was cancelled, or failed (the cause is chained).
        """
        if not self._submitted:
            raise JobError(f"job {self.job_id()} was never submitted; call submit() first")
        if not self._execution.wait(timeout):
            raise JobTimeoutError(f"job {self.job_id()} did not finish within {timeout} s; it is still {self.status().name}")
        execution = self._execution
        if execution.cancelled:
            raise JobError(f"job {self.job_id()} was cancelled, so it has no result")
        if execution.error is not None:
            raise JobError(f"job {self.job_id()} failed: {type(execution.error).__name__}: {execution.error}") from execution.error
        return execution.result

    def cancel(self) -> bool:
        """Cancel the job: a queued job never runs, a running one stops at its next checkpoint.

        Returns:
            True if the cancellation took effect, False if the job had already ended.
        """
        execution = self._execution
        if execution.finished:
            return False
        if execution.cancel_if_queued():
            self._submitted = True
            return True
        # Running: it stops at its next checkpoint (ops are finite, so this is short).
        execution.wait(timeout=CANCEL_WAIT_SECONDS)
        return execution.cancelled or not execution.finished

    def progress(self) -> tuple[int, int]:
        """``(ops_done, ops_total)`` as the job's checkpoint events record them."""
        return self._execution.progress()

    def wait_for_final_state(self, timeout: Optional[float] = None, wait: float = 5, callback: Optional[Callable] = None) -> None:
        """Wait until the job is DONE, ERROR or CANCELLED, querying every ``wait`` seconds.

        Args:
            timeout: seconds to wait for the job; ``None`` waits indefinitely.
            wait: seconds between queries (the wait ends early when the job ends).
            callback: called after each query that finds the job not yet final, as
                ``callback(job_id, status, job)`` (as Qiskit's ``JobV1``).

        Raises:
            JobTimeoutError: if the job does not reach a final state within ``timeout``.
        """
        if wait is None or wait <= 0:
            wait = 0.01
        start = time.monotonic()
        status = self.status()
        while status not in JOB_FINAL_STATES:
            elapsed = time.monotonic() - start
            if timeout is not None and elapsed >= timeout:
                raise JobTimeoutError(f"job {self.job_id()} did not reach a final state within {timeout} s; it is {status.name}")
            if callback is not None:
                callback(self.job_id(), status, self)
            pause = wait if timeout is None else min(wait, max(timeout - elapsed, 0.0))
            if not self._submitted:
                time.sleep(pause)
            else:
                self._execution.wait(pause)
            status = self.status()

    def circuits(self):
        """The circuits this job runs."""
        return self._circuits

    def error_message(self) -> Optional[str]:
        """Why the job failed, or None."""
        error = self._execution.error
        return None if error is None else f"{type(error).__name__}: {error}"

    def __reduce__(self):
        raise TypeError(
            "a GPUJob cannot be pickled: it is a handle on a simulation running in this process. "
            "Pickle its result (job.result()) or its backend (job.backend()) instead"
        )

    def __repr__(self) -> str:
        return f"<GPUJob {self.job_id()} on {self._execution.device.name}: {self.status().name}>"
