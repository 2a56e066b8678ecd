"""qBraid runtime provider: ``qbraid.runtime.load_provider("gpu_provider")``.

Registered under the ``qbraid.providers`` entry-point group. The provider's
devices, one per engine device (``gpu_provider_gpu``, ``gpu_provider_cpu``),
declare Qiskit's ``QuantumCircuit`` as their program type in a
``TargetProfile``, so qBraid's transpiler converts what it can (OpenQASM 2 and
3 strings, and the other program types it knows) into Qiskit circuits before
``submit``. A device runs them on a :class:`~gpu_provider.GPUSimulator`; its
jobs wrap the :class:`~gpu_provider.GPUJob`, so their status is read from the
same engine events (never blocking) and ``cancel`` stops the same execution.

Requires the ``qbraid`` extra (``pip install "gpu-provider[qbraid]"``).
"""

from __future__ import annotations

import logging
from typing import Any, Optional

from qbraid.programs import ExperimentType, ProgramSpec
from qbraid.runtime import (
    DeviceStatus,
    GateModelResultData,
    JobStatus,
    QuantumDevice,
    QuantumJob,
    QuantumProvider,
    Result,
    TargetProfile,
)
from qbraid.runtime.exceptions import JobStateError, ProgramValidationError, QbraidRuntimeError, ResourceNotFoundError
from qbraid.transpiler import Conversion, ConversionGraph, ConversionScheme
from qiskit import QuantumCircuit
from qiskit.providers import JobError, JobTimeoutError
from qiskit.providers import JobStatus as QiskitJobStatus

from .backend import GPUSimulator
from .engine.executor import dispatcher_for, max_qubits_for
from .engine.devices import PRECISIONS, probe_gpu, resolve_device
from .errors import GPUProviderError, InvalidInputError, InvalidOptionError
from .job import GPUJob

logger = logging.getLogger(__name__)

PROVIDER_NAME = "gpu_provider"
DEVICE_KINDS = {"gpu_provider_gpu": "GPU", "gpu_provider_cpu": "CPU"}

# One fixed mapping from the Qiskit job states GPUJob reports to qBraid's.
_STATUS = {
    QiskitJobStatus.INITIALIZING: JobStatus.INITIALIZING,
    QiskitJobStatus.QUEUED: JobStatus.QUEUED,
    QiskitJobStatus.VALIDATING: JobStatus.VALIDATING,
    QiskitJobStatus.RUNNING: JobStatus.RUNNING,
    QiskitJobStatus.CANCELLED: JobStatus.CANCELLED,
    QiskitJobStatus.DONE: JobStatus.COMPLETED,
    QiskitJobStatus.ERROR: JobStatus.FAILED,
}


class GPUQbraidProvider(QuantumProvider):
    """gpu_provider's devices for qBraid: the GPU and the CPU.

    Keyword arguments (``precision``, ``seed_simulator``, fusion options...) become
    default run options of every device's :class:`~gpu_provider.GPUSimulator`.
    """

    def __init__(self, **backend_options: Any) -> None:
        for key in backend_options:
            if key in ("device", "device_id"):
                raise ValueError(f"{key} is chosen by the device (get_device('gpu_provider_gpu' or 'gpu_provider_cpu')), not the provider")
        self._backend_options = backend_options
        GPUSimulator(device="CPU", **backend_options)  # validates the options now

    def get_devices(self, **kwargs) -> list["GPUQbraidDevice"]:
        """Both devices; ``status=DeviceStatus.ONLINE`` (or any profile field) filters them."""
        devices = [self.get_device(device_id) for device_id in DEVICE_KINDS]
        status = kwargs.pop("status", None)
        if status is not None:
            devices = [device for device in devices if device.status() == status]
        for key, value in kwargs.items():
            devices = [device for device in devices if device.profile.get(key) == value]
        return devices

    def get_device(self, device_id: str) -> "GPUQbraidDevice":
        if device_id not in DEVICE_KINDS:
            raise ResourceNotFoundError(f"no device {device_id!r}; gpu_provider's devices are {sorted(DEVICE_KINDS)}")
        return GPUQbraidDevice(self._profile(device_id), self._backend_options)

    def _profile(self, device_id: str) -> TargetProfile:
        kind = DEVICE_KINDS[device_id]
        try:
            device, _ = resolve_device(kind, 0)
            precision = self._backend_options.get("precision", "double")
            num_qubits: Optional[int] = max_qubits_for(device, PRECISIONS[precision]().itemsize)
        except GPUProviderError:  # no usable GPU: the device exists but reports UNAVAILABLE
            num_qubits = None
        return TargetProfile(
            device_id=device_id,
            simulator=True,
            experiment_type=ExperimentType.GATE_MODEL,
            num_qubits=num_qubits,
            program_spec=ProgramSpec(QuantumCircuit, alias="qiskit"),
            provider_name=PROVIDER_NAME,
        )

    def __hash__(self) -> int:
        return hash(type(self))


