"""GPUSimulator end to end: exact statevectors, dynamic circuits, seeds, options and typed errors.

Oracles: ``qiskit.quantum_info.Statevector`` for exact states and distributions,
Qiskit Aer for dynamic circuits (chi-square within sampling error, see
``tests.helpers``). Every test runs on each device the machine really has.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from qiskit import ClassicalRegister, QuantumCircuit, QuantumRegister, transpile
from qiskit.circuit import Gate, Instruction, Parameter
from qiskit.circuit.classical import expr, types
from qiskit.circuit.library import GlobalPhaseGate, MCXGate, QFTGate, StatePreparation, UnitaryGate
from qiskit.providers import JobError
from qiskit.quantum_info import Statevector, random_statevector, random_unitary

from gpu_provider.errors import (
    InvalidInputError,
    InvalidOptionError,
    IterationLimitError,
    UnboundParameterError,
    UnsupportedInstructionError,
)
from tests.helpers import (
    aer_counts,
    assert_counts_agree,
    assert_counts_match,
    assert_state_matches,
    controlled_operator,
    controlled_unitary,
    exact_distribution,
    make_backend,
    random_entangled_state,
    random_layer,
    random_positions,
    run_statevector,
    standard_gate,
    standard_gate_names,
)

# Default options (fusion off below 14 qubits) and fusion forced on for small circuits.
FUSION = [pytest.param({}, id="unfused"), pytest.param({"fusion_threshold": 1}, id="fused")]
SHOTS = 2000


@pytest.fixture(params=FUSION)
def fusion(request) -> dict:
    return request.param


def run_states(backend, circuits, **options) -> list[np.ndarray]:
    result = backend.run(circuits, shots=1, statevector=True, **options).result()
    return [np.asarray(result.get_statevector(i)) for i in range(len(circuits))]


def bell_counts_are_right(backend) -> None:
    """The backend still runs a correct job (used after every error)."""
    circuit = QuantumCircuit(2, 2)
    circuit.h(0)
    circuit.cx(0, 1)
    circuit.measure([0, 1], [0, 1])
    counts = backend.run(circuit, shots=1000, seed_simulator=3).result().get_counts()
    assert_counts_match(counts, {"00": 0.5, "11": 0.5}, shots=1000)


# ---------------------------------------------------------------------------
# the standard gate library, exact


@pytest.mark.parametrize("precision", ["double", "single"])
@pytest.mark.parametrize("name", standard_gate_names())
def test_every_standard_gate(device, fusion, precision, name):
    rng = np.random.default_rng(sum(map(ord, name)) + (precision == "single"))
    circuits = []
    for trial in range(4):
        probe = standard_gate(name, rng)
        k = probe.num_qubits
        n = int(rng.integers(max(k, 2), 11))  # up to 10 qubits
        controls = getattr(probe, "num_ctrl_qubits", 0)
        ctrl_state = int(rng.integers(0, 2**controls)) if controls and trial % 2 else None
        circuit = QuantumCircuit(n, name=f"{name}-{trial}")
        random_layer(circuit, rng)  # a random product start
        if trial >= 2:
            random_entangled_state(circuit, rng)
        circuit.append(standard_gate(name, rng, ctrl_state), random_positions(rng, n, k))
        circuits.append(circuit)
    backend = make_backend(device, precision=precision, **fusion)
    for circuit, state in zip(circuits, run_states(backend, circuits)):
        assert_state_matches(state, circuit, precision)


@pytest.mark.parametrize("n", [12, 16])
def test_wide_circuits_sample_and_fuse_by_default(device, n):
    # Wider than one 2^10-amplitude row; at 16 qubits fusion is on by default (threshold 14).
    rng = np.random.default_rng(n)
    circuit = QuantumCircuit(n, n)
    circuit.h([0, n - 1, n // 2])
    circuit.x(3)
    circuit.cx(0, n - 2)
    circuit.cx(n - 1, 1)
    circuit.append(standard_gate("cry", rng), [n // 2, 5])
    circuit.append(standard_gate("rzz", rng), [5, n - 1])
    circuit.append(standard_gate("u", rng), [7])
    circuit.cswap(7, 2, n - 3)
    circuit.measure(range(n), range(n))
    backend = make_backend(device)
    result = backend.run(circuit, shots=SHOTS, seed_simulator=3, statevector=True).result()
    assert_state_matches(result.get_statevector(0), circuit)
    assert_counts_match(result.get_counts(), exact_distribution(circuit), shots=SHOTS)
    metadata = result.results[0].metadata
    if n >= 14:
        assert metadata["fusion_ops_after"] < metadata["fusion_ops_before"]


def test_untranspiled_standard_gates_sample_right(device):
    rng = np.random.default_rng(1)
    circuit = QuantumCircuit(4, 4)
    circuit.h(0)
    circuit.append(standard_gate("cu", rng), [0, 3])
    circuit.append(standard_gate("rcccx", rng), [3, 0, 2, 1])
    circuit.append(standard_gate("xx_plus_yy", rng), [2, 0])
    circuit.append(standard_gate("c3sx", rng), [1, 3, 0, 2])
    circuit.ecr(1, 3)
    circuit.measure([0, 1, 2, 3], [3, 0, 2, 1])  # a permuted clbit order
    counts = make_backend(device).run(circuit, shots=SHOTS, seed_simulator=5).result().get_counts()
    assert_counts_match(counts, exact_distribution(circuit), shots=SHOTS)


# ---------------------------------------------------------------------------
# unitary, custom and wide gates


@pytest.mark.parametrize("precision", ["double", "single"])
def test_unitary_gates_up_to_five_qubits(device, fusion, precision):
    rng = np.random.default_rng(2)
    circuits = []
    for k in (1, 2, 3, 4, 5):
        n = int(rng.integers(k + 1, 11))
        circuit = QuantumCircuit(n)
        random_entangled_state(circuit, rng)
        circuit.unitary(random_unitary(2**k, seed=k), random_positions(rng, n, k))
        circuit.unitary(random_unitary(2**k, seed=10 + k), random_positions(rng, n, k))
        circuits.append(circuit)
    backend = make_backend(device, precision=precision, **fusion)
    for circuit, state in zip(circuits, run_states(backend, circuits)):
        assert_state_matches(state, circuit, precision)


def test_custom_gate_with_only_a_definition(device, fusion):
    theta = Parameter("theta")
    inner = QuantumCircuit(2, global_phase=0.3)
    inner.ry(theta, 0)
    inner.cx(0, 1)
    inner.rz(-theta / 2, 1)
    inner_gate = inner.to_gate(label="inner")
    outer = QuantumCircuit(3, name="outer")
    outer.append(inner_gate, [2, 0])
    outer.ccx(0, 2, 1)
    outer.append(inner_gate.inverse(), [1, 2])
    custom = Gate("my_custom", 3, [])
    custom.definition = outer.assign_parameters({theta: 1.234})
    rng = np.random.default_rng(3)
    circuit = QuantumCircuit(6)
    random_entangled_state(circuit, rng)
    circuit.append(custom, [5, 1, 3])
    circuit.append(custom, [0, 4, 2])
    assert_state_matches(run_statevector(make_backend(device, **fusion), circuit), circuit)


def test_mcx_with_seven_controls(device, fusion):
    rng = np.random.default_rng(4)
    circuit = QuantumCircuit(10)
    random_entangled_state(circuit, rng)
    circuit.append(MCXGate(7), random_positions(rng, 10, 8))
    circuit.append(MCXGate(7, ctrl_state="1010011"), random_positions(rng, 10, 8))
    assert_state_matches(run_statevector(make_backend(device, **fusion), circuit), circuit)


def test_mcx_flips_only_on_all_ones(device):
    # A basis-state check that does not depend on the random start: |1111111 0> -> |1111111 1>.
    circuit = QuantumCircuit(9, 9)
    circuit.x(range(1, 8))
    circuit.append(MCXGate(7), [7, 1, 6, 2, 5, 3, 4, 8])
    circuit.measure(range(9), range(9))
    counts = make_backend(device).run(circuit, shots=10).result().get_counts()
    assert counts == {"111111110": 10}


@pytest.mark.parametrize("num_ctrl,ctrl_state", [(1, 0), (2, 0b10), (3, 0b011), (4, 0b0101), (5, 0b10110), (6, 0b101101)])
def test_controlled_unitary_with_ctrl_state(device, fusion, num_ctrl, ctrl_state):
    rng = np.random.default_rng(num_ctrl)
    n = min(num_ctrl + 4, 10)
    base, gate = controlled_unitary(num_ctrl, ctrl_state)
    circuit = QuantumCircuit(n)
    random_entangled_state(circuit, rng)
    start = Statevector(circuit)
    qubits = random_positions(rng, n, num_ctrl + 2)
    circuit.append(gate, qubits)
    expected = start.evolve(controlled_operator(base, num_ctrl, ctrl_state), qargs=qubits).data
    assert_state_matches(run_statevector(make_backend(device, **fusion), circuit), expected)


@pytest.mark.parametrize("n", [8, 11])
def test_large_library_gate_qft(device, fusion, n):
    rng = np.random.default_rng(n)
    circuit = QuantumCircuit(n)
    random_layer(circuit, rng)
    circuit.append(QFTGate(n), [int(q) for q in rng.permutation(n)])
    assert_state_matches(run_statevector(make_backend(device, **fusion), circuit), circuit)


# ---------------------------------------------------------------------------
# initialize, state_preparation, global phase, no-ops


def test_initialize_on_fresh_qubits(device, fusion):
    rng = np.random.default_rng(5)
    circuit = QuantumCircuit(7)
    random_layer(circuit, rng, [0, 2, 6])
    circuit.cx(0, 6)
    circuit.initialize(random_statevector(8, seed=1), [5, 1, 3])
    circuit.cx(3, 0)
    circuit.initialize("r", [4])
    circuit.cry(0.3, 4, 5)
    assert_state_matches(run_statevector(make_backend(device, **fusion), circuit), circuit)


def test_initialize_on_used_qubits_product_state(device):
    # Qubits 1 and 2 are used but not entangled with 0 and 3: after the implicit
    # reset the outcome distribution is that of a fresh initialize.
    rng = np.random.default_rng(6)
    angles = rng.uniform(-np.pi, np.pi, (4, 3))
    vector = random_statevector(4, seed=3)

    def build(with_history: bool) -> QuantumCircuit:
        circuit = QuantumCircuit(4, 4)
        for q in (0, 3) + ((1, 2) if with_history else ()):
            circuit.u(*angles[q], q)
        circuit.cx(0, 3)
        if with_history:
            circuit.cx(1, 2)
        circuit.initialize(vector, [2, 1])
        circuit.cx(2, 0)
        circuit.measure(range(4), range(4))
        return circuit

    counts = make_backend(device).run(build(True), shots=SHOTS, seed_simulator=11).result().get_counts()
    assert_counts_match(counts, exact_distribution(build(False)), shots=SHOTS)


def test_initialize_on_used_qubits_statevector(device):
    rng = np.random.default_rng(13)
    angles = rng.uniform(-np.pi, np.pi, (4, 3))
    vector = random_statevector(4, seed=13)

    def build(with_history: bool) -> QuantumCircuit:
        circuit = QuantumCircuit(4)
        for q in (0, 3) + ((1, 2) if with_history else ()):
            circuit.u(*angles[q], q)
        circuit.cx(0, 3)
        if with_history:
            circuit.cx(1, 2)  # 1 and 2 are used, but not entangled with 0 and 3
        circuit.initialize(vector, [2, 1])
        circuit.cx(2, 0)
        return circuit

    state = run_statevector(make_backend(device), build(True))
    assert_state_matches(state, Statevector(build(False)).data, phase_sensitive=False)


@pytest.mark.filterwarnings("ignore::scipy.sparse.SparseEfficiencyWarning")
def test_bare_operations_clifford_and_annotated(device, fusion):
    from qiskit.circuit.annotated_operation import AnnotatedOperation, InverseModifier, PowerModifier
    from qiskit.circuit.library import SXGate
    from qiskit.quantum_info import random_clifford

    rng = np.random.default_rng(14)
    circuit = QuantumCircuit(5)
    random_entangled_state(circuit, rng)
    circuit.append(random_clifford(3, seed=2), [4, 0, 2])
    circuit.append(AnnotatedOperation(SXGate(), [InverseModifier(), PowerModifier(3)]), [1])
    circuit.append(UnitaryGate(random_unitary(2, seed=3)).control(2, ctrl_state=2, annotated=True), [3, 1, 0])
    assert_state_matches(run_statevector(make_backend(device, **fusion), circuit), circuit)


def test_initialize_on_entangled_qubits_matches_aer(device):
    circuit = QuantumCircuit(3, 3)
    circuit.h(0)
    circuit.cx(0, 1)
    circuit.ry(0.7, 2)
    circuit.cx(1, 2)
    circuit.initialize(random_statevector(4, seed=4), [1, 2])
    circuit.cx(1, 0)
    circuit.measure(range(3), range(3))
    counts = make_backend(device).run(circuit, shots=SHOTS, seed_simulator=12).result().get_counts()
    assert_counts_agree(counts, aer_counts(circuit, SHOTS))


def test_state_preparation_on_fresh_and_used_qubits(device, fusion):
    rng = np.random.default_rng(7)
    circuit = QuantumCircuit(6)
    circuit.prepare_state(random_statevector(4, seed=5), [4, 1])  # fresh
    random_layer(circuit, rng, [0, 2, 3, 5])
    circuit.cx(1, 3)
    circuit.cx(5, 0)
    circuit.prepare_state(random_statevector(8, seed=6), [3, 0, 5])  # used: its unitary
    circuit.append(StatePreparation("1+"), [2, 4])  # used, from a label
    circuit.prepare_state(3, [1, 2])  # used, from an integer
    assert_state_matches(run_statevector(make_backend(device, **fusion), circuit), circuit)


def test_global_phase_is_in_the_statevector(device, fusion):
    definition = QuantumCircuit(1, global_phase=0.4)
    definition.h(0)
    phased = Gate("phased_h", 1, [])
    phased.definition = definition
    circuit = QuantumCircuit(3, global_phase=1.1)
    circuit.h(0)
    circuit.append(GlobalPhaseGate(-0.35), [])
    circuit.append(phased, [2])
    circuit.cx(0, 1)
    state = run_statevector(make_backend(device, **fusion), circuit)
    assert_state_matches(state, circuit)  # phase-sensitive: amplitudes equal, not only |<a|b>|
    assert abs(np.vdot(Statevector(circuit).data, state) - 1) < 1e-12


def test_barrier_and_delay_are_no_ops(device):
    rng = np.random.default_rng(8)
    plain = QuantumCircuit(4)
    random_entangled_state(plain, rng)
    noisy = QuantumCircuit(4)
    for inst in plain.data:
        noisy.append(inst.operation, inst.qubits)
        noisy.barrier()
        noisy.delay(100, inst.qubits[0])
    noisy.id(2)
    state = run_statevector(make_backend(device), noisy)
    assert_state_matches(state, plain)


# ---------------------------------------------------------------------------
# dynamic circuits: compared with Aer within sampling error


def _check_dynamic(device, circuit, shots=SHOTS, exact=None, **options):
    counts = make_backend(device, **options).run(circuit, shots=shots, seed_simulator=21).result().get_counts()
    assert sum(counts.values()) == shots
    if exact is not None:
        assert_counts_match(counts, exact)
    else:
        assert_counts_agree(counts, aer_counts(circuit, shots))
    return counts


def test_mid_circuit_measure_then_gates_on_the_same_qubit(device, fusion):
    circuit = QuantumCircuit(3, 4)
    circuit.h(0)
    circuit.cx(0, 1)
    circuit.measure(0, 0)
    circuit.ry(1.1, 0)
    circuit.cx(0, 2)
    circuit.measure(0, 1)
    circuit.rx(0.4, 1)
    circuit.measure([1, 2], [2, 3])
    _check_dynamic(device, circuit, **fusion)


def test_mid_circuit_reset(device, fusion):
    circuit = QuantumCircuit(3, 3)
    circuit.h(0)
    circuit.cx(0, 1)
    circuit.ry(0.8, 2)
    circuit.reset(0)
    circuit.cx(1, 2)
    circuit.reset(1)
    circuit.h(1)
    circuit.measure(range(3), range(3))
    _check_dynamic(device, circuit, **fusion)


def test_reset_gives_zero_exactly(device):
    circuit = QuantumCircuit(2, 2)
    circuit.h(0)
    circuit.cx(0, 1)
    circuit.reset(0)
    circuit.measure([0, 1], [0, 1])
    _check_dynamic(device, circuit, exact={"00": 0.5, "10": 0.5})


def test_teleportation_with_if_else_on_clbits(device, fusion):
    theta, phi = 1.1, 0.6
    qr = QuantumRegister(3)
    m0, m1, out = ClassicalRegister(1, "m0"), ClassicalRegister(1, "m1"), ClassicalRegister(1, "out")
    circuit = QuantumCircuit(qr, m0, m1, out)
    circuit.ry(theta, 0)
    circuit.rz(phi, 0)
    circuit.h(1)
    circuit.cx(1, 2)
    circuit.cx(0, 1)
    circuit.h(0)
    circuit.measure(0, m0[0])
    circuit.measure(1, m1[0])
    with circuit.if_test((m1[0], 1)):
        circuit.x(2)
    with circuit.if_test((m0, 1)):
        circuit.z(2)
    circuit.rz(-phi, 2)
    circuit.ry(-theta, 2)  # undoes the teleported state: out is always 0
    circuit.measure(2, out[0])
    counts = _check_dynamic(device, circuit, **fusion)
    assert all(key.split()[0] == "0" for key in counts), counts
    assert_counts_match(counts, {f"0 {b} {a}": 0.25 for a in "01" for b in "01"})


def test_if_else_with_register_condition_and_else_branch(device, fusion):
    c = ClassicalRegister(2, "c")
    r = ClassicalRegister(2, "r")
    circuit = QuantumCircuit(QuantumRegister(4), c, r)
    circuit.h([0, 1])
    circuit.measure([0, 1], c)
    with circuit.if_test((c, 2)) as else_:
        circuit.x(2)
        circuit.ry(0.5, 3)
    with else_:
        circuit.h(3)
    circuit.measure([2, 3], r)
    _check_dynamic(device, circuit, **fusion)


def test_if_else_with_classical_expressions(device, fusion):
    c = ClassicalRegister(3, "c")
    r = ClassicalRegister(2, "r")
    circuit = QuantumCircuit(QuantumRegister(5), c, r)
    circuit.h([0, 1, 2])
    circuit.measure([0, 1, 2], c)
    with circuit.if_test(expr.logic_and(expr.greater_equal(c, 3), expr.logic_not(c[1]))):
        circuit.x(3)
    with circuit.if_test(expr.equal(expr.bit_xor(c, 5), 0)) as else_:
        circuit.x(4)
    with else_:
        circuit.ry(0.9, 4)
    circuit.measure([3, 4], r)
    counts = _check_dynamic(device, circuit, **fusion)
    for key in counts:
        r_bits, c_bits = key.split()
        value = int(c_bits, 2)
        assert (r_bits[1] == "1") == (value >= 3 and not (value >> 1) & 1), key


def test_while_loop_repeat_until_success(device, fusion):
    circuit = QuantumCircuit(2, 2)
    circuit.h(0)
    circuit.measure(0, 0)
    with circuit.while_loop((circuit.clbits[0], 0)):  # retry until qubit 0 reads 1
        circuit.reset(0)
        circuit.h(0)
        circuit.measure(0, 0)
        circuit.x(1)  # flips once per retry
    circuit.measure(1, 1)
    counts = _check_dynamic(device, circuit, **fusion)
    assert all(key[-1] == "1" for key in counts)
    # P(qubit 1 = 1) = P(odd number of retries) = sum_k (1/2)^(k+1), k odd = 1/3
    assert_counts_match(counts, {"01": 2 / 3, "11": 1 / 3})


def test_for_loop_with_loop_parameter(device, fusion):
    circuit = QuantumCircuit(2, 2)
    with circuit.for_loop(range(1, 4)) as i:
        circuit.rx(i * 0.3, 0)
        circuit.cry(i * 0.2, 0, 1)
    circuit.measure([0, 1], [0, 1])
    unrolled = QuantumCircuit(2, 2)
    for i in range(1, 4):
        unrolled.rx(i * 0.3, 0)
        unrolled.cry(i * 0.2, 0, 1)
    unrolled.measure([0, 1], [0, 1])
    counts = _check_dynamic(device, circuit, exact=exact_distribution(unrolled), **fusion)
    assert_counts_agree(counts, aer_counts(circuit, SHOTS))


def test_switch_case_on_register(device, fusion):
    c = ClassicalRegister(2, "c")
    out = ClassicalRegister(2, "out")
    circuit = QuantumCircuit(QuantumRegister(4), c, out)
    circuit.h([0, 1])
    circuit.measure([0, 1], c)
    with circuit.switch(c) as case:
        with case(0):
            circuit.x(2)
        with case(1, 2):
            circuit.x(3)
        with case(case.DEFAULT):
            circuit.x([2, 3])
    circuit.measure([2, 3], out)
    counts = _check_dynamic(device, circuit, **fusion)
    expected_out = {0: "01", 1: "10", 2: "10", 3: "11"}
    for key in counts:
        out_bits, c_bits = key.split()
        assert out_bits == expected_out[int(c_bits, 2)], key
    assert_counts_match(counts, {f"{expected_out[v]} {v:02b}": 0.25 for v in range(4)})


def test_break_and_continue(device, fusion):
    circuit = QuantumCircuit(3, 3)
    with circuit.for_loop(range(6)):
        circuit.h(0)
        circuit.measure(0, 0)
        with circuit.if_test((circuit.clbits[0], 1)):
            circuit.break_loop()
        circuit.x(1)  # counts loops that did not break, mod 2
        with circuit.if_test((circuit.clbits[0], 0)):
            circuit.continue_loop()
        circuit.x(2)  # never reached: continue always skips it
    circuit.measure([1, 2], [1, 2])
    counts = _check_dynamic(device, circuit, **fusion)
    assert all(key[0] == "0" for key in counts), counts
    # The loop breaks at the first 1 read after k zeros (p = 2^-(k+1)); x(1) ran k times.
    # All six reads 0 (p = 1/64): no break, last read 0, x(1) six times.
    assert_counts_match(counts, {"001": 21 / 32, "011": 21 / 64, "000": 1 / 64})


def test_while_loop_with_break(device):
    circuit = QuantumCircuit(2, 2)
    with circuit.while_loop(expr.lift(True)):
        circuit.h(0)
        circuit.measure(0, 0)
        circuit.x(1)
        with circuit.if_test(expr.lift(circuit.clbits[0])):
            circuit.break_loop()
    circuit.measure(1, 1)
    counts = make_backend(device).run(circuit, shots=SHOTS, seed_simulator=3).result().get_counts()
    assert_counts_match(counts, {"11": 2 / 3, "01": 1 / 3})


def test_while_loop_with_continue(device, fusion):
    circuit = QuantumCircuit(3, 3)
    rounds = circuit.add_var("rounds", expr.lift(0, types.Uint(3)))
    with circuit.while_loop(expr.less(rounds, 4)):
        circuit.store(rounds, expr.add(rounds, 1))
        circuit.h(0)
        circuit.measure(0, 0)
        with circuit.if_test((circuit.clbits[0], 1)):
            circuit.continue_loop()
        circuit.x(1)  # once per round that read 0
    with circuit.if_test(expr.equal(rounds, 4)):
        circuit.x(2)  # continue must not end the loop: always four rounds
    circuit.measure([1, 2], [1, 2])
    counts = make_backend(device, **fusion).run(circuit, shots=SHOTS, seed_simulator=8).result().get_counts()
    # qubit 1 is the parity of four fair reads, clbit 0 the last read: uniform and independent.
    assert_counts_match(counts, {"100": 0.25, "101": 0.25, "110": 0.25, "111": 0.25})


def test_standalone_variables_and_store(device, fusion):
    circuit = QuantumCircuit(3, 3)
    count = circuit.add_var("count", expr.lift(0, types.Uint(4)))
    seen_one = circuit.add_var("seen_one", False)
    with circuit.for_loop(range(3)):
        circuit.h(0)
        circuit.measure(0, 0)
        with circuit.if_test(expr.lift(circuit.clbits[0])):
            circuit.store(count, expr.add(count, 1))
            circuit.store(seen_one, True)
        circuit.reset(0)
    with circuit.if_test(expr.greater_equal(count, 2)):
        circuit.x(1)
    with circuit.if_test(expr.logic_not(seen_one)):
        circuit.x(2)
    circuit.store(circuit.clbits[0], expr.equal(count, 3))
    circuit.measure([1, 2], [1, 2])
    counts = _check_dynamic(device, circuit, **fusion, exact={"010": 3 / 8, "011": 1 / 8, "100": 1 / 8, "000": 3 / 8})
    assert set(counts) <= {"010", "011", "100", "000"}


def test_store_to_single_bits_of_variables_and_registers(device):
    circuit = QuantumCircuit(2, 3)
    value = circuit.add_var("value", expr.lift(0b101, types.Uint(3)))
    position = circuit.add_var("position", expr.lift(2, types.Uint(2)))
    circuit.store(expr.index(value, 1), True)  # value = 0b111
    circuit.store(expr.index(value, 0), False)  # value = 0b110
    circuit.store(expr.index(circuit.cregs[0], position), True)  # c[2] = 1, at a computed index
    circuit.store(expr.index(circuit.cregs[0], 1), expr.equal(value, 6))  # c[1] = 1
    with circuit.if_test(expr.equal(value, 6)):
        circuit.x(0)
    circuit.measure(0, 0)
    counts = make_backend(device).run(circuit, shots=20).result().get_counts()
    assert counts == {"111": 20}


def test_switch_on_variable(device):
    circuit = QuantumCircuit(2, 2)
    value = circuit.add_var("value", expr.lift(0, types.Uint(2)))
    circuit.h([0, 1])
    circuit.measure([0, 1], [0, 1])
    circuit.store(value, expr.lift(circuit.cregs[0]))
    with circuit.switch(value) as case:
        with case(3):
            circuit.x(0)
        with case(case.DEFAULT):
            pass
    circuit.measure(0, 0)
    counts = make_backend(device).run(circuit, shots=SHOTS, seed_simulator=4).result().get_counts()
    # When both read 1 the x flips qubit 0 back to 0.
    assert_counts_match(counts, {"00": 0.25, "01": 0.25, "10": 0.5})


def test_runaway_while_loop_fails_the_job_with_a_typed_cause(device):
    circuit = QuantumCircuit(1, 1)
    with circuit.while_loop((circuit.clbits[0], 0)):
        circuit.measure(0, 0)  # always 0: never ends
    backend = make_backend(device, max_loop_iterations=50)
    job = backend.run(circuit, shots=2)
    with pytest.raises(JobError) as info:
        job.result(timeout=60)
    assert isinstance(info.value.__cause__, IterationLimitError)
    bell_counts_are_right(backend)


# ---------------------------------------------------------------------------
# seeds


def _dynamic_and_static():
    static = QuantumCircuit(3, 3)
    static.h(range(3))
    static.measure(range(3), range(3))
    dynamic = QuantumCircuit(3, 3)
    dynamic.h(range(3))
    dynamic.measure(0, 0)
    with dynamic.if_test((dynamic.clbits[0], 1)):
        dynamic.x(1)
    dynamic.measure(range(3), range(3))
    return [static, dynamic]


@pytest.mark.parametrize("kind", ["sampled", "per_shot"])
def test_seeded_runs_repeat_exactly(device, kind):
    circuit = _dynamic_and_static()[kind == "per_shot"]
    backend = make_backend(device)
    first = backend.run(circuit, shots=500, seed_simulator=42, memory=True).result()
    second = backend.run(circuit, shots=500, seed_simulator=42, memory=True).result()
    other = backend.run(circuit, shots=500, seed_simulator=43, memory=True).result()
    assert first.get_counts() == second.get_counts()
    assert first.get_memory() == second.get_memory()
    assert first.get_memory() != other.get_memory()
    backend.set_options(seed_simulator=42)
    assert backend.run(circuit, shots=500, memory=True).result().get_memory() == first.get_memory()


def test_experiment_seeds_in_a_list(device):
    # Experiment i of a job runs with seed + i.
    static, dynamic = _dynamic_and_static()
    backend = make_backend(device)
    together = backend.run([static, dynamic], shots=300, seed_simulator=7, memory=True).result()
    alone = backend.run(dynamic, shots=300, seed_simulator=8, memory=True).result()
    assert together.get_memory(1) == alone.get_memory(0)
    assert together.results[1].seed_simulator == 8


# ---------------------------------------------------------------------------
# transpile


def test_transpile_for_the_backend_and_run(device):
    backend = make_backend(device)
    rng = np.random.default_rng(9)
    circuit = QuantumCircuit(5, 5)
    random_entangled_state(circuit, rng)
    circuit.append(QFTGate(4), [4, 2, 0, 1])
    circuit.append(MCXGate(3), [0, 1, 2, 3])
    circuit.unitary(random_unitary(4, seed=1), [3, 0])
    circuit.measure(range(5), range(5))
    compiled = transpile(circuit, backend, seed_transpiler=1, optimization_level=2)
    assert compiled.num_qubits == circuit.num_qubits
    counts = backend.run(compiled, shots=SHOTS, seed_simulator=2).result().get_counts()
    assert_counts_match(counts, exact_distribution(circuit), shots=SHOTS)
    # The statevector is in physical qubit order: move each virtual qubit to where the layout put it.
    unmeasured = circuit.remove_final_measurements(inplace=False)
    compiled_unmeasured = transpile(unmeasured, backend, seed_transpiler=1, optimization_level=2)
    final = compiled_unmeasured.layout.final_index_layout() if compiled_unmeasured.layout else list(range(5))
    logical = Statevector(unmeasured).data.reshape((2,) * 5)
    physical = np.moveaxis(logical, [4 - v for v in range(5)], [4 - final[v] for v in range(5)]).reshape(-1)
    assert_state_matches(run_statevector(backend, compiled_unmeasured), physical)


def test_transpiled_dynamic_circuit(device):
    backend = make_backend(device)
    circuit = QuantumCircuit(3, 3)
    circuit.h(0)
    circuit.measure(0, 0)
    with circuit.if_test((circuit.clbits[0], 1)) as else_:
        circuit.append(QFTGate(2), [1, 2])
    with else_:
        circuit.ch(0, 2)
    circuit.measure([1, 2], [1, 2])
    compiled = transpile(circuit, backend, seed_transpiler=1)
    counts = backend.run(compiled, shots=SHOTS, seed_simulator=3).result().get_counts()
    assert_counts_agree(counts, aer_counts(circuit, SHOTS))


# ---------------------------------------------------------------------------
# Aer's parameter_binds


def test_parameter_binds_expand_circuits_as_aer_does(device):
    theta, phi = Parameter("theta"), Parameter("phi")
    circuit = QuantumCircuit(3, name="ansatz")
    circuit.ry(theta, 0)
    circuit.cx(0, 1)
    circuit.rz(phi, 1)
    circuit.rx(theta + 2 * phi, 2)
    circuit.h(1)
    circuit.measure_all()
    fixed = QuantumCircuit(1, name="fixed")
    fixed.h(0)
    fixed.measure_all()
    binds = [{theta: [0.1, 1.3, 2.9], phi: [0.0, -0.7, 0.4]}, {}]
    backend = make_backend(device)
    unmeasured = [circuit.remove_final_measurements(inplace=False), fixed.remove_final_measurements(inplace=False)]
    exact_run = backend.run(unmeasured, shots=1, statevector=True, parameter_binds=binds).result()
    assert len(exact_run.results) == 4
    states = [np.asarray(exact_run.get_statevector(i)) for i in range(4)]
    for index in range(3):
        exact = Statevector(circuit.remove_final_measurements(inplace=False).assign_parameters(
            {theta: binds[0][theta][index], phi: binds[0][phi][index]}))
        assert_state_matches(states[index], exact.data, "double")
    result = backend.run([circuit, fixed], shots=SHOTS, seed_simulator=5, parameter_binds=binds).result()
    assert [experiment.header["name"] for experiment in result.results] == ["ansatz"] * 3 + ["fixed"]
    from qiskit_aer import AerSimulator

    reference = AerSimulator().run([circuit, fixed], shots=SHOTS, seed_simulator=5, parameter_binds=binds).result()
    for index in range(4):
        assert_counts_agree(result.get_counts(index), reference.get_counts(index))
    # Parameters may also be named by string; a lone dict serves a lone circuit.
    named = backend.run(circuit, shots=10, parameter_binds={"theta": [0.5], "phi": [0.2]}).result()
    assert len(named.results) == 1


@pytest.mark.parametrize(
    "binds, message",
    [
        ([{}], "one dict per circuit"),
        ("theta", "list of dicts"),
        ([{Parameter("elsewhere"): [1.0]}, {}], "not one of its parameters"),
        ([{"theta": [0.1, 0.2], "phi": [0.3]}, {}], "same, non-zero number"),
        ([{"theta": [], "phi": []}, {}], "same, non-zero number"),
        ([{"theta": ["a"], "phi": [0.3]}, {}], "must be numbers"),
        ([{"theta": [float("nan")], "phi": [0.3]}, {}], "finite"),
    ],
)
def test_parameter_binds_errors_are_clear(binds, message):
    theta, phi = Parameter("theta"), Parameter("phi")
    circuit = QuantumCircuit(1)
    circuit.rx(theta, 0)
    circuit.rz(phi, 0)
    circuit.measure_all()
    other = QuantumCircuit(1)
    other.h(0)
    other.measure_all()
    backend = make_backend("CPU")
    with pytest.raises(InvalidOptionError, match=message):
        backend.run([circuit, other], shots=10, parameter_binds=binds)
    bell_counts_are_right(backend)
    # Bound only in part: the unbound parameter is named.
    with pytest.raises(UnboundParameterError, match="phi"):
        backend.run([circuit, other], shots=10, parameter_binds=[{theta: [0.1]}, {}])


# ---------------------------------------------------------------------------
# typed errors, and the backend still works after each


def test_unbound_parameter_names_it(device):
    backend = make_backend(device)
    gamma = Parameter("gamma_unbound")
    circuit = QuantumCircuit(2)
    circuit.rzz(gamma, 0, 1)
    circuit.measure_all()
    with pytest.raises(UnboundParameterError, match="gamma_unbound"):
        backend.run(circuit)
    bell_counts_are_right(backend)


def test_unbound_parameter_inside_control_flow_is_named(device):
    backend = make_backend(device)
    beta = Parameter("beta_in_body")
    circuit = QuantumCircuit(1, 1)
    circuit.measure(0, 0)
    with circuit.if_test((circuit.clbits[0], 0)):
        circuit.rx(beta, 0)
    with pytest.raises(UnboundParameterError, match="beta_in_body"):
        backend.run(circuit)
    bell_counts_are_right(backend)


def test_instruction_without_matrix_or_definition_is_named(device):
    backend = make_backend(device)
    circuit = QuantumCircuit(2)
    circuit.append(Instruction("frobnicate", 1, 0, []), [0])
    with pytest.raises(UnsupportedInstructionError, match="frobnicate"):
        backend.run(circuit)
    bell_counts_are_right(backend)


def test_unknown_run_option_warns_and_runs(device):
    backend = make_backend(device)
    circuit = QuantumCircuit(1, 1)
    circuit.x(0)
    circuit.measure(0, 0)
    with pytest.warns(UserWarning, match="Option not_an_option is not used by this backend"):
        counts = backend.run(circuit, shots=10, not_an_option=3).result().get_counts()
    assert counts == {"1": 10}
    bell_counts_are_right(backend)


@pytest.mark.parametrize(
    "options",
    [
        {"shots": 0},
        {"shots": -5},
        {"shots": 1.5},
        {"shots": "100"},
        {"memory": "yes"},
        {"statevector": 1},
        {"seed_simulator": -1},
        {"seed_simulator": 1.5},
        {"precision": "half"},
        {"device": "TPU"},
        {"device_id": -1},
        {"fusion_enable": "no"},
        {"fusion_max_qubits": 0},
        {"fusion_max_qubits": 99},
        {"fusion_threshold": -1},
        {"max_loop_iterations": 0},
    ],
    ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()),
)
def test_bad_option_values_raise_invalid_option_error(device, options):
    backend = make_backend(device)
    circuit = QuantumCircuit(1, 1)
    circuit.measure(0, 0)
    with pytest.raises(InvalidOptionError):
        backend.run(circuit, **options)
    with pytest.raises(InvalidOptionError):
        backend.set_options(**options)
    bell_counts_are_right(backend)


def test_statevector_with_mid_circuit_measure_is_refused(device):
    backend = make_backend(device)
    circuit = QuantumCircuit(2, 2)
    circuit.h(0)
    circuit.measure(0, 0)
    circuit.cx(0, 1)
    circuit.measure(1, 1)
    with pytest.raises(InvalidInputError):
        backend.run(circuit, statevector=True)
    bell_counts_are_right(backend)


def test_non_circuit_input_is_refused(device):
    backend = make_backend(device)
    for bad in ("OPENQASM 2.0;", [], [QuantumCircuit(1), "x"]):
        with pytest.raises(InvalidInputError):
            backend.run(bad)
    bell_counts_are_right(backend)


def test_warnings_do_not_leak_between_runs(device):
    backend = make_backend(device)
    circuit = QuantumCircuit(1, 1)
    circuit.measure(0, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        backend.run(circuit, shots=5).result()  # known options only: no warning


def test_run_holds_off_garbage_collection_while_it_translates_and_restores_it(monkeypatch):
    import gc
    import threading

    from gpu_provider import backend as backend_module

    seen = []
    real_translate = backend_module.translate

    def recording_translate(*args, **kwargs):
        seen.append(gc.isenabled())
        return real_translate(*args, **kwargs)

    monkeypatch.setattr(backend_module, "translate", recording_translate)
    backend = make_backend("CPU")
    qc = QuantumCircuit(2)
    qc.h(0)
    qc.cx(0, 1)
    qc.measure_all()
    assert gc.isenabled()
    counts = backend.run([qc, qc], shots=200, seed_simulator=3).result().get_counts()
    assert seen == [False, False] and gc.isenabled()
    assert all(set(c) <= {"00", "11"} and sum(c.values()) == 200 for c in counts)
    # A failing run() restores it too, and a caller who turned it off keeps it off.
    bad = QuantumCircuit(1)
    bad.append(Gate("opaque", 1, []), [0])
    with pytest.raises(UnsupportedInstructionError):
        backend.run(bad)
    assert gc.isenabled()
    gc.disable()
    try:
        backend.run(qc, shots=10).result()
        assert not gc.isenabled()
    finally:
        gc.enable()
    # Concurrent run() calls: collection resumes only after the last one.
    barrier = threading.Barrier(2)

    def slow_translate(*args, **kwargs):
        barrier.wait(timeout=10)
        return real_translate(*args, **kwargs)

    monkeypatch.setattr(backend_module, "translate", slow_translate)
    jobs = []
    threads = [threading.Thread(target=lambda: jobs.append(backend.run(qc, shots=10))) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len(jobs) == 2 and gc.isenabled()
    assert all(sum(job.result().get_counts().values()) == 10 for job in jobs)


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")
def test_a_child_forked_during_another_threads_run_collects_garbage_again():
    import gc

    from gpu_provider import backend as backend_module
    from tests.helpers import report_from_forked_child

    with backend_module._gc_paused():  # as if another thread were inside run()
        assert not gc.isenabled()
        reported = report_from_forked_child(lambda: b"1" if gc.isenabled() and backend_module._GC_PAUSES == 0 else b"0", 1)
    assert reported == b"1" and gc.isenabled()


def test_numpy_integer_options_run_and_stay_json_serializable():
    """shots, seeds and widths given as NumPy integers (as from an array) behave as ints, as Aer takes them."""
    import json

    from gpu_provider import GPUSimulator

    backend = GPUSimulator(device="CPU")
    qc = QuantumCircuit(1, 1)
    qc.h(0)
    qc.measure(0, 0)
    for branching in (True, False):
        result = backend.run(qc, shots=np.int64(100), seed_simulator=np.int32(3), shot_branching_enable=np.bool_(branching)).result()
        assert sum(result.get_counts().values()) == 100 and type(result.results[0].shots) is int
        json.dumps(result.to_dict(), default=str)
    backend.set_options(shots=np.int64(50), fusion_threshold=np.int16(3))
    assert type(backend.options.shots) is int and type(backend.options.fusion_threshold) is int
    assert sum(backend.run(qc).result().get_counts().values()) == 50
