"""``GPUSimulator``: a Qiskit ``BackendV2`` over the gpu_provider engine.

``run()`` validates options, picks the device, translates (and fuses) every
circuit before returning, so mistakes raise at once; the simulation itself
runs asynchronously in a :class:`~gpu_provider.GPUJob`. No per-run state lives
on the backend: one backend object serves many threads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import numbers
import os
import threading
import time
import uuid
import warnings
from collections.abc import Mapping
from typing import Any, Optional

import numpy as np
from qiskit.circuit import (
    BreakLoopOp,
    ContinueLoopOp,
    ForLoopOp,
    IfElseOp,
    Measure,
    Parameter,
    QuantumCircuit,
    Reset,
    SwitchCaseOp,
    WhileLoopOp,
)
from qiskit.circuit.library import Initialize, StatePreparation, UnitaryGate, get_standard_gate_name_mapping
from qiskit.providers import BackendV2, Options
from qiskit.result import Result
from qiskit.transpiler import Target

from . import __version__
from .compiler.fusion import DEFAULT_FUSION_THRESHOLD, default_width, fuse, fusion_limits
from .compiler.translate import DENSE_MAX_QUBITS, EAGER_LOOP_ITERATIONS, translate
from .engine import small_batch
from .engine.devices import PRECISIONS, Device, byte_count, check_device_option, resolve_device, state_bytes, too_large_error
from .engine.executor import (
    Execution,
    ExperimentOutput,
    RunConfig,
    dispatcher_for,
    estimated_ops,
    kernels_cover,
    memory_needed,
    max_qubits_for,
    need_detail,
    run_program,
    state_arrays,
)
from .engine.threads import DEFAULT_PARALLEL_THRESHOLD, threads_for
from .engine.distributed import (
    EXCHANGE_BYTES,
    RankGroup,
    abandon_on_ranks,
    agree_on_job,
    Ranks,
    check_split,
    global_qubits_for,
    job_digest,
    mpi_communicator,
    ranks_for,
    run_on_ranks,
)
from .engine.program import Program, compact, lazy_loop, measurements_are_terminal
from .engine.stabilizer import MAX_GATE_QUBITS, require_clifford, tableau_bytes, why_not_clifford
from .errors import CircuitTooLargeError, DeviceUnavailableError, InvalidInputError, InvalidOptionError, UnknownOptionError
from .executors import check_executor_options, run_chunks
from .job import GPUJob
from .qiskit_errors import raises_qiskit_errors

logger = logging.getLogger(__name__)

MAX_SHOTS = 10**9
# Memory for one shot of memory=True output, a conservative Python-side estimate.
BYTES_PER_MEMORY_SHOT = 120


class GPUSimulator(BackendV2):
    """Exact statevector simulator on an NVIDIA GPU (CuPy) or, without one, on NumPy.

    Options (set with ``set_options`` or pass to ``run``):
        shots (int): samples per circuit (1024).
        memory (bool): also return every shot's outcome (False).
        seed_simulator (int | None): seed; experiment ``i`` uses ``seed + i``.
        precision ("double" | "single"): complex128 or complex64 amplitudes.
        device ("auto" | "GPU" | "CPU"): "auto" uses a usable GPU, else the CPU.
        device_id (int): which GPU.
        statevector (bool): add each circuit's final statevector (terminal
            measurements removed) to the result.
        fusion_enable, fusion_max_qubits, fusion_threshold: gate fusion.
        max_loop_iterations (int): cap on ``while_loop`` iterations.
        initial_statevector (array | None): start from this state instead of |0...0>.
        mpi (bool | mpi4py communicator): split each circuit's state over the
            2^k ranks of ``MPI.COMM_WORLD`` (True) or of the given communicator.
            Every rank calls ``run()`` with the same circuits and options and
            gets the same result; each rank uses its own GPU. A rank must hold
            at least as many qubits as the widest gate acts on. Needs the
            ``mpi`` extra and ``mpiexec -n 2^k``; see docs/getting-started.md.
        executor (concurrent.futures.Executor | dask.distributed.Client | None):
            run the job's circuits in chunks on this executor's workers, as
            Aer's option of the same name; ``None`` (default) runs them here.
            Every circuit is still compiled by ``run()``; each worker resolves
            ``device`` itself and each experiment's metadata names the device
            and worker that ran it. The job's status, progress, cancel and
            result timeout cover the whole batch; a worker that dies fails the
            job with ``ExecutorError``.
        max_job_size (int | None): circuits per chunk on the executor; ``None``
            spreads them over the executor's workers, a few chunks each.
            Ignored without an executor.
        batch_small_circuits (bool): on a GPU, run consecutive small circuits
            (up to 14 qubits in single precision and 13 in double where the
            GPU's shared memory per block allows, as on A100, H100 and H200;
            12 and 11 on any GPU; gates and final measurements only) many per
            kernel launch, each whole in shared memory (True); the same counts
            for a seed, up to rounding. On an
            executor, its GPU workers do the same with their chunks. Other
            circuits and MPI runs are unaffected.
        shot_branching_enable (bool): shots of a circuit that measures
            mid-circuit, resets or branches on classical values share one
            simulation until their outcomes differ (True; Aer's option of the
            same name, off there by default). Counts keep the distribution of
            independent shots and memory comes in a random order; a seed gives
            other samples than with False, which runs every shot on its own.
        batched_shots_gpu (bool): on a GPU, the shots of such a circuit of up
            to 14 qubits in single precision and 13 in double (12 and 11 on any
            GPU; gates, measure, reset, and conditions that compare clbits with
            constants) run one per thread block, all of them in one kernel
            launch (True; Aer's option of the same name, off there by default).
            At once where that launch costs less than one simulation's
            launches; otherwise, with shot branching, once branching has begun
            more paths than the launch would cost; without it, always. On the CPU the same
            hand-over (with shot branching only) runs them as one NumPy batch
            with the kernel's random draws. A seed gives the same samples run
            after run; where the batch ran, other ones than the interpreter's,
            with the same distribution.
        batched_shots_gpu_max_qubits (int): the widest circuit whose shots
            ``batched_shots_gpu`` runs in one launch on a GPU (Aer's option of
            the same name; 16 by default, so the device's shared memory
            decides: 14 qubits in single precision, 13 in double, on A100,
            H100 and H200).
        max_parallel_threads (int): on the CPU, the most BLAS threads a job's
            matrix products use (Aer's option of the same name; 0, the
            default, allows every core this process may use). Jobs running at
            the same time share the cores, and the count never exceeds the
            process's own (``OPENBLAS_NUM_THREADS``, a ``threadpoolctl``
            limit). Set 1 on a machine whose cores other work keeps busy.
        statevector_parallel_threshold (int): on the CPU, a job whose widest
            circuit has at most this many qubits uses one BLAS thread (Aer's
            option of the same name, 14 by default): on such small states
            threads gain nothing measurable on an idle machine and cost
            1.7-3x (single runs up to 16x) where the cores are busy. See
            docs/getting-started.md, "CPU threads".
    """

    def __init__(self, provider=None, name: str = "gpu_simulator", **options: Any) -> None:
        super().__init__(
            provider=provider,
            name=name,
            description="Exact statevector simulator on NVIDIA GPUs through CuPy, with a NumPy CPU fallback",
            backend_version=__version__,
        )
        self._target_cache: dict = {}
        if options:
            self.set_options(**options)

    @classmethod
    def _default_options(cls) -> Options:
        return Options(
            shots=1024,
            memory=False,
            seed_simulator=None,
            precision="double",
            device="auto",
            device_id=0,
            statevector=False,
            fusion_enable=True,
            fusion_max_qubits=None,
            fusion_threshold=DEFAULT_FUSION_THRESHOLD,
            max_loop_iterations=100_000,
            initial_statevector=None,
            mpi=False,
            executor=None,
            max_job_size=None,
            batch_small_circuits=True,
            shot_branching_enable=True,
            batched_shots_gpu=True,
            batched_shots_gpu_max_qubits=16,
            parameter_binds=None,
            method="automatic",
            max_parallel_threads=0,
            statevector_parallel_threshold=DEFAULT_PARALLEL_THRESHOLD,
        )

    @raises_qiskit_errors
    def set_options(self, **fields: Any) -> None:
        """Update options; an unknown field raises ``AttributeError`` (as BackendV2 specifies), a bad value ``InvalidOptionError``."""
        known = {key: value for key, value in fields.items() if key in self.options}
        for key in sorted(fields.keys() - known.keys()):
            raise UnknownOptionError(f"{key!r} is not an option of {self.name}; its options are {sorted(self.options)}")
        merged = {**self.options.__dict__, **known}
        _validate_options(merged)
        super().set_options(**{key: merged[key] for key in known})  # as validated: NumPy integers become ints
        self._target_cache.clear()

    # -- target ---------------------------------------------------------------

    @property
    @raises_qiskit_errors
    def target(self) -> Target:
        device, _ = resolve_device(self.options.device, self.options.device_id)
        # Under MPI, 2^k ranks of this device's size hold k more qubits.
        comm = mpi_communicator(self.options.mpi)
        global_qubits = 0 if comm is None else global_qubits_for(comm.Get_size())
        stabilizer = self.options.method == "stabilizer"
        key = (device.name, self.options.precision, global_qubits, stabilizer)
        target = self._target_cache.get(key)
        if target is None:
            itemsize = np.dtype(PRECISIONS[self.options.precision]).itemsize
            where = device.name if comm is None else f"{comm.Get_size()} ranks of {device.name}"
            # A stabilizer state's width is that of Aer's stabilizer method (its run checks the memory).
            width = STABILIZER_TARGET_QUBITS if stabilizer else max_qubits_for(device, itemsize) + global_qubits
            target = _build_target(width, f"{self.name} on {where}")
            self._target_cache[key] = target
        return target

    @property
    def max_circuits(self):
        return None

    # -- run ------------------------------------------------------------------

    @raises_qiskit_errors
    def run(self, run_input, **options: Any) -> GPUJob:
        """Simulate one circuit or a list of circuits; returns a submitted :class:`GPUJob`.

        Run options that Qiskit's tools pass to every backend and that an ideal
        simulator fulfils anyway (``meas_level=2``, ``meas_return``,
        ``init_qubits=True``, ``rep_delay``, ``rep_time``) are accepted silently;
        any other unknown option warns. Every error below is also a ``QiskitError``.

        Raises:
            InvalidInputError: for input that is not circuits, an empty list, bad
                option values, unbound parameters or unsupported instructions.
            DeviceUnavailableError: ``device="GPU"`` where no GPU is usable (with an
                ``executor``, each worker checks for its own GPU instead).
            CircuitTooLargeError: a circuit whose state does not fit in memory.
        """
        merged = dict(self.options.__dict__)
        for key, value in options.items():
            if key in merged:
                merged[key] = value
            elif key in IDEAL_RUN_OPTIONS:
                IDEAL_RUN_OPTIONS[key](value)
            else:
                warnings.warn(f"Option {key} is not used by this backend", UserWarning, stacklevel=3)
        _check_mpi_option(merged["mpi"])
        ranks = ranks_for(merged["mpi"])
        if ranks is None:
            return self._submit(self._prepare(run_input, merged))
        # Under MPI every rank prepares, then all agree (same circuits, options and seed) before any
        # waits on another: a rank whose preparation failed still takes part, so all raise together.
        prepared, error = None, None
        try:
            prepared = self._prepare(run_input, merged, ranks)
        except Exception as exc:
            error = exc
        seed = agree_on_job(ranks.comm, prepared.digest() if prepared else "", prepared.seed if prepared else 0, error)
        prepared.reseed(seed)
        return self._submit(prepared, RankGroup(ranks.comm))

    def _prepare(self, run_input, merged: dict, ranks: Optional[Ranks] = None) -> "_Prepared":
        """Validate, translate, check and fuse every circuit (all of run()'s work before the job)."""
        with _gc_paused():
            return self._prepare_circuits(run_input, merged, ranks)

    def _prepare_circuits(self, run_input, merged: dict, ranks: Optional[Ranks]) -> "_Prepared":
        _validate_options(merged)
        circuits = _bind_parameters(_as_circuit_list(run_input), merged["parameter_binds"])
        executor = merged["executor"]
        global_qubits = 0
        planning_kind = None  # the device kind fusion plans for when it is not the local device's
        if ranks is not None:
            if executor is not None:
                raise InvalidOptionError(
                    "mpi and executor cannot be combined: mpi splits one state over the ranks, executor spreads "
                    "circuits over workers; choose one"
                )
            global_qubits = ranks.global_qubits
            device, fallback_reason = ranks.device(merged["device"], merged["device_id"])
        else:
            try:
                device, fallback_reason = resolve_device(merged["device"], merged["device_id"])
            except DeviceUnavailableError:
                if executor is None:
                    raise
                # device="GPU" on a machine without one: the executor's workers resolve it (a job
                # submitted from a login node to GPU nodes). Plan for a GPU; check memory there.
                device, fallback_reason = resolve_device("CPU")
                planning_kind = "GPU"
        seed = merged["seed_simulator"]
        if seed is None:
            seed = int(np.random.default_rng().integers(0, 2**31 - 1))
        itemsize = np.dtype(PRECISIONS[merged["precision"]]).itemsize
        experiments = []
        distributed = []
        bulk_sizes: list = []  # per circuit, its bulk-kernel bytes where run() found them (see small_batch.plan)
        # What this process may allocate on the device, read once for the whole list (it reads system files).
        capacity = dispatcher_for(device).capacity() if planning_kind is None else 0
        # On a GPU whose bulk kernel will run a job's small circuits, they are not fused: the kernel
        # applies each gate in shared memory, where a gate costs next to nothing and fusing it would
        # be most of the circuit's host work (an executor's workers decide for themselves).
        bulk = merged["batch_small_circuits"] and ranks is None and executor is None
        for index, circuit in enumerate(circuits):
            # Simulate only the qubits some op touches: a layout-transpiled circuit is as wide as the Target.
            # A stabilizer state reads gates of up to MAX_GATE_QUBITS qubits: wider ones expand.
            program = compact(translate(circuit, merged["initial_statevector"], dense_max_qubits=_dense_width(merged["method"])))
            method = _explicit_method(merged, program, circuit.name, ranks)
            if merged["statevector"] and not measurements_are_terminal(program):
                raise InvalidInputError(
                    f"statevector=True needs a circuit whose measurements are all at the end, without "
                    f"control flow; circuit {circuit.name!r} measures or branches mid-circuit. Drop the option, "
                    "or save the state before the first measurement"
                )
            config = RunConfig(
                shots=merged["shots"],
                seed=seed + index,
                memory=merged["memory"],
                statevector=merged["statevector"],
                precision=merged["precision"],
                max_loop_iterations=merged["max_loop_iterations"],
                shot_branching=merged["shot_branching_enable"],
                batched_shots=merged["batched_shots_gpu"],
                batched_shots_max_qubits=merged["batched_shots_gpu_max_qubits"],
                method=method,
                max_parallel_threads=merged["max_parallel_threads"],
                parallel_threshold=merged["statevector_parallel_threshold"],
            )
            if merged["statevector"]:  # the full-width vector returned, idle qubits included
                _check_statevector_output(program, circuit.name, itemsize)
            # Under MPI with 2^k > 1 ranks the state is split: each rank keeps n - k qubits, at least as
            # many as the widest gate targets.
            local_qubits = program.num_qubits - global_qubits
            split = global_qubits > 0
            if split:
                check_split(circuit.name, program.num_qubits, global_qubits, program.ops)
            if planning_kind is None:
                try:
                    _check_fits(device, program, config, itemsize, capacity, num_qubits=local_qubits if split else None)
                except CircuitTooLargeError as exc:
                    # A state without its scratch buffer, where that fits; "automatic", as Aer's, runs a
                    # Clifford circuit too wide for a state vector as a stabilizer state (first choice).
                    in_place, exc = (None, exc) if split else _in_place_instead(exc, device, program, config, itemsize, capacity)
                    if in_place is not None and not (merged["method"] == "automatic" and why_not_clifford(program) is None):
                        config = in_place
                    else:
                        program, config = _stabilizer_instead(exc, merged, circuit, program, config, ranks)
                    _check_fits(device, program, config, itemsize, capacity)
            if split and merged["statevector"]:
                _check_gathered_state(program, circuit.name, itemsize)
            if merged["memory"]:
                _check_memory_output(merged["shots"], device)
            ops_before = program.num_ops
            bulk_size = small_batch.eligible_bytes(program, config, device) if bulk else None
            if merged["fusion_enable"] and bulk_size is None and config.method == "statevector":
                width = merged["fusion_max_qubits"]
                if split:  # a fused gate's targets must fit on one rank
                    width = min(width or default_width(device.kind, merged["precision"]), local_qubits)
                if width is None or width >= fusion_limits()[0]:
                    program = fuse(program, planning_kind or device.kind, width, merged["fusion_threshold"], precision=merged["precision"])
            if executor is not None:
                _check_portable(program, circuit.name)
            experiments.append((circuit, program, config, ops_before))
            distributed.append(split)
            bulk_sizes.append(bulk_size)
        return _Prepared(circuits, device, fallback_reason, seed, merged, experiments, distributed, global_qubits, bulk_sizes)

    def _submit(self, prepared: "_Prepared", group=None) -> GPUJob:
        device, experiments, merged = prepared.device, prepared.experiments, prepared.merged
        job_id = str(uuid.uuid4())
        ops_total = sum(estimated_ops(program, config) for _, program, config, _ in experiments)
        run_metadata = {"device": device.name, "precision": merged["precision"]}
        if prepared.fallback_reason:
            run_metadata["gpu_unavailable_reason"] = prepared.fallback_reason
        splits = prepared.distributed
        if group is not None:
            run_metadata["mpi_ranks"] = group.size

        executor = merged["executor"]
        if executor is not None:
            where = (merged["device"], merged["device_id"], merged["max_job_size"], merged["batch_small_circuits"])

            def simulate(execution: Execution) -> Result:
                return _simulate_on_executor(self, job_id, executor, where, experiments, execution, run_metadata)

            reserve = 0  # the states live on the executor's workers; this job only waits for them here
        else:
            # Runs of small circuits that go to the GPU's bulk kernel (none on the CPU, under MPI or when turned off).
            plan = None
            if merged["batch_small_circuits"] and group is None:
                plan = small_batch.plan(device, [(program, config) for _, program, config, _ in experiments], sizes=prepared.bulk_sizes)

            def simulate(execution: Execution) -> Result:
                if group is None:
                    return _simulate(self, job_id, device, experiments, execution, run_metadata, plan=plan)
                return run_on_ranks(group, execution, lambda: _simulate(self, job_id, device, experiments, execution, run_metadata, group, splits))

            k = prepared.global_qubits
            reserve = max(
                memory_needed(program, config, device, num_qubits=program.num_qubits - k if split else None)
                + (EXCHANGE_BYTES if split else 0)
                for (_, program, config, _), split in zip(experiments, prepared.distributed)
            )
            if plan is not None:  # the bulk path's largest chunk of buffers
                reserve = max(reserve, small_batch.reserve_bytes(plan))
            if merged["memory"] and device.kind == "CPU":  # the per-shot list lives beside the state
                reserve += merged["shots"] * BYTES_PER_MEMORY_SHOT
        widest = max(program.num_qubits for _, program, _, _ in experiments)
        # The job's BLAS threads on the CPU; a job on an executor only waits here (its chunks hold their own).
        threads = 0 if executor is not None else job_threads(widest, merged)
        execution = Execution(device, ops_total, simulate, reserve_bytes=reserve, num_qubits=widest, threads=threads)
        if group is not None:
            # Cancelled while queued, or refused: this rank still joins the first sync point, so the others stop too.
            execution.on_abandon = lambda kind, message: abandon_on_ranks(group, kind, message)
        job = GPUJob(self, job_id, execution, circuits=prepared.circuits)
        job.submit()
        return job


@dataclasses.dataclass
class _Prepared:
    """What run() prepared for one job: device, seed, and per circuit (circuit, program, config, ops before
    fusion) and whether its state is split over MPI ranks (``distributed``, with ``global_qubits`` rank bits)."""

    circuits: list
    device: Device
    fallback_reason: str
    seed: int
    merged: dict
    experiments: list
    distributed: list
    global_qubits: int
    bulk_sizes: list  # per circuit, small_batch.eligible_bytes where run() found it, else None

    def digest(self) -> str:
        """The same on every rank given the same circuits and options (the seed aside: rank 0's is taken)."""
        options = {key: value for key, value in self.merged.items() if key not in ("seed_simulator", "mpi", "device_id")}
        options["initial_statevector"] = None if options["initial_statevector"] is None else np.asarray(options["initial_statevector"])
        parts = [(program, config.shots, config.memory, config.statevector, config.precision) for _, program, config, _ in self.experiments]
        return job_digest(parts, sorted((k, repr(v) if not isinstance(v, np.ndarray) else v) for k, v in options.items()))

    def reseed(self, seed: int) -> None:
        self.seed = seed
        self.experiments = [
            (circuit, program, dataclasses.replace(config, seed=seed + index), ops_before)
            for index, (circuit, program, config, ops_before) in enumerate(self.experiments)
        ]


def _simulate(
    backend: GPUSimulator,
    job_id: str,
    device: Device,
    experiments,
    execution: Execution,
    run_metadata: dict,
    group=None,
    splits=(),
    plan=None,
) -> Result:
    """Run the experiments; with an MPI ``group``, those marked in ``splits`` are split over its
    ranks and the others run whole on every rank (checking the ranks' control channel for cancels).
    With a ``plan`` (:func:`small_batch.plan`, no group), its batched runs go through the GPU's bulk kernel."""
    start = time.time()
    results = []
    items = [(program, config) for _, program, config, _ in experiments]
    outputs = _outputs(device, items, execution, group, splits, plan)
    for (circuit, program, config, ops_before), output in zip(experiments, outputs):
        output.metadata.update(fusion_ops_before=ops_before, fusion_ops_after=program.num_ops)
        if "gpu_unavailable_reason" in run_metadata:
            output.metadata["gpu_unavailable_reason"] = run_metadata["gpu_unavailable_reason"]
        results.append(experiment_result(circuit, output, config))
    return _job_result(backend, job_id, results, start, dict(run_metadata))


def _outputs(device: Device, items: list, execution: Execution, group, splits, plan):
    """Each experiment's output in order: the runs that ``plan`` batches in bulk, the rest one at a time."""

    def run_one(index: int):
        program, config = items[index]
        if group is None:
            return run_program(program, device, config, execution)
        if splits[index]:
            return run_program(program, device, config, execution, group=group)
        return run_program(program, device, config, group)

    runs = plan if plan is not None else [small_batch.Run(0, len(items), False)]
    return small_batch.outputs_in_order(runs, items, device, execution, run_one)


def _simulate_on_executor(backend: GPUSimulator, job_id: str, executor, where, experiments, execution: Execution, run_metadata: dict) -> Result:
    """The job's circuits in chunks on ``executor``'s workers; the Result as :func:`_simulate` builds it."""
    start = time.time()
    device_option, device_id, max_job_size, batch_small_circuits = where
    work = [(program, config, estimated_ops(program, config)) for _, program, config, _ in experiments]
    outputs = run_chunks(executor, work, execution, device_option, device_id, max_job_size, job_id, batch_small_circuits)
    results = []
    for (circuit, program, config, ops_before), output in zip(experiments, outputs):
        output.metadata.update(fusion_ops_before=ops_before, fusion_ops_after=program.num_ops)
        results.append(experiment_result(circuit, output, config))
    metadata = {
        "device": ",".join(sorted({output.metadata["device"] for output in outputs})),
        "precision": run_metadata["precision"],
        "executor": type(executor).__name__,
    }
    return _job_result(backend, job_id, results, start, metadata)


def _job_result(backend: GPUSimulator, job_id: str, results: list, start: float, metadata: dict) -> Result:
    return Result.from_dict(
        {
            "backend_name": backend.name,
            "backend_version": backend.backend_version,
            "job_id": job_id,
            "results": results,
            "status": "COMPLETED",
            "success": True,
            "time_taken": time.time() - start,
            "metadata": metadata,
        }
    )


def experiment_result(circuit: QuantumCircuit, output: ExperimentOutput, config: RunConfig) -> dict:
    """One experiment laid out as Qiskit's BasicSimulator lays it out."""
    data: dict = {"counts": {hex(value): count for value, count in output.counts.items()}}
    if output.memory is not None:
        data["memory"] = [hex(value) for value in output.memory]
    if output.statevector is not None:
        data["statevector"] = output.statevector
    header = {
        "name": circuit.name,
        "n_qubits": circuit.num_qubits,
        "qreg_sizes": [[qreg.name, qreg.size] for qreg in circuit.qregs],
        "creg_sizes": [[creg.name, creg.size] for creg in circuit.cregs],
        "qubit_labels": [[qreg.name, j] for qreg in circuit.qregs for j in range(qreg.size)],
        "clbit_labels": [[creg.name, j] for creg in circuit.cregs for j in range(creg.size)],
        "memory_slots": circuit.num_clbits,
        "global_phase": float(circuit.global_phase) if not hasattr(circuit.global_phase, "parameters") else 0.0,
        "metadata": circuit.metadata if circuit.metadata is not None else {},
    }
    return {
        "name": circuit.name,
        "seed_simulator": config.seed,
        "shots": config.shots,
        "data": data,
        "status": "DONE",
        "success": True,
        "header": header,
        "time_taken": output.metadata["time_taken"],
        "metadata": output.metadata,
    }


# ---------------------------------------------------------------------------
# validation


def _as_circuit_list(run_input) -> list[QuantumCircuit]:
    if isinstance(run_input, QuantumCircuit):
        return [run_input]
    if isinstance(run_input, (list, tuple)):
        if not run_input:
            raise InvalidInputError("run() was given an empty list; pass at least one QuantumCircuit")
        for index, item in enumerate(run_input):
            if not isinstance(item, QuantumCircuit):
                raise InvalidInputError(f"run() input {index} is a {type(item).__name__}, not a QuantumCircuit; pass circuits only")
        return list(run_input)
    raise InvalidInputError(
        f"run() takes a QuantumCircuit or a list of them, not {type(run_input).__name__}; "
        "parse OpenQASM with qiskit.qasm2.loads / qiskit.qasm3.loads first"
    )


def _bind_parameters(circuits: list, binds) -> list:
    """Aer's ``parameter_binds``: one dict per circuit, each parameter to a list of values (all
    lists of a circuit equally long); a circuit becomes one experiment per position, in order."""
    if binds is None:
        return circuits
    if isinstance(binds, Mapping):
        binds = [binds]
    if not isinstance(binds, (list, tuple)) or len(binds) != len(circuits):
        count = len(binds) if isinstance(binds, (list, tuple)) else type(binds).__name__
        raise InvalidOptionError(
            f"parameter_binds needs one dict per circuit ({len(circuits)}), not {count}; "
            "each maps a circuit's parameters to lists of values, e.g. [{theta: [0.1, 0.2]}]"
        )
    bound: list = []
    for circuit, bind in zip(circuits, binds):
        if not isinstance(bind, Mapping):
            raise InvalidOptionError(f"parameter_binds for circuit {circuit.name!r} must be a dict of parameter -> values, not {type(bind).__name__}")
        if not bind:
            bound.append(circuit)
            continue
        by_name = {parameter.name: parameter for parameter in circuit.parameters}
        columns: dict = {}
        for key, values in bind.items():
            parameter = by_name.get(key) if isinstance(key, str) else key
            if parameter not in circuit.parameters:
                raise InvalidOptionError(
                    f"parameter_binds for circuit {circuit.name!r} names {key!r}, which is not one of its parameters "
                    f"({sorted(by_name) or 'none'})"
                )
            try:
                column = np.asarray(values, dtype=float).reshape(-1)
            except (TypeError, ValueError):
                raise InvalidOptionError(f"parameter_binds values for {key!r} in circuit {circuit.name!r} must be numbers, not {values!r}") from None
            if not np.all(np.isfinite(column)):
                raise InvalidOptionError(f"parameter_binds values for {key!r} in circuit {circuit.name!r} must be finite")
            columns[parameter] = column
        lengths = {len(column) for column in columns.values()}
        if len(lengths) != 1 or 0 in lengths:
            raise InvalidOptionError(
                f"parameter_binds for circuit {circuit.name!r} give {sorted(lengths)} values for different parameters; "
                "give every parameter the same, non-zero number of values"
            )
        for position in range(lengths.pop()):
            instance = circuit.assign_parameters({p: float(c[position]) for p, c in columns.items()}, inplace=False)
            instance.name = circuit.name  # results are found by the circuit's name, as Aer's are
            bound.append(instance)
    return bound


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


_FLAG_OPTIONS = ("memory", "statevector", "fusion_enable", "batch_small_circuits", "shot_branching_enable", "batched_shots_gpu")
_INT_OPTIONS = (
    "shots", "seed_simulator", "device_id", "fusion_max_qubits", "fusion_threshold", "max_loop_iterations",
    "batched_shots_gpu_max_qubits", "max_job_size", "max_parallel_threads", "statevector_parallel_threshold",
)


def _validate_options(options: dict) -> None:
    """Check every option's value, raising InvalidOptionError; normalizes them in ``options``."""
    shots = options["shots"]
    if not _is_int(shots) or not 1 <= shots <= MAX_SHOTS:
        raise InvalidOptionError(f"shots must be an integer from 1 to {MAX_SHOTS:,}, not {shots!r}")
    for flag in _FLAG_OPTIONS:
        if not isinstance(options[flag], (bool, np.bool_)):
            raise InvalidOptionError(f"{flag} must be True or False, not {options[flag]!r}")
    seed = options["seed_simulator"]
    if seed is not None and (not _is_int(seed) or seed < 0):
        raise InvalidOptionError(f"seed_simulator must be a non-negative integer or None, not {seed!r}")
    if options["precision"] not in PRECISIONS:
        raise InvalidOptionError(f"precision must be one of {tuple(PRECISIONS)}, not {options['precision']!r}")
    check_device_option(options["device"], options["device_id"])
    low, high = fusion_limits()
    width = options["fusion_max_qubits"]
    if width is not None and (not _is_int(width) or not low <= width <= high):
        raise InvalidOptionError(f"fusion_max_qubits must be an integer from {low} to {high} (or None for the device default), not {width!r}")
    threshold = options["fusion_threshold"]
    if not _is_int(threshold) or threshold < 0:
        raise InvalidOptionError(f"fusion_threshold must be a non-negative integer, not {threshold!r}")
    _check_mpi_option(options["mpi"])
    widest = options["batched_shots_gpu_max_qubits"]
    if not _is_int(widest) or widest < 1:
        raise InvalidOptionError(f"batched_shots_gpu_max_qubits must be a positive integer, not {widest!r}")
    cap = options["max_loop_iterations"]
    if not _is_int(cap) or cap < 1:
        raise InvalidOptionError(f"max_loop_iterations must be a positive integer, not {cap!r}")
    check_executor_options(options["executor"], options["max_job_size"])
    for key in ("max_parallel_threads", "statevector_parallel_threshold"):
        if not _is_int(options[key]) or options[key] < 0:
            raise InvalidOptionError(f"{key} must be a non-negative integer, not {options[key]!r}")
    # NumPy integers and booleans pass the checks above; the engine and the Result want Python ones.
    for key in _INT_OPTIONS:
        if _is_int(options[key]):
            options[key] = int(options[key])
    for key in _FLAG_OPTIONS:
        options[key] = bool(options[key])
    if options["method"] not in METHODS:
        raise InvalidOptionError(
            f"method={options['method']!r}: gpu_provider simulates state vectors, and Clifford circuits as "
            "stabilizer states; use method='automatic', 'statevector' or 'stabilizer', or qiskit-aer for other methods"
        )
    binds = options["parameter_binds"]
    if binds is not None and not isinstance(binds, (Mapping, list, tuple)):
        raise InvalidOptionError(f"parameter_binds must be a list of dicts (one per circuit) or None, not {type(binds).__name__}")


def job_threads(widest: int, options: Any) -> int:
    """The BLAS threads a CPU job whose widest circuit has ``widest`` qubits asks for, from the
    backend's ``max_parallel_threads`` and ``statevector_parallel_threshold`` (a dict or Options)."""
    return threads_for(widest, options.get("max_parallel_threads"), options.get("statevector_parallel_threshold"))


def _check_portable(program: Program, name: str) -> None:
    """A program sent to an executor's workers must pickle: refuse one holding a loop built on demand."""
    loop = lazy_loop(program.ops)
    if loop is not None:
        raise InvalidInputError(
            f"circuit {name!r} has a for_loop over {len(loop.iterations)} values, whose bodies are built on demand "
            "from the circuit and cannot be sent to an executor's workers; run it without executor=, or loop over "
            f"at most {EAGER_LOOP_ITERATIONS} values"
        )


_GC_LOCK = threading.Lock()
_GC_PAUSES = 0
_GC_WAS_ENABLED = False


@contextlib.contextmanager
def _gc_paused():
    """Python's cyclic garbage collector held off while run() translates and fuses circuits.

    Translation allocates a few objects per instruction, and with the caller's
    circuits alive every collection the allocations trigger walks all of them:
    on 500 small circuits that was 20-25% of run()'s time. What is built here
    holds no reference cycles to reclaim; collection resumes when the last
    concurrent run() leaves, and only if it was on when the first came in.
    """
    global _GC_PAUSES, _GC_WAS_ENABLED
    with _GC_LOCK:
        if _GC_PAUSES == 0:
            _GC_WAS_ENABLED = gc.isenabled()
            gc.disable()
        _GC_PAUSES += 1
    try:
        yield
    finally:
        with _GC_LOCK:
            _GC_PAUSES -= 1
            if _GC_PAUSES == 0 and _GC_WAS_ENABLED:
                gc.enable()


def _gc_after_fork_in_child() -> None:
    """A child forked while another thread was inside run(): only the forking thread lives on."""
    global _GC_LOCK, _GC_PAUSES
    _GC_LOCK = threading.Lock()
    if _GC_PAUSES:
        _GC_PAUSES = 0
        if _GC_WAS_ENABLED:
            gc.enable()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_gc_after_fork_in_child)


