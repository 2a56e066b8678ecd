"""Native Qiskit primitives on the engine: :class:`EstimatorV2` and :class:`SamplerV2`.

They sit beside :class:`~gpu_provider.GPUSimulator` and use its options, device
and compiler, with no shots in the estimator:

- Each PUB's circuit is translated and fused once
  (:func:`~gpu_provider.compiler.parameters.compile_circuit`); each binding of
  its parameters rebuilds only the parameter-dependent matrices.
- The estimator runs each binding once, on the device, and evaluates every
  observable that binding broadcasts to on the final state, exactly
  (:mod:`gpu_provider.engine.expectation`: Pauli terms grouped by X mask, one
  pass per group). ``precision > 0`` adds seeded Gaussian noise of that
  standard deviation, as Qiskit's ``StatevectorEstimator`` and Aer do.
- The sampler returns a ``BitArray`` per classical register; mid-circuit
  measurement and control flow work as in ``backend.run``.
- ``run()`` validates and compiles before returning a submitted
  :class:`GPUPrimitiveJob`; the work runs on the device's dispatcher, so
  ``status()`` never blocks and ``cancel()`` stops at the next checkpoint.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Optional

import numpy as np
from qiskit.circuit import QuantumCircuit
from qiskit.primitives import BaseEstimatorV2, BaseSamplerV2
from qiskit.primitives.base.base_primitive_job import BasePrimitiveJob
from qiskit.primitives.containers import BitArray, DataBin, PrimitiveResult, PubResult, SamplerPubResult
from qiskit.primitives.containers.estimator_pub import EstimatorPub
from qiskit.primitives.containers.sampler_pub import SamplerPub

from .backend import GPUSimulator, _check_fits, _in_place_instead, job_threads
from .compiler.fusion import default_width
from .compiler.parameters import CompiledCircuit, FusionOptions, compile_circuit
from .compiler.translate import translate
from .engine.devices import PRECISIONS, Device, resolve_device, state_bytes, too_large_error
from .engine.batch import BATCH_MAX_AMPLITUDES, batch_size, batchable, evolve_batch, evolve_columns
from .engine.distributed import (
    EXCHANGE_BYTES,
    DistributedStateVector,
    RankGroup,
    abandon_on_ranks,
    agree_on_job,
    Ranks,
    check_split,
    job_digest,
    ranks_for,
    run_on_ranks,
)
from .engine.executor import (
    WORKSPACE_BYTES,
    Execution,
    RunConfig,
    device_kernels,
    dispatcher_for,
    evolve,
    kernels_cover,
    new_state,
    run_program,
    sample_memory,
    stabilizer_bytes,
    state_arrays,
)
from .engine.expectation import MAX_MASK_QUBITS, PauliSum, batch_expectation_values, expectation_values, pauli_sum
from .engine.program import Measure, is_sampling_friendly
from .engine.trajectories import branch_points, run_exact
from .engine.stabilizer import MAX_GATE_QUBITS, StabilizerState, require_clifford, why_not_clifford
from .errors import CircuitTooLargeError, InvalidInputError, InvalidOptionError
from .job import GPUJob

logger = logging.getLogger(__name__)

# Aer's option names, accepted so that its users can switch by changing the import.
_AER_OPTION_KEYS = ("default_precision", "default_shots", "backend_options", "run_options")


class GPUPrimitiveJob(GPUJob, BasePrimitiveJob):
    """The job of a primitive's ``run()``: Qiskit's ``PrimitiveJob`` contract
    (``result``, ``status``, ``done``, ``running``, ``cancelled``,
    ``in_final_state``, ``cancel``, ``job_id``) plus ``backend()``,
    ``wait_for_final_state``, ``result(timeout)`` and ``progress()`` of
    :class:`~gpu_provider.GPUJob`, whose event-driven, non-blocking behaviour it
    shares. ``result()`` returns a ``PrimitiveResult``.
    """

    def __init__(self, backend, job_id: str, execution: Execution, circuits=None) -> None:
        GPUJob.__init__(self, backend, job_id, execution, circuits=circuits)

    def _submit(self) -> None:  # the name Qiskit's PrimitiveJob uses
        self.submit()

    def __repr__(self) -> str:
        return f"<GPUPrimitiveJob {self.job_id()} on {self._execution.device.name}: {self.status().name}>"


def _split_options(options: Optional[dict], **defaults) -> dict:
    """Aer-style ``options`` merged over the keyword defaults."""
    merged = dict(defaults)
    if options:
        unknown = set(options) - set(_AER_OPTION_KEYS)
        if unknown:
            raise InvalidOptionError(f"unknown primitive options {sorted(unknown)}; the options are {list(_AER_OPTION_KEYS)}")
        merged.update({k: v for k, v in options.items() if k != "run_options"})
        run_options = dict(options.get("run_options") or {})
        if "seed_simulator" in run_options:
            merged["seed"] = run_options.pop("seed_simulator")
        if "shots" in run_options:
            merged["default_shots"] = run_options.pop("shots")
        if run_options:
            raise InvalidOptionError(f"run_options {sorted(run_options)} are not used; pass seed_simulator or shots")
    return merged


class _Primitive:
    """What both primitives share: the backend (options, device) and compiling PUB circuits."""

    def _init_backend(self, backend: Optional[GPUSimulator], backend_options: Optional[dict]) -> None:
        if backend is not None and not isinstance(backend, GPUSimulator):
            raise InvalidInputError(f"backend must be a GPUSimulator, not {type(backend).__name__}")
        self._backend = backend if backend is not None else GPUSimulator()
        if backend_options:
            self._backend.set_options(**backend_options)

    @property
    def backend(self) -> GPUSimulator:
        """The :class:`~gpu_provider.GPUSimulator` whose options (device, precision, fusion) this primitive uses."""
        return self._backend

    @classmethod
    def from_backend(cls, backend: GPUSimulator, **options):
        """A primitive on ``backend`` (Aer's constructor of the same name): its options are the backend's."""
        return cls(backend=backend, **options)

    @property
    def options(self) -> SimpleNamespace:
        """Aer's view of the options: ``default_precision`` or ``default_shots``, ``backend_options``
        (the backend's current options) and ``run_options`` (the seed)."""
        fields = {"default_precision": self._default_precision} if hasattr(self, "_default_precision") else {"default_shots": self._default_shots}
        seed = self._seed
        return SimpleNamespace(
            **fields,
            backend_options=dict(self._backend.options.__dict__),
            run_options={} if seed is None else {"seed_simulator": seed},
        )

    def _ranks(self) -> Optional[Ranks]:
        """The MPI ranks when the backend's ``mpi`` option is on (each circuit's state is split over them)."""
        return ranks_for(self._backend.options.mpi)

    def _device(self, ranks: Optional[Ranks] = None) -> tuple[Device, str, str]:
        options = self._backend.options
        if ranks is not None:
            device, reason = ranks.device(options.device, options.device_id)
        else:
            device, reason = resolve_device(options.device, options.device_id)
        return device, options.precision, reason

    def _compile(
        self, circuit: QuantumCircuit, device: Device, cache: dict, global_qubits: int = 0, tableaux: bool = False, restart: bool = True
    ) -> CompiledCircuit:
        """``circuit`` compiled once per run. With ``tableaux``, a Clifford circuit may run
        as a stabilizer state, as the backend's ``method`` option says: then ``compiled.method`` is
        "stabilizer" (unfused: its gates are read one by one). A state of which two copies do not
        fit may run without its scratch buffer (``compiled.in_place``), as
        the backend's would; a Clifford circuit under "automatic" still goes to a tableau first.
        ``restart``: a dynamic circuit's shots run as trajectories from a copy of the state (the
        sampler's), not by exact branching (the estimator's, whose copies its PUBs count)."""
        key = id(circuit)
        if key not in cache:
            options = self._backend.options
            width = options.fusion_max_qubits
            local = circuit.num_qubits - global_qubits
            if global_qubits:  # a fused gate's targets must fit on one rank
                width = min(width or default_width(device.kind, options.precision), max(local, 1))
            fusion = FusionOptions(options.fusion_enable, device.kind, width, options.fusion_threshold, options.precision)
            itemsize = np.dtype(PRECISIONS[options.precision]).itemsize
            too_large = None
            stabilizer = tableaux and not global_qubits and options.method == "stabilizer"
            vector_in_place = False
            if not stabilizer:
                try:
                    _check_vector_fits(device, local, itemsize)
                except CircuitTooLargeError as exc:
                    narrow = _as_tableau_reads(circuit) if not global_qubits else None
                    # In place: a circuit measured at the end only (no copies for trajectories), one state.
                    room = narrow is not None and is_sampling_friendly(narrow) and _fits(device, local, itemsize)
                    automatic = tableaux and not global_qubits and options.method == "automatic"
                    clifford = room and not circuit.parameters and why_not_clifford(narrow) is None
                    if automatic and not (room and not clifford):
                        stabilizer, too_large = True, exc
                    elif room:
                        vector_in_place = True
                    else:
                        raise
            if stabilizer:  # unfused, gates wider than a tableau reads expanded
                fusion = FusionOptions(False, device.kind, width, options.fusion_threshold, options.precision)
                compiled = compile_circuit(circuit, fusion, dense_max_qubits=MAX_GATE_QUBITS)
            else:
                compiled = compile_circuit(circuit, fusion)
                vector_in_place, compiled.state_arrays = _program_arrays(
                    compiled, device, options.precision, local, vector_in_place, bool(global_qubits), restart
                )
            if stabilizer:
                _check_clifford(compiled, too_large)
                compiled.method = "stabilizer"
            compiled.in_place = vector_in_place
            if global_qubits and compiled.template is not None:
                check_split(circuit.name, circuit.num_qubits, global_qubits, compiled.template.ops)
            cache[key] = (circuit, compiled)  # keep the circuit alive: ids stay unique
        return cache[key][1]

    def _compiled_pubs(self, kind, pubs, default, device: Device, ranks: Optional[Ranks]) -> list:
        """Every PUB coerced and validated as ``kind``, with its circuit compiled once (shared by PUBs).
        A state of which two copies do not fit may run in place: the sampler draws its shots and
        the estimator reads its Pauli sums a chunk at a time, without a second array."""
        coerced = [_coerce(kind, pub, default, i) for i, pub in enumerate(_pub_list(pubs, kind))]
        global_qubits = ranks.global_qubits if ranks is not None else 0
        cache: dict = {}
        restart = kind is SamplerPub
        return [(pub, self._compile(pub.circuit, device, cache, global_qubits, tableaux=True, restart=restart)) for pub in coerced]

    @staticmethod
    def _agreed(ranks: Optional[Ranks], prepare):
        """``prepare()`` (a dict with "digest" and "seed"); under MPI every rank prepares, then all
        agree on the job (same PUBs, rank 0's seed) or all raise. Returns it with the job's RankGroup."""
        if ranks is None:
            return prepare(), None
        prepared, error = None, None
        try:
            prepared = prepare()
        except Exception as exc:
            error = exc
        seed = agree_on_job(ranks.comm, prepared["digest"] if prepared else "", prepared["seed"] if prepared else 0, error)
        prepared["seed"] = seed
        return prepared, RankGroup(ranks.comm)

    def _submit(self, device: Device, ops_total: int, work, tasks: list, group: Optional[RankGroup] = None) -> GPUPrimitiveJob:
        # Reserve what _compile checked for the widest circuit run as a state vector (a
        # state and its scratch buffer, and the copies exact branching keeps waiting),
        # plus a batch of small states and the workspace, so the dispatcher's admission
        # control counts this job beside the backend's; or, where larger, what the
        # largest task run as stabilizer states needs.
        itemsize = np.dtype(PRECISIONS[self._backend.options.precision]).itemsize
        vectors = [task for task in tasks if not _on_tableau(task.compiled)]
        widest = max((task.pub.circuit.num_qubits for task in vectors), default=0)  # run([]): an empty result
        branch_copies = max((getattr(task, "branch_copies", 0) for task in vectors), default=0)
        local = widest - (group.global_qubits if group is not None else 0)
        # The arrays the widest circuit's program holds: 1 in place (two copies did not fit), 2 with
        # the scratch buffer, more for a wide Pauli evolution's recurrence.
        arrays = max((getattr(task.compiled, "state_arrays", 2) for task in vectors if task.pub.circuit.num_qubits == widest), default=2)
        batches = any(batch_size(task.pub.circuit.num_qubits, device.kind) > 1 for task in vectors)
        reserve = (arrays + branch_copies) * state_bytes(local, itemsize) + (BATCH_MAX_AMPLITUDES * itemsize if batches else 0) + WORKSPACE_BYTES
        reserve = max([reserve] + [_tableau_reserve(task) for task in tasks if _on_tableau(task.compiled)])
        circuits = [task.pub.circuit for task in tasks]
        run = work
        if group is not None:
            reserve += EXCHANGE_BYTES

            def run(execution: Execution):
                return run_on_ranks(group, execution, lambda: work(execution))

        threads = job_threads(widest, self._backend.options)
        execution = Execution(device, ops_total, run, reserve_bytes=reserve, num_qubits=widest, threads=threads)
        if group is not None:
            execution.on_abandon = lambda kind, message: abandon_on_ranks(group, kind, message)
        job = GPUPrimitiveJob(self._backend, str(uuid.uuid4()), execution, circuits=circuits)
        job.submit()
        return job


def _circuit_parts(circuit: QuantumCircuit) -> list:
    """A circuit as plain values for :func:`job_digest` (parameters by name, so every rank agrees)."""
    parts: list = [circuit.num_qubits, circuit.num_clbits, str(circuit.global_phase)]
    for instruction in circuit.data:
        operation = instruction.operation
        params = [p if isinstance(p, np.ndarray) else (_circuit_parts(p) if isinstance(p, QuantumCircuit) else str(p)) for p in operation.params]
        parts.append(
            (
                operation.name,
                tuple(circuit.find_bit(q).index for q in instruction.qubits),
                tuple(circuit.find_bit(c).index for c in instruction.clbits),
                params,
            )
        )
    return parts


def _parameter_values(pub, compiled: CompiledCircuit) -> np.ndarray:
    """The PUB's parameter sets as an array in the compiled circuit's parameter order (shape + (P,))."""
    if compiled.parameters:
        values = pub.parameter_values.as_array(compiled.parameters)
        if not np.all(np.isfinite(values)):  # refused at run(), not as a failed job
            raise InvalidInputError(f"parameter values for circuit {pub.circuit.name!r} must be finite numbers (NaN or infinity given)")
        return values
    return np.zeros(pub.parameter_values.shape + (0,))


def _ops_estimate(pub, compiled: CompiledCircuit) -> int:
    """Ops a PUB runs, for progress: the compiled circuit's, once per parameter set."""
    return max(compiled.ops_before, 1) * max(int(np.prod(pub.parameter_values.shape, dtype=np.int64)), 1)


def _seed_of(seed) -> Optional[int]:
    if seed is None or isinstance(seed, np.random.Generator):
        return None
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InvalidOptionError(f"seed must be a non-negative integer, a numpy Generator or None, not {seed!r}")
    return int(seed)


def _simulator_metadata(
    device: Device, precision: str, compiled: CompiledCircuit, program_ops: int, bindings: int, seconds: float, reason: str, batched: int = 0
) -> dict:
    metadata = {
        "device": device.name,
        "precision": precision,
        "method": getattr(compiled, "method", "statevector"),
        "num_bindings": bindings,
        "batched_bindings": batched,
        "compiled_once": not compiled.per_binding_translation,
        "parametrized_ops": compiled.num_slots,
        "fusion_ops_before": compiled.ops_before,
        "fusion_ops_after": program_ops,
        "time_taken": seconds,
    }
    if getattr(compiled, "in_place", False):
        metadata["in_place"] = True  # a CPU state without its scratch buffer (two copies did not fit)
    if reason:
        metadata["gpu_unavailable_reason"] = reason
    return metadata


# ---------------------------------------------------------------------------
# Estimator


def _as_pauli_sum(observable, num_qubits: int) -> PauliSum:
    """A Qiskit ``SparseObservable`` (an ``ObservablesArray`` element) as the engine's PauliSum."""
    if observable.contains_projectors:
        observable = observable.as_paulis()
    bit_terms = np.asarray(observable.bit_terms, dtype=np.uint64)
    indices = np.asarray(observable.indices, dtype=np.uint64)
    boundaries = np.asarray(observable.boundaries, dtype=np.int64)
    count = observable.num_terms
    if num_qubits > MAX_MASK_QUBITS:  # a stabilizer state's observable: Python-integer masks
        x_masks, z_masks = [], []
        for term in range(count):
            letters = range(boundaries[term], boundaries[term + 1])
            x_masks.append(sum(1 << int(indices[i]) for i in letters if int(bit_terms[i]) & 2))
            z_masks.append(sum(1 << int(indices[i]) for i in letters if int(bit_terms[i]) & 1))
        return pauli_sum(num_qubits, x_masks, z_masks, np.asarray(observable.coeffs, dtype=np.complex128))
    owner = np.repeat(np.arange(count), np.diff(boundaries))
    x = np.zeros(count, dtype=np.uint64)
    z = np.zeros(count, dtype=np.uint64)
    # SparseObservable's Pauli letters: bit 0 is the Z part, bit 1 the X part (Y has both).
    np.bitwise_or.at(x, owner, ((bit_terms >> np.uint64(1)) & np.uint64(1)) << indices)
    np.bitwise_or.at(z, owner, (bit_terms & np.uint64(1)) << indices)
    return pauli_sum(num_qubits, x, z, np.asarray(observable.coeffs, dtype=np.complex128))


def _measured_mask(program) -> int:
    """The qubits a program of gates and final measurements measures, as a bit mask."""
    mask = 0
    for op in program.ops:
        if isinstance(op, Measure):
            mask |= 1 << op.qubit
    return mask


def _dephased(observable: PauliSum, measured: int) -> PauliSum:
    """``observable`` after Z measurements of the ``measured`` qubits: only its terms with I or Z there."""
    if observable.x.dtype == object:  # Python-integer masks (wider than 64 qubits)
        keep = np.array([(int(x) & measured) == 0 for x in observable.x], dtype=bool)
    else:
        keep = (observable.x & np.uint64(measured)) == 0
    if keep.all():
        return observable
    if not keep.any():  # nothing survives: the value is 0
        return pauli_sum(observable.num_qubits, [0], [0], [0.0])
    return PauliSum(observable.num_qubits, observable.x[keep], observable.z[keep], observable.coeffs[keep])


@dataclass
class _EstimatorTask:
    pub: EstimatorPub
    compiled: CompiledCircuit
    values: np.ndarray  # (*param_shape, num_parameters)
    observables: np.ndarray  # object array of PauliSum, obs_shape
    shape: tuple
    branch_copies: int = 0  # state copies exact branching keeps waiting (a circuit that measures mid-circuit)


class EstimatorV2(_Primitive, BaseEstimatorV2):
    """Exact expectation values on the gpu_provider engine (GPU through CuPy, or NumPy).

    Args:
        default_precision: standard deviation of the Gaussian noise added to each
            expectation value when a PUB or ``run()`` gives none; 0 (the default) is exact.
        seed: seed (or numpy Generator) of that noise.
        backend: a :class:`~gpu_provider.GPUSimulator` whose options (``device``,
            ``precision``, ``fusion_*``) are used; a new one by default.
        backend_options: options set on that backend.
        options: Aer's form, ``{"default_precision", "backend_options", "run_options":
            {"seed_simulator"}}``, for code written against Aer's ``EstimatorV2``.
    """

    def __init__(
        self,
        *,
        default_precision: float = 0.0,
        seed: np.random.Generator | int | None = None,
        backend: Optional[GPUSimulator] = None,
        backend_options: Optional[dict] = None,
        options: Optional[dict] = None,
    ) -> None:
        merged = _split_options(options, default_precision=default_precision, seed=seed, backend_options=backend_options)
        if "default_shots" in merged:
            raise InvalidOptionError("the estimator takes no shots; give precision instead")
        self._default_precision = _check_precision(merged["default_precision"])
        _seed_of(merged["seed"])
        self._seed = merged["seed"]
        self._init_backend(backend, merged["backend_options"])

    @property
    def default_precision(self) -> float:
        return self._default_precision

    @property
    def seed(self):
        return self._seed

    def run(self, pubs: Iterable, *, precision: float | None = None) -> GPUPrimitiveJob:
        """Estimate every PUB; returns a submitted :class:`GPUPrimitiveJob`.

        A circuit that measures mid-circuit, resets or branches on its outcomes has
        no single final state: its expectation values are exact averages over every
        path of outcomes, weighted by probability (the engine's exact branching), as
        the observable's expectation in the mixed state the circuit prepares.

        Raises:
            ValueError: a PUB that does not validate (parameter count, observable
                width, negative precision), or a state (with the copies exact
                branching keeps) too large for the device.
        """
        if precision is None:
            precision = self._default_precision
        _check_precision(precision)
        ranks = self._ranks()
        prepared, group = self._agreed(ranks, lambda: self._prepare(pubs, precision, ranks))
        tasks, device, dtype_name, reason = prepared["tasks"], prepared["device"], prepared["dtype"], prepared["reason"]
        seed = prepared["seed"] if ranks is not None else self._seed
        config = RunConfig(shots=1, seed=0, precision=dtype_name)

        def work(execution: Execution) -> PrimitiveResult:
            results = []
            for task in tasks:
                results.append(_estimate(task, device, config, execution, seed, reason, group))
            return PrimitiveResult(results, metadata={"version": 2})

        return self._submit(device, prepared["ops_total"], work, tasks, group)

    def _prepare(self, pubs, precision, ranks) -> dict:
        """Coerce, validate and compile every PUB (the work of ``run()`` before the job)."""
        device, dtype_name, reason = self._device(ranks)
        tasks = []
        ops_total = 0
        for pub, compiled in self._compiled_pubs(EstimatorPub, pubs, precision, device, ranks):
            n = pub.circuit.num_qubits
            observables = np.empty(pub.observables.shape, dtype=object)
            for index, observable in np.ndenumerate(pub.observables.sparse_observables_array()):
                observables[index] = _as_pauli_sum(observable, n)
            values = _parameter_values(pub, compiled)
            copies = 0
            template = compiled.template
            if template is None and values.size:  # translated per binding: the first binding shows the ops
                template = compiled.bind(values.reshape(-1, values.shape[-1])[0])
            if template is not None and is_sampling_friendly(template):
                # Final measurements collapse the state, as mid-circuit ones do (and as Aer's estimator
                # averages them): terms with X or Y on a measured qubit average to zero.
                measured = _measured_mask(template)
                if measured:
                    observables = np.vectorize(lambda o: _dephased(o, measured), otypes=[object])(observables)
            elif template is not None:
                # Exact branching: a state copy waits per uncertain measurement on a path.
                copies = branch_points(template.ops)
            if template is not None and not is_sampling_friendly(template) and not _on_tableau(compiled):
                local = n - (ranks.global_qubits if ranks is not None else 0)
                arrays = getattr(compiled, "state_arrays", 2) + copies
                device.check_fits(local, np.dtype(PRECISIONS[dtype_name]).itemsize, arrays=arrays, workspace=WORKSPACE_BYTES)
            shape = np.broadcast_shapes(pub.parameter_values.shape, pub.observables.shape)
            tasks.append(_EstimatorTask(pub, compiled, values, observables, shape, copies))
            ops_total += _ops_estimate(pub, compiled)
        prepared = {"tasks": tasks, "device": device, "dtype": dtype_name, "reason": reason, "ops_total": ops_total}
        if ranks is not None:
            seed = self._seed
            if seed is None or isinstance(seed, np.random.Generator):  # every rank adopts rank 0's draw
                seed = int((seed if seed is not None else np.random.default_rng()).integers(0, 2**62))
            prepared["seed"] = seed
            prepared["digest"] = job_digest(
                [
                    (_circuit_parts(t.pub.circuit), t.values, float(t.pub.precision), [(o.x, o.z, o.coeffs) for o in t.observables.flat])
                    for t in tasks
                ],
                dtype_name,
            )
        return prepared


def _check_precision(precision) -> float:
    if isinstance(precision, bool) or not isinstance(precision, (int, float, np.integer, np.floating)):
        # As Qiskit's reference estimator: a value that is no number is a TypeError.
        raise TypeError(f"precision must be a real number, not {precision!r} ({type(precision).__name__})")
    if not math.isfinite(precision) or precision < 0:
        raise InvalidOptionError(f"precision must be a finite non-negative number (0 is exact), not {precision!r}")
    return float(precision)


def _coerce(kind, pub, default, index: int):
    """Qiskit's PUB coercion and validation, its errors naming the PUB."""
    try:
        return kind.coerce(pub, default)
    except ValueError as exc:
        raise InvalidInputError(f"PUB {index} is not valid: {exc}") from exc


def _pub_list(pubs, kind) -> list:
    if isinstance(pubs, (QuantumCircuit, EstimatorPub, SamplerPub)):
        primitive = "Sampler" if kind is SamplerPub else "Estimator"
        raise InvalidInputError(
            f"An invalid {primitive} pub-like was given ({type(pubs).__name__}): "
            "run() takes a list of PUBs; wrap a single one in a list: run([pub])"
        )
    return list(pubs)


def _estimate(
    task: _EstimatorTask, device: Device, config: RunConfig, execution: Execution, seed, reason: str, group: Optional[RankGroup] = None
) -> PubResult:
    start = time.perf_counter()
    pub = task.pub
    precision = float(pub.precision)
    param_shape = pub.parameter_values.shape
    index_array = np.empty(param_shape, dtype=object)
    for index in np.ndindex(*param_shape):
        index_array[index] = index
    bc_index, bc_obs = np.broadcast_arrays(index_array, task.observables)
    # Every output position, grouped by the binding it needs: one simulation per binding.
    by_binding: dict = {}
    for position in np.ndindex(*task.shape):
        by_binding.setdefault(bc_index[position], []).append(position)
    evs = np.zeros(task.shape, dtype=np.float64)
    state = None
    program_ops = 0
    batched = 0
    compiled = task.compiled
    n = pub.circuit.num_qubits
    tableau = _on_tableau(compiled)
    if tableau:  # a stabilizer state, one binding at a time, on the job's device
        state = StabilizerState(device.xp, n)
        for binding, positions in by_binding.items():
            program = _clifford_binding(compiled, task.values[binding])
            program_ops = program.num_ops
            _store(positions, _expectations(program, state, [bc_obs[p] for p in positions], config, execution), bc_obs, evs)
    elif group is not None and group.global_qubits:
        # Split over the MPI ranks: one binding at a time on one DistributedStateVector;
        # expectation_values reduces over the ranks, so every rank gets every value.
        for binding, positions in by_binding.items():
            program = compiled.bind(task.values[binding])
            program_ops = program.num_ops
            if state is None:
                state = DistributedStateVector(device.xp, n, config.dtype, device_kernels(device, config.dtype), group, program.ops)
            _store(positions, _expectations(program, state, [bc_obs[p] for p in positions], config, group), bc_obs, evs)
    chunks = [] if tableau or (group is not None and group.global_qubits) else _chunks(list(by_binding.items()), n, device.kind)
    for chunk in chunks:
        kernels = device_kernels(device, config.dtype)
        if len(chunk) > 1 and compiled.can_batch:
            columns = compiled.bind_columns(np.stack([task.values[binding] for binding, _ in chunk]))
            batch = evolve_columns(columns, n, len(chunk), device.xp, config.dtype, kernels, execution)
            program_ops = compiled.template.num_ops
            batched += len(chunk)
            rows = batch_expectation_values(batch, [[bc_obs[p] for p in positions] for _, positions in chunk])
            for (_, positions), values in zip(chunk, rows):
                _store(positions, values, bc_obs, evs)
            continue
        programs = [compiled.bind(task.values[binding]) for binding, _ in chunk]
        program_ops = programs[0].num_ops
        if batchable(programs):
            batch = evolve_batch(programs, device.xp, config.dtype, kernels, execution)
            states = (batch.state(row) for row in range(len(chunk)))
            batched += len(chunk)
            _consume(zip(chunk, states), bc_obs, evs)
            continue
        if state is None:
            state = new_state(device, pub.circuit.num_qubits, config.dtype, in_place=getattr(compiled, "in_place", False))
        for (_, positions), program in zip(chunk, programs):
            _store(positions, _expectations(program, state, [bc_obs[p] for p in positions], config, execution), bc_obs, evs)
    del state
    if precision != 0:
        rng = np.random.default_rng(seed)
        evs = np.asarray(rng.normal(evs, precision), dtype=np.float64)  # a 0-d array for a scalar PUB, as Qiskit's
    stds = np.full(task.shape, precision, dtype=np.float64)
    data = DataBin(evs=evs, stds=stds, shape=task.shape)
    metadata = {
        "target_precision": precision,
        "circuit_metadata": pub.circuit.metadata,
        "simulator_metadata": _simulator_metadata(
            device, config.precision, task.compiled, program_ops, len(by_binding), time.perf_counter() - start, reason, batched
        ),
    }
    return PubResult(data, metadata=metadata)


def _expectations(program, state, observables: list, config: RunConfig, execution) -> np.ndarray:
    """``<O>`` of each observable after ``program`` runs on ``state`` from |0...0>.

    A program that measures mid-circuit, resets or branches has no single final state:
    its values are the average over every path of outcomes, weighted by the path's
    probability (the engine's exact branching), i.e. ``Tr(rho O)`` of the mixed state
    the circuit prepares. ``execution`` is the job's, or an MPI group.
    """
    if is_sampling_friendly(program):
        return expectation_values(evolve(program, state, config, execution), observables)
    state.reset_to_zero()
    total = np.zeros(len(observables), dtype=np.complex128)
    weight = np.zeros(1)

    def finish(trajectory) -> None:
        total[:] += trajectory.weight * expectation_values(trajectory.state, observables)
        weight[0] += trajectory.weight

    run_exact(state, program, config.max_loop_iterations, finish, limit=branch_points(program.ops), execution=execution)
    return total / weight[0]  # 1 up to the paths too light to visit


def _consume(finals, bc_obs: np.ndarray, evs: np.ndarray) -> None:
    """Evaluate, on each final state, the observables of the output positions it serves."""
    for (_, positions), final in finals:
        _store(positions, expectation_values(final, [bc_obs[p] for p in positions]), bc_obs, evs)


def _store(positions: list, values: np.ndarray, bc_obs: np.ndarray, evs: np.ndarray) -> None:
    scale = max(1.0, max(float(np.sum(np.abs(bc_obs[p].coeffs))) for p in positions))
    if np.max(np.abs(values.imag)) > 1e-8 * scale:
        raise InvalidInputError("an observable is not Hermitian: its expectation value is not real")
    for p, value in zip(positions, values.real):
        evs[p] = value


def _chunks(items: list, num_qubits: int, device_kind: str):
    """Parameter sets in chunks that one batch of states holds (one at a time for wide states)."""
    size = batch_size(num_qubits, device_kind)
    for start in range(0, len(items), size):
        yield items[start : start + size]


# ---------------------------------------------------------------------------
# Sampler


@dataclass
class _SamplerTask:
    pub: SamplerPub
    compiled: CompiledCircuit
    values: np.ndarray
    shots: int


class SamplerV2(_Primitive, BaseSamplerV2):
    """Shots from the gpu_provider engine, as ``BitArray`` per classical register.

    Args:
        default_shots: shots of a PUB that gives none (1024).
        seed: seed of the samples (an int, or None for fresh randomness).
        backend: a :class:`~gpu_provider.GPUSimulator` whose options are used.
        backend_options: options set on that backend.
        options: Aer's form, ``{"default_shots", "backend_options", "run_options":
            {"seed_simulator"}}``.
    """

    def __init__(
        self,
        *,
        default_shots: int = 1024,
        seed: Optional[int] = None,
        backend: Optional[GPUSimulator] = None,
        backend_options: Optional[dict] = None,
        options: Optional[dict] = None,
    ) -> None:
        merged = _split_options(options, default_shots=default_shots, seed=seed, backend_options=backend_options)
        if "default_precision" in merged:
            raise InvalidOptionError("the sampler takes shots, not a precision")
        self._default_shots = _check_shots(merged["default_shots"])
        _seed_of(merged["seed"])  # checks it
        # An int repeats the samples on every run; a Generator advances (one draw a run), as Qiskit's.
        self._seed = merged["seed"] if merged["seed"] is None or isinstance(merged["seed"], np.random.Generator) else int(merged["seed"])
        self._init_backend(backend, merged["backend_options"])

    @property
    def default_shots(self) -> int:
        return self._default_shots

    @property
    def seed(self) -> Optional[int]:
        return self._seed

    def run(self, pubs: Iterable, *, shots: int | None = None) -> GPUPrimitiveJob:
        """Sample every PUB; returns a submitted :class:`GPUPrimitiveJob`.

        Raises:
            ValueError: a PUB that does not validate (parameter count, shots < 1)
                or a state too large for the device.
        """
        if shots is None:
            shots = self._default_shots
        _check_shots(shots)
        ranks = self._ranks()
        prepared, group = self._agreed(ranks, lambda: self._prepare(pubs, shots, ranks))
        tasks, device, dtype_name, reason, seed = (prepared[key] for key in ("tasks", "device", "dtype", "reason", "seed"))
        if any(not task.pub.circuit.cregs for task in tasks):
            # As Qiskit's StatevectorSampler: such a PUB's result has no data.
            warnings.warn(
                "One of your circuits has no output classical registers and so the result "
                "will be empty. Did you mean to add measurement instructions?",
                UserWarning,
                stacklevel=2,
            )

        def work(execution: Execution) -> PrimitiveResult:
            seeds = np.random.default_rng(seed)
            results = [_sample(task, device, dtype_name, execution, seeds, reason, group) for task in tasks]
            return PrimitiveResult(results, metadata={"version": 2})

        return self._submit(device, prepared["ops_total"], work, tasks, group)

    def _prepare(self, pubs, shots, ranks) -> dict:
        """Coerce, validate and compile every PUB (the work of ``run()`` before the job)."""
        device, dtype_name, reason = self._device(ranks)
        tasks = []
        ops_total = 0
        for pub, compiled in self._compiled_pubs(SamplerPub, pubs, shots, device, ranks):
            values = _parameter_values(pub, compiled)
            tasks.append(_SamplerTask(pub, compiled, values, int(pub.shots)))
            ops_total += _ops_estimate(pub, compiled)
        if isinstance(self._seed, np.random.Generator):
            seed = int(self._seed.integers(0, 2**62))
        else:
            seed = self._seed if self._seed is not None else int(np.random.default_rng().integers(0, 2**62))
        prepared = {"tasks": tasks, "device": device, "dtype": dtype_name, "reason": reason, "ops_total": ops_total, "seed": seed}
        if ranks is not None:
            prepared["digest"] = job_digest([(_circuit_parts(t.pub.circuit), t.values, t.shots) for t in tasks], dtype_name)
        return prepared


def _tableau_reserve(task) -> int:
    """Bytes a task run as stabilizer states needs at once (one parameter set at a time)."""
    shape = task.values.shape[:-1]
    if not int(np.prod(shape, dtype=np.int64)):
        return 0
    template = task.compiled.template
    program = template if template is not None else task.compiled.bind(task.values[(0,) * len(shape)])
    # The estimator's exact branching keeps a copy per uncertain measurement on a path: as shot
    # branching with that many forks (2^copies shots) would.
    shots = getattr(task, "shots", None) or 1 << max(getattr(task, "branch_copies", 0), 0)
    return stabilizer_bytes(program, RunConfig(shots=shots, method="stabilizer"))


def _program_arrays(compiled: CompiledCircuit, device: Device, precision: str, local: int, in_place: bool, split: bool, restart: bool) -> tuple:
    """``(in place, state-sized arrays)`` the run of ``compiled``'s program holds, as the backend
    counts them (:func:`~gpu_provider.engine.executor.state_arrays`: a wide Pauli evolution's
    recurrence, the copy trajectories restart from) and checks them against the device's room. A
    program measured only at the end that fits only in place runs in place; one that fits in
    neither way is refused before the job, saying what it needs. Without ``restart`` a dynamic
    program branches exactly instead (the estimator): no restart copy, and its PUB checks the
    count with the copies its paths keep. Translated per binding (no template), the count of a
    plain state."""
    template = compiled.template
    if template is None:
        return in_place, 1 if in_place else 2
    itemsize = np.dtype(PRECISIONS[precision]).itemsize
    config = RunConfig(shots=1, precision=precision, in_place=in_place)
    sampling = is_sampling_friendly(template)
    capacity = dispatcher_for(device).capacity()
    try:
        if restart or sampling:
            _check_fits(device, template, config, itemsize, capacity, num_qubits=local if split else None)
    except CircuitTooLargeError as exc:
        if in_place or split or not sampling:
            raise
        config, smallest = _in_place_instead(exc, device, template, config, itemsize, capacity)
        if config is None:
            raise smallest from None
    arrays = state_arrays(template, config, kernels_cover(template, device, config.dtype))
    return config.in_place, arrays - (0 if restart or sampling else 1)


def _vector_bytes(num_qubits: int, itemsize: int, arrays: int, device_kind: str) -> int:
    """What :meth:`_Primitive._submit` reserves for a state-vector task of ``num_qubits``: ``arrays``
    states, a batch of small states where such states batch, and the workspace."""
    batch = BATCH_MAX_AMPLITUDES * itemsize if batch_size(num_qubits, device_kind) > 1 else 0
    return arrays * state_bytes(num_qubits, itemsize) + batch + WORKSPACE_BYTES


def _check_vector_fits(device: Device, num_qubits: int, itemsize: int) -> None:
    """Raise :class:`CircuitTooLargeError` unless a state, its scratch buffer and the rest fit on
    ``device``: in what its dispatcher lets jobs of this process share (a job running now does
    not shrink it; the new one waits for memory instead), as ``run()`` of the backend counts."""
    needed, free = _vector_bytes(num_qubits, itemsize, 2, device.kind), dispatcher_for(device).capacity()
    if needed > free:
        raise too_large_error(device.kind, num_qubits, itemsize, needed, free, f"2 arrays of 2^{num_qubits} x {itemsize} bytes and {WORKSPACE_BYTES >> 20} MiB of workspace")


def _fits(device: Device, num_qubits: int, itemsize: int) -> bool:
    """Whether one state of ``num_qubits`` (no scratch buffer) and the rest fit on ``device`` (as
    :func:`_check_vector_fits` counts)."""
    return _vector_bytes(num_qubits, itemsize, 1, device.kind) <= dispatcher_for(device).capacity()


def _as_tableau_reads(circuit: QuantumCircuit):
    """``circuit`` translated as a tableau reads it (parameters at placeholder values: only its
    structure is asked), or None where it does not translate (it fails later with its own error)."""
    try:
        bound = circuit.assign_parameters([0.5] * circuit.num_parameters, inplace=False) if circuit.parameters else circuit
        return translate(bound, dense_max_qubits=MAX_GATE_QUBITS)
    except Exception:
        return None


def _clifford_binding(compiled: CompiledCircuit, values: np.ndarray):
    """The Program of one parameter set of a circuit run as a stabilizer state (it must be Clifford)."""
    program = compiled.bind(values)
    reason = why_not_clifford(program)
    if reason is not None:
        raise InvalidInputError(f"circuit {compiled.circuit.name!r} runs as a stabilizer state, but with parameters {np.asarray(values).tolist()} {reason}")
    return program


def _on_tableau(compiled: CompiledCircuit) -> bool:
    return getattr(compiled, "method", "statevector") == "stabilizer"


def _check_clifford(compiled: CompiledCircuit, too_large: Optional[CircuitTooLargeError]) -> None:
    """A circuit a primitive will run as a stabilizer state must be Clifford; checked now unless its
    parameters decide (then for each parameter set as it runs)."""
    if not compiled.parameters:
        require_clifford(compiled.bind(np.zeros(0)), compiled.circuit.name, too_large)


def _check_shots(shots) -> int:
    if isinstance(shots, bool) or not isinstance(shots, (int, np.integer)):
        raise TypeError(f"shots must be an integer, not {shots!r}")  # as Qiskit's reference sampler
    if not 1 <= shots <= 10**9:
        raise InvalidOptionError(f"shots must be an integer from 1 to 1,000,000,000, not {shots!r}")
    return int(shots)


def _sample(
    task: _SamplerTask, device: Device, precision: str, execution: Execution, seeds: np.random.Generator, reason: str, group=None
) -> SamplerPubResult:
    start = time.perf_counter()
    pub = task.pub
    circuit = pub.circuit
    shape = pub.parameter_values.shape
    registers = [(creg.name, [circuit.find_bit(bit).index for bit in creg]) for creg in circuit.cregs]
    arrays = {name: np.zeros(shape + (task.shots, -(-len(bits) // 8)), dtype=np.uint8) for name, bits in registers}  # a 0-bit register: 0 bytes
    program_ops = 0
    batched = 0
    compiled = task.compiled
    split = group is not None and group.global_qubits > 0
    # Split over MPI ranks: one parameter set at a time, each run split (run_program with the group).
    chunks = [[index] for index in np.ndindex(*shape)] if split else _chunks(list(np.ndindex(*shape)), circuit.num_qubits, device.kind)
    if _on_tableau(compiled):  # a stabilizer state per parameter set
        chunks = []
        for index in np.ndindex(*shape):
            program = _clifford_binding(compiled, task.values[index])
            program_ops = program.num_ops
            config = RunConfig(shots=task.shots, seed=int(seeds.integers(0, 2**62)), memory=True, precision=precision, method="stabilizer")
            memory = run_program(program, device, config, execution).memory or [0] * task.shots
            for name, bits in registers:
                arrays[name][index] = _register_bytes(memory, bits, task.shots, circuit.num_clbits)
    for chunk in chunks:
        configs = [
            RunConfig(shots=task.shots, seed=int(seeds.integers(0, 2**62)), memory=True, precision=precision, in_place=getattr(compiled, "in_place", False))
            for _ in chunk
        ]
        kernels = device_kernels(device, configs[0].dtype)
        if not split and len(chunk) > 1 and compiled.can_batch:
            columns = compiled.bind_columns(np.stack([task.values[index] for index in chunk]))
            batch = evolve_columns(columns, circuit.num_qubits, len(chunk), device.xp, configs[0].dtype, kernels, execution)
            program = compiled.template  # measurements are the same in every binding
            program_ops = program.num_ops
            memories = [
                sample_memory(program, batch.state(row), task.shots, np.random.default_rng(config.seed)) for row, config in enumerate(configs)
            ]
            batched += len(chunk)
            for index, memory in zip(chunk, memories):
                for name, bits in registers:
                    arrays[name][index] = _register_bytes(memory, bits, task.shots, circuit.num_clbits)
            continue
        programs = [compiled.bind(task.values[index]) for index in chunk]
        program_ops = programs[0].num_ops
        if split:
            memories = (run_program(program, device, config, execution, group=group).memory for program, config in zip(programs, configs))
        elif batchable(programs):
            batch = evolve_batch(programs, device.xp, configs[0].dtype, kernels, execution)
            memories = [
                sample_memory(program, batch.state(row), task.shots, np.random.default_rng(config.seed))
                for row, (program, config) in enumerate(zip(programs, configs))
            ]
            batched += len(chunk)
        else:
            memories = (run_program(program, device, config, execution).memory for program, config in zip(programs, configs))
        for index, memory in zip(chunk, memories):
            memory = memory or [0] * task.shots
            for name, bits in registers:
                arrays[name][index] = _register_bytes(memory, bits, task.shots, circuit.num_clbits)
    data = DataBin(**{name: BitArray(arrays[name], len(bits)) for name, bits in registers}, shape=shape)
    metadata = {
        "shots": task.shots,
        "circuit_metadata": circuit.metadata,
        "simulator_metadata": _simulator_metadata(
            device, precision, task.compiled, program_ops, int(np.prod(shape, dtype=np.int64)), time.perf_counter() - start, reason, batched
        ),
    }
    return SamplerPubResult(data, metadata=metadata)


def _register_bytes(memory: list, clbits: list[int], shots: int, num_clbits: int) -> np.ndarray:
    """Each shot's register value (bit j from ``clbits[j]``) as big-endian bytes, as BitArray stores it."""
    num_bytes = -(-len(clbits) // 8)
    if not num_bytes:  # a register of no bits, as Qiskit's BitArray holds it: no bytes a shot
        return np.zeros((shots, 0), dtype=np.uint8)
    if num_clbits <= 62:  # every shot's clbit integer fits an int64
        values = np.asarray(memory, dtype=np.int64)
        register = np.zeros(shots, dtype=np.int64)
        for j, clbit in enumerate(clbits):
            register |= ((values >> clbit) & 1) << j
        shifts = 8 * np.arange(num_bytes - 1, -1, -1)
        return ((register[:, None] >> shifts[None, :]) & 0xFF).astype(np.uint8)
    out = np.zeros((shots, num_bytes), dtype=np.uint8)
    for shot, value in enumerate(memory):
        register = 0
        for j, clbit in enumerate(clbits):
            register |= ((int(value) >> clbit) & 1) << j
        out[shot] = np.frombuffer(register.to_bytes(num_bytes, "big"), dtype=np.uint8)
    return out


__all__ = ["EstimatorV2", "SamplerV2", "GPUPrimitiveJob"]
