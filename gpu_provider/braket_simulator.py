"""Amazon Braket local simulator: ``LocalSimulator("gpu_provider")``.

Registered under the ``braket.simulators`` entry-point group. It is a Braket
``BaseLocalSimulator``, as ``braket_sv`` is, so Braket's own code takes every
kind of program Braket hands its simulators: OpenQASM 3 (a Braket ``Circuit``
arrives serialized that way), JAQCD programs and program sets. Braket parses,
validates against :attr:`GPUBraketSimulator.properties`, maps qubits, splits
shots into paths at mid-circuit measurements and lays results out, exactly as
for ``braket_sv``. What reaches the simulator, gate operations (a matrix on
targets) plus Braket's ``Projection`` (a branch's measurement outcome) and
``Reset``, becomes an engine ``Program``, fused and run by the same engine as
the Qiskit backend, on the GPU or the CPU (:class:`_EngineSimulation`). With
``shots=0`` the result types are computed exactly from the final state on its
device (:mod:`gpu_provider.engine.observables`); with ``shots>0`` measurements
are sampled from it and the SDK derives the result types from them.

Braket qubit ``b`` of ``n`` (after Braket's compaction of the qubits used) is
engine qubit ``n - 1 - b``, so a Braket state index, with qubit 0 the most
significant bit, equals the engine's index.

Requires the ``braket`` extra (``pip install "gpu-provider[braket]"``).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
from braket.default_simulator.gate_operations import Projection, Reset
from braket.default_simulator.operation import GateOperation
from braket.default_simulator.result_types import TargetedResultType
from braket.default_simulator.simulation import Simulation
from braket.default_simulator.simulator import BaseLocalSimulator
from braket.device_schema import DeviceActionType
from braket.device_schema.simulators import GateModelSimulatorDeviceCapabilities, GateModelSimulatorDeviceParameters
from braket.ir.jaqcd import Program as JaqcdProgram
from braket.ir.openqasm import Program as OpenQASMProgram
from braket.ir.openqasm import ProgramSet
from braket.task_result import GateModelTaskResult, ResultTypeValue

from . import __version__
from .compiler.fusion import DEFAULT_FUSION_THRESHOLD, fuse
from .engine.devices import PRECISIONS, Device, check_device_option, resolve_device, state_bytes, too_large_error
from .engine.executor import (
    Execution,
    RunConfig,
    dispatcher_for,
    kernels_cover,
    max_qubits_for,
    memory_needed,
    need_detail,
    new_state,
    run_ops,
    sample_outcomes,
    state_arrays,
)
from .engine.observables import (
    DENSITY_MATRIX_COPIES,
    amplitudes,
    density_matrix_arrays,
    marginal_probabilities,
    reduced_density_matrix,
    tensor_expectation,
)
from .engine.program import Diagonal, GlobalPhase, Program, Unitary
from .engine.statevector import StateVector
from .errors import GPUProviderError, SimulationError

logger = logging.getLogger(__name__)

BRAKET_GROUP = "braket.simulators"
DEVICE_ID = "gpu_provider"
MAX_SHOTS = 10**9
_OPTIONS = ("device", "device_id", "precision", "seed", "fusion_enable")
# Braket's program-set limits, as braket_sv declares them.
MAX_EXECUTABLES = 100
MAX_PROGRAM_SET_SHOTS = 200_000

JAQCD_GATES = [
    "ccnot", "cnot", "cphaseshift", "cphaseshift00", "cphaseshift01", "cphaseshift10", "cswap", "cv", "cy",
    "cz", "ecr", "h", "i", "iswap", "pswap", "phaseshift", "rx", "ry", "rz", "s", "si", "swap", "t", "ti",
    "unitary", "v", "vi", "x", "xx", "xy", "y", "yy", "z", "zz",
]  # fmt: skip
GATES = sorted(set(JAQCD_GATES) | {"U", "GPhase", "gpi", "gpi2", "ms", "prx"})
OBSERVABLES = ["x", "y", "z", "h", "i", "hermitian"]
RESULT_TYPES = ["Sample", "Expectation", "Variance", "Probability", "StateVector", "DensityMatrix", "Amplitude"]

_PAULI = {
    "x": np.array([[0, 1], [1, 0]], dtype=complex),
    "y": np.array([[0, -1j], [1j, 0]], dtype=complex),
    "z": np.diag([1.0, -1.0]).astype(complex),
    "h": np.array([[1, 1], [1, -1]], dtype=complex) / np.sqrt(2),
    "i": np.eye(2, dtype=complex),
}


@dataclass(frozen=True)
class _Settings:
    """One run's choices: the device (resolved), precision, fusion, and a seed sequence
    from which every simulation of the run (one per path, one per mid-circuit draw)
    takes its own stream, so a seed repeats the whole run."""

    device: Device
    precision: str
    fusion: bool
    seeds: np.random.SeedSequence

    @property
    def dtype(self):
        return np.dtype(PRECISIONS[self.precision])


class _EngineSimulation(Simulation):
    """Braket's ``Simulation`` over the engine.

    ``evolve`` collects operations; each read (samples, exact result values, the state
    vector, probabilities, an expectation) runs them from |0...0> as one job of the
    device's dispatcher, so admission control counts it beside the backend's jobs, and
    reads what it needs before the state is freed. Braket's code reads once per
    simulation.
    """

    def __init__(self, qubit_count: int, shots: int, settings: _Settings) -> None:
        super().__init__(qubit_count=qubit_count, shots=shots)
        self._settings = settings
        self._seed = int(settings.seeds.spawn(1)[0].generate_state(1, np.uint64)[0] >> np.uint64(1))
        self._steps: list = []

    def evolve(self, operations) -> None:
        self._steps.extend(_engine_steps(operations, self._qubit_count))

    # -- reads (each one device job) ------------------------------------------

    def retrieve_samples(self) -> np.ndarray:
        n, shots = self._qubit_count, self._shots
        if not shots:
            return np.zeros(0, dtype=np.int64)

        def read(state, execution):
            rng = np.random.default_rng(self._seed)
            return np.concatenate(list(sample_outcomes(state, list(range(n)), shots, rng, execution)))

        return self._run(read, extra_arrays=0)

    def result_values(self, results) -> list:
        """Exact values of Braket result types (JAQCD form), read from one final state."""
        n = self._qubit_count
        # Expectation values, variances, probabilities and amplitudes read the state a chunk at a
        # time; a density matrix takes its copies, a state vector its host copy.
        extra = max([_read_arrays(type(result).__name__, self._settings, n, getattr(result, "targets", None)) for result in results], default=0)
        return self._run(lambda state, _: [_exact_value(state, result, n) for result in results], extra_arrays=extra)

    @property
    def state_vector(self) -> np.ndarray:
        return self._run(lambda state, _: _host_state(state), extra_arrays=_read_arrays("StateVector", self._settings, self._qubit_count))

    @property
    def probabilities(self) -> np.ndarray:
        n = self._qubit_count
        return self._run(lambda state, _: marginal_probabilities(state, list(range(n))), extra_arrays=0)

    @property
    def density_matrix(self) -> np.ndarray:
        n = self._qubit_count
        return self._run(lambda state, _: reduced_density_matrix(state, list(range(n))), extra_arrays=_read_arrays("DensityMatrix", self._settings, n))

    def expectation(self, observable) -> float:
        """``<O>`` of a Braket simulator observable (its matrix on its measured qubits)."""
        qubits = observable.measured_qubits
        if qubits is None:
            raise ValueError(f"the observable {observable} has no target qubits")
        n = self._qubit_count
        factor = (tuple(n - 1 - q for q in reversed(qubits)), np.asarray(observable.matrix, dtype=complex))
        return self._run(lambda state, _: tensor_expectation(state, [factor])[0], extra_arrays=0)

    # -- the job ------------------------------------------------------------------

    def _run(self, read: Callable[[StateVector, Execution], Any], extra_arrays: int) -> Any:
        settings, n = self._settings, self._qubit_count
        device, itemsize = settings.device, settings.dtype.itemsize
        config = RunConfig(shots=max(self._shots, 1), seed=self._seed, precision=settings.precision)
        segments = self._segments(config)
        gates = Program(n, 0, tuple(op for segment, _ in segments for op in segment), name="braket")
        # The state (its scratch buffer too, where both fit; else in place), what the gates hold
        # and what the read allocates: fail before running.
        extra = extra_arrays * state_bytes(n, itemsize)
        capacity = dispatcher_for(device).capacity()  # as run() counts it: jobs running now do not shrink it
        if memory_needed(gates, config, device) + extra > capacity:
            config = dataclasses.replace(config, in_place=True)
        reserve = memory_needed(gates, config, device) + extra
        if reserve > capacity:
            arrays = state_arrays(gates, config, kernels_cover(gates, device, config.dtype)) + extra_arrays
            raise too_large_error(device.kind, n, itemsize, reserve, capacity, need_detail(arrays, n, itemsize))

        def simulate(execution: Execution):
            start = time.perf_counter()
            state = new_state(device, n, config.dtype, in_place=config.in_place)
            rng = np.random.default_rng(self._seed)
            for ops, after in segments:
                run_ops(state, ops, rng, config, execution)
                if after is not None:
                    after(state)
            value = read(state, execution)
            logger.debug("ran %d qubits on %s (%s) in %.3f s", n, device.name, settings.precision, time.perf_counter() - start)
            return value

        execution = Execution(device, max(gates.num_ops, 1), simulate, reserve_bytes=reserve, num_qubits=n)
        dispatcher_for(device).submit(execution)
        execution.wait()  # Braket's local run is synchronous
        if execution.error is not None:
            raise execution.error
        return execution.result

    def _segments(self, config: RunConfig) -> list:
        """Runs of gates (fused), each followed by a projection or reset, or by nothing."""
        segments, run = [], []

        def close(after):
            ops = tuple(run)
            if ops and self._settings.fusion:
                program = Program(self._qubit_count, 0, ops, name="braket")
                ops = fuse(program, self._settings.device.kind, None, DEFAULT_FUSION_THRESHOLD, precision=config.precision).ops
            segments.append((ops, after))
            run.clear()

        for step in self._steps:
            if callable(step):
                close(step)
            else:
                run.append(step)
        close(None)
        return segments


def _projection(qubit: int, outcome: int) -> Callable[[StateVector], None]:
    """Braket's ``Projection``: keep the branch's outcome, renormalized."""

    def project(state: StateVector) -> None:
        p1 = min(max(state.probability_one(qubit), 0.0), 1.0)
        probability = p1 if outcome else 1.0 - p1
        if probability <= 0.0:
            raise SimulationError(f"a branch projects engine qubit {qubit} onto an outcome of probability 0")
        state.collapse(qubit, outcome, probability)

    return project


def _reset(qubit: int) -> Callable[[StateVector], None]:
    return lambda state: state.fold_into_zero(qubit)


class GPUBraketSimulator(BaseLocalSimulator):
    """Braket local simulator over gpu_provider's engine (NVIDIA GPU through CuPy, or NumPy).

    Args:
        device: "auto" (a usable GPU, else the CPU), "GPU" or "CPU".
        device_id: which GPU.
        precision: "double" (complex128) or "single" (complex64).

    ``run(program, shots=N, device=..., precision=..., seed=..., fusion_enable=...)``
    overrides them per run; ``LocalSimulator("gpu_provider").run(circuit, shots=N,
    precision="single")`` passes them through. ``program`` is an OpenQASM 3 program,
    a JAQCD program or a program set, as for ``braket_sv``.
    """

    DEVICE_ID = DEVICE_ID

    def __init__(self, device: str = "auto", device_id: int = 0, precision: str = "double") -> None:
        self._options = {"device": device, "device_id": device_id, "precision": precision, "seed": None, "fusion_enable": True}
        _check_options(self._options)
        self._settings: _Settings | None = None  # set on the per-run copy that runs a program

    # -- run --------------------------------------------------------------------

    def run(self, circuit_ir: OpenQASMProgram | JaqcdProgram | ProgramSet, *args, **kwargs):
        """Simulate a program; returns a ``GateModelTaskResult`` (a ``ProgramSetTaskResult``
        for a program set).

        ``shots`` may come by keyword or, as Braket's simulators take it, positionally
        (after ``qubit_count`` for a JAQCD program).

        Raises:
            TypeError: a program of another kind, an unsupported instruction or result type.
            ValueError: shots out of range, a program that does not parse, result types that do
                not fit the shots.
            NameError: an ``input`` without a value.
            gpu_provider errors: ``device="GPU"`` without a usable GPU, a state too large.
        """
        if not isinstance(circuit_ir, (OpenQASMProgram, JaqcdProgram, ProgramSet)):
            raise TypeError(
                "gpu_provider's Braket simulator runs OpenQASM 3 programs (braket.ir.openqasm.Program), "
                f"program sets, JAQCD programs and Braket Circuits, not {type(circuit_ir).__name__}"
            )
        positional = list(args)
        if isinstance(circuit_ir, JaqcdProgram) and positional:
            positional.pop(0)  # qubit_count: unused, as in braket_sv
        shots = kwargs.pop("shots", positional.pop(0) if positional else 0)
        if positional:
            raise TypeError(f"run() takes the program and shots; unexpected arguments {tuple(positional)}")
        if not isinstance(shots, (int, np.integer)) or isinstance(shots, bool) or not 0 <= shots <= MAX_SHOTS:
            raise ValueError(f"shots must be an integer from 0 to {MAX_SHOTS:,}, not {shots!r}")
        run_options = dict(self._options)
        for key, value in kwargs.items():
            if key in _OPTIONS:
                run_options[key] = value
            else:
                warnings.warn(f"Option {key} is not used by {type(self).__name__}", UserWarning, stacklevel=2)
        _check_options(run_options)
        device, fallback_reason = resolve_device(run_options["device"], run_options["device_id"])
        if fallback_reason:
            logger.info("gpu_provider Braket simulator runs on the CPU: %s", fallback_reason)
        seed = run_options["seed"]
        runner = copy.copy(self)  # this run's settings; Braket's code calls back into it
        runner._settings = _Settings(device, run_options["precision"], bool(run_options["fusion_enable"]), np.random.SeedSequence(seed))
        shots = int(shots)
        if isinstance(circuit_ir, OpenQASMProgram):
            return runner.run_openqasm(circuit_ir, shots=shots)
        if isinstance(circuit_ir, ProgramSet):
            return runner.run_program_set(circuit_ir, shots=shots)
        return runner.run_jaqcd(circuit_ir, shots=shots)

    def run_multiple(self, programs, max_parallel: int | None = None, *args, **kwargs) -> list:
        """Run several programs at once (``LocalSimulator.run_batch``): threads over the
        engine's dispatcher, not the process pool of Braket's default, so GPU jobs share one
        CUDA context and run on their own streams. Results come back in program order."""
        programs = list(programs)
        if not programs:
            return []
        workers = max(1, min(max_parallel or os.cpu_count() or 1, len(programs)))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="gpu_provider-braket") as pool:
            return list(pool.map(lambda program: self.run(program, *args, **kwargs), programs))

    def initialize_simulation(self, **kwargs) -> Simulation:
        settings = self._settings
        if settings is None:  # called outside run(): the simulator's own options
            device, _ = resolve_device(self._options["device"], self._options["device_id"])
            settings = _Settings(device, self._options["precision"], bool(self._options["fusion_enable"]), np.random.SeedSequence(self._options["seed"]))
            self._settings = settings
        return _EngineSimulation(kwargs["qubit_count"], kwargs.get("shots", 0), settings)

    def _generate_results(self, results, result_types, simulation: _EngineSimulation) -> list:
        """Exact result values, computed on the state's device (Braket's own computes them
        from host copies of the whole state)."""
        values = simulation.result_values(results)
        return [ResultTypeValue.construct(type=result, value=value) for result, value in zip(results, values)]

    def run_openqasm(self, openqasm_ir: OpenQASMProgram, shots: int = 0, *, batch_size: int = 1) -> GateModelTaskResult:
        """An OpenQASM 3 program. Braket's interpreter parses it (with the shots, so a
        mid-circuit measurement splits them into paths, run by Braket's branched
        simulation); a program of one path runs here, its exact result values computed on
        the device."""
        created_at = self._timestamp()
        context = self._parse(openqasm_ir, shots)
        if context.is_branched:
            return self._run_branched(context, openqasm_ir, shots, batch_size, created_at)
        circuit = context.circuit
        circuit.validate_single_measured_register()
        qubit_map = self._map_circuit_to_contiguous_qubits(circuit)
        qubit_count = circuit.num_qubits
        measured_qubits = circuit.measured_qubits
        self._validate_ir_results_compatibility(circuit.results, device_action_type=DeviceActionType.OPENQASM)
        self._validate_ir_instructions_compatibility(circuit, device_action_type=DeviceActionType.OPENQASM)
        self._validate_input_provided(circuit)
        self._validate_shots_and_ir_results(shots, circuit.results, qubit_count)
        simulation = self.initialize_simulation(qubit_count=qubit_count, shots=shots, batch_size=batch_size)
        simulation.evolve(circuit.instructions)
        results = circuit.results
        if not shots:
            result_types = self._translate_result_types(results)  # Braket's checks of observables and targets
            self._validate_result_types_qubits_exist([rt for rt in result_types if isinstance(rt, TargetedResultType)], qubit_count)
            results = self._generate_results(results, result_types, simulation)
        elif circuit.basis_rotation_instructions:
            simulation.evolve(circuit.basis_rotation_instructions)  # sampled observables: their eigenbasis
        mapped = [qubit_map[q] for q in measured_qubits] if measured_qubits else None
        return self._create_results_obj(results, openqasm_ir, simulation, created_at, measured_qubits, mapped)

    def _parse(self, circuit_ir: OpenQASMProgram, shots: int):
        """Braket's interpreter; its errors (syntax, an index out of range, a missing input)
        reach the caller as ``braket_sv`` raises them."""
        if shots > 0:
            return self._parse_program_with_shots(circuit_ir, shots)
        return self.parse_program(circuit_ir)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_settings"] = None  # a resolved device does not travel to another process
        return state

    # -- properties ---------------------------------------------------------------

    @property
    def properties(self) -> GateModelSimulatorDeviceCapabilities:
        """Supported operations, modifiers, result types and the qubit count of the device."""

        try:
            device, _ = resolve_device(self._options["device"], self._options["device_id"])
            qubits = max_qubits_for(device, np.dtype(PRECISIONS[self._options["precision"]]).itemsize)
        except GPUProviderError:
            qubits = 0
        exact_only = ("StateVector", "DensityMatrix", "Amplitude")
        result_types = [
            {"name": name, "minShots": 0 if name != "Sample" else 1, "maxShots": 0 if name in exact_only else MAX_SHOTS}
            | ({"observables": OBSERVABLES} if name in ("Sample", "Expectation", "Variance") else {})
            for name in RESULT_TYPES
        ]
        return GateModelSimulatorDeviceCapabilities.parse_obj(
            {
                "service": {
                    "executionWindows": [{"executionDay": "Everyday", "windowStartHour": "00:00", "windowEndHour": "23:59:59"}],
                    "shotsRange": [0, MAX_SHOTS],
                },
                "action": {
                    "braket.ir.jaqcd.program": {
                        "actionType": "braket.ir.jaqcd.program",
                        "version": ["1"],
                        "supportedOperations": JAQCD_GATES,
                        "supportedResultTypes": result_types,
                    },
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
                            "braket_result_type_density_matrix",
                            "braket_result_type_amplitude",
                        ],
                        "forbiddenPragmas": [
                            "braket_noise_amplitude_damping", "braket_noise_bit_flip", "braket_noise_depolarizing",
                            "braket_noise_kraus", "braket_noise_pauli_channel", "braket_noise_generalized_amplitude_damping",
                            "braket_noise_phase_flip", "braket_noise_phase_damping", "braket_noise_two_qubit_dephasing",
                            "braket_noise_two_qubit_depolarizing", "braket_result_type_adjoint_gradient",
                        ],  # fmt: skip
                        "supportedResultTypes": result_types,
                        "supportPhysicalQubits": False,
                        "supportsPartialVerbatimBox": False,
                        "requiresContiguousQubitIndices": False,
                        "requiresAllQubitsMeasurement": False,
                        "supportsUnassignedMeasurements": True,
                        "disabledQubitRewiringSupported": False,
                    },
                    "braket.ir.openqasm.program_set": {
                        "actionType": "braket.ir.openqasm.program_set",
                        "version": ["1"],
                        "maximumExecutables": MAX_EXECUTABLES,
                        "maximumTotalShots": MAX_PROGRAM_SET_SHOTS,
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


def _check_options(options: dict) -> None:
    if options["precision"] not in PRECISIONS:
        raise ValueError(f"precision must be one of {tuple(PRECISIONS)}, not {options['precision']!r}")
    check_device_option(options["device"], options["device_id"])
    seed = options["seed"]
    if seed is not None and (not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0):
        raise ValueError(f"seed must be a non-negative integer or None, not {seed!r}")


def _engine_steps(instructions, num_qubits: int) -> list:
    """Braket operations on compact qubits as engine steps: gate operations (a matrix on
    targets, controls first) become engine ops; ``Projection`` and ``Reset`` become
    callables applied to the state between runs of gates."""

    def engine(qubit: int) -> int:
        return num_qubits - 1 - qubit

    ops: list = []
    for op in instructions:
        kind = type(op).__name__
        if isinstance(op, (Projection, Reset)):
            if len(op.targets) != 1:
                raise ValueError(f"{kind} acts on one qubit, not {op.targets}")
            qubit = engine(op.targets[0])
            ops.append(_projection(qubit, op.outcome) if isinstance(op, Projection) else _reset(qubit))
            continue
        if not isinstance(op, GateOperation):
            raise TypeError(
                f"instruction {kind.lower()} is not supported by gpu_provider's Braket simulator (a pure "
                "state-vector simulator); use LocalSimulator('braket_dm') for noise"
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


def _read_arrays(name: str, settings, num_qubits: int, targets=None) -> int:
    """State-sized arrays of the device a read of result type ``name`` allocates beside the state:
    a density matrix's copies and its 4^k complex128 entries (``targets``, else every qubit); a
    state vector's complex128 host copy, on the CPU (that is the device's memory there); none
    for the rest, read a chunk at a time."""
    if name == "DensityMatrix":
        return DENSITY_MATRIX_COPIES + density_matrix_arrays(len(targets) if targets else num_qubits, num_qubits, settings.dtype.itemsize)
    if name == "StateVector" and settings.device.xp is np:
        return 16 // settings.dtype.itemsize
    return 0


def _host_state(state) -> np.ndarray:
    """The state as complex128 on the host, in one copy (see :func:`_read_arrays`)."""
    state.to_canonical()
    data = state.data if state.xp is np else state.data.get()
    return data.astype(np.complex128, copy=state.xp is np)


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
        return _host_state(state)
    if name == "DensityMatrix":
        targets = result.targets if result.targets else list(range(num_qubits))
        return reduced_density_matrix(state, [num_qubits - 1 - q for q in reversed(targets)])
    if name == "Amplitude":
        values = amplitudes(state, [int(bits, 2) for bits in result.states])
        return {bits: complex(value) for bits, value in zip(result.states, values)}
    raise TypeError(f"result type {name} is not supported by gpu_provider")
