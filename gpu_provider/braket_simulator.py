"""Amazon Braket local simulator: ``LocalSimulator("gpu_provider")``.

Registered under the ``braket.simulators`` entry-point group. Braket hands its
simulators OpenQASM 3 (a Braket ``Circuit`` arrives serialized that way). The
program is parsed by Braket's own OpenQASM 3 interpreter, the one ``braket_sv``
uses, so every Braket gate, modifier, pragma and input means exactly what it
means there; its gate operations (matrices on targets) become an engine
``Program``, which is fused and run by the same engine as the Qiskit backend.
With ``shots=0`` the result types are computed exactly from the final state on
its device (:mod:`gpu_provider.engine.observables`); with ``shots>0`` the
measurements are sampled from it and the SDK derives the result types from
them, as it does for ``braket_sv``.

Braket qubit ``b`` of ``n`` (after Braket's compaction of the qubits used) is
engine qubit ``n - 1 - b``, so a Braket state index, with qubit 0 the most
significant bit, equals the engine's index.

Requires the ``braket`` extra (``pip install "gpu-provider[braket]"``).
"""

from __future__ import annotations

import logging
import time
import uuid
import warnings
from datetime import datetime, timezone
from typing import Any

import numpy as np
from braket.default_simulator.openqasm.program_context import ProgramContext
from braket.default_simulator.operation import GateOperation
from braket.default_simulator.simulator import OpenQASMSimulator
from braket.device_schema.simulators import GateModelSimulatorDeviceCapabilities, GateModelSimulatorDeviceParameters
from braket.ir.openqasm import Program as OpenQASMProgram
from braket.task_result import AdditionalMetadata, GateModelTaskResult, ResultTypeValue, TaskMetadata

from . import __version__
from .compiler.fusion import DEFAULT_FUSION_THRESHOLD, fuse
from .engine.devices import PRECISIONS, check_device_option, resolve_device, state_bytes
from .engine.executor import Execution, RunConfig, dispatcher_for, final_state, max_qubits_for, memory_needed, sample_outcomes
from .engine.observables import amplitudes, marginal_probabilities, tensor_expectation
from .engine.program import Diagonal, GlobalPhase, Program, Unitary
from .errors import GPUProviderError

logger = logging.getLogger(__name__)

BRAKET_GROUP = "braket.simulators"
DEVICE_ID = "gpu_provider"
MAX_SHOTS = 10**9
_OPTIONS = ("device", "device_id", "precision", "seed", "fusion_enable")

GATES = [
    "U", "GPhase", "ccnot", "cnot", "cphaseshift", "cphaseshift00", "cphaseshift01", "cphaseshift10",
    "cswap", "cv", "cy", "cz", "ecr", "gpi", "gpi2", "h", "i", "iswap", "ms", "pswap", "phaseshift",
    "prx", "rx", "ry", "rz", "s", "si", "swap", "t", "ti", "unitary", "v", "vi", "x", "xx", "xy",
    "y", "yy", "z", "zz",
]  # fmt: skip
OBSERVABLES = ["x", "y", "z", "h", "i", "hermitian"]
_SHOTS_ONLY = ("Sample",)
_EXACT_ONLY = ("StateVector", "Amplitude")
RESULT_TYPES = ["Sample", "Expectation", "Variance", "Probability", "StateVector", "Amplitude"]

_PAULI = {
    "x": np.array([[0, 1], [1, 0]], dtype=complex),
    "y": np.array([[0, -1j], [1j, 0]], dtype=complex),
    "z": np.diag([1.0, -1.0]).astype(complex),
    "h": np.array([[1, 1], [1, -1]], dtype=complex) / np.sqrt(2),
    "i": np.eye(2, dtype=complex),
}