def _check_mpi_option(mpi) -> None:
    if not isinstance(mpi, (bool, np.bool_)) and not (hasattr(mpi, "Get_size") and hasattr(mpi, "Dup")):
        raise InvalidOptionError(f"mpi must be True, False or an mpi4py communicator, not {mpi!r}")


def _check_fits(device: Device, program: Program, config: RunConfig, itemsize: int, capacity: int, num_qubits=None) -> None:
    """Refuse a circuit whose run could not fit even with no other job of this process running.

    ``capacity`` (the dispatcher's): what the device has free, capped by the process's rlimits and
    cgroup limit; while jobs run it is the capacity measured before they started,
    so a circuit that fits after they end is accepted and waits in the queue.
    ``num_qubits``: the width one rank holds when the state is split over MPI ranks.
    """
    n = program.num_qubits if num_qubits is None else num_qubits
    needed = memory_needed(program, config, device, num_qubits=n) + (EXCHANGE_BYTES if num_qubits is not None else 0)
    if needed > capacity:
        if config.method == "stabilizer":
            raise CircuitTooLargeError(
                f"a {n}-qubit stabilizer state needs {byte_count(needed)} bytes on the {device.kind} (its tableau "
                f"of {byte_count(tableau_bytes(n))} bytes, copies of it and workspace) but only "
                f"{byte_count(capacity)} bytes are free; use fewer qubits or another device",
                num_qubits=n,
                bytes_needed=needed,
                bytes_free=capacity,
            )
        arrays = state_arrays(program, config, kernels_cover(program, device, config.dtype))
        detail = need_detail(arrays, n, itemsize)
        if config.statevector:
            detail += "; one array is the copy statevector=True returns: leave it off to need one less"
        if num_qubits is not None:
            detail += f" on each rank ({program.num_qubits - n} qubits are spread over the ranks); use more ranks"
        raise too_large_error(device.kind, n, itemsize, needed, capacity, detail)


