"""Clifford circuits as stabilizer states (engine/stabilizer.py, method="stabilizer" and "automatic").

Oracles: ``qiskit.quantum_info.Statevector`` (exact, small circuits),
``qiskit.quantum_info.StabilizerState`` (exact marginals of wide circuits) and
Aer's stabilizer method (sampled, wide dynamic circuits).
"""

from __future__ import annotations

import numpy as np
import pytest
from qiskit import ClassicalRegister, QuantumCircuit, QuantumRegister
from qiskit.circuit.library import PauliEvolutionGate
from qiskit.circuit.random import random_clifford_circuit
from qiskit.quantum_info import Clifford, SparsePauliOp, StabilizerState, Statevector

from gpu_provider import GPUSimulator
from gpu_provider.compiler.translate import translate
from gpu_provider.engine import devices
from gpu_provider.engine.executor import RunConfig, new_state, run_ops
from gpu_provider.engine.program import PauliEvolution, Program
from gpu_provider.engine.stabilizer import NotCliffordError, StabilizerState as EngineStabilizer, why_not_clifford
from gpu_provider.errors import CircuitTooLargeError, InvalidInputError, InvalidOptionError
from tests.engine.test_gpu_plumbing import fake_gpu  # noqa: F401  (a fixture)
from tests.helpers import DEVICES, assert_counts_agree, assert_counts_match, exact_distribution

CPU = devices.CPUDevice()


def ghz(n: int) -> QuantumCircuit:
    qc = QuantumCircuit(n, n)
    qc.h(0)
    for q in range(n - 1):
        qc.cx(q, q + 1)
    qc.measure(range(n), range(n))
    return qc


def measured(circuit: QuantumCircuit) -> QuantumCircuit:
    out = circuit.copy()
    out.measure_all()
    return out


# -- the engine's tableau against the state vector ---------------------------------------


@pytest.mark.parametrize("seed", range(4))
def test_support_and_marginals_equal_the_state_vector(seed):
    """Sampled support = the exact support, each outcome equally likely; P(1) per qubit exact."""
    rng = np.random.default_rng(seed)
    for _ in range(25):
        n = int(rng.integers(1, 7))
        circuit = random_clifford_circuit(n, int(rng.integers(1, 30)), seed=int(rng.integers(2**31)))
        program = translate(circuit)
        assert why_not_clifford(program) is None
        state = EngineStabilizer(np, n)
        run_ops(state, program.ops, rng, RunConfig())
        probabilities = Statevector(circuit).probabilities()
        support = set(np.flatnonzero(probabilities > 1e-9).tolist())
        x0, basis = state.sampling_table()
        assert 2 ** basis.shape[0] == len(support)
        assert np.allclose(probabilities[sorted(support)], 1 / len(support))
        assert set(state.sample(list(range(n)), 4000, rng).tolist()) == support
        for q in range(n):
            exact = float(sum(p for i, p in enumerate(probabilities) if (i >> q) & 1))
            assert state.probability_one(q) == pytest.approx(exact, abs=1e-12)


def test_collapse_and_reset_follow_the_state_vector():
    """Measurements (forced outcomes) and resets between Clifford layers, against StateVector.collapse."""
    rng = np.random.default_rng(11)
    for _ in range(60):
        n = int(rng.integers(1, 6))
        tableau, vector = EngineStabilizer(np, n), new_state(CPU, n, np.complex128)
        for _ in range(3):
            program = translate(random_clifford_circuit(n, int(rng.integers(1, 12)), seed=int(rng.integers(2**31))))
            run_ops(tableau, program.ops, rng, RunConfig())
            run_ops(vector, program.ops, rng, RunConfig())
            for q in rng.permutation(n)[: int(rng.integers(0, n + 1))].tolist():
                p1 = vector.probability_one(q)
                assert tableau.probability_one(q) == pytest.approx(p1, abs=1e-9)
                outcome = int(rng.random() < p1) if 1e-9 < p1 < 1 - 1e-9 else int(round(p1))
                flip = bool(rng.integers(2))
                tableau.collapse(q, outcome, p1 if outcome else 1 - p1, flip)
                vector.collapse(q, outcome, p1 if outcome else 1 - p1, flip)
        support = set(np.flatnonzero(np.abs(vector.to_host()) ** 2 > 1e-9).tolist())
        assert set(tableau.sample(list(range(n)), 3000, rng).tolist()) == support


