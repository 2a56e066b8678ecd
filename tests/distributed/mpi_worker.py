"""Run under ``mpiexec -n N python mpi_worker.py SCENARIO OUTDIR``: each rank writes what it got.

The tests in ``test_mpi.py`` start it with a timeout and compare the ranks'
files with each other, across rank counts, and with oracles. Every rank
writes ``OUTDIR/rank<r>.pkl``: a dict of results, or of errors as
``(type name, message)``.
"""

from __future__ import annotations

import os
import pickle
import sys
import time

import numpy as np
from mpi4py import MPI
from qiskit import ClassicalRegister, QuantumCircuit, QuantumRegister
from qiskit.circuit import Parameter
from qiskit.circuit.random import random_circuit

from gpu_provider import GPUSimulator

COMM = MPI.COMM_WORLD
RANK = COMM.Get_rank()


def circuits_with_global_gates() -> list[QuantumCircuit]:
    """Random 10-16 qubit circuits; gates on the top qubits (the rank bits at first) included."""
    out = []
    for n, seed in ((10, 1), (13, 2), (16, 3)):
        qc = random_circuit(n, 6, max_operands=3, seed=seed)
        for q in range(n - 3, n):  # dense gates on the qubits the ranks start with
            qc.h(q)
            qc.cx(q, q - n + 3)
        qc.rzz(0.3, n - 1, 0)
        qc.name = f"random{n}"
        out.append(qc)
    out.append(special_circuit())
    return out


def special_circuit(n: int = 11) -> QuantumCircuit:
    """Initialize, wide multi-controlled gates, diagonals, Pauli evolutions and unitaries on the top qubits."""
    from qiskit.circuit.library import DiagonalGate, PauliEvolutionGate, UnitaryGate
    from qiskit.quantum_info import SparsePauliOp, random_unitary

    qc = QuantumCircuit(n, name="special")
    qc.initialize([0.6, 0.0, 0.0, 0.8j], [n - 1, 0])  # on a rank qubit, at the start
    qc.h(range(1, n - 1))
    qc.mcx([n - 1, n - 2, 0, 1, 2, 3], 4)  # 7 qubits: the sliced (wide) controlled path, global controls
    qc.append(UnitaryGate(random_unitary(4, seed=5)), [n - 1, 2])
    qc.append(DiagonalGate(list(np.exp(1j * np.arange(8) * 0.37))), [n - 1, n - 2, 1])
    evolution = PauliEvolutionGate(SparsePauliOp(["XYZ", "ZZI", "IXX"], [0.4, -0.3, 0.7]), time=0.8)
    qc.append(evolution, [n - 1, n - 2, 3])
    qc.cswap(n - 1, n - 2, 5)
    qc.mcp(0.9, [n - 2, 5, 6, 7, 8], n - 1)  # a controlled phase onto a rank qubit
    return qc


def dynamic_circuit(n: int = 12) -> QuantumCircuit:
    """Mid-circuit measurement, reset and a branch, on the top (global) qubits too."""
    q = QuantumRegister(n, "q")
    c = ClassicalRegister(n, "c")
    qc = QuantumCircuit(q, c, name="dynamic")
    qc.h(range(n))
    qc.cx(n - 1, 0)
    qc.ry(0.7, n - 2)
    qc.measure(n - 1, 0)  # a global qubit, mid-circuit
    qc.reset(n - 1)
    qc.measure(n - 2, 1)
    with qc.if_test((c[0], 1)):
        qc.x(n - 1)
        qc.cx(n - 1, 3)
    qc.rx(0.4, n - 1)
    qc.reset(2)
    qc.crx(1.1, 2, n - 3)
    qc.measure(range(n), range(n))
    return qc


def scenario_results(backend: GPUSimulator) -> dict:
    out = {}
    for qc in circuits_with_global_gates():
        sv = backend.run(qc, statevector=True, shots=1, seed_simulator=7).result()
        out[f"{qc.name}/statevector"] = np.asarray(sv.get_statevector(0))
        out[f"{qc.name}/mpi"] = sv.results[0].metadata.get("mpi")
        measured = qc.measure_all(inplace=False)
        result = backend.run(measured, shots=4000, memory=True, seed_simulator=11).result()
        out[f"{qc.name}/counts"] = result.get_counts(0)
        out[f"{qc.name}/memory"] = result.get_memory(0)
    dynamic = dynamic_circuit()
    result = backend.run(dynamic, shots=300, seed_simulator=5).result()
    out["dynamic/counts"] = result.get_counts(0)
    # Several circuits in one job, one narrow enough for every rank count here.
    batch = [qc.measure_all(inplace=False) for qc in circuits_with_global_gates()[:2]]
    result = backend.run(batch, shots=1000, seed_simulator=21).result()
    out["batch/counts"] = [result.get_counts(i) for i in range(len(batch))]
    return out