def _check_meas_level(value) -> None:
    if _is_int(value) and int(value) == 2:  # MeasLevel.CLASSIFIED is an IntEnum
        return
    raise InvalidOptionError(
        f"meas_level={value!r} asks for pulse-level data (0: raw, 1: kerneled), which a statevector "
        "simulator does not have; use meas_level=2 (classified bits), the default"
    )


def _check_meas_return(value) -> None:
    if getattr(value, "value", value) not in ("single", "avg"):
        raise InvalidOptionError(f"meas_return must be 'single' or 'avg', not {value!r}")


def _check_init_qubits(value) -> None:
    if value is not True and value != 1:
        raise InvalidOptionError(
            f"init_qubits={value!r} asks to keep qubit states between shots; every shot of this "
            "simulator starts from |0...0>, so only init_qubits=True is possible"
        )


def _check_duration(name: str):
    def check(value) -> None:
        if value is not None and (not isinstance(value, numbers.Real) or isinstance(value, bool) or not value >= 0):
            raise InvalidOptionError(f"{name} must be a non-negative number or None, not {value!r}")

    return check


def _check_noise_model(value) -> None:
    if value is not None:
        raise InvalidOptionError(
            "noise_model asks for a noisy simulation; gpu_provider simulates ideal (noiseless) statevectors, "
            "so its answer would not be the one asked for. Run noisy circuits on qiskit-aer's AerSimulator"
        )