class GPUQbraidDevice(QuantumDevice):
    """One gpu_provider device (GPU or CPU) as a qBraid ``QuantumDevice``."""

    def __init__(self, profile: TargetProfile, backend_options: Optional[dict] = None) -> None:
        super().__init__(profile=profile, scheme=ConversionScheme(conversion_graph=_conversion_graph()))
        self._backend = GPUSimulator(device=DEVICE_KINDS[profile.device_id], **(backend_options or {}))

    def status(self) -> DeviceStatus:
        """ONLINE for the CPU; for the GPU, ONLINE only where one is usable (probed once, cached)."""
        if DEVICE_KINDS[self.id] == "GPU" and not probe_gpu().usable:
            return DeviceStatus.UNAVAILABLE
        return DeviceStatus.ONLINE

    def queue_depth(self) -> int:
        """Jobs of this process waiting to start on this device (admission waits for memory).

        Raises:
            ResourceNotFoundError: the GPU device where no GPU is usable.
        """
        try:
            device, _ = resolve_device(DEVICE_KINDS[self.id], 0)
        except GPUProviderError as exc:
            raise ResourceNotFoundError(f"{self.id} has no queue: {exc}") from exc
        return dispatcher_for(device).queued()

    def submit(self, run_input, shots: Optional[int] = None, **options: Any):
        """Run Qiskit circuit(s); one :class:`GPUQbraidJob` per circuit.

        Raises:
            ProgramValidationError: a circuit the simulator cannot run (the cause is chained).
            ValueError: an option value out of range (shots, precision...).
        """
        circuits = run_input if isinstance(run_input, list) else [run_input]
        if shots is not None:
            options["shots"] = shots
        jobs = []
        for circuit in circuits:
            try:
                gpu_job = self._backend.run(measure_if_unmeasured(circuit), **options)
            except InvalidOptionError:
                raise
            except InvalidInputError as exc:
                raise ProgramValidationError(f"{self.id} cannot run circuit {getattr(circuit, 'name', '')!r}: {exc}") from exc
            jobs.append(GPUQbraidJob(gpu_job.job_id(), job=gpu_job, device=self))
        return jobs if isinstance(run_input, list) else jobs[0]


def measure_if_unmeasured(circuit: QuantumCircuit) -> QuantumCircuit:
    """``circuit`` with every qubit measured when it measures none, as Braket's simulators and
    qBraid's own treat a program without measurements (a Braket circuit converted by qBraid arrives
    so: its implicit final measurement is not written, only its bit register). Classical bits
    that nothing writes or reads are dropped, so the counts hold one bit per qubit."""
    if not isinstance(circuit, QuantumCircuit) or circuit.num_qubits == 0 or _measures(circuit.data):
        return circuit
    if any(instruction.clbits or instruction.operation.name in _CONTROL_FLOW for instruction in circuit.data):
        return circuit  # its classical bits are in use (a condition, a store): leave it as written
    measured = QuantumCircuit(name=circuit.name, global_phase=circuit.global_phase, metadata=circuit.metadata)
    measured.add_bits(circuit.qubits)
    for register in circuit.qregs:
        measured.add_register(register)
    for instruction in circuit.data:
        measured.append(instruction.operation, instruction.qubits)
    measured.measure_all()
    return measured


_CONTROL_FLOW = frozenset(("if_else", "while_loop", "for_loop", "switch_case", "box", "store"))