def scenario_circuits(outdir: str) -> dict:
    backend = GPUSimulator(device="CPU", mpi=True)
    out = scenario_results(backend)
    out["target_qubits"] = backend.target.num_qubits
    return out


def expectation_circuit(n: int = 12) -> QuantumCircuit:
    qc = random_circuit(n, 5, max_operands=2, seed=4)
    for q in range(n - 2, n):
        qc.h(q)
        qc.cx(q, 1)
    return qc


def scenario_expectation(outdir: str) -> dict:
    """Pauli expectation values on a split state, from the engine (X and Z on global qubits)."""
    from gpu_provider.compiler.translate import translate
    from gpu_provider.engine.distributed import DistributedStateVector, RankGroup
    from gpu_provider.engine.executor import RunConfig, evolve
    from gpu_provider.engine.expectation import expectation_values, pauli_sum

    qc = expectation_circuit()
    n = qc.num_qubits
    program = translate(qc)
    group = RankGroup(COMM)
    state = DistributedStateVector(np, n, np.complex128, None, group, program.ops)
    evolve(program, state, RunConfig())
    rng = np.random.default_rng(9)
    terms = rng.integers(0, 4, size=(6, n))  # 0 I, 1 X, 2 Y, 3 Z per qubit
    terms[0, :] = 0
    terms[0, n - 1] = 1  # X on the top qubit
    terms[1, :] = 0
    terms[1, n - 1], terms[1, 0] = 3, 2  # Z on the top qubit, Y on qubit 0
    x = [sum(1 << q for q in range(n) if t[q] in (1, 2)) for t in terms]
    z = [sum(1 << q for q in range(n) if t[q] in (2, 3)) for t in terms]
    coeffs = [0.5, -1.25, 0.75, 1.0, 2.0, -0.3]
    labels = ["".join("IXYZ"[t[q]] for q in reversed(range(n))) for t in terms]
    observables = [pauli_sum(n, x[:3], z[:3], coeffs[:3]), pauli_sum(n, x[3:], z[3:], coeffs[3:])]
    values = expectation_values(state, observables)
    # Sampling and the full state from the same split state, after the expectation's swaps.
    full = state.to_host()
    return {"values": values, "labels": labels, "coeffs": coeffs, "state": full, "swaps": group.swaps}


def estimator_pubs():
    """A parametrized 12-qubit circuit (gates on the top qubits), two parameter sets, Paulis with X/Y/Z on them."""
    from qiskit.circuit import ParameterVector
    from qiskit.quantum_info import SparsePauliOp

    n = 12
    theta = ParameterVector("t", 3)
    qc = QuantumCircuit(n)
    for q in range(n):
        qc.ry(theta[q % 3] * (q + 1) / n, q)
    for q in range(n - 1):
        qc.cx(q, q + 1)
    qc.rx(theta[0], n - 1)
    qc.crz(theta[1], n - 1, 2)
    qc.h(n - 2)
    observables = [
        SparsePauliOp(["X" + "I" * (n - 1), "Y" + "Z" * (n - 2) + "X"], [0.5, -1.5]),
        SparsePauliOp(["ZZ" + "I" * (n - 2), "I" * (n - 1) + "Y"], [1.0, 0.25]),
    ]
    values = np.array([[0.1, 0.7, -1.3], [2.0, -0.4, 0.9]])
    return qc, observables, values


def dynamic_estimator_pub():
    """A 10-qubit circuit that measures the top qubit (a rank bit at first), branches on it and resets it."""
    from qiskit.quantum_info import SparsePauliOp

    n = 10
    qc = QuantumCircuit(n, 1)
    for q in range(n):
        qc.ry(0.3 + 0.2 * q, q)
    for q in range(n - 1):
        qc.cx(q, q + 1)
    qc.measure(n - 1, 0)
    with qc.if_test((qc.clbits[0], 1)):
        qc.rx(0.7, 0)
    qc.reset(n - 1)
    qc.h(n - 1)
    qc.cx(n - 1, 3)
    return qc, [SparsePauliOp("Z" * n), SparsePauliOp("X" + "I" * (n - 2) + "Z"), SparsePauliOp("I" * (n - 4) + "Y" + "I" * 3)]