# Run options Qiskit's own tools (qiskit-experiments, the primitives) pass to every
# backend. An ideal simulator already does what their accepted values ask (bits
# classified, qubits reset before each shot, no repetition timing), so they are
# checked and then need nothing more; a value asking for more is an error.
IDEAL_RUN_OPTIONS = {
    "meas_level": _check_meas_level,
    "meas_return": _check_meas_return,
    "init_qubits": _check_init_qubits,
    "rep_delay": _check_duration("rep_delay"),
    "rep_time": _check_duration("rep_time"),
    # Aer's: a noise model cannot be honoured by an ideal simulator; None (no noise) is fine.
    "noise_model": _check_noise_model,
}
# Aer's simulation methods that this simulator has: "automatic" runs a state vector, or a stabilizer
# state for a Clifford circuit whose state vector does not fit (see _stabilizer_instead).
METHODS = ("automatic", "statevector", "stabilizer")
# The Target's width with method="stabilizer" (Aer's stabilizer method's): 4 n^2 bytes a state.
STABILIZER_TARGET_QUBITS = 10_000


def _explicit_method(merged: dict, program: Program, name: str, ranks) -> str:
    """The engine method a circuit starts with: "stabilizer" only when asked for (and possible)."""
    if merged["method"] != "stabilizer":
        return "statevector"
    require_clifford(program, name)
    if ranks is not None:
        raise InvalidOptionError("method='stabilizer' runs on one process; drop mpi (a stabilizer state is small enough for one)")
    if merged["statevector"]:
        raise InvalidOptionError("statevector=True needs method='statevector' (or 'automatic'): a stabilizer state has no state vector")
    return "stabilizer"