def test_clifford_recognition():
    qc = QuantumCircuit(3)
    qc.h(0), qc.s(1), qc.sdg(2), qc.sx(0), qc.cz(0, 2), qc.swap(1, 2), qc.iswap(0, 1), qc.ecr(1, 2), qc.cy(2, 0)
    qc.rz(np.pi / 2, 1), qc.rx(-np.pi, 2), qc.u(np.pi / 2, 0, np.pi, 0), qc.dcx(0, 1)
    qc.global_phase = 0.3
    assert why_not_clifford(translate(qc)) is None
    for gate in ("t", "ccx", "rz"):
        bad = qc.copy()
        if gate == "t":
            bad.t(1)
        elif gate == "ccx":
            bad.ccx(0, 1, 2)
        else:
            bad.rz(0.3, 2)
        assert "not a Clifford" in why_not_clifford(translate(bad))
    evolution = QuantumCircuit(3)
    evolution.append(PauliEvolutionGate(SparsePauliOp(["XYZ", "ZZI"]), time=np.pi / 4), [0, 1, 2])
    assert why_not_clifford(translate(evolution)) is None
    evolution.append(PauliEvolutionGate(SparsePauliOp(["XII", "ZZI"]), time=np.pi / 8), [0, 1, 2])
    assert "not a Clifford" in why_not_clifford(translate(evolution))
    state = EngineStabilizer(np, 1)
    with pytest.raises(NotCliffordError):
        state.apply_unitary((0,), np.diag([1, np.exp(0.25j * np.pi)]))


def test_pauli_evolution_ops_match_the_state_vector():
    """The engine's PauliEvolution op (wide evolutions reach it untranslated): multiples of pi/4, commuting terms."""
    rng = np.random.default_rng(3)
    qubits = (0, 2, 3, 5)
    for _ in range(30):
        prefix = translate(random_clifford_circuit(6, 20, seed=int(rng.integers(2**31))))
        tableau, vector = EngineStabilizer(np, 6), new_state(CPU, 6, np.complex128)
        run_ops(tableau, prefix.ops, rng, RunConfig())
        run_ops(vector, prefix.ops, rng, RunConfig())
        x, z = int(rng.integers(1, 16)), int(rng.integers(0, 16))
        # A second term commuting with the first: the first times a Z-string on its own X-free qubits.
        x2, z2 = x, z ^ (int(rng.integers(0, 16)) & ~x)
        angles = (float(rng.integers(-7, 8)) * np.pi / 4, float(rng.integers(-7, 8)) * np.pi / 4)
        op = PauliEvolution(qubits, (x, x2), (z, z2), angles)
        assert why_not_clifford(Program(6, 0, (op,))) is None
        tableau.apply_pauli_evolution(op.qubits, op.x_masks, op.z_masks, op.angles)
        vector.apply_pauli_evolution(op.qubits, op.x_masks, op.z_masks, op.angles)
        support = set(np.flatnonzero(np.abs(vector.to_host()) ** 2 > 1e-9).tolist())
        assert set(tableau.sample(list(range(6)), 2000, rng).tolist()) == support
        for q in range(6):
            assert tableau.probability_one(q) == pytest.approx(vector.probability_one(q), abs=1e-9)
    clashing = PauliEvolution((0, 1), (1, 0), (0, 1), (np.pi / 4, np.pi / 4))  # X and Z on qubit 0 do not commute
    assert "Pauli evolution" in why_not_clifford(Program(2, 0, (clashing,)))


def test_pauli_evolution_and_initialize_match_the_state_vector():
    qc = QuantumCircuit(4)
    qc.h([0, 1])
    qc.cx(1, 2)
    qc.append(PauliEvolutionGate(SparsePauliOp(["XYZI", "ZZIZ"], [1.0, -1.0]), time=3 * np.pi / 4), range(4))
    qc.append(PauliEvolutionGate(SparsePauliOp("YIXI"), time=np.pi / 2), range(4))
    prepared = QuantumCircuit(6)
    prepared.initialize("01", [4, 5])
    prepared.compose(qc, range(4), inplace=True)
    backend = GPUSimulator(device="CPU", method="stabilizer", seed_simulator=5)
    counts = backend.run(measured(prepared), shots=4000).result().get_counts()
    assert_counts_match(counts, exact_distribution(measured(prepared)), shots=4000)


# -- the backend -----------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_explicit_method_matches_the_exact_distribution(device):
    backend = GPUSimulator(device=device, method="stabilizer")
    for seed in range(6):
        circuit = measured(random_clifford_circuit(5, 25, seed=seed))
        result = backend.run(circuit, shots=3000, seed_simulator=seed).result()
        assert result.results[0].metadata["method"] == "stabilizer"
        assert_counts_match(result.get_counts(), exact_distribution(circuit), shots=3000)
    # Registers, clbits measured twice, a partial measurement: laid out as for a state vector.
    qc = QuantumCircuit(4, 3)
    qc.h(0), qc.cx(0, 1), qc.x(3)
    qc.measure([0, 1, 3], [2, 0, 1])
    qc.measure(0, 0)
    counts = backend.run(qc, shots=2000, seed_simulator=1).result().get_counts()
    assert_counts_match(counts, exact_distribution(qc), shots=2000)