class _MeasureAtEndContext(ProgramContext):
    """Braket's program context, refusing measurements whose result is used mid-program.

    This simulator samples every measurement from the final state, so a program
    that reads a measured bit, or acts on a measured qubit, is rejected rather
    than simulated wrongly.
    """

    def _apply_pending_mcm_targets(self) -> None:
        if self._pending_mcm_targets:
            raise ValueError(
                "gpu_provider's Braket simulator measures at the end of the program only; this program "
                "uses a measurement result, or acts on a measured qubit, before the end. Move the "
                "measurements to the end, or run it on LocalSimulator('braket_sv')"
            )
        super()._apply_pending_mcm_targets()


class GPUBraketSimulator(OpenQASMSimulator):
    """Braket local simulator over gpu_provider's engine (NVIDIA GPU through CuPy, or NumPy).

    Args:
        device: "auto" (a usable GPU, else the CPU), "GPU" or "CPU".
        device_id: which GPU.
        precision: "double" (complex128) or "single" (complex64).

    ``run(program, shots=N, device=..., precision=..., seed=...)`` overrides them per run;
    ``LocalSimulator("gpu_provider").run(circuit, shots=N, precision="single")`` passes them through.
    """

    DEVICE_ID = DEVICE_ID

    def __init__(self, device: str = "auto", device_id: int = 0, precision: str = "double") -> None:
        self._options = {"device": device, "device_id": device_id, "precision": precision, "seed": None, "fusion_enable": True}
        _check_options(self._options)

    def create_program_context(self) -> ProgramContext:
        return _MeasureAtEndContext()

    # -- run --------------------------------------------------------------------

    def run(self, circuit_ir: OpenQASMProgram, shots: int = 0, **options: Any) -> GateModelTaskResult:
        """Simulate an OpenQASM 3 program; returns a ``GateModelTaskResult``.

        Raises:
            TypeError: a program that is not OpenQASM, an unsupported instruction or result type.
            ValueError: shots out of range, a program that does not parse, result types that do
                not fit the shots, a measurement used mid-program.
            NameError: an ``input`` without a value.
            gpu_provider errors: ``device="GPU"`` without a usable GPU, a state too large.
        """
        if not isinstance(circuit_ir, OpenQASMProgram):
            raise TypeError(
                f"gpu_provider's Braket simulator runs OpenQASM 3 programs (braket.ir.openqasm.Program) and "
                f"Braket Circuits, not {type(circuit_ir).__name__}"
            )
        if not isinstance(shots, (int, np.integer)) or isinstance(shots, bool) or not 0 <= shots <= MAX_SHOTS:
            raise ValueError(f"shots must be an integer from 0 to {MAX_SHOTS:,}, not {shots!r}")
        run_options = dict(self._options)
        for key, value in options.items():
            if key in _OPTIONS:
                run_options[key] = value
            else:
                warnings.warn(f"Option {key} is not used by {type(self).__name__}", UserWarning, stacklevel=2)
        _check_options(run_options)
        created_at = _timestamp()

        circuit = self._parse(circuit_ir)
        circuit.validate_single_measured_register()
        qubit_map = {q: i for i, q in enumerate(sorted(circuit.qubit_set))}
        num_qubits = len(qubit_map)
        measured_qubits = circuit.measured_qubits
        for result in circuit.results:  # as braket_sv does: result targets in compact qubits
            if getattr(result, "targets", None):
                result.targets = [qubit_map[q] for q in result.targets]
        _check_result_types(circuit.results, shots, num_qubits)

        ops = _engine_ops(circuit.instructions, qubit_map, num_qubits)
        if shots and circuit.results:
            # Observables measured by sampling: rotate into their eigenbasis first.
            ops += _engine_ops(circuit.basis_rotation_instructions, {q: q for q in range(num_qubits)}, num_qubits)
        device, fallback_reason = resolve_device(run_options["device"], run_options["device_id"])
        if fallback_reason:
            logger.info("gpu_provider Braket simulator runs on the CPU: %s", fallback_reason)
        # The state, its scratch buffer and, for exact result types, the probabilities: fail before running.
        device.check_fits(num_qubits, np.dtype(PRECISIONS[run_options["precision"]]).itemsize, arrays=2 if shots else 3)
        program = Program(num_qubits, 0, tuple(ops), name="braket")
        if run_options["fusion_enable"]:
            program = fuse(program, device.kind, None, DEFAULT_FUSION_THRESHOLD, precision=run_options["precision"])
        seed = run_options["seed"]
        if seed is None:
            seed = int(np.random.default_rng().integers(0, 2**31 - 1))
        config = RunConfig(shots=max(shots, 1), seed=seed, precision=run_options["precision"])
        columns = [qubit_map[q] for q in measured_qubits] if measured_qubits else list(range(num_qubits))

        def simulate(execution: Execution):
            start = time.perf_counter()
            state = final_state(program, device, config, execution)
            if shots:
                engine_qubits = [num_qubits - 1 - b for b in columns]
                outcomes = np.concatenate(list(sample_outcomes(state, engine_qubits, shots, np.random.default_rng(seed), execution)))
                values = ((outcomes[:, None] >> np.arange(len(columns))) & 1).astype(int)
            else:
                values = [ResultTypeValue.construct(type=rt, value=_exact_value(state, rt, num_qubits)) for rt in circuit.results]
            return values, time.perf_counter() - start

        # Through the device's dispatcher, so admission control counts this run beside
        # the backend's jobs (exact result types also hold a probabilities array).
        itemsize = np.dtype(PRECISIONS[run_options["precision"]]).itemsize
        reserve = memory_needed(program, config, device) + (0 if shots else state_bytes(num_qubits, itemsize))
        execution = Execution(device, max(program.num_ops, 1), simulate, reserve_bytes=reserve, num_qubits=num_qubits)
        dispatcher_for(device).submit(execution)
        execution.wait()  # Braket's local run is synchronous
        if execution.error is not None:
            raise execution.error
        values, seconds = execution.result
        logger.debug("ran %d qubits on %s (%s) in %.3f s", num_qubits, device.name, run_options["precision"], seconds)
        fields = dict(
            taskMetadata=TaskMetadata(id=str(uuid.uuid4()), shots=shots, deviceId=DEVICE_ID, createdAt=created_at, endedAt=_timestamp()),
            additionalMetadata=AdditionalMetadata(action=circuit_ir),
            measuredQubits=measured_qubits or list(range(num_qubits)),
        )
        if shots:
            return GateModelTaskResult.construct(resultTypes=circuit.results, measurements=values.tolist(), **fields)
        return GateModelTaskResult.construct(resultTypes=values, **fields)

    def _parse(self, circuit_ir: OpenQASMProgram):
        try:
            context = self.parse_program(circuit_ir)
            return context.circuit
        except (TypeError, NameError):
            raise
        except ValueError as exc:
            raise ValueError(f"gpu_provider cannot run this OpenQASM program: {exc}") from exc
        except Exception as exc:  # the parser raises several types; Braket users catch ValueError
            raise ValueError(f"could not parse the OpenQASM 3 program: {type(exc).__name__}: {exc}") from exc

    # -- properties ---------------------------------------------------------------

    @property
    def properties(self) -> GateModelSimulatorDeviceCapabilities:
        """Supported operations, modifiers, result types and the qubit count of the device."""

        try:
            device, _ = resolve_device(self._options["device"], self._options["device_id"])
            qubits = max_qubits_for(device, np.dtype(PRECISIONS[self._options["precision"]]).itemsize)
        except GPUProviderError:
            qubits = 0
        result_types = [
            {"name": "Sample", "observables": OBSERVABLES, "minShots": 1, "maxShots": MAX_SHOTS},
            {"name": "Expectation", "observables": OBSERVABLES, "minShots": 0, "maxShots": MAX_SHOTS},
            {"name": "Variance", "observables": OBSERVABLES, "minShots": 0, "maxShots": MAX_SHOTS},
            {"name": "Probability", "minShots": 0, "maxShots": MAX_SHOTS},
            {"name": "StateVector", "minShots": 0, "maxShots": 0},
            {"name": "Amplitude", "minShots": 0, "maxShots": 0},
        ]
        return GateModelSimulatorDeviceCapabilities.parse_obj(
            {
                "service": {
                    "executionWindows": [{"executionDay": "Everyday", "windowStartHour": "00:00", "windowEndHour": "23:59:59"}],
                    "shotsRange": [0, MAX_SHOTS],
                },
                "action": {
                    "braket.ir.openqasm.program": {
                        "actionType": "braket.ir.openqasm.program",
                        "version": ["1"],
                        "supportedOperations": GATES,
                        "supportedModifiers": [
                            {"name": "ctrl"},
                            {"name": "negctrl"},
                            {"name": "pow", "exponent_types": ["int", "float"]},
                            {"name": "inv"},
                        ],
                        "supportedPragmas": [
                            "braket_unitary_matrix",
                            "braket_result_type_sample",
                            "braket_result_type_expectation",
                            "braket_result_type_variance",
                            "braket_result_type_probability",
                            "braket_result_type_state_vector",
                            "braket_result_type_amplitude",
                        ],
                        "forbiddenPragmas": [
                            "braket_noise_amplitude_damping", "braket_noise_bit_flip", "braket_noise_depolarizing",
                            "braket_noise_kraus", "braket_noise_pauli_channel", "braket_noise_generalized_amplitude_damping",
                            "braket_noise_phase_flip", "braket_noise_phase_damping", "braket_noise_two_qubit_dephasing",
                            "braket_noise_two_qubit_depolarizing", "braket_result_type_density_matrix",
                            "braket_result_type_adjoint_gradient",
                        ],  # fmt: skip
                        "supportedResultTypes": result_types,
                        "supportPhysicalQubits": False,
                        "supportsPartialVerbatimBox": False,
                        "requiresContiguousQubitIndices": False,
                        "requiresAllQubitsMeasurement": False,
                        "supportsUnassignedMeasurements": True,
                        "disabledQubitRewiringSupported": False,
                    },
                },
                "paradigm": {"qubitCount": qubits},
                "deviceParameters": GateModelSimulatorDeviceParameters.schema(),
            }
        )

    def __repr__(self) -> str:
        return f"GPUBraketSimulator(device={self._options['device']!r}, precision={self._options['precision']!r}, version={__version__!r})"