def _dense_width(method: str) -> int:
    """The widest gate translation builds as one matrix for ``method`` (see :func:`translate`)."""
    return MAX_GATE_QUBITS if method == "stabilizer" else DENSE_MAX_QUBITS


def _in_place_instead(exc: CircuitTooLargeError, device: Device, program: Program, config: RunConfig, itemsize: int, capacity: int) -> tuple:
    """``(config with a state in place, exc)`` (no scratch buffer, :attr:`RunConfig.in_place`) where
    the run then fits in ``capacity``; else ``(None, the error)``, which then names what the run
    needs in place, the least a state vector needs. On a GPU this matters to programs the kernels
    do not cover alone (``initialize``, gates wider than theirs), which otherwise count a buffer."""
    if config.method != "statevector":
        return None, exc
    in_place = dataclasses.replace(config, in_place=True)
    try:
        _check_fits(device, program, in_place, itemsize, capacity)
    except CircuitTooLargeError as smallest:
        return None, smallest
    return in_place, exc


def _stabilizer_instead(exc: CircuitTooLargeError, merged: dict, circuit, program: Program, config: RunConfig, ranks) -> tuple:
    """``(program, config)`` run as a stabilizer state, where method='automatic' may run ``circuit`` so:
    it is a Clifford circuit, one process holds it and no state vector was asked for; else ``exc`` is
    raised. A program that is not Clifford as translated is translated again for a tableau (its gates
    wider than a tableau reads expanded into their definitions) before it is judged."""
    if merged["method"] != "automatic" or config.method != "statevector" or ranks is not None or merged["statevector"]:
        raise exc
    if why_not_clifford(program) is not None:
        program = compact(translate(circuit, merged["initial_statevector"], dense_max_qubits=_dense_width("stabilizer")))
    require_clifford(program, circuit.name, too_large=exc)
    return program, dataclasses.replace(config, method="stabilizer")