def test_a_seed_repeats_the_samples_and_memory_is_per_shot():
    backend = GPUSimulator(device="CPU", method="stabilizer")
    circuit = measured(random_clifford_circuit(9, 40, seed=3))
    first = backend.run(circuit, shots=500, seed_simulator=42, memory=True).result()
    second = backend.run(circuit, shots=500, seed_simulator=42, memory=True).result()
    assert first.get_memory() == second.get_memory()
    assert len(first.get_memory()) == 500 and sum(first.get_counts().values()) == 500


def test_automatic_runs_wide_clifford_circuits_as_stabilizer_states():
    """A 120-qubit GHZ state and a 150-bit Bernstein-Vazirani circuit: far past any state vector."""
    backend = GPUSimulator(device="CPU")
    result = backend.run(ghz(120), shots=1000, seed_simulator=1).result()
    counts = result.get_counts()
    assert set(counts) == {"0" * 120, "1" * 120} and sum(counts.values()) == 1000
    assert 400 < counts["0" * 120] < 600
    assert result.results[0].metadata["method"] == "stabilizer"
    secret = np.random.default_rng(0).integers(0, 2, 150)
    bv = QuantumCircuit(151, 150)
    bv.x(150), bv.h(range(151))
    for q in np.flatnonzero(secret).tolist():
        bv.cx(q, 150)
    bv.h(range(150))
    bv.measure(range(150), range(150))
    counts = backend.run(bv, shots=50).result().get_counts()
    assert counts == {"".join(str(b) for b in secret[::-1]): 50}


def test_wide_random_clifford_marginals_match_stabilizer_state():
    """80 qubits: the marginal distribution of several triples of qubits, against Qiskit's exact one."""
    rng = np.random.default_rng(7)
    circuit = random_clifford_circuit(80, 400, seed=7)
    exact = StabilizerState(Clifford(circuit))
    result = GPUSimulator(device="CPU").run(measured(circuit), shots=4000, seed_simulator=9, memory=True).result()
    memory = result.get_memory()
    assert result.results[0].metadata["method"] == "stabilizer"
    for _ in range(8):
        triple = sorted(rng.choice(80, 3, replace=False).tolist())
        marginal: dict = {}
        for shot in memory:
            key = "".join(shot[79 - q] for q in reversed(triple))
            marginal[key] = marginal.get(key, 0) + 1
        assert_counts_match(marginal, exact.probabilities_dict(triple), shots=4000)


def _dynamic(n: int, seed: int) -> QuantumCircuit:
    """Clifford layers with mid-circuit measurements, resets and feed-forward on ``n`` qubits."""
    rng = np.random.default_rng(seed)
    qc = QuantumCircuit(n, 6)
    qc.compose(random_clifford_circuit(n, 3 * n, seed=seed), inplace=True)
    a, b, c = rng.choice(n, 3, replace=False).tolist()
    qc.measure(a, 0)
    qc.reset(b)
    with qc.if_test((qc.clbits[0], 1)):
        qc.h(b)
        qc.cx(b, c)
    qc.compose(random_clifford_circuit(n, 2 * n, seed=seed + 1), inplace=True)
    qc.measure(c, 1)
    with qc.if_test((qc.clbits[1], 0)) as otherwise:
        qc.x(a)
    with otherwise:
        qc.s(a)
        qc.h(a)
    qc.measure([a, b, c], [2, 3, 4])
    qc.measure((a + 1) % n, 5)
    return qc


@pytest.mark.parametrize("branching", [True, False])
def test_dynamic_clifford_circuits_match_the_state_vector(branching):
    for seed in range(3):
        circuit = _dynamic(6, seed)
        ours = GPUSimulator(device="CPU", method="stabilizer", shot_branching_enable=branching)
        reference = GPUSimulator(device="CPU", method="statevector")
        counts = ours.run(circuit, shots=3000, seed_simulator=seed).result().get_counts()
        expected = reference.run(circuit, shots=3000, seed_simulator=seed + 100).result().get_counts()
        assert_counts_agree(counts, expected)


def test_wide_dynamic_clifford_circuit_against_aer_stabilizer():
    from qiskit import transpile
    from qiskit_aer import AerSimulator

    circuit = _dynamic(70, 4)
    result = GPUSimulator(device="CPU").run(circuit, shots=3000, seed_simulator=2).result()
    assert result.results[0].metadata["method"] == "stabilizer"
    aer = AerSimulator(method="stabilizer")
    expected = aer.run(transpile(circuit, aer, optimization_level=0), shots=3000, seed_simulator=3).result().get_counts()
    assert_counts_agree(result.get_counts(), expected)


