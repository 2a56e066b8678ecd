"""gpu_provider: an exact statevector simulator for Qiskit, on NVIDIA GPUs or NumPy.

>>> from gpu_provider import GPUProvider
>>> backend = GPUProvider().get_backend("gpu_simulator")
>>> counts = backend.run(circuit, shots=1000).result().get_counts()
>>> from gpu_provider import EstimatorV2
>>> evs = EstimatorV2().run([(circuit, observables, parameter_values)]).result()[0].data.evs

Importing the package touches no CUDA: the GPU is probed lazily on first use.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .errors import (  # noqa: E402
    CircuitTooLargeError,
    DeviceUnavailableError,
    ExecutorError,
    GPUProviderError,
    InvalidInputError,
    InvalidOptionError,
    IterationLimitError,
    SimulationError,
    UnboundParameterError,
    UnknownOptionError,
    UnsupportedInstructionError,
)


def __getattr__(name: str):
    # The Qiskit front end loads on first use, so ``import gpu_provider.engine`` stays Qiskit-free.
    if name in ("GPUProvider",):
        from .provider import GPUProvider

        return GPUProvider
    if name in ("GPUSimulator",):
        from .backend import GPUSimulator

        return GPUSimulator
    if name in ("GPUJob",):
        from .job import GPUJob

        return GPUJob
    if name in ("EstimatorV2", "SamplerV2", "GPUPrimitiveJob"):
        from . import primitives

        return getattr(primitives, name)
    raise AttributeError(f"module 'gpu_provider' has no attribute {name!r}")


__all__ = [
    "GPUProvider",
    "GPUSimulator",
    "GPUJob",
    "EstimatorV2",
    "SamplerV2",
    "GPUPrimitiveJob",
    "GPUProviderError",
    "InvalidInputError",
    "InvalidOptionError",
    "UnboundParameterError",
    "UnknownOptionError",
    "UnsupportedInstructionError",
    "CircuitTooLargeError",
    "DeviceUnavailableError",
    "ExecutorError",
    "SimulationError",
    "IterationLimitError",
    "__version__",
]
