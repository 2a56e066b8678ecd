"""The typed errors of gpu_provider.

This module imports nothing from Qiskit so the engine can raise these too. Each
error also derives from the built-in exception a caller would naturally catch
(``ValueError``, ``MemoryError``, ``RuntimeError``), and every message says what
was wrong and what to do about it.
"""

from __future__ import annotations


def _rebuild(cls, args: tuple, state: dict):
    """Unpickle an error whose ``__init__`` takes keyword-only arguments (sent back by an executor's worker)."""
    error = BaseException.__new__(cls, *args)  # MemoryError's own __new__ refuses subclasses here
    error.args = args
    error.__dict__.update(state)
    return error


class GPUProviderError(Exception):
    """Base class of every error raised by gpu_provider."""

    def __reduce__(self):
        # The default reduction calls ``cls(*args)``, which loses (or fails on) keyword-only
        # attributes; a job run on an executor gets its workers' errors back through pickle.
        return (_rebuild, (type(self), self.args, dict(self.__dict__)))


class InvalidInputError(GPUProviderError, ValueError):
    """A circuit, option or value handed to the simulator is not valid."""


class InvalidOptionError(InvalidInputError):
    """A run or backend option has a value the simulator does not accept."""


class UnknownOptionError(GPUProviderError, AttributeError):
    """``set_options`` was given a field that is not an option (``AttributeError``, as BackendV2 specifies)."""


class UnboundParameterError(InvalidInputError):
    """The circuit still holds unbound Parameters."""


class UnsupportedInstructionError(InvalidInputError):
    """An instruction has neither a matrix, a known meaning nor a definition."""


class CircuitTooLargeError(GPUProviderError, MemoryError):
    """The state of the circuit does not fit in the memory of the chosen device."""

    def __init__(self, message: str, *, num_qubits: int, bytes_needed: int, bytes_free: int):
        super().__init__(message)
        self.num_qubits = num_qubits
        self.bytes_needed = bytes_needed
        self.bytes_free = bytes_free


class DeviceUnavailableError(GPUProviderError, RuntimeError):
    """The device that was asked for cannot be used here; ``reason`` says why."""

    def __init__(self, message: str, *, reason: str = ""):
        super().__init__(message)
        self.reason = reason


class SimulationError(GPUProviderError, RuntimeError):
    """Simulation failed while a job was running."""


class IterationLimitError(SimulationError):
    """A classical loop ran more iterations than ``max_loop_iterations`` allows."""


class ExecutorError(GPUProviderError, RuntimeError):
    """A job run on an executor (``executor=`` option) lost its workers: one died, was
    cancelled from outside, or the executor was shut down or disconnected. The cause is chained."""


class JobCancelledError(GPUProviderError):
    """Raised inside an execution when its job was cancelled (internal signal)."""


class DistributedError(SimulationError):
    """A rank of a distributed (MPI) job failed or disagreed, so every rank stopped; ``rank`` says which."""

    def __init__(self, message: str, *, rank: int = -1):
        super().__init__(message)
        self.rank = rank