def test_errors_name_the_cause_and_leave_the_backend_usable():
    backend = GPUSimulator(device="CPU")
    wide = ghz(60)
    wide.t(3)
    with pytest.raises(CircuitTooLargeError, match="not a Clifford"):
        backend.run(wide)
    with pytest.raises(CircuitTooLargeError):  # a state vector was asked for
        backend.run(ghz(60), method="statevector")
    with pytest.raises(InvalidInputError, match="method='stabilizer' simulates Clifford circuits only"):
        backend.run(wide, method="stabilizer")
    with pytest.raises(InvalidOptionError, match="statevector=True"):
        backend.run(ghz(3), method="stabilizer", statevector=True)
    with pytest.raises(InvalidOptionError, match="method='density_matrix'"):
        backend.run(ghz(3), method="density_matrix")
    counts = backend.run(ghz(3), shots=100, seed_simulator=1).result().get_counts()
    assert set(counts) <= {"000", "111"} and sum(counts.values()) == 100


def test_the_target_is_wide_for_the_stabilizer_method():
    from qiskit import transpile

    backend = GPUSimulator(device="CPU", method="stabilizer")
    assert backend.target.num_qubits == 10_000
    assert GPUSimulator(device="CPU").target.num_qubits < 64
    compiled = transpile(ghz(200), backend, optimization_level=2)
    counts = backend.run(compiled, shots=200, seed_simulator=4).result().get_counts()
    assert set(counts) == {"0" * 200, "1" * 200}


def test_the_tableau_runs_on_the_device_path_of_a_cupy_stand_in(fake_gpu):  # noqa: F811
    circuit = _dynamic(6, 1)
    on_gpu = GPUSimulator(device="GPU", method="stabilizer").run(circuit, shots=3000, seed_simulator=3).result()
    assert on_gpu.results[0].metadata["device"].startswith("GPU")
    expected = GPUSimulator(device="CPU", method="statevector").run(circuit, shots=3000, seed_simulator=4).result().get_counts()
    assert_counts_agree(on_gpu.get_counts(), expected)