# ---------------------------------------------------------------------------
# helpers


def _timestamp() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _check_options(options: dict) -> None:
    if options["precision"] not in PRECISIONS:
        raise ValueError(f"precision must be one of {tuple(PRECISIONS)}, not {options['precision']!r}")
    check_device_option(options["device"], options["device_id"])
    seed = options["seed"]
    if seed is not None and (not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0):
        raise ValueError(f"seed must be a non-negative integer or None, not {seed!r}")


def _check_result_types(results, shots: int, num_qubits: int) -> None:
    for result in results:
        name = type(result).__name__
        if name not in RESULT_TYPES:
            raise TypeError(f"result type {name} is not supported by gpu_provider; it supports {', '.join(RESULT_TYPES)}")
    if not shots:
        if not results:
            raise ValueError("Result types must be specified in the program when shots=0 (or run with shots>0)")
        for result in results:
            name = type(result).__name__
            if name in _SHOTS_ONLY:
                raise ValueError("sample can only be specified when shots>0")
            if name == "Amplitude":
                for bits in result.states:
                    if len(bits) != num_qubits:
                        raise ValueError(f"Length of state {bits} for result type amplitude must be equivalent to number of qubits {num_qubits} in circuit")
    else:
        for result in results:
            if type(result).__name__ in _EXACT_ONLY:
                raise ValueError("statevector and amplitude result types are not available when shots>0; run with shots=0")
    for result in results:
        targets = getattr(result, "targets", None)
        if targets and max(targets) >= num_qubits:
            raise ValueError(f"result type {type(result).__name__} references qubits {targets} outside the program's {num_qubits}")