def _check_statevector_output(program: Program, name: str, itemsize: int) -> None:
    """statevector=True returns the circuit's full width, idle qubits included: it must fit on the host."""
    from .engine.devices import host_available_bytes

    if program.layout is None:
        return  # the simulated state is the returned one, already checked against the device
    needed = state_bytes(program.width, itemsize) + state_bytes(program.num_qubits, itemsize + 8)
    free = host_available_bytes()
    if needed > free:
        raise CircuitTooLargeError(
            f"statevector=True returns all {program.width} qubits of circuit {name!r} "
            f"({program.num_qubits} of them are used), which needs {byte_count(needed)} bytes of host memory but "
            f"{byte_count(free)} are free; drop statevector=True (counts need only the used qubits) or remove the idle qubits",
            num_qubits=program.width,
            bytes_needed=needed,
            bytes_free=free,
        )


def _check_gathered_state(program: Program, name: str, itemsize: int) -> None:
    """statevector=True on a split state gathers all of it on every rank's host."""
    from .engine.devices import host_available_bytes

    needed = state_bytes(program.width, itemsize) + state_bytes(program.num_qubits, itemsize)
    free = host_available_bytes()
    if needed > free:
        raise CircuitTooLargeError(
            f"statevector=True gathers the whole {program.width}-qubit state of circuit {name!r} on every rank, "
            f"which needs {byte_count(needed)} bytes of host memory but {byte_count(free)} are free; drop statevector=True "
            "(counts and expectation values are reduced over the ranks without it)",
            num_qubits=program.width,
            bytes_needed=needed,
            bytes_free=free,
        )