def test_an_executor_worker_runs_the_stabilizer_state():
    """A chunk on an executor's worker checks a tableau's memory, not a 2^n state's."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:
        result = GPUSimulator(device="CPU", executor=pool).run([ghz(90), ghz(4)], shots=200, seed_simulator=1).result()
    wide, narrow = result.get_counts()
    assert set(wide) == {"0" * 90, "1" * 90} and set(narrow) == {"0000", "1111"}
    assert [r.metadata["method"] for r in result.results] == ["stabilizer", "statevector"]


def test_sampler_runs_wide_clifford_circuits_as_stabilizer_states():
    from qiskit.circuit import Parameter

    from gpu_provider import EstimatorV2, SamplerV2

    sampler = SamplerV2(backend_options={"device": "CPU"}, seed=1)
    result = sampler.run([ghz(100)], shots=600).result()[0]
    counts = result.data.c.get_counts()
    assert set(counts) == {"0" * 100, "1" * 100} and 200 < counts["0" * 100] < 400
    assert result.data.c.num_bits == 100 and result.metadata["simulator_metadata"]["method"] == "stabilizer"
    # Parameters decide Clifford-ness: multiples of pi/2 run, others fail the job with the reason.
    theta = Parameter("t")
    qc = QuantumCircuit(80, 2)
    qc.h(0), qc.rz(theta, 0), qc.h(0), qc.cx(0, 79), qc.measure([0, 79], [0, 1])
    bits = sampler.run([(qc, [[0.0], [np.pi], [np.pi / 2]])], shots=400).result()[0].data.c
    assert bits.shape == (3,) and bits.get_counts(0) == {"00": 400} and bits.get_counts(1) == {"11": 400}
    assert set(bits.get_counts(2)) == {"00", "11"} and 120 < bits.get_counts(2)["00"] < 280
    from qiskit.providers import JobError

    with pytest.raises(JobError, match="not a Clifford"):
        sampler.run([(qc, [0.3])]).result()
    not_clifford = ghz(100)
    not_clifford.t(0)
    with pytest.raises(CircuitTooLargeError, match="not a Clifford"):
        sampler.run([not_clifford])
    unmeasured = ghz(100).remove_final_measurements(inplace=False)
    evs = EstimatorV2(backend_options={"device": "CPU"}).run([(unmeasured, ["Z" * 100, "X" * 100, "Z" * 99 + "I"])]).result()[0].data.evs
    np.testing.assert_allclose(evs, [1.0, 1.0, 0.0], atol=1e-12)  # the GHZ state's Z...Z and X...X are +1
    explicit = SamplerV2(backend_options={"device": "CPU", "method": "stabilizer"}, seed=2)
    circuit = measured(random_clifford_circuit(5, 20, seed=9))
    counts = explicit.run([circuit], shots=3000).result()[0].data.meas.get_counts()
    assert_counts_match(counts, exact_distribution(circuit), shots=3000)


def test_clifford_objects_wider_than_a_tableau_reads_are_expanded():
    """Qiskit's Clifford-typed objects wider than the 6 qubits a tableau reads a gate on (a Clifford, a
    PermutationGate, a LinearFunction) expand into Clifford gates: for method="stabilizer", for the
    "automatic" fallback of a 70-qubit circuit and in the primitives. Exact oracle: Qiskit's StabilizerState."""
    from qiskit.circuit.library import LinearFunction, PermutationGate
    from qiskit.quantum_info import Pauli, random_clifford

    from gpu_provider import EstimatorV2

    rng = np.random.default_rng(11)
    n = 70
    circuit = random_clifford_circuit(n, 150, seed=11)
    circuit.append(random_clifford(8, seed=12), rng.choice(n, 8, replace=False).tolist())
    circuit.append(PermutationGate(rng.permutation(9).tolist()), rng.choice(n, 9, replace=False).tolist())
    matrix = np.eye(7, dtype=bool)
    matrix[0, 1:] = True
    circuit.append(LinearFunction(matrix), rng.choice(n, 7, replace=False).tolist())
    circuit.compose(random_clifford_circuit(n, 150, seed=13), inplace=True)
    exact = StabilizerState(Clifford(circuit))
    labels = [exact.clifford.to_labels(mode="S")[i].lstrip("+-") for i in (0, 5)] + ["".join(rng.choice(list("IZ"), n)) for _ in range(2)]
    evs = EstimatorV2(backend_options={"device": "CPU"}).run([(circuit, labels)]).result()[0]
    assert evs.metadata["simulator_metadata"]["method"] == "stabilizer"
    np.testing.assert_allclose(evs.data.evs, [exact.expectation_value(Pauli(label)) for label in labels], atol=1e-12)
    for method in ("automatic", "stabilizer"):
        result = GPUSimulator(device="CPU", method=method).run(measured(circuit), shots=3000, seed_simulator=3, memory=True).result()
        assert result.results[0].metadata["method"] == "stabilizer"
        memory = result.get_memory()
        for _ in range(3):
            pair = sorted(rng.choice(n, 2, replace=False).tolist())
            marginal: dict = {}
            for shot in memory:
                key = "".join(shot[n - 1 - q] for q in reversed(pair))
                marginal[key] = marginal.get(key, 0) + 1
            assert_counts_match(marginal, exact.probabilities_dict(pair), shots=3000)


def test_wide_gates_are_judged_without_building_their_matrices():
    """A 30-control mcx in a 45-qubit circuit: refused at once, by width, not by a 2^31-row matrix."""
    import time

    from qiskit.circuit.library import MCXGate

    qc = QuantumCircuit(45, 1)
    qc.h(range(45))
    qc.append(MCXGate(30), range(31))
    qc.measure(0, 0)
    start = time.perf_counter()
    with pytest.raises(CircuitTooLargeError, match="wider than the 6 qubits"):
        GPUSimulator(device="CPU").run(qc)
    assert time.perf_counter() - start < 5
    with pytest.raises(NotCliffordError):
        EngineStabilizer(np, 8).apply_controlled(tuple(range(7)), 0, (7,), np.array([[0, 1], [1, 0]]))


