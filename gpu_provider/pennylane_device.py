"""The PennyLane device ``gpu_provider.qubit``: PennyLane tapes on the same engine as the backend.

``qml.device("gpu_provider.qubit", wires=4, shots=None, device="auto", precision="double")``
finds this class through the ``pennylane.plugins`` entry point. It is a thin front end:

- capabilities come from ``pennylane_qubit.toml`` (PennyLane's schema 3), so PennyLane's
  own preprocessing decomposes whatever is not listed and validates wires, observables
  and measurements before a tape gets here;
- each operation becomes one engine op from its matrix: device wire i is engine qubit
  ``n - 1 - i``, so PennyLane's big-endian order is the engine's canonical index and a
  gate's matrix goes in with its wires reversed; diagonal matrices become ``Diagonal``;
- the forward run is fused (``compiler.fusion.fuse``) and evolved by ``executor.evolve``;
  expectation values of Pauli words, sums and Hamiltonians go through the engine's
  grouped Pauli pass, other observables through its dense terms (``engine.observables``);
  shots are drawn from the state on its device;
- ``diff_method="adjoint"`` runs ``engine.adjoint.adjoint_jacobian``: one forward run,
  one backward sweep; parameter-shift and the other PennyLane methods work as usual;
- mid-circuit measurements run natively per shot ("one-shot") or deferred by PennyLane.

PennyLane is imported only here (install the ``pennylane`` extra).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import replace
from pathlib import Path
from typing import Optional

import numpy as np
import pennylane as qml
from pennylane.devices import Device, ExecutionConfig
from pennylane.devices.modifiers import simulator_tracking, single_tape_support
from pennylane.devices.preprocess import (
    decompose,
    no_sampling,
    validate_adjoint_trainable_params,
    validate_measurements,
    validate_observables,
)
from pennylane.exceptions import DeviceError
from pennylane.measurements import (
    DensityMatrixMP,
    ExpectationMP,
    ProbabilityMP,
    SampleMeasurement,
    StateMeasurement,
    StateMP,
    VarianceMP,
)
from pennylane.operation import StatePrepBase, operation_derivative
from pennylane.ops import Conditional, MidMeasure
from pennylane.tape import QuantumScript
from pennylane.transforms.dynamic_one_shot import gather_mcm
from pennylane.wires import Wires

from .compiler.fusion import default_width, fuse
from .engine import program as P
from .engine.adjoint import AdjointStep, adjoint_jacobian, apply_gate
from .engine.devices import PRECISIONS, check_device_option, resolve_device
from .engine.distributed import (
    DistributedStateVector,
    RankGroup,
    agree_on_job,
    check_split,
    job_digest,
    ranks_for,
    run_on_ranks,
)
from .engine.executor import WORKSPACE_BYTES, RunConfig, blas_threads, device_kernels, evolve, kernels_cover, new_state, sample_outcomes
from .engine.threads import threads_for
from .engine.trajectories import Interpreter, Trajectory, branch_points, run_exact, saved_states
from .engine.expectation import pauli_sum
from .engine.observables import (
    DENSE_MAX_QUBITS,
    DenseTerm,
    Observable,
    apply_observable,
    density_matrix_arrays,
    expectations,
    inner,
    marginal_probabilities,
    tensor_expectation,
)
from .errors import CircuitTooLargeError, InvalidOptionError

logger = logging.getLogger(__name__)

CONFIG_FILE = Path(__file__).parent / "pennylane_qubit.toml"
# How mid-circuit measurements may run (the capability file says the same).
MCM_METHODS = ("one-shot", "tree-traversal", "deferred", "device")


def _blas_held(method):
    """Run a device method with the engine's BLAS threads for its widest state (engine/threads.py):
    one thread up to 14 qubits, where threads cost more than they gain whenever the cores are busy."""

    @functools.wraps(method)
    def held(self, circuits, *args, **kwargs):
        batch = (circuits,) if isinstance(circuits, QuantumScript) else circuits
        widest = len(self.wires) if self.wires is not None else max((len(tape.wires) for tape in batch), default=0)
        with blas_threads(self._device, threads_for(widest)):
            return method(self, circuits, *args, **kwargs)

    return held


@simulator_tracking
@single_tape_support
class GPUQubitDevice(Device):
    """An exact state-vector PennyLane device on an NVIDIA GPU (CuPy) or the CPU (NumPy).

    Args:
        wires: number of wires or their labels (``None``: the circuit's wires).
        shots: ``None`` for exact results, or a number (or shot vector) of samples.
        device: ``"auto"`` (a usable GPU, else the CPU, with the reason logged),
            ``"GPU"`` (an error with the reason where none is usable) or ``"CPU"``.
        device_id: which GPU.
        precision: ``"double"`` (complex128) or ``"single"`` (complex64).
        seed: seed of the sampler and of mid-circuit measurements (``"global"``: drawn
            from NumPy's global generator, as ``default.qubit`` does; ``None``: fresh entropy).
        fusion: fuse gates for the forward run as the Qiskit backend does.
        mpi: ``True`` (``MPI.COMM_WORLD``) or an mpi4py communicator: under
            ``mpiexec -n 2^k`` every rank creates the device and runs the same
            QNodes; each state is split over the ranks and every rank gets the
            same results (as lightning.gpu's ``mpi=True``). Observables must be
            Pauli sums; gradients use parameter-shift (no adjoint).

    Raises:
        DeviceError: a bad ``device``, ``device_id`` or ``precision``, or ``device="GPU"``
            where no GPU is usable (the message gives the reason).
    """

    name = "gpu_provider.qubit"
    short_name = "gpu_provider.qubit"
    pennylane_requires = ">=0.45"
    config_filepath = CONFIG_FILE

    def __init__(
        self, wires=None, shots=None, *, device: str = "auto", device_id: int = 0, precision: str = "double", seed="global", fusion: bool = True, mpi=False
    ) -> None:
        super().__init__(wires=wires, shots=shots)
        try:
            check_device_option(device, device_id)
            if precision not in PRECISIONS:
                raise InvalidOptionError(f"precision must be one of {tuple(PRECISIONS)}, not {precision!r}")
            ranks = ranks_for(mpi)
            self._comm = ranks.comm if ranks is not None else None
            if ranks is not None:  # each rank on a node takes its own GPU, or its share of the cores
                self._device, self.fallback_reason = ranks.device(device, device_id)
            else:
                self._device, self.fallback_reason = resolve_device(device, device_id)
        except Exception as exc:  # the backend's typed errors, in PennyLane's type
            raise DeviceError(str(exc)) from exc
        self._group: Optional[RankGroup] = None  # the ranks of the batch being executed, under mpi
        self._precision = precision
        self._fusion = bool(fusion)
        if isinstance(seed, str) and seed == "global":
            seed = np.random.randint(0, 2**31)
        self._rng = np.random.default_rng(seed)

    @property
    def engine_device(self) -> str:
        """Where the engine runs: ``"CPU"`` or ``"GPU:<id>"``."""
        return self._device.name

    @property
    def precision(self) -> str:
        return self._precision

    def __repr__(self) -> str:
        wires = len(self.wires) if self.wires is not None else None
        return f"<GPUQubitDevice wires={wires} shots={self.shots} on {self.engine_device} in {self._precision}>"

    # -- configuration ---------------------------------------------------------

    def setup_execution_config(self, config: Optional[ExecutionConfig] = None, circuit: Optional[QuantumScript] = None) -> ExecutionConfig:
        config = config or ExecutionConfig()
        updates = {}
        if config.gradient_method == "best":
            # Split over MPI ranks there is no adjoint sweep: parameter-shift runs the circuits instead.
            updates["gradient_method"] = "adjoint" if self._comm is None else "parameter-shift"
        method = updates.get("gradient_method", config.gradient_method)
        if config.use_device_gradient is None:
            updates["use_device_gradient"] = method == "adjoint"
        if config.use_device_jacobian_product is None:
            updates["use_device_jacobian_product"] = False
        if updates.get("use_device_gradient", config.use_device_gradient) and config.grad_on_execution is None:
            # With device_vjp=True the VJP comes after the forward run (PennyLane's reverse pass).
            updates["grad_on_execution"] = not updates.get("use_device_jacobian_product", config.use_device_jacobian_product)
        shots_present = bool(circuit is not None and circuit.shots)
        mcm = config.mcm_config
        method = None if mcm.mcm_method is None else str(getattr(mcm.mcm_method, "value", mcm.mcm_method))
        postselects = circuit is not None and any(isinstance(op, MidMeasure) and op.postselect is not None for op in circuit.operations)
        if method is None:
            # Without shots a postselection runs as the tree traversal (exact): PennyLane's deferral
            # needs a Projector gate, which this device does not apply.
            method = "one-shot" if shots_present else ("tree-traversal" if postselects else "deferred")
        elif method not in MCM_METHODS:
            raise DeviceError(f"{self.name} runs mid-circuit measurements with mcm_method in {MCM_METHODS}, not {method!r}")
        elif method == "one-shot" and circuit is not None and not shots_present:
            raise DeviceError("mcm_method='one-shot' samples each shot: it needs shots (use 'tree-traversal' or 'deferred' for exact results)")
        if method == "device":  # the device's own way, as default.qubit takes it
            method = "tree-traversal"
        if method == "tree-traversal" and shots_present:
            # With shots the engine's shot branching is the tree traversal: shots share a state
            # until their outcomes differ. PennyLane's one-shot transform gathers their results.
            method = "one-shot"
        if method == "deferred" and postselects:
            raise DeviceError(
                f"{self.name} postselects with mcm_method='tree-traversal' (exact, the default without shots) or "
                "'one-shot' (with shots); 'deferred' would need a Projector gate, which it does not apply"
            )
        if method in ("one-shot", "tree-traversal") and mcm.postselect_mode == "fill-shots":
            raise DeviceError("postselect_mode='fill-shots' is supported with mcm_method='deferred' only, as on default.qubit")
        updates["mcm_config"] = replace(mcm, mcm_method=method)
        return replace(config, **updates)

    def preprocess_transforms(self, execution_config: Optional[ExecutionConfig] = None):
        config = execution_config or ExecutionConfig()
        program = super().preprocess_transforms(config)
        # The capability file lists measurements by name; like default.qubit, also accept any
        # state measurement without shots (computed from the state) and any sample
        # measurement with shots (from the device's samples), custom subclasses included.
        for bound in list(program):
            if getattr(getattr(bound, "tape_transform", None), "__name__", "") == "validate_measurements":
                program.remove(bound)
        program.add_transform(validate_measurements, analytic_measurements=_exact_measurement, sample_measurements=_sample_measurement, name=self.name)
        if config.gradient_method == "adjoint":
            _add_adjoint_transforms(program, self.name)
        return program

    def supports_derivatives(self, execution_config: Optional[ExecutionConfig] = None, circuit: Optional[QuantumScript] = None) -> bool:
        if self._comm is not None:
            return False  # split over MPI ranks: no adjoint sweep (parameter-shift runs the circuits)
        if execution_config is None:
            return True
        if execution_config.gradient_method not in ("adjoint", "best") or execution_config.derivative_order > 1:
            return False
        if circuit is None:
            return True
        program = qml.CompilePipeline() if hasattr(qml, "CompilePipeline") else qml.transforms.core.TransformProgram()
        _add_adjoint_transforms(program, self.name)
        try:
            program((circuit,))
        except Exception:  # any reason adjoint cannot take it: PennyLane then picks another method
            return False
        return True

    # -- execution -------------------------------------------------------------

    @_blas_held
    def execute(self, circuits, execution_config: Optional[ExecutionConfig] = None):
        single = isinstance(circuits, QuantumScript)
        batch = (circuits,) if single else circuits
        if self._comm is None:
            results = tuple(self._run_tape(tape) for tape in batch)
        else:
            results = self._on_ranks(batch)
        return results[0] if single else results

    def _on_ranks(self, batch) -> tuple:
        """The batch on every rank of the communicator, each state split over them.

        The ranks first agree on the tapes (a digest) and adopt rank 0's seed, so
        samples and mid-circuit outcomes are the same everywhere; one rank's error
        stops every rank (``engine.distributed``).
        """
        digest, error = "", None
        try:
            digest = job_digest([_tape_parts(tape) for tape in batch])
        except Exception as exc:
            error = exc
        # Ranks whose generators are in the same state (the device's seed given alike) keep them, so
        # they draw what a device without MPI draws; otherwise all take one seeded from rank 0.
        state = job_digest(repr(self._rng.bit_generator.state))
        try:
            seed, same = agree_on_job(self._comm, digest, int(state[:15], 16), error, all_seeds=True)
        except Exception as exc:
            raise DeviceError(str(exc)) from exc
        if not same:
            self._rng = np.random.default_rng(seed)
        group = RankGroup(self._comm)
        self._group = group
        try:
            return run_on_ranks(group, None, lambda: tuple(self._run_tape(tape) for tape in batch))
        finally:
            self._group = None

    @_blas_held
    def compute_derivatives(self, circuits, execution_config: Optional[ExecutionConfig] = None):
        single = isinstance(circuits, QuantumScript)
        batch = (circuits,) if single else circuits
        jacobians = tuple(self._adjoint(tape)[1] for tape in batch)
        return jacobians[0] if single else jacobians

    @_blas_held
    def execute_and_compute_derivatives(self, circuits, execution_config: Optional[ExecutionConfig] = None):
        single = isinstance(circuits, QuantumScript)
        batch = (circuits,) if single else circuits
        pairs = [self._adjoint(tape) for tape in batch]
        results = tuple(p[0] for p in pairs)
        jacobians = tuple(p[1] for p in pairs)
        return (results[0], jacobians[0]) if single else (results, jacobians)

    def supports_vjp(self, execution_config: Optional[ExecutionConfig] = None, circuit: Optional[QuantumScript] = None) -> bool:
        """``device_vjp=True``: the same adjoint Jacobian as :meth:`supports_derivatives`, contracted with the cotangents."""
        return self.supports_derivatives(execution_config, circuit)

    @_blas_held
    def compute_vjp(self, circuits, cotangents, execution_config: Optional[ExecutionConfig] = None):
        single = isinstance(circuits, QuantumScript)
        batch, cotangents = ((circuits,), (cotangents,)) if single else (circuits, cotangents)
        vjps = tuple(_vjp(tape, self._adjoint(tape)[1], dy) for tape, dy in zip(batch, cotangents))
        return vjps[0] if single else vjps

    @_blas_held
    def execute_and_compute_vjp(self, circuits, cotangents, execution_config: Optional[ExecutionConfig] = None):
        single = isinstance(circuits, QuantumScript)
        batch, cotangents = ((circuits,), (cotangents,)) if single else (circuits, cotangents)
        pairs = [self._adjoint(tape) for tape in batch]
        results = tuple(result for result, _ in pairs)
        vjps = tuple(_vjp(tape, jacobian, dy) for tape, (_, jacobian), dy in zip(batch, pairs, cotangents))
        return (results[0], vjps[0]) if single else (results, vjps)

    # -- internals -------------------------------------------------------------

    def _layout(self, tape: QuantumScript) -> "_Layout":
        wires = self.wires if self.wires is not None else tape.wires
        return _Layout(Wires(wires))

    def _new_state(self, num_qubits: int, ops=(), arrays: int = 2, in_place: bool = False):
        """A state of ``num_qubits`` qubits, once ``arrays`` of them (its copies, buffers) fit the
        device with the engine's workspace. With ``in_place``, where they do not but one state does,
        a state without its scratch buffer (its reads then make no state-sized temporary either)."""
        itemsize = np.dtype(PRECISIONS[self._precision]).itemsize
        dtype = PRECISIONS[self._precision]
        group = self._group
        if group is not None and group.global_qubits:
            check_split("pennylane", num_qubits, group.global_qubits, ops)
            self._device.check_fits(num_qubits - group.global_qubits, itemsize, arrays=arrays, workspace=WORKSPACE_BYTES)
            return DistributedStateVector(self._device.xp, num_qubits, dtype, device_kernels(self._device, dtype), group, ops)
        try:
            self._device.check_fits(num_qubits, itemsize, arrays=arrays, workspace=WORKSPACE_BYTES)
        except CircuitTooLargeError:
            if not in_place:
                raise
            self._device.check_fits(num_qubits, itemsize, arrays=1, workspace=WORKSPACE_BYTES)
            return new_state(self._device, num_qubits, dtype, in_place=True)
        return new_state(self._device, num_qubits, dtype)

    def _forward(self, tape: QuantumScript, layout: "_Layout", arrays: int = 2, in_place: bool = False, states: int = 0):
        """The final state of ``tape`` (no mid-circuit measurements), fused, on the engine's device,
        once ``arrays`` states fit beside ``states`` more that the caller will make, each with its
        scratch buffer unless the GPU kernels apply every gate in place; in place (see
        :meth:`_new_state`) if ``in_place`` and they do not fit."""
        ops = layout.engine_ops(tape.operations)
        program = self._fused(P.Program(layout.num_qubits, 0, tuple(ops), name="pennylane"))
        if states:
            per_state = 1 if kernels_cover(program, self._device, PRECISIONS[self._precision]) else 2
            arrays += states * per_state
        state = self._new_state(layout.num_qubits, program.ops, arrays=arrays, in_place=in_place)
        return evolve(program, state, RunConfig(shots=1, precision=self._precision))

    def _fused(self, program: P.Program) -> P.Program:
        if not self._fusion:
            return program
        width = None
        if self._group is not None and self._group.global_qubits:  # a fused gate must fit on one rank
            width = min(default_width(self._device.kind, self._precision), max(program.num_qubits - self._group.global_qubits, 1))
        return fuse(program, self._device.kind, width, precision=self._precision)

    def _run_tape(self, tape: QuantumScript):
        layout = self._layout(tape)
        if any(isinstance(op, MidMeasure) for op in tape.operations):
            if not tape.shots:  # mcm_method="tree-traversal" (deferred and one-shot leave none here)
                return self._run_tree(tape, layout)
            return self._run_one_shot(tape, layout)
        copies, in_place = _read_copies(tape, layout, self._device.xp is np, np.dtype(PRECISIONS[self._precision]).itemsize)
        state = self._forward(tape, layout, arrays=2 + copies, in_place=in_place)
        if not tape.shots:
            results = tuple(self._measure_exact(mp, state, layout) for mp in tape.measurements)
            return results[0] if len(results) == 1 else results
        per_partition = []
        for shots in tape.shots:
            results = tuple(self._measure_shots(mp, state, layout, shots) for mp in tape.measurements)
            per_partition.append(results[0] if len(results) == 1 else results)
        return tuple(per_partition) if tape.shots.has_partitioned_shots else per_partition[0]

    def _measure_exact(self, mp, state, layout: "_Layout"):
        if isinstance(mp, (ExpectationMP, VarianceMP)) and mp.obs is None:
            # A function of measured wires (e.g. a deferred mid-circuit measurement's value).
            mean, second = _wire_function_moments(mp, state, layout)
            return np.float64(mean if isinstance(mp, ExpectationMP) else second - mean * mean)
        if isinstance(mp, ExpectationMP):
            return np.float64(expectations(state, [layout.observable(mp.obs)])[0].real)
        if isinstance(mp, VarianceMP):
            return np.float64(_variance(state, mp.obs, layout))
        if isinstance(mp, ProbabilityMP):
            target = state
            if mp.obs is not None:
                target = state.snapshot(in_place=True)
                for op in layout.engine_ops(mp.obs.diagonalizing_gates()):
                    apply_gate(target, op)
            wires = mp.wires if len(mp.wires) else layout.wires
            return marginal_probabilities(target, layout.qubits_big_endian(wires))
        if isinstance(mp, StateMeasurement):
            dtype = PRECISIONS[self._precision]
            return mp.process_state(state.to_host().astype(dtype, copy=False), wire_order=layout.wires)
        raise DeviceError(f"{self.name} cannot compute the measurement {mp} without shots")

    def _sample_bits(self, state, layout: "_Layout", shots: int) -> np.ndarray:
        """(shots, num_wires) 0/1 samples, column i being device wire i."""
        n = layout.num_qubits
        if n == 0:
            return np.zeros((shots, 0), dtype=np.int64)
        outcomes = np.concatenate(list(sample_outcomes(state, layout.qubits_in_wire_order(), shots, self._rng)))
        return ((outcomes[:, None] >> np.arange(n)[None, :]) & 1).astype(np.int64)

    def _rotated(self, state, layout: "_Layout", gates):
        if not gates:
            return state
        rotated = state.snapshot(in_place=True)
        for op in layout.engine_ops(gates):
            apply_gate(rotated, op)
        return rotated

    def _measure_shots(self, mp, state, layout: "_Layout", shots: int):
        if not isinstance(mp, SampleMeasurement):
            raise DeviceError(f"{self.name} cannot measure {mp} with shots")
        obs = mp.obs
        if isinstance(mp, ExpectationMP) and obs is not None and _is_sum(obs):
            # Term by term, each in its own basis, as PennyLane's default device estimates sums.
            coeffs, terms = obs.terms()
            total = 0.0
            for coeff, term in zip(coeffs, terms):
                if isinstance(term, qml.Identity) or len(term.wires) == 0:
                    total += float(np.real(coeff))
                    continue
                # One rotated copy at a time (as counted): the last term's is gone before the next.
                samples = self._sample_bits(self._rotated(state, layout, term.diagonalizing_gates()), layout, shots)
                total += float(np.real(coeff)) * float(qml.expval(term).process_samples(samples, wire_order=layout.wires))
            return np.float64(total)
        return mp.process_samples(self._samples_in_basis(mp, state, layout, shots), wire_order=layout.wires)

    def _samples_in_basis(self, mp, state, layout: "_Layout", shots: int) -> np.ndarray:
        """``shots`` rows of bits drawn from ``state`` in the eigenbasis of ``mp``'s observable."""
        obs = mp.obs
        rotated = self._rotated(state, layout, obs.diagonalizing_gates() if obs is not None else [])
        return self._sample_bits(rotated, layout, shots)

    def _run_one_shot(self, tape: QuantumScript, layout: "_Layout"):
        """Each shot's results, as PennyLane's ``dynamic_one_shot`` expects them (the mid-circuit values last).

        The tape becomes an engine program (a mid-circuit measurement writes a
        clbit, ``qml.cond`` a switch on the clbits its condition reads) that the
        engine's interpreter runs with shot branching: shots share a trajectory
        until their measurements differ. Each trajectory's shots then draw their
        terminal measurements from its final state; the shots are returned in
        an order drawn from the device's generator.
        """
        program, clbits = self._dynamic_program(tape, layout)
        shots = tape.shots.total_shots
        waiting = saved_states(layout.num_qubits, np.dtype(PRECISIONS[self._precision]).itemsize, shots)
        state = self._new_state(layout.num_qubits, program.ops, arrays=2 + waiting)
        terminal = tape.measurements[: len(tape.measurements) - len(clbits)]
        single = len(tape.measurements) == 1
        results: list = []

        def finish(trajectory: Trajectory) -> None:
            mid = tuple(int(trajectory.clbits[bit]) for bit in clbits.values())
            measured = [self._measure_each_shot(mp, trajectory.state, layout, trajectory.shots) for mp in terminal]
            for shot in range(trajectory.shots):
                values = tuple(per_shot[shot] for per_shot in measured) + mid
                results.append(values[0] if single else values)

        interpreter = Interpreter(self._rng, RunConfig.max_loop_iterations, None, waiting, finish)
        interpreter.run_all(Trajectory.start(state, program.ops, program.num_clbits, shots))
        return tuple(results[i] for i in self._rng.permutation(len(results)).tolist())

    def _dynamic_program(self, tape: QuantumScript, layout: "_Layout") -> tuple:
        """The tape as a fused engine program (a mid-circuit measurement writes a clbit, then a
        ``Reset`` for ``reset=True``; ``qml.cond`` a switch on the clbits its condition reads),
        and each ``MidMeasure``'s clbit, in the tape's order."""
        clbits: dict = {}
        ops = []
        for index, op in enumerate(tape.operations):
            if isinstance(op, MidMeasure):
                qubit = layout.qubit(op.wires[0])
                ops.append(P.Measure(qubit, clbits.setdefault(op, len(clbits))))
                if op.reset:
                    ops.append(P.Reset(qubit))
            elif isinstance(op, Conditional):
                ops.append(_switch_on(op.meas_val, clbits, tuple(layout.engine_ops([op.base], first=False))))
            else:
                ops.extend(layout.engine_ops([op], first=index == 0))
        return self._fused(P.Program(layout.num_qubits, len(clbits), tuple(ops), name="pennylane")), clbits

    def _run_tree(self, tape: QuantumScript, layout: "_Layout"):
        """Exact results of a tape with mid-circuit measurements (``mcm_method="tree-traversal"``).

        The engine's exact branching (``trajectories.run_exact``) visits every path of
        outcomes depth first with its probability, a state copy waiting per uncertain
        measurement on the path (``n_mcm + 1`` states at most), as PennyLane's tree
        traversal does. At each leaf the terminal measurements are exact (those of
        mid-circuit values through PennyLane's ``gather_mcm``). Leaves against a
        postselection are dropped; the rest are averaged by probability, so a
        postselection conditions the results (NaN where no leaf is left, as on
        default.qubit); a variance comes from the averaged first and second moments.
        """
        for mp in tape.measurements:
            if isinstance(mp, StateMeasurement) and not isinstance(mp, (ExpectationMP, VarianceMP, ProbabilityMP)):
                raise DeviceError(
                    f"{type(mp).__name__} after mid-circuit measurements has no single state to read; "
                    "use mcm_method='deferred', or expval / var / probs"
                )
        program, clbits = self._dynamic_program(tape, layout)
        depth = branch_points(program.ops)
        # The root state, one copy per uncertain measurement on a path, and a scratch buffer.
        state = self._new_state(layout.num_qubits, program.ops, arrays=2 + depth)
        leaves: list = []  # (weight, per-measurement moments)

        def finish(trajectory: Trajectory) -> None:
            values = {measure: int(trajectory.clbits[bit]) for measure, bit in clbits.items()}
            if any(measure.postselect is not None and values[measure] != measure.postselect for measure in clbits):
                return
            leaves.append((trajectory.weight, [self._leaf_moments(mp, trajectory.state, layout, values) for mp in tape.measurements]))

        run_exact(state, program, RunConfig.max_loop_iterations, finish, limit=depth)
        total = sum(weight for weight, _ in leaves)
        results = []
        for index, mp in enumerate(tape.measurements):
            if total <= 0.0:
                width = 2 ** len(mp.wires) if isinstance(mp, ProbabilityMP) else None
                results.append(np.full(width, np.nan) if width else np.float64(np.nan))
                continue
            first = sum(weight * moments[index][0] for weight, moments in leaves) / total
            if isinstance(mp, VarianceMP):
                second = sum(weight * moments[index][1] for weight, moments in leaves) / total
                results.append(np.float64(max(second - first * first, 0.0)))
            else:
                results.append(np.asarray(first, dtype=np.float64) if isinstance(mp, ProbabilityMP) else np.float64(first))
        return results[0] if len(results) == 1 else tuple(results)

    def _leaf_moments(self, mp, state, layout: "_Layout", values: dict) -> tuple:
        """(value, second moment) of ``mp`` at a leaf of the tree: the value is a mean, or a
        probability vector; the second moment only for a variance."""
        if mp.mv is not None:  # a function of mid-circuit values: PennyLane evaluates it on one "shot"
            samples = {measure: np.array([[value]]) for measure, value in values.items()}
            valid = np.array([[True]])
            if isinstance(mp, VarianceMP):
                mean = float(gather_mcm(ExpectationMP(obs=mp.mv), samples, valid))
                return mean, float(gather_mcm(ExpectationMP(obs=mp.mv * mp.mv), samples, valid))
            if isinstance(mp, (ExpectationMP, ProbabilityMP)):
                return np.asarray(gather_mcm(mp, samples, valid), dtype=np.float64), None
            raise DeviceError(f"{self.name} cannot compute {type(mp).__name__} of mid-circuit values without shots")
        if isinstance(mp, VarianceMP):
            if mp.obs is None:
                return _wire_function_moments(mp, state, layout)
            mean = float(expectations(state, [layout.observable(mp.obs)])[0].real)
            return mean, _variance(state, mp.obs, layout) + mean * mean
        return np.asarray(self._measure_exact(mp, state, layout), dtype=np.float64), None

    def _measure_each_shot(self, mp, state, layout: "_Layout", shots: int) -> list:
        """``mp`` of each of ``shots`` shots drawn from ``state``, one result a shot."""
        obs = mp.obs
        if shots == 1 or not isinstance(mp, SampleMeasurement) or (isinstance(mp, ExpectationMP) and obs is not None and _is_sum(obs)):
            return [self._measure_shots(mp, state, layout, 1) for _ in range(shots)]
        samples = self._samples_in_basis(mp, state, layout, shots)
        return [mp.process_samples(samples[shot : shot + 1], wire_order=layout.wires) for shot in range(shots)]

    def _adjoint(self, tape: QuantumScript):
        """(results, jacobian) of a tape of expectation values: one forward run, one backward sweep."""
        if tape.shots:
            raise DeviceError("adjoint differentiation needs exact expectation values: run with shots=None")
        if not all(isinstance(mp, ExpectationMP) for mp in tape.measurements):
            raise DeviceError("adjoint differentiation on gpu_provider.qubit supports expectation values only")
        layout = self._layout(tape)
        observables = [layout.observable(mp.obs) for mp in tape.measurements]
        steps = layout.adjoint_steps(tape)
        # The sweep's states: a bra per observable (made through one work copy: the third
        # array) and, where a gate has a derivative matrix, a scratch copy of the state.
        states = len(observables) + int(any(step.derivatives for step in steps))
        state = self._forward(tape, layout, arrays=3, states=states)
        values = tuple(np.float64(v.real) for v in expectations(state, observables))
        jac = adjoint_jacobian(state, steps, observables, len(tape.trainable_params))
        results = values[0] if len(values) == 1 else values
        return results, _jacobian_shape(jac)


def _tape_parts(tape: QuantumScript) -> list:
    """A tape as plain values, the same on every rank for the same tape (no per-process hashes).

    Mid-circuit measurements are named by their place in the tape (their own ids are
    random per process), with their reset and postselection; a condition or a measured
    mid-circuit value by the table of its values over the measurements it reads.
    """
    index = {op: i for i, op in enumerate(op for op in tape.operations if isinstance(op, MidMeasure))}

    def values(mv) -> tuple:
        if isinstance(mv, (list, tuple)):
            return tuple(values(item) for item in mv)
        order = sorted(mv.measurements, key=index.__getitem__)
        table = []
        for bits in range(1 << len(order)):
            assignment = {m: (bits >> (len(order) - 1 - j)) & 1 for j, m in enumerate(order)}
            table.append(str(mv.concretize(assignment)))
        return (tuple(index[m] for m in order), tuple(table))

    parts: list = [str(tape.shots)]
    for op in tape.operations:
        if isinstance(op, MidMeasure):
            parts.append(("MidMeasure", tuple(str(w) for w in op.wires), bool(op.reset), op.postselect))
            continue
        condition = None
        if isinstance(op, Conditional):
            condition, op = values(op.meas_val), op.base
        params = []
        for value in op.data:
            try:
                params.append(np.asarray(qml.math.unwrap(value), dtype=complex))
            except Exception:
                params.append(str(value))
        parts.append((type(op).__name__, tuple(str(w) for w in op.wires), params, condition))
    for mp in tape.measurements:
        parts.append((type(mp).__name__, values(mp.mv)) if mp.mv is not None else str(mp))
    return parts


def _jacobian_shape(jac: np.ndarray):
    """PennyLane's layout of a Jacobian: (observables, parameters) with unit axes squeezed."""
    jac = np.squeeze(jac)
    if jac.ndim == 0:
        return np.array(jac)
    if jac.ndim == 1:
        return tuple(np.array(j) for j in jac)
    return tuple(tuple(np.array(j_) for j_ in j) for j in jac)


def _switch_on(condition, clbits: dict, body: tuple) -> P.SwitchCase:
    """``qml.cond(condition, ...)`` as an engine switch: ``body`` runs for the values of the
    clbits the condition reads (its measurements' outcomes) for which the condition holds."""
    unknown = [m for m in condition.measurements if m not in clbits]
    if unknown:
        raise DeviceError(f"qml.cond reads mid-circuit measurements {unknown} that the circuit makes only later, or never")
    bits = tuple(clbits[m] for m in condition.measurements)
    holds = tuple(
        sum(outcome << position for position, outcome in enumerate(outcomes))
        for outcomes, value in condition.branches.items()
        if bool(value)
    )
    return P.SwitchCase(P.Bits(bits), ((holds, body),))


def _wire_function_moments(mp, state, layout: "_Layout") -> tuple[float, float]:
    """First and second moments of a measurement of a function of wires (``mp.obs`` None)."""
    probs = marginal_probabilities(state, layout.qubits_big_endian(mp.wires))
    eigvals = np.asarray(mp.eigvals(), dtype=np.float64)
    return float(probs @ eigvals), float(probs @ eigvals**2)


def _is_sum(obs) -> bool:
    return isinstance(obs, (qml.ops.Sum, qml.ops.LinearCombination)) or (isinstance(obs, qml.ops.SProd) and _is_sum(obs.base))


# A density matrix, purity or entropy: the host copy of the state and what PennyLane's own
# processing of it allocates (three more copies, measured for a reduced density matrix).
HOST_STATE_PROCESSING_COPIES = 4


def _read_copies(tape: QuantumScript, layout: "_Layout", host: bool, itemsize: int) -> tuple[int, bool]:
    """``(copies, in place)`` for reading the final state of ``tape`` (no mid-circuit measurements).

    ``copies``: the most state-sized arrays one measurement adds beside a state and its scratch
    buffer (one at a time: a rotated copy to sample or to take probabilities in another basis,
    the copy a dense term is applied to, ``O|psi>`` and its work copy for a variance, the host
    copy of a state read on the CPU, what PennyLane's processing of it makes, and a density
    matrix's own entries). ``in place``: whether every measurement reads the state
    without any, so the state may run without its buffer: exact expectation values, variances of
    Pauli sums and of one Hermitian term, probabilities of wires, samples that need no rotation.
    """
    copies, in_place = 0, True
    for mp in tape.measurements:
        obs = mp.obs
        if tape.shots:
            rotated = False
            if obs is not None:
                try:
                    terms = obs.terms()[1] if isinstance(mp, ExpectationMP) and _is_sum(obs) else [obs]
                    rotated = any(term.diagonalizing_gates() for term in terms)
                except Exception:
                    rotated = True
            need, readable = int(rotated), not rotated
        elif isinstance(mp, (ExpectationMP, VarianceMP)) and obs is None:
            need, readable = 0, True  # a function of measured wires: marginal probabilities
        elif isinstance(mp, ExpectationMP):
            need, readable = int(bool(layout.observable(obs).dense)), True
        elif isinstance(mp, VarianceMP):
            pauli = obs.pauli_rep is not None
            need, readable = (0 if pauli else 2), pauli or _single_term(layout.observable(obs)) is not None
        elif isinstance(mp, ProbabilityMP):
            need, readable = int(obs is not None), obs is None
        else:  # the state itself, or a density matrix, purity or entropy PennyLane forms from a host copy
            plain = isinstance(mp, StateMP) and not isinstance(mp, DensityMatrixMP)
            need, readable = (1 if plain else HOST_STATE_PROCESSING_COPIES) if host else 0, False
            if host and isinstance(mp, DensityMatrixMP):  # and its 4^k complex128 entries
                need += density_matrix_arrays(len(mp.wires) or layout.num_qubits, layout.num_qubits, itemsize)
        copies, in_place = max(copies, need), in_place and readable
    return copies, in_place


def _single_term(observable: Observable):
    """The one dense term of an observable that is a real multiple of one Hermitian matrix, else None."""
    if observable.pauli is not None or len(observable.dense) != 1 or complex(observable.dense[0].coeff).imag:
        return None
    return observable.dense[0]


def _variance(state, obs, layout: "_Layout") -> float:
    observable = layout.observable(obs)
    term = _single_term(observable) if getattr(state, "in_place", False) else None
    if term is not None:  # no room for O|psi>: the term's moments in its eigenbasis
        return tensor_expectation(state, [(term.qubits, term.matrix)])[1] * complex(term.coeff).real ** 2
    mean = expectations(state, [observable])[0].real
    rep = obs.pauli_rep
    if rep is not None:
        square = expectations(state, [layout.pauli_observable(rep @ rep)])[0].real
    else:
        applied = apply_observable(state, observable)
        square = inner(applied, applied).real
    return float(square - mean * mean)


def _vjp(tape: QuantumScript, jacobian, cotangent):
    """The cotangent contracted with the tape's adjoint Jacobian, in PennyLane's shapes."""
    from pennylane.gradients.vjp import compute_vjp_multi, compute_vjp_single

    if len(tape.measurements) == 1:
        return compute_vjp_single(cotangent, jacobian)
    return compute_vjp_multi(cotangent, jacobian)


def _exact_measurement(mp) -> bool:
    return isinstance(mp, StateMeasurement)


def _sample_measurement(mp) -> bool:
    return isinstance(mp, SampleMeasurement) and (mp.obs is None or _samples_in_eigenbasis(mp.obs))


def _samples_in_eigenbasis(obs) -> bool:
    """Whether shots can measure ``obs``: every factor or term rotates into its eigenbasis (a
    SparseHamiltonian does not; default.qubit refuses it with shots too)."""
    operands = getattr(obs, "operands", None)
    if operands is not None:  # sums, products
        return all(_samples_in_eigenbasis(o) for o in operands)
    base = getattr(obs, "base", None)
    if base is not None:  # scalar products, adjoints, powers
        return _samples_in_eigenbasis(base)
    return obs.has_diagonalizing_gates


def _adjoint_ops(op) -> bool:
    """Operations the adjoint sweep differentiates directly (others are decomposed)."""
    return not isinstance(op, (Conditional, MidMeasure)) and (
        op.num_params == 0 or not any(qml.math.requires_grad(d) for d in op.data) or (op.num_params == 1 and op.has_generator)
    )


def _adjoint_measurements(mp) -> bool:
    return isinstance(mp, ExpectationMP)


def _add_adjoint_transforms(program, name: str) -> None:
    label = f"adjoint + {name}"
    program.add_transform(no_sampling, name=label)
    program.add_transform(decompose, stopping_condition=_adjoint_ops, name=label, skip_initial_state_prep=True)
    program.add_transform(validate_observables, lambda obs: obs.has_matrix or obs.pauli_rep is not None, name=label)
    program.add_transform(validate_measurements, analytic_measurements=_adjoint_measurements, name=label)
    program.add_transform(validate_adjoint_trainable_params)


class _Layout:
    """Device wires to engine qubits (wire i is qubit n - 1 - i) and PennyLane objects to engine ones."""

    def __init__(self, wires: Wires) -> None:
        self.wires = wires
        self.num_qubits = len(wires)
        self._index = {w: i for i, w in enumerate(wires)}

    def qubit(self, wire) -> int:
        try:
            return self.num_qubits - 1 - self._index[wire]
        except KeyError:
            raise qml.wires.WireError(f"wire {wire!r} is not one of the device's wires {self.wires.tolist()}") from None

    def qubits_big_endian(self, wires) -> list[int]:
        """Engine qubits for an index whose first wire is its most significant bit (bit j = result[j])."""
        return [self.qubit(w) for w in reversed(list(wires))]

    def qubits_in_wire_order(self) -> list[int]:
        return [self.qubit(w) for w in self.wires]

    # -- operations --

    def engine_ops(self, ops, first: bool = True) -> list:
        out = []
        for index, op in enumerate(ops):
            if not op.has_matrix and op.has_decomposition and not isinstance(op, (StatePrepBase, qml.GlobalPhase)):
                # e.g. the body of a Conditional that PennyLane left whole
                out.extend(self.engine_ops(op.decomposition(), first=False))
                continue
            engine_op = self.engine_op(op, initial=first and index == 0)
            if engine_op is not None:
                out.append(engine_op)
        return out

    def engine_op(self, op, initial: bool = False):
        if isinstance(op, (qml.Identity, qml.Barrier, qml.Snapshot)) or op.name in ("Identity", "Barrier", "Snapshot"):
            return None
        if isinstance(op, StatePrepBase):
            if not initial:
                raise DeviceError(f"{op.name} is supported only as the first operation of a circuit")
            vector = np.asarray(qml.math.toarray(op.state_vector(wire_order=op.wires)), dtype=np.complex128).reshape(-1)
            return P.Initialize(tuple(self.qubits_big_endian(op.wires)), vector)
        if isinstance(op, qml.GlobalPhase) and not op.control_wires:
            return P.GlobalPhase(-float(np.real(op.data[0])))
        if len(op.wires) == 0:
            matrix = np.asarray(qml.matrix(op), dtype=np.complex128)
            return P.GlobalPhase(float(np.angle(matrix.reshape(-1)[0])))
        try:
            matrix = np.asarray(qml.matrix(op, wire_order=op.wires), dtype=np.complex128)
        except Exception as exc:
            raise DeviceError(f"{op.name} on wires {op.wires.tolist()} has no matrix that {GPUQubitDevice.name} can apply") from exc
        return _matrix_op(tuple(self.qubits_big_endian(op.wires)), matrix, op.name)

    def adjoint_steps(self, tape: QuantumScript) -> list[AdjointStep]:
        """Each operation as a gate, its inverse and, if trainable, its derivative matrix."""
        trainable = {param: column for column, param in enumerate(tape.trainable_params)}
        steps = []
        param = 0
        for index, op in enumerate(tape.operations):
            num = op.num_params
            columns = [trainable[p] for p in range(param, param + num) if p in trainable]
            param += num
            if isinstance(op, StatePrepBase) and index == 0:
                if columns:
                    raise DeviceError("adjoint differentiation cannot differentiate a state preparation's parameters")
                continue
            gate = self.engine_op(op)
            if gate is None:
                continue
            derivatives = generators = ()
            if columns:
                if num != 1 or not op.has_generator:
                    raise DeviceError(f"adjoint differentiation cannot differentiate {op.name}: it needs one parameter with a generator")
                sentence = _generator_sentence(op)
                if sentence is not None:  # dU/dtheta = i G U with G a Pauli sum: one pass, no copy
                    generators = ((columns[0], self.pauli_observable(sentence).pauli),)
                else:
                    derivative = np.asarray(operation_derivative(op), dtype=np.complex128)
                    qubits = tuple(self.qubits_big_endian(op.wires))
                    derivatives = ((columns[0], _matrix_op(qubits, derivative, op.name + "'")),)
            steps.append(AdjointStep(gate, _inverse(gate), derivatives, generators))
        return steps

    # -- observables --

    def observable(self, obs) -> Observable:
        rep = obs.pauli_rep
        if rep is not None:
            return self.pauli_observable(rep)
        try:
            coeffs, terms = obs.terms()
        except Exception:
            coeffs, terms = [1.0], [obs]
        paulis = []
        dense = []
        for coeff, term in zip(coeffs, terms):
            term_rep = term.pauli_rep
            if term_rep is not None:
                paulis.append(complex(coeff) * term_rep)
                continue
            if len(term.wires) > DENSE_MAX_QUBITS:
                raise DeviceError(f"{term.name} on {len(term.wires)} wires is wider than the {DENSE_MAX_QUBITS} wires a dense observable may have")
            matrix = np.asarray(qml.matrix(term, wire_order=term.wires), dtype=np.complex128)
            dense.append(DenseTerm(tuple(self.qubits_big_endian(term.wires)), matrix, complex(coeff)))
        pauli = None
        if paulis:
            total = paulis[0]
            for extra in paulis[1:]:
                total = total + extra
            pauli = self.pauli_observable(total).pauli
        return Observable(self.num_qubits, pauli, tuple(dense))

    def pauli_observable(self, sentence) -> Observable:
        xs, zs, coeffs = [], [], []
        for word, coeff in sentence.items():
            x = z = 0
            for wire, letter in word.items():
                bit = 1 << self.qubit(wire)
                if letter in ("X", "Y"):
                    x |= bit
                if letter in ("Z", "Y"):
                    z |= bit
            xs.append(x)
            zs.append(z)
            coeffs.append(complex(coeff))
        return Observable(self.num_qubits, pauli_sum(self.num_qubits, xs, zs, coeffs))


def _generator_sentence(op):
    """The generator ``G`` of ``op`` (``U = exp(i theta G)``) as a Pauli sentence, or None."""
    try:
        generator = op.generator()
        sentence = generator.pauli_rep
        if sentence is not None:
            return sentence
        # e.g. projector-controlled generators (PhaseShift, CRX): decompose their small matrix once
        matrix = np.asarray(qml.matrix(generator, wire_order=op.wires), dtype=np.complex128)
        if matrix.shape[0] > 1 << 4:
            return None
        key = (matrix.tobytes(), tuple(op.wires))
        if key not in _GENERATOR_CACHE:
            if len(_GENERATOR_CACHE) > 4096:
                _GENERATOR_CACHE.clear()
            _GENERATOR_CACHE[key] = qml.pauli_decompose(matrix, wire_order=op.wires, pauli=True)
        return _GENERATOR_CACHE[key]
    except Exception:  # no Pauli form: the dense derivative is used instead
        return None


_GENERATOR_CACHE: dict = {}


def _matrix_op(qubits: tuple, matrix: np.ndarray, label: str):
    diagonal = np.diagonal(matrix)
    if np.count_nonzero(matrix - np.diag(diagonal)) == 0:
        return P.Diagonal(qubits, np.ascontiguousarray(diagonal), label=label)
    return P.Unitary(qubits, matrix, label=label)


def _inverse(op):
    if isinstance(op, P.Diagonal):
        return P.Diagonal(op.qubits, np.conj(op.diagonal), label=op.label + "^-1")
    if isinstance(op, P.GlobalPhase):
        return P.GlobalPhase(-op.phase)
    return P.Unitary(op.qubits, np.ascontiguousarray(op.matrix.conj().T), label=op.label + "^-1")