def _measures(data) -> bool:
    for instruction in data:
        operation = instruction.operation
        if operation.name == "measure":
            return True
        if any(_measures(block.data) for block in getattr(operation, "blocks", ())):
            return True
    return False


def _qasm2_to_qiskit(source: str) -> QuantumCircuit:
    from .cli import load_qasm

    return load_qasm(source, "an OpenQASM 2 program")


def _conversion_graph() -> ConversionGraph:
    """qBraid's own conversion graph, plus OpenQASM 2 -> Qiskit where qBraid lacks it.

    Some qBraid releases register no ``qasm2 -> qiskit`` conversion unless optional
    packages are installed; the project's OpenQASM loader (Qiskit's parsers) fills it.
    """
    graph = ConversionGraph(include_isolated=True)
    if not graph.has_edge("qasm2", "qiskit"):
        graph.add_conversion(Conversion("qasm2", "qiskit", _qasm2_to_qiskit))
    return graph


class GPUQbraidJob(QuantumJob):
    """A qBraid job over a :class:`~gpu_provider.GPUJob`: status from the engine's events."""

    def __init__(self, job_id: str, job: Optional[GPUJob] = None, device: Optional[GPUQbraidDevice] = None, **kwargs) -> None:
        super().__init__(job_id, device=device, **kwargs)
        if job is None:
            raise ResourceNotFoundError(f"job {job_id} cannot be loaded by id: gpu_provider jobs live in the process that ran them")
        self._job = job

    def status(self) -> JobStatus:
        """The job's state, read without blocking."""
        status = _STATUS[self._job.status()]
        self._cache_metadata["status"] = status
        return status

    def cancel(self) -> None:
        """Cancel: a queued job never runs, a running one stops at its next checkpoint.

        Raises:
            JobStateError: the job already reached a terminal state.
        """
        if self.status() in JobStatus.terminal_states():
            raise JobStateError(f"cannot cancel job {self.id}: it is already {self.status().name}")
        if not self._job.cancel() and self.status() != JobStatus.CANCELLED:
            raise QbraidRuntimeError(f"failed to cancel job {self.id}; it is {self.status().name}")

    def result(self, timeout: Optional[float] = None) -> Result:
        """Wait for the job (up to ``timeout`` seconds) and return its qBraid ``Result``.

        A cancelled or failed job gives ``success=False`` with the reason in ``details``.

        Raises:
            TimeoutError: the job did not finish in time (it keeps running).
        """
        try:
            qiskit_result = self._job.result(timeout=timeout)
        except JobTimeoutError as exc:
            raise TimeoutError(str(exc)) from exc
        except JobError as exc:
            return Result(device_id=self._device_id(), job_id=self.id, success=False, data=GateModelResultData(), status=self.status(), error=str(exc))
        # One experiment per circuit, or one per position of parameter_binds: a list of each then,
        # as qBraid's own Qiskit result builder gives. Bits are in Qiskit's order (qubit 0 rightmost).
        experiments = range(len(qiskit_result.results))
        counts = [{key.replace(" ", ""): value for key, value in qiskit_result.get_counts(i).items()} for i in experiments]
        measurements = None
        if all(getattr(experiment.data, "memory", None) is not None for experiment in qiskit_result.results):
            import numpy as np

            measurements = [
                np.array([[int(bit) for bit in bits.replace(" ", "")] for bits in qiskit_result.get_memory(i)], dtype=np.int8).reshape(
                    len(qiskit_result.get_memory(i)), -1
                )
                for i in experiments
            ]
        single = len(counts) == 1
        metadata = dict(qiskit_result.results[0].metadata) if single else {"experiments": [dict(e.metadata) for e in qiskit_result.results]}
        return Result(
            device_id=self._device_id(),
            job_id=self.id,
            success=True,
            data=GateModelResultData(
                measurement_counts=counts[0] if single else counts,
                measurements=(measurements[0] if single else measurements) if measurements is not None else None,
            ),
            status=self.status(),
            metadata=metadata,
        )

    def _device_id(self) -> str:
        return self._device.id if self._device is not None else PROVIDER_NAME

    def progress(self) -> tuple[int, int]:
        """``(ops_done, ops_total)``, as :meth:`GPUJob.progress`."""
        return self._job.progress()