def _check_memory_output(shots: int, device: Device) -> None:
    from .engine.devices import host_available_bytes, process_limit_bytes

    needed = shots * BYTES_PER_MEMORY_SHOT
    free = min(host_available_bytes(), process_limit_bytes())
    if needed > free:
        raise InvalidOptionError(
            f"memory=True with {shots:,} shots needs about {needed:,} bytes of host memory but {free:,} are free; "
            "use fewer shots or memory=False"
        )


# ---------------------------------------------------------------------------
# target


def _build_target(num_qubits: int, description: str) -> Target:
    target = Target(description=description, num_qubits=num_qubits)
    for name, op in get_standard_gate_name_mapping().items():
        if name in ("measure", "reset", "delay") or op.num_qubits > num_qubits:
            continue
        target.add_instruction(op, name=name)
    target.add_instruction(Measure(), name="measure")
    target.add_instruction(Reset(), name="reset")
    from qiskit.circuit import Delay

    target.add_instruction(Delay(Parameter("t")), name="delay")
    for cls, name in (
        (UnitaryGate, "unitary"),
        (Initialize, "initialize"),
        (StatePreparation, "state_preparation"),
        (IfElseOp, "if_else"),
        (WhileLoopOp, "while_loop"),
        (ForLoopOp, "for_loop"),
        (SwitchCaseOp, "switch_case"),
        (BreakLoopOp, "break_loop"),
        (ContinueLoopOp, "continue_loop"),
    ):
        target.add_instruction(cls, name=name)
    return target