def test_estimator_runs_wide_clifford_circuits_as_stabilizer_states():
    """127 qubits (a heavy-hex device's width): Pauli sums against Qiskit's StabilizerState."""
    from qiskit.quantum_info import Pauli

    from gpu_provider import EstimatorV2

    rng = np.random.default_rng(4)
    n = 127
    circuit = random_clifford_circuit(n, 600, seed=3)
    exact = StabilizerState(Clifford(circuit))
    stabilizers = [label.lstrip("+-") for label in exact.clifford.to_labels(mode="S")[:3]]
    observables = [
        SparsePauliOp(["".join(rng.choice(list("IXYZ"), n)) for _ in range(3)] + stabilizers[i : i + 2], rng.normal(size=5))
        for i in range(2)
    ]
    result = EstimatorV2(backend_options={"device": "CPU"}).run([(circuit, observables)]).result()[0]
    expected = [sum(c.real * exact.expectation_value(Pauli(label)) for label, c in o.to_list()) for o in observables]
    np.testing.assert_allclose(result.data.evs, expected, atol=1e-12)
    assert result.metadata["simulator_metadata"]["method"] == "stabilizer"
    assert np.all(np.abs(expected) > 1e-6)  # the stabilizer terms do not vanish
    # Final measurements collapse (X/Y terms on measured qubits drop); the first qubit's stabilizer sign stays.
    measured = circuit.copy()
    measured.add_register(__import__("qiskit").ClassicalRegister(1))
    measured.measure(0, 0)
    z_only = "".join("Z" if c in "ZY" else "I" for c in stabilizers[0])
    terms = SparsePauliOp([stabilizers[0], z_only[:-1] + ("Z" if stabilizers[0][-1] != "I" else "I")])
    ours = EstimatorV2(backend_options={"device": "CPU"}).run([(measured, terms)]).result()[0].data.evs
    kept = [(label, c) for label, c in terms.to_list() if label[-1] not in "XY"]
    collapsed = sum(c.real * exact.expectation_value(Pauli(label)) for label, c in kept) if kept else 0.0
    # Measuring qubit 0 leaves every term that commutes with Z_0 unchanged; the others average to 0.
    assert ours == pytest.approx(collapsed, abs=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_estimator_dynamic_clifford_circuits_match_the_state_vector_estimator(seed):
    """Exact branching over a tableau: the same averages as over a state vector."""
    from gpu_provider import EstimatorV2

    circuit = _dynamic(6, seed)
    observables = [SparsePauliOp(label) for label in ("ZZIIII", "XIXIII", "IYZIXI", "ZIIIIZ", "IIIXII")]
    tableau = EstimatorV2(backend_options={"device": "CPU", "method": "stabilizer"}).run([(circuit, observables)]).result()[0]
    vector = EstimatorV2(backend_options={"device": "CPU"}).run([(circuit, observables)]).result()[0]
    assert tableau.metadata["simulator_metadata"]["method"] == "stabilizer"
    np.testing.assert_allclose(tableau.data.evs, vector.data.evs, atol=1e-10)


def _random_start(seed: int, mid_bits: int) -> tuple:
    """(rng, n, circuit, mid): 2-6 qubits, a register ``m`` for mid-circuit outcomes and one ``f`` for the end."""
    r = np.random.default_rng(seed)
    n = int(r.integers(2, 7))
    qc = QuantumCircuit(n)
    mid = ClassicalRegister(mid_bits, "m")
    qc.add_register(mid)
    qc.add_register(ClassicalRegister(n, "f"))
    return r, n, qc, mid


def _clifford_layer(qc: QuantumCircuit, r: np.random.Generator, n: int) -> None:
    qc.compose(random_clifford_circuit(n, int(r.integers(1, 3 * n + 1)), seed=int(r.integers(1 << 30))), inplace=True)


def _measure_reset_circuit(seed: int) -> QuantumCircuit:
    """Clifford layers with mid-circuit measurements and resets, no feed-forward: Pauli frames."""
    r, n, qc, mid = _random_start(seed, 5)
    for _ in range(int(r.integers(2, 6))):
        _clifford_layer(qc, r, n)
        q = int(r.integers(n))
        qc.measure(q, mid[int(r.integers(5))])
        if r.integers(2):
            qc.reset(q)
    qc.measure(range(n), qc.cregs[1])
    return qc


def test_pauli_frames_match_the_state_vector():
    for seed in range(12):
        circuit = _measure_reset_circuit(seed)
        result = GPUSimulator(device="CPU", method="stabilizer").run(circuit, shots=3000, seed_simulator=seed, memory=True).result()
        metadata = result.results[0].metadata
        assert metadata.get("pauli_frames") or metadata["measure_sampling"]
        expected = GPUSimulator(device="CPU", method="statevector").run(circuit, shots=3000, seed_simulator=seed + 50).result().get_counts()
        assert_counts_agree(result.get_counts(), expected)
        memory = result.get_memory()
        assert {key: memory.count(key) for key in set(memory)} == result.get_counts()


def test_a_wide_repetition_code_runs_as_pauli_frames_with_consistent_syndromes():
    """61 data qubits in |+>, 60 ancillas, 5 rounds: round 0's syndromes are random, later rounds repeat
    them, and the final data bits reproduce them (every shot exactly), with 180 clbits per shot."""
    d, rounds = 61, 5
    data, ancillas = QuantumRegister(d, "d"), QuantumRegister(d - 1, "a")
    circuit = QuantumCircuit(data, ancillas)
    syndromes = [ClassicalRegister(d - 1, f"s{r}") for r in range(rounds)]
    for register in syndromes:
        circuit.add_register(register)
    final = ClassicalRegister(d, "out")
    circuit.add_register(final)
    circuit.h(data)
    for r in range(rounds):
        for i in range(d - 1):
            circuit.cx(data[i], ancillas[i])
            circuit.cx(data[i + 1], ancillas[i])
        circuit.measure(ancillas, syndromes[r])
        circuit.reset(ancillas)
    circuit.measure(data, final)
    result = GPUSimulator(device="CPU").run(circuit, shots=400, seed_simulator=3, memory=True).result()
    assert result.results[0].metadata["method"] == "stabilizer" and result.results[0].metadata["pauli_frames"]
    ones = np.zeros(d - 1)
    for shot in result.get_memory():
        registers = shot.split(" ")[::-1]  # s0 ... s4, out (each written high bit first)
        bits = [register[::-1] for register in registers]
        out = [int(b) for b in bits[-1]]
        parity = [out[i] ^ out[i + 1] for i in range(d - 1)]
        for r in range(rounds):
            assert [int(b) for b in bits[r]] == parity
        ones += parity
    assert np.all((ones > 120) & (ones < 280))  # each syndrome bit about half the 400 shots


@pytest.mark.parametrize("make", [lambda: _measure_reset_circuit(3), lambda: _feedback_circuit(4)], ids=["measure_reset", "feed_forward"])
def test_pauli_frames_on_the_device_path_of_a_cupy_stand_in(fake_gpu, make):  # noqa: F811
    circuit = make()
    on_gpu = GPUSimulator(device="GPU", method="stabilizer").run(circuit, shots=3000, seed_simulator=3).result()
    assert on_gpu.results[0].metadata["device"].startswith("GPU") and on_gpu.results[0].metadata["pauli_frames"]
    expected = GPUSimulator(device="CPU", method="statevector").run(circuit, shots=3000, seed_simulator=4).result().get_counts()
    assert_counts_agree(on_gpu.get_counts(), expected)


def test_pauli_frames_in_chunks_of_shots(monkeypatch):
    """Shots past FRAME_CHUNK_SHOTS run chunk by chunk (memory independent of the shots), same distribution."""
    from gpu_provider.engine import stabilizer

    monkeypatch.setattr(stabilizer, "FRAME_CHUNK_SHOTS", 96)  # 3000 shots: 31 full chunks and a partial one
    circuit = _measure_reset_circuit(5)
    result = GPUSimulator(device="CPU", method="stabilizer").run(circuit, shots=3000, seed_simulator=8, memory=True).result()
    assert result.results[0].metadata["pauli_frames"] and len(result.get_memory()) == 3000
    expected = GPUSimulator(device="CPU", method="statevector").run(circuit, shots=3000, seed_simulator=9).result().get_counts()
    assert_counts_agree(result.get_counts(), expected)


def _feedback_circuit(seed: int) -> QuantumCircuit:
    """Clifford layers, mid-circuit measurements and Pauli feed-forward: ``if`` on a bit, on a register
    (with ``else``), ``switch``, classical expressions, nested conditionals, ``for`` loops of them."""
    from qiskit.circuit.classical import expr

    r, n, qc, mid = _random_start(seed, 4)

    def paulis():
        for _ in range(int(r.integers(1, 3))):
            (qc.x, qc.y, qc.z)[int(r.integers(3))](int(r.integers(n)))

    for _ in range(int(r.integers(2, 7))):
        _clifford_layer(qc, r, n)
        q, c = int(r.integers(n)), mid[int(r.integers(4))]
        kind = int(r.integers(6))
        if kind == 5:
            with qc.for_loop(range(int(r.integers(1, 4)))):
                qc.h(q)
                qc.measure(q, c)
                with qc.if_test((c, 1)):
                    qc.x(q)
            continue
        qc.measure(q, c)
        if kind == 0:
            with qc.if_test((c, int(r.integers(2)))):
                paulis()
        elif kind == 1:
            with qc.if_test((mid, int(r.integers(16)))) as otherwise:
                paulis()
            with otherwise:
                paulis()
        elif kind == 2:
            with qc.switch(mid) as case:
                with case(0, 3, 5):
                    paulis()
                with case(1, 2):
                    paulis()
                with case(case.DEFAULT):
                    paulis()
        elif kind == 3:
            with qc.if_test(expr.logic_or(expr.equal(mid[0], mid[1]), expr.less(mid, int(r.integers(16))))):
                paulis()
                with qc.if_test((mid[2], 1)):
                    paulis()
        else:
            with qc.if_test(expr.bit_xor(mid[0], mid[3])):
                paulis()
    qc.measure(range(n), qc.cregs[1])
    return qc


def test_pauli_feed_forward_runs_as_frames_and_matches_the_state_vector():
    for seed in range(12):
        circuit = _feedback_circuit(seed)
        result = GPUSimulator(device="CPU", method="stabilizer").run(circuit, shots=3000, seed_simulator=seed).result()
        assert result.results[0].metadata["pauli_frames"]
        expected = GPUSimulator(device="CPU", method="statevector").run(circuit, shots=3000, seed_simulator=seed + 50).result().get_counts()
        assert_counts_agree(result.get_counts(), expected)


def test_a_pauli_with_any_global_phase_is_fed_forward_on_frames():
    """e^{0.3i} X as a conditioned unitary (a Pauli up to a phase that is no power of i) and rz(pi)."""
    from qiskit.circuit.library import UnitaryGate

    qc = QuantumCircuit(2, 3)
    qc.h(0)
    qc.cx(0, 1)
    qc.measure(0, 0)
    with qc.if_test((qc.clbits[0], 1)):
        qc.append(UnitaryGate(np.exp(0.3j) * np.array([[0, 1], [1, 0]])), [0])
        qc.rz(np.pi, 1)
    qc.h(1)
    qc.measure(0, 1)
    qc.measure(1, 2)
    result = GPUSimulator(device="CPU", method="stabilizer").run(qc, shots=3000, seed_simulator=2).result()
    assert result.results[0].metadata["pauli_frames"]
    expected = GPUSimulator(device="CPU", method="statevector").run(qc, shots=3000, seed_simulator=3).result().get_counts()
    assert_counts_agree(result.get_counts(), expected)


def _teleportations(pairs: int) -> QuantumCircuit:
    """``pairs`` qubits in |+i> teleported at once (a Bell pair each, X and Z corrections conditioned
    on the two outcomes), then rotated back to |0> and measured: 0 in every shot when the
    corrections are right; the 2 * pairs Bell measurements are uniformly random."""
    sources, links, targets = (QuantumRegister(pairs, name) for name in ("s", "l", "t"))
    bell = ClassicalRegister(2 * pairs, "bell")
    out = ClassicalRegister(pairs, "out")
    qc = QuantumCircuit(sources, links, targets, bell, out)
    for i in range(pairs):
        qc.h(sources[i])
        qc.s(sources[i])
        qc.h(links[i])
        qc.cx(links[i], targets[i])
        qc.cx(sources[i], links[i])
        qc.h(sources[i])
        qc.measure(sources[i], bell[2 * i])
        qc.measure(links[i], bell[2 * i + 1])
        with qc.if_test((bell[2 * i + 1], 1)):
            qc.x(targets[i])
        with qc.if_test((bell[2 * i], 1)):
            qc.z(targets[i])
        qc.sdg(targets[i])
        qc.h(targets[i])
        qc.measure(targets[i], out[i])
    return qc


def test_wide_teleportation_corrections_are_exact_in_every_shot():
    pairs = 40  # 120 qubits: a tableau, the corrections as Pauli frames
    result = GPUSimulator(device="CPU").run(_teleportations(pairs), shots=500, seed_simulator=2, memory=True).result()
    metadata = result.results[0].metadata
    assert metadata["method"] == "stabilizer" and metadata["pauli_frames"]
    ones = np.zeros(2 * pairs)
    for shot in result.get_memory():
        out, bell = shot.split(" ")
        assert out == "0" * pairs
        ones += [int(b) for b in bell[::-1]]
    assert np.all((ones > 170) & (ones < 330))  # each Bell outcome about half the 500 shots


def test_feed_forward_that_is_not_a_pauli_keeps_the_trajectories():
    from qiskit.circuit.classical import expr, types

    from gpu_provider.engine.stabilizer import frames_fit

    qc = QuantumCircuit(3, 2)
    qc.h(0)
    qc.measure(0, 0)
    with qc.if_test((qc.clbits[0], 1)):
        qc.cx(0, 1)  # a conditioned Clifford that is not a Pauli
    qc.measure(1, 1)
    assert not frames_fit(translate(qc))
    flag = expr.Var.new("flag", types.Bool())
    qv = QuantumCircuit(2, 1)
    qv.add_uninitialized_var(flag)
    qv.h(0)
    qv.measure(0, 0)
    qv.store(flag, qv.clbits[0])
    with qv.if_test(flag):
        qv.x(1)  # a Pauli, but conditioned on a classical variable
    assert not frames_fit(translate(qv))
    for circuit in (qc, qv):
        circuit.measure_all()
        result = GPUSimulator(device="CPU", method="stabilizer").run(circuit, shots=2000, seed_simulator=1).result()
        assert not result.results[0].metadata.get("pauli_frames")
        expected = GPUSimulator(device="CPU", method="statevector").run(circuit, shots=2000, seed_simulator=5).result().get_counts()
        assert_counts_agree(result.get_counts(), expected)