def _engine_ops(instructions, qubit_map: dict, num_qubits: int) -> list:
    """Braket gate operations (matrix on targets, controls first) as engine ops."""

    def engine(qubit: int) -> int:
        return num_qubits - 1 - qubit_map[qubit]

    ops: list = []
    for op in instructions:
        kind = type(op).__name__
        if kind in ("Reset", "Projection") or not isinstance(op, GateOperation):
            raise TypeError(
                f"instruction {kind.lower()} is not supported by gpu_provider's Braket simulator (a pure "
                "state-vector simulator of unitary gates); use LocalSimulator('braket_dm') for noise"
            )
        for name in ("_angle", "_angle_1", "_angle_2", "_angle_3"):
            value = getattr(op, name, None)
            if value is not None:
                try:
                    float(value)
                except TypeError:
                    missing = value.free_symbols.pop()
                    raise NameError(f"Missing input variable '{missing}'.") from None
        num_controls = len(op.control_state)
        controls = tuple(engine(q) for q in op.targets[:num_controls])
        ctrl_state = sum(int(bit) << i for i, bit in enumerate(op.control_state))
        if kind == "GPhase":
            phase = float(np.angle(op.matrix[0, 0]))
            if controls:  # a phase on the controls' state: a diagonal on the control qubits
                diagonal = np.ones(1 << num_controls, dtype=complex)
                diagonal[ctrl_state] = np.exp(1j * phase)
                ops.append(Diagonal(controls, diagonal, label="gphase"))
            else:
                ops.append(GlobalPhase(phase))
            continue
        matrix = np.asarray(op.matrix, dtype=complex)
        targets = tuple(engine(q) for q in reversed(op.targets[num_controls:]))  # Braket: first target is the high bit
        if matrix.shape != (1 << len(targets),) * 2 or not np.all(np.isfinite(matrix)):
            raise ValueError(f"{kind} on qubits {op.targets} has a matrix of shape {matrix.shape} or non-finite entries")
        if not np.allclose(matrix @ matrix.conj().T, np.eye(matrix.shape[0]), atol=1e-8):
            raise ValueError(f"{kind} on qubits {op.targets} is not unitary")
        if not controls and np.count_nonzero(matrix - np.diag(np.diagonal(matrix))) == 0:
            ops.append(Diagonal(targets, np.diagonal(matrix).copy(), label=kind.lower()))  # one in-place pass, fuses as such
        else:
            ops.append(Unitary(targets, matrix, controls=controls, ctrl_state=ctrl_state, label=kind.lower()))
    return ops