def scenario_primitives(outdir: str) -> dict:
    """EstimatorV2 and SamplerV2 over a backend with mpi=True."""
    from gpu_provider.primitives import EstimatorV2, SamplerV2

    backend = GPUSimulator(device="CPU", mpi=True)
    qc, observables, values = estimator_pubs()
    estimator = EstimatorV2(backend=backend)
    result = estimator.run([(qc, [[o] for o in observables], values)]).result()
    measured = qc.measure_all(inplace=False)
    sampler = SamplerV2(backend=backend, seed=17)
    samples = sampler.run([(measured, values)], shots=500).result()
    dynamic, dynamic_observables = dynamic_estimator_pub()
    exact = estimator.run([(dynamic, dynamic_observables)]).result()  # exact branching on split states
    return {
        "dynamic_evs": np.asarray(exact[0].data.evs),
        "evs": np.asarray(result[0].data.evs),
        "counts": [samples[0].data.meas.get_counts(i) for i in range(len(values))],
    }


def scenario_errors(outdir: str) -> dict:
    """Bad input: each must raise on every rank, and the next good job must still run."""
    out = {}
    backend = GPUSimulator(device="CPU", mpi=True, seed_simulator=3)

    def attempt(key, fn):
        try:
            fn()
            out[key] = ("no error", "")
        except Exception as exc:
            out[key] = (type(exc).__name__, str(exc))

    # Ranks disagree on the circuit.
    other = QuantumCircuit(6)
    other.h(0)
    if RANK == 1:
        other.x(5)
    other.measure_all()
    attempt("disagree", lambda: backend.run(other).result())
    # One rank's preparation fails (an unbound parameter there only).
    bad = QuantumCircuit(6)
    bad.h(0)
    if RANK == COMM.Get_size() - 1:
        bad.rx(Parameter("theta"), 5)
    bad.measure_all()
    attempt("one_rank_fails", lambda: backend.run(bad).result())
    # Too many ranks for the circuit: its widest gate needs more qubits than a rank holds.
    narrow = QuantumCircuit(3)
    narrow.rxx(0.3, 0, 2)
    narrow.measure_all()
    attempt("too_many_ranks", lambda: backend.run(narrow, fusion_enable=False).result())
    # Two ways of scaling out at once.
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        attempt("mpi_and_executor", lambda: backend.run(other, executor=pool).result())
    # A rank that fails while the job runs: the others must stop too.
    from gpu_provider.engine import distributed

    original = distributed.DistributedStateVector.apply_unitary
    calls = {"n": 0}

    def failing(self, qubits, matrix):
        calls["n"] += 1
        if RANK == 1 and calls["n"] == 5:
            raise MemoryError("injected failure on rank 1")
        return original(self, qubits, matrix)

    distributed.DistributedStateVector.apply_unitary = failing
    try:
        qc = random_circuit(10, 8, max_operands=2, seed=8)
        qc.measure_all()
        job = backend.run(qc, fusion_enable=False)
        attempt("fails_midway", lambda: job.result(timeout=60))
        out["fails_midway/status"] = job.status().name
    finally:
        distributed.DistributedStateVector.apply_unitary = original
    # Everything still usable: a good job after all of that.
    good = random_circuit(10, 4, max_operands=2, seed=2)
    good.measure_all()
    out["after"] = backend.run(good, shots=500).result().get_counts()
    return out


def scenario_cancel(outdir: str) -> dict:
    """Rank 0 cancels a long split job; every rank's job must end cancelled, and the next job run."""
    backend = GPUSimulator(device="CPU", mpi=True, seed_simulator=1, fusion_enable=False)
    qc = QuantumCircuit(18)
    for layer in range(400):
        for q in range(18):
            qc.rx(0.1 * (layer + 1), q)
        for q in range(0, 17, 2):
            qc.cx(q, q + 1)
    qc.measure_all()
    job = backend.run(qc, shots=10)
    out = {}
    deadline = time.monotonic() + 60
    while job.progress()[0] == 0 and time.monotonic() < deadline:  # this rank's job has run some ops
        time.sleep(0.01)
    out["progress_running"] = job.progress()
    out["status_running"] = job.status().name
    COMM.Barrier()  # every rank's job is running (it has thousands of ops to go)
    if RANK == 0:
        out["cancel_returned"] = job.cancel()
    job.wait_for_final_state(timeout=60, wait=0.05)
    out["status"] = job.status().name
    out["error"] = job.error_message()
    good = QuantumCircuit(10)
    good.h(range(10))
    good.cx(9, 0)
    good.measure_all()
    out["after"] = backend.run(good, shots=500).result().get_counts()
    return out


def scenario_fake_gpu(outdir: str) -> dict:
    """The GPU path's plumbing on a NumPy-backed stand-in for CuPy: host-staged and CUDA-aware exchanges."""
    import types

    from tests.engine.test_gpu_plumbing import DeviceArray, make_fake_cupy

    def get(self, stream=None, order="C", out=None):
        if out is None:
            return np.array(self)
        np.copyto(out, self)
        return out

    def set_(self, array, stream=None):
        np.copyto(self, array)

    DeviceArray.get = get
    DeviceArray.set = set_
    fake = make_fake_cupy()
    fake.cuda.get_current_stream = lambda: types.SimpleNamespace(synchronize=lambda: None)
    cupyx = types.ModuleType("cupyx")
    cupyx.empty_pinned = lambda shape, dtype=np.float64: np.empty(shape, dtype=dtype)
    sys.modules["cupy"] = fake
    sys.modules["cupyx"] = cupyx
    from gpu_provider.engine import devices, distributed, kernels

    kernels.kernels_for = lambda dtype: None  # the array-module path (no compiled kernels on a stand-in)
    devices.reset_probe()
    out = {}
    for aware in (False, True):
        distributed._cuda_aware = lambda MPI, aware=aware: aware
        backend = GPUSimulator(device="GPU", mpi=True)
        for qc in circuits_with_global_gates()[:2]:
            result = backend.run(qc, statevector=True, shots=1, seed_simulator=7).result()
            out[f"{aware}/{qc.name}/statevector"] = np.asarray(result.get_statevector(0))
            out[f"{aware}/{qc.name}/device"] = result.results[0].metadata["device"]
            out[f"{aware}/{qc.name}/mpi"] = result.results[0].metadata["mpi"]
            measured = qc.measure_all(inplace=False)
            out[f"{aware}/{qc.name}/counts"] = backend.run(measured, shots=2000, seed_simulator=11).result().get_counts()
    return out


def scenario_queued_cancel(outdir: str) -> dict:
    """Rank 1 cancels the job while it is still queued there (its workers busy); rank 0 runs it meanwhile."""
    local = GPUSimulator(device="CPU", seed_simulator=1, fusion_enable=False)
    blockers = []
    if RANK == 1:
        slow = QuantumCircuit(18)
        for layer in range(600):
            slow.rx(0.1 * layer, range(18))
            slow.cx(range(0, 17, 2), range(1, 18, 2))
        slow.measure_all()
        blockers = [local.run(slow, shots=1) for _ in range(2)]  # both CPU workers of this rank busy
        deadline = time.monotonic() + 60
        while not all(b.status().name == "RUNNING" for b in blockers) and time.monotonic() < deadline:
            time.sleep(0.01)
    COMM.Barrier()
    qc = random_circuit(12, 40, max_operands=2, seed=3)
    qc.measure_all()
    job = GPUSimulator(device="CPU", mpi=True, seed_simulator=2, fusion_enable=False).run(qc, shots=100)
    out = {"queued_status": job.status().name}
    if RANK == 1:
        out["cancel_returned"] = job.cancel()
    job.wait_for_final_state(timeout=60, wait=0.05)
    out["status"] = job.status().name
    out["error"] = job.error_message()
    for blocker in blockers:
        blocker.cancel()
    return out


def scenario_missing_rank(outdir: str) -> dict:
    """Rank 1 runs without mpi (it never joins): rank 0 must raise after GPU_PROVIDER_MPI_TIMEOUT, not hang."""
    os.environ["GPU_PROVIDER_MPI_TIMEOUT"] = "3"
    qc = QuantumCircuit(6)
    qc.h(range(6))
    qc.measure_all()
    start = time.monotonic()
    try:
        counts = GPUSimulator(device="CPU", mpi=RANK == 0, seed_simulator=1).run(qc, shots=10).result().get_counts()
        out = {"outcome": ("counts", sum(counts.values()))}
    except Exception as exc:
        out = {"outcome": (type(exc).__name__, str(exc))}
    out["seconds"] = time.monotonic() - start
    return out