def _factors(observable, targets, num_qubits: int) -> list:
    """A Braket observable (jaqcd form: names and matrices of [re, im]) as engine ``(qubits, matrix)`` factors."""
    targets = list(targets)
    factors = []
    position = 0
    for item in observable:
        if isinstance(item, str):
            matrix = _PAULI[item]
        else:
            matrix = np.array([[complex(re, im) for re, im in row] for row in item])
        width = int(round(np.log2(matrix.shape[0])))
        qubits = targets[position : position + width]
        position += width
        if len(qubits) != width:
            raise ValueError(f"the observable {observable} needs more targets than {targets}")
        factors.append((tuple(num_qubits - 1 - q for q in reversed(qubits)), matrix))
    return factors


def _exact_value(state, result, num_qubits: int):
    name = type(result).__name__
    if name in ("Expectation", "Variance"):
        pick = 0 if name == "Expectation" else 1
        if result.targets is None:  # a one-qubit observable on every qubit: one value each
            return [tensor_expectation(state, _factors(result.observable, [q], num_qubits))[pick] for q in range(num_qubits)]
        return tensor_expectation(state, _factors(result.observable, result.targets, num_qubits))[pick]
    if name == "Probability":
        targets = result.targets if result.targets else list(range(num_qubits))
        return marginal_probabilities(state, [num_qubits - 1 - q for q in reversed(targets)])
    if name == "StateVector":
        return state.to_host().astype(np.complex128)
    if name == "Amplitude":
        values = amplitudes(state, [int(bits, 2) for bits in result.states])
        return {bits: complex(value) for bits, value in zip(result.states, values)}
    raise TypeError(f"result type {name} is not supported by gpu_provider")