def pennylane_circuits(device):
    """QNodes on 10 wires; device wire 0 is the engine's top qubit (a rank bit at first)."""
    import pennylane as qml
    from pennylane import numpy as pnp

    n = 10

    def layers(params):
        for w in range(n):
            qml.RY(params[w % 3] * (w + 1) / n, wires=w)
        for w in range(n - 1):
            qml.CNOT(wires=[w, w + 1])
        qml.CRZ(params[1], wires=[0, 7])
        qml.RX(params[2], wires=0)

    @qml.qnode(device, diff_method="parameter-shift")
    def energy(params):
        layers(params)
        return qml.expval(qml.PauliX(0) @ qml.PauliZ(9) + 0.5 * qml.PauliY(5))

    @qml.qnode(device)
    def exact(params):
        layers(params)
        return qml.var(qml.PauliZ(0) @ qml.PauliX(1)), qml.probs(wires=[0, 9, 4]), qml.state()

    params = pnp.array([0.3, -1.1, 0.7], requires_grad=True)
    return energy, exact, params


def pennylane_counts(device):
    """A QNode of counts on wires 0 (a rank bit at first), 3 and 9."""
    import pennylane as qml

    @qml.qnode(device)
    def counts(params):
        qml.Hadamard(wires=0)
        qml.CNOT(wires=[0, 9])
        qml.RY(params[0], wires=3)
        return qml.counts(wires=[0, 3, 9])

    return counts


def pennylane_tree(device):
    """Mid-circuit measurements over the tree of outcomes (exact): wire 0 is a rank bit at first."""
    import pennylane as qml

    @qml.qnode(device, mcm_method="tree-traversal")
    def tree(params):
        qml.RY(params[0], wires=0)
        qml.CNOT(wires=[0, 9])
        m0 = qml.measure(0, reset=True)
        qml.cond(m0, qml.RX)(params[1], wires=4)
        qml.RY(params[2], wires=0)
        m1 = qml.measure(9)
        return qml.expval(qml.PauliZ(4) @ qml.PauliX(0)), qml.probs(wires=[0, 4]), qml.expval(m0 + m1)

    return tree


def scenario_pennylane(outdir: str) -> dict:
    import pennylane as qml

    device = qml.device("gpu_provider.qubit", wires=10, mpi=True, device="CPU", seed=5)
    energy, exact, params = pennylane_circuits(device)
    value = float(energy(params))
    gradient = np.asarray(qml.grad(energy)(params))
    variance, probs, state = exact(params)
    counts = pennylane_counts(qml.device("gpu_provider.qubit", wires=10, mpi=True, device="CPU", seed=5, shots=500))

    @qml.qnode(device)
    def hermitian(params):
        qml.RY(params[0], wires=0)
        return qml.expval(qml.Hermitian(np.array([[1.0, 0.5], [0.5, -1.0]]), wires=0))

    try:
        hermitian(params)
        refused = ("no error", "")
    except Exception as exc:
        refused = (type(exc).__name__, str(exc))
    after = float(energy(params))  # the device still works
    tree = [np.asarray(value) for value in pennylane_tree(device)(params)]
    return {
        "tree": tree,
        "refused": refused,
        "after": after,
        "energy": value,
        "gradient": gradient,
        "variance": float(variance),
        "probs": np.asarray(probs),
        "state": np.asarray(state),
        "counts": dict(counts(params)),
    }


_GROUPS: list = []


def _track_groups() -> None:
    """Keep every RankGroup made, to check that each job's communicators are freed."""
    from gpu_provider.engine import distributed

    original = distributed.RankGroup.__init__

    def init(self, comm) -> None:
        original(self, comm)
        _GROUPS.append(self)

    distributed.RankGroup.__init__ = init


def unfreed_communicators(wait: float = 10.0) -> int:
    """Communicators of this rank's jobs still allocated (a job abandoned on a rank frees its own
    on a thread, after its first sync: waited for up to ``wait`` seconds)."""
    deadline = time.monotonic() + wait
    while True:
        unfreed = sum(comm != MPI.COMM_NULL for group in _GROUPS for comm in (group.data, group.control))
        if not unfreed or time.monotonic() > deadline:
            return unfreed
        time.sleep(0.05)


def main() -> None:
    scenario, outdir = sys.argv[1], sys.argv[2]
    _track_groups()
    try:
        result = globals()[f"scenario_{scenario}"](outdir)
        if scenario in ("errors", "cancel", "queued_cancel"):
            result["jobs"] = len(_GROUPS)
            result["unfreed_communicators"] = unfreed_communicators()
    except Exception as exc:  # reported, so the test shows which rank failed and how
        result = {"__error__": (type(exc).__name__, str(exc))}
    with open(os.path.join(outdir, f"rank{RANK}.pkl"), "wb") as handle:
        pickle.dump(result, handle)


if __name__ == "__main__":
    main()
