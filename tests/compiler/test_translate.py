"""translate: QuantumCircuit -> Program, checked against qiskit.quantum_info without the engine.

The oracle is ``Statevector(circuit)`` (or ``Operator``); the Program is applied by
``tests.helpers.reference_evolve``, so these tests isolate the compiler from the
engine that runs its output.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from qiskit import ClassicalRegister, QuantumCircuit, QuantumRegister
from qiskit.circuit import Gate, Instruction, Parameter
from qiskit.circuit.classical import expr, types
from qiskit.circuit.library import (
    CXGate,
    GlobalPhaseGate,
    MCXGate,
    QFTGate,
    RXGate,
    RZGate,
    StatePreparation,
    UnitaryGate,
)
from qiskit.quantum_info import Operator, Statevector, random_statevector, random_unitary

from gpu_provider.compiler.translate import translate
from gpu_provider.engine import program as P
from gpu_provider.errors import InvalidInputError, UnboundParameterError, UnsupportedInstructionError
from tests.helpers import (
    controlled_operator,
    controlled_unitary,
    random_entangled_state,
    random_layer,
    random_positions,
    reference_evolve,
    standard_gate,
    standard_gate_names,
)

ATOL = 1e-12


def assert_program_matches(circuit: QuantumCircuit, atol: float = ATOL) -> P.Program:
    """The translated program maps |0..0> to Statevector(circuit), global phase included."""
    program = translate(circuit)
    assert program.num_qubits == circuit.num_qubits
    assert program.num_clbits == circuit.num_clbits
    actual = reference_evolve(program)
    expected = Statevector(circuit).data
    np.testing.assert_allclose(actual, expected, atol=atol, rtol=0)
    return program


def flat_gate_ops(program: P.Program) -> list:
    return [op for op in program.ops if isinstance(op, (P.Unitary, P.Diagonal))]


# ---------------------------------------------------------------------------
# standard gates


@pytest.mark.parametrize("name", standard_gate_names())
def test_every_standard_gate_on_random_qubits(name):
    rng = np.random.default_rng(abs(hash(name)) % 2**32)
    for trial in range(4):
        probe = standard_gate(name, rng)
        k = probe.num_qubits
        n = int(rng.integers(max(k, 1), 7))
        ctrl_state = int(rng.integers(0, 2 ** getattr(probe, "num_ctrl_qubits", 0))) if hasattr(probe, "num_ctrl_qubits") else None
        gate = standard_gate(name, rng, ctrl_state=ctrl_state if trial % 2 else None)
        circuit = QuantumCircuit(n)
        random_entangled_state(circuit, rng)
        circuit.append(gate, random_positions(rng, n, k))
        assert_program_matches(circuit)


def test_standard_gate_operator_is_qiskits_matrix_on_its_qubits():
    # The op keeps Qiskit's qubit order: qubits[0] is the matrix's low bit.
    circuit = QuantumCircuit(4)
    circuit.cx(3, 1)
    circuit.rzz(0.3, 2, 0)
    ops = translate(circuit).ops
    assert isinstance(ops[0], P.Unitary) and ops[0].qubits == (3, 1) and not ops[0].controls
    np.testing.assert_array_equal(ops[0].matrix, CXGate().to_matrix())
    assert isinstance(ops[1], P.Diagonal) and ops[1].qubits == (2, 0)
    np.testing.assert_allclose(ops[1].diagonal, np.diag(Operator(circuit.data[1].operation).data), atol=ATOL)


@pytest.mark.parametrize("name", ["z", "s", "sdg", "t", "tdg", "p", "rz", "u1", "cz", "cp", "crz", "cs", "csdg", "cu1", "ccz", "rzz"])
def test_diagonal_gates_become_diagonal_ops(name):
    rng = np.random.default_rng(7)
    gate = standard_gate(name, rng)
    circuit = QuantumCircuit(gate.num_qubits)
    circuit.append(gate, list(range(gate.num_qubits))[::-1])
    (op,) = translate(circuit).ops
    assert isinstance(op, P.Diagonal)
    np.testing.assert_allclose(op.diagonal, np.diag(Operator(gate).data), atol=ATOL)


@pytest.mark.parametrize("name", ["x", "h", "cx", "swap", "rx", "u", "ecr"])
def test_non_diagonal_gates_become_unitary_ops(name):
    rng = np.random.default_rng(8)
    gate = standard_gate(name, rng)
    circuit = QuantumCircuit(gate.num_qubits)
    circuit.append(gate, range(gate.num_qubits))
    (op,) = translate(circuit).ops
    assert isinstance(op, P.Unitary)
    np.testing.assert_allclose(op.matrix, Operator(gate).data, atol=ATOL)


def test_bound_parameter_expressions_translate_to_numbers():
    theta, phi = Parameter("theta"), Parameter("phi")
    circuit = QuantumCircuit(2)
    circuit.rx(2 * theta + 1, 0)
    circuit.crz(theta * phi, 1, 0)
    circuit.global_phase = phi / 3
    bound = circuit.assign_parameters({theta: 0.37, phi: -1.2})
    assert_program_matches(bound)


# ---------------------------------------------------------------------------
# no-ops and global phase


def test_barrier_delay_and_identity_are_no_ops():
    circuit = QuantumCircuit(3)
    circuit.barrier()
    circuit.delay(100, 1)
    circuit.delay(5, 0, unit="us")
    circuit.id(2)
    circuit.barrier([0, 2])
    assert translate(circuit).ops == ()


def test_global_phase_of_the_circuit_is_kept():
    circuit = QuantumCircuit(2, global_phase=0.7)
    circuit.h(0)
    program = assert_program_matches(circuit)
    assert sum(op.phase for op in program.ops if isinstance(op, P.GlobalPhase)) == pytest.approx(0.7)


def test_global_phase_gate_is_kept():
    circuit = QuantumCircuit(1)
    circuit.append(GlobalPhaseGate(1.3), [])
    circuit.x(0)
    assert_program_matches(circuit)


# ---------------------------------------------------------------------------
# unitary, custom gates, wide gates


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
def test_unitary_gate_on_random_qubits(k):
    rng = np.random.default_rng(k)
    n = 7
    circuit = QuantumCircuit(n)
    random_entangled_state(circuit, rng)
    circuit.unitary(random_unitary(2**k, seed=k), random_positions(rng, n, k))
    assert_program_matches(circuit)


def test_custom_gate_with_only_a_definition_is_expanded():
    inner_def = QuantumCircuit(2, global_phase=0.25)
    inner_def.h(0)
    inner_def.cx(0, 1)
    inner_def.rz(0.4, 1)
    inner = Gate("inner", 2, [])
    inner.definition = inner_def
    outer_def = QuantumCircuit(3, global_phase=-0.5)
    outer_def.append(inner, [2, 0])
    outer_def.ry(0.9, 1)
    outer_def.append(inner, [1, 2])
    outer = Gate("outer", 3, [])
    outer.definition = outer_def
    rng = np.random.default_rng(3)
    circuit = QuantumCircuit(5)
    random_entangled_state(circuit, rng)
    circuit.append(outer, [4, 1, 3])
    circuit.append(outer.inverse(), [0, 3, 2])
    assert_program_matches(circuit)


def test_parameterized_custom_gate_definition():
    theta = Parameter("t")
    definition = QuantumCircuit(2)
    definition.rx(theta, 0)
    definition.cry(2 * theta, 0, 1)
    gate = definition.to_gate(label="mine")
    circuit = QuantumCircuit(3)
    circuit.h(1)
    circuit.append(gate, [2, 1])
    bound = circuit.assign_parameters({theta: 0.81})
    assert_program_matches(bound)


def test_mcx_with_seven_controls():
    rng = np.random.default_rng(11)
    circuit = QuantumCircuit(9)
    random_entangled_state(circuit, rng)
    qubits = random_positions(rng, 9, 8)
    circuit.append(MCXGate(7), qubits)
    program = assert_program_matches(circuit)
    last = flat_gate_ops(program)[-1]  # one op, not a decomposition into many
    assert isinstance(last, P.Unitary) and set(P.op_qubits(last)) == set(qubits)


@pytest.mark.parametrize("num_ctrl,ctrl_state", [(1, 0), (2, 0b01), (3, 0b101), (4, 0b0110), (5, 0b10110), (6, 0b101101)])
def test_controlled_unitary_with_ctrl_state(num_ctrl, ctrl_state):
    rng = np.random.default_rng(num_ctrl)
    base, gate = controlled_unitary(num_ctrl, ctrl_state)
    n = num_ctrl + 3
    circuit = QuantumCircuit(n)
    random_entangled_state(circuit, rng)
    start = Statevector(circuit)
    qubits = random_positions(rng, n, num_ctrl + 2)
    circuit.append(gate, qubits)
    expected = start.evolve(controlled_operator(base, num_ctrl, ctrl_state), qargs=qubits).data
    np.testing.assert_allclose(reference_evolve(translate(circuit)), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("n", [8, 11])
def test_large_library_gate_qft(n):
    rng = np.random.default_rng(n)
    circuit = QuantumCircuit(n)
    random_layer(circuit, rng)
    circuit.append(QFTGate(n), [int(q) for q in rng.permutation(n)])
    assert_program_matches(circuit, atol=1e-11)


# ---------------------------------------------------------------------------
# initialize and state_preparation


def test_initialize_on_fresh_qubits_becomes_initialize_op():
    vector = random_statevector(8, seed=5)
    circuit = QuantumCircuit(5)
    circuit.h(0)
    circuit.initialize(vector, [3, 1, 4])
    circuit.cx(3, 0)
    program = assert_program_matches(circuit)
    (init,) = [op for op in program.ops if isinstance(op, P.Initialize)]
    assert init.qubits == (3, 1, 4)
    assert not any(isinstance(op, P.Reset) for op in program.ops)


@pytest.mark.parametrize("params", ["01+-rl", "1", 5])
def test_initialize_from_labels_and_integers(params):
    k = len(params) if isinstance(params, str) else 3
    circuit = QuantumCircuit(k + 1)
    circuit.initialize(params, list(range(1, k + 1))[::-1])
    circuit.h(0)
    assert_program_matches(circuit)


def test_initialize_on_used_qubits_resets_them_first():
    circuit = QuantumCircuit(3)
    circuit.h(1)
    circuit.x(2)
    circuit.initialize(random_statevector(4, seed=2), [1, 2])
    program = translate(circuit)
    resets = [op.qubit for op in program.ops if isinstance(op, P.Reset)]
    assert sorted(resets) == [1, 2]
    kinds = [type(op) for op in program.ops]
    assert kinds.index(P.Initialize) > max(i for i, k in enumerate(kinds) if k is P.Reset)


def test_state_preparation_on_fresh_and_used_qubits():
    rng = np.random.default_rng(4)
    circuit = QuantumCircuit(5)
    circuit.prepare_state(random_statevector(4, seed=1), [4, 2])  # fresh
    random_layer(circuit, rng, [0, 1, 3])
    circuit.cx(1, 3)
    circuit.prepare_state(random_statevector(8, seed=2), [3, 0, 1])  # used: acts as its unitary
    circuit.append(StatePreparation(random_statevector(2, seed=3)), [2])  # used
    assert_program_matches(circuit)


# ---------------------------------------------------------------------------
# measure, reset


def test_measure_and_reset_ops():
    circuit = QuantumCircuit(3, 2)
    circuit.reset(0)  # still |0>: nothing to do
    circuit.h(1)
    circuit.measure(1, 0)
    circuit.reset(1)
    circuit.measure(2, 1)
    ops = translate(circuit).ops
    assert ops[1:] == (P.Measure(1, 0), P.Reset(1), P.Measure(2, 1))


# ---------------------------------------------------------------------------
# classical conditions and control flow


def _all_clbit_assignments(n):
    return [list(bits) for bits in itertools.product([0, 1], repeat=n)]


def test_old_style_conditions_evaluate_like_qiskit():
    qr = QuantumRegister(1)
    a = ClassicalRegister(2, "a")
    b = ClassicalRegister(3, "b")
    circuit = QuantumCircuit(qr, a, b)
    with circuit.if_test((a[1], 1)):
        circuit.x(0)
    with circuit.if_test((b, 5)):
        circuit.x(0)
    with circuit.if_test((a[0], False)):
        circuit.x(0)
    ops = translate(circuit).ops
    assert all(isinstance(op, P.IfElse) for op in ops)
    for clbits in _all_clbit_assignments(5):
        a_value = clbits[0] | clbits[1] << 1
        b_value = clbits[2] | clbits[3] << 1 | clbits[4] << 2
        assert bool(P.evaluate(ops[0].condition, clbits, {})) == (clbits[1] == 1)
        assert bool(P.evaluate(ops[1].condition, clbits, {})) == (b_value == 5), (clbits, a_value)
        assert bool(P.evaluate(ops[2].condition, clbits, {})) == (clbits[0] == 0)


def test_expression_conditions_evaluate_like_qiskit():
    a = ClassicalRegister(3, "a")
    b = ClassicalRegister(2, "b")
    circuit = QuantumCircuit(QuantumRegister(1), a, b)
    conditions = {
        "a == 6 && b[0]": (expr.logic_and(expr.equal(a, 6), b[0]), lambda av, bv: av == 6 and bv & 1),
        "!(a < b) || b[1]": (expr.logic_or(expr.logic_not(expr.less(a, b)), b[1]), lambda av, bv: (not av < bv) or bv >> 1 & 1),
        "(a & 5) != 0": (expr.not_equal(expr.bit_and(a, 5), 0), lambda av, bv: (av & 5) != 0),
        "(a ^ 7) >= 3": (expr.greater_equal(expr.bit_xor(a, 7), 3), lambda av, bv: (av ^ 7) >= 3),
        "~a == 2": (expr.equal(expr.bit_not(a), 2), lambda av, bv: (~av & 7) == 2),
        "a[2] != b[0]": (expr.not_equal(a[2], b[0]), lambda av, bv: (av >> 2 & 1) != (bv & 1)),
        "(a | (uint3) b) > 5": (expr.greater(expr.bit_or(a, expr.cast(b, types.Uint(3))), 5), lambda av, bv: (av | bv) > 5),
        "a + b == 4": (expr.equal(expr.add(a, expr.cast(b, types.Uint(3))), 4), lambda av, bv: ((av + bv) & 7) == 4),
        "a << 1 == 6": (expr.equal(expr.shift_left(a, 1), 6), lambda av, bv: ((av << 1) & 7) == 6),
    }
    for label, (condition, _) in conditions.items():
        with circuit.if_test(condition):
            circuit.x(0)
    ops = translate(circuit).ops
    for clbits in _all_clbit_assignments(5):
        av = clbits[0] | clbits[1] << 1 | clbits[2] << 2
        bv = clbits[3] | clbits[4] << 1
        for op, (label, (_, truth)) in zip(ops, conditions.items()):
            assert bool(P.evaluate(op.condition, clbits, {})) == bool(truth(av, bv)), (label, clbits)


def test_if_else_bodies_use_outer_qubit_and_clbit_indices():
    circuit = QuantumCircuit(4, 3)
    circuit.h(2)
    circuit.measure(2, 1)
    with circuit.if_test((circuit.clbits[1], 1)) as else_:
        circuit.x(3)
        circuit.measure(3, 2)
    with else_:
        circuit.cx(0, 1)
    (_, measure, if_else) = translate(circuit).ops
    assert measure == P.Measure(2, 1)
    assert isinstance(if_else, P.IfElse)
    assert [op.qubits for op in if_else.true_body[:1]] == [(3,)]
    assert if_else.true_body[1] == P.Measure(3, 2)
    assert if_else.false_body[0].qubits == (0, 1)


def test_for_loop_binds_the_loop_parameter_each_iteration():
    circuit = QuantumCircuit(2, 1)
    with circuit.for_loop(range(1, 4)) as theta:
        circuit.rx(theta * 0.5, 1)
    (loop,) = translate(circuit).ops
    assert isinstance(loop, P.ForLoop) and len(loop.iterations) == 3
    for value, body in zip(range(1, 4), loop.iterations):
        (op,) = body
        np.testing.assert_allclose(op.matrix, RXGate(value * 0.5).to_matrix(), atol=ATOL)


def test_while_switch_break_continue_and_store_translate():
    circuit = QuantumCircuit(2, 2)
    counter = circuit.add_var("counter", expr.lift(0, types.Uint(4)))
    flag = circuit.add_var("flag", False)
    with circuit.while_loop(expr.less(counter, 5)):
        circuit.store(counter, expr.add(counter, 1))
        with circuit.if_test(expr.equal(counter, 2)):
            circuit.continue_loop()
        with circuit.if_test(expr.equal(counter, 4)):
            circuit.break_loop()
        circuit.x(0)
    circuit.store(flag, expr.equal(counter, 4))
    with circuit.switch(counter) as case:
        with case(4):
            circuit.x(1)
        with case(case.DEFAULT):
            circuit.h(1)
    ops = translate(circuit).ops
    kinds = [type(op) for op in ops]
    assert P.WhileLoop in kinds and P.SwitchCase in kinds
    loop = ops[kinds.index(P.WhileLoop)]
    inner = [type(op) for op in loop.body]
    assert inner[0] is P.Store and inner.count(P.IfElse) == 2
    assert any(isinstance(b, P.ContinueLoop) for b in loop.body[1].true_body)
    assert any(isinstance(b, P.BreakLoop) for b in loop.body[2].true_body)
    switch = ops[kinds.index(P.SwitchCase)]
    assert switch.cases[0][0] == (4,) and switch.cases[-1][0] is None


# ---------------------------------------------------------------------------
# errors


def test_unbound_parameter_is_named():
    theta = Parameter("theta_unbound")
    circuit = QuantumCircuit(1)
    circuit.rx(theta, 0)
    with pytest.raises(UnboundParameterError, match="theta_unbound"):
        translate(circuit)


def test_unbound_global_phase_is_named():
    phi = Parameter("phi_phase")
    circuit = QuantumCircuit(1, global_phase=phi)
    circuit.x(0)
    with pytest.raises(UnboundParameterError, match="phi_phase"):
        translate(circuit)


def test_partially_bound_circuit_names_only_the_missing_parameter():
    a, b = Parameter("alpha"), Parameter("beta_left")
    circuit = QuantumCircuit(1)
    circuit.rx(a, 0)
    circuit.rz(b, 0)
    with pytest.raises(UnboundParameterError, match="beta_left") as info:
        translate(circuit.assign_parameters({a: 0.1}))
    assert "alpha" not in str(info.value)


def test_instruction_without_matrix_or_definition_is_named():
    circuit = QuantumCircuit(2)
    circuit.h(0)
    circuit.append(Instruction("mystery_box", 1, 0, []), [1])
    with pytest.raises(UnsupportedInstructionError, match="mystery_box"):
        translate(circuit)


def test_opaque_gate_without_definition_is_named():
    circuit = QuantumCircuit(2)
    circuit.append(Gate("opaque_thing", 2, []), [0, 1])
    with pytest.raises(UnsupportedInstructionError, match="opaque_thing"):
        translate(circuit)


def test_non_circuit_input_is_rejected():
    with pytest.raises(InvalidInputError):
        translate("OPENQASM 2.0;")


def test_rz_cache_distinguishes_parameters():
    # The standard-gate cache is keyed by parameters: two angles, two matrices.
    circuit = QuantumCircuit(1)
    circuit.append(RZGate(0.1), [0])
    circuit.append(RZGate(0.2), [0])
    first, second = translate(circuit).ops
    np.testing.assert_allclose(first.diagonal, np.diag(RZGate(0.1).to_matrix()), atol=ATOL)
    np.testing.assert_allclose(second.diagonal, np.diag(RZGate(0.2).to_matrix()), atol=ATOL)


def test_repeated_standard_gates_take_the_seen_gate_path_and_match_the_first_translation():
    # The second translation of the same gates finds them by (name, *parameters): the ops must be
    # the same as the first's (same numbers, labels, kinds), and every gate still reaches its qubits.
    from gpu_provider.compiler import translate as translate_module

    rng = np.random.default_rng(5)
    circuit = QuantumCircuit(4)
    for _ in range(3):
        for q in range(4):
            circuit.u(*rng.uniform(-np.pi, np.pi, 3), q)
        circuit.cx(0, 1)
        circuit.rz(0.25, 2)
        circuit.crx(0.5, 3, 1)
        circuit.rzz(0.75, 0, 3)
        circuit.x(2)
    translate_module._SEEN_STANDARD.clear()
    first = translate(circuit)
    assert len(translate_module._SEEN_STANDARD) >= 5
    second = translate(circuit)
    assert [type(op) for op in first.ops] == [type(op) for op in second.ops]
    for a, b in zip(first.ops, second.ops):
        assert (a.qubits, getattr(a, "label", None), getattr(a, "controls", ()), getattr(a, "ctrl_state", 0)) == (
            b.qubits, getattr(b, "label", None), getattr(b, "controls", ()), getattr(b, "ctrl_state", 0))
        numbers = (a.diagonal, b.diagonal) if isinstance(a, P.Diagonal) else (a.matrix, b.matrix)
        assert numbers[0] is numbers[1]  # one cached array
    expected = Statevector(circuit).data
    np.testing.assert_allclose(reference_evolve(second), expected, atol=ATOL)


def test_seen_gate_path_still_checks_parameters_it_has_not_seen():
    from gpu_provider.compiler import translate as translate_module

    circuit = QuantumCircuit(1)
    circuit.rx(0.3, 0)
    translate(circuit)
    bad = QuantumCircuit(1)
    bad.rx(float("nan"), 0)
    with pytest.raises(InvalidInputError, match="non-finite"):
        translate(bad)
    assert not any(key[0] == "rx" and key[1] != key[1] for key in translate_module._SEEN_STANDARD)
    theta = Parameter("t")
    bound = QuantumCircuit(1)
    bound.rx(theta, 0)
    bound = bound.assign_parameters({theta: 0.3})
    np.testing.assert_allclose(reference_evolve(translate(bound)), Statevector(bound).data, atol=ATOL)


def test_gate_op_builds_the_dataclass_object():
    matrix = np.eye(4, dtype=np.complex128)
    fast = P.gate_op((0, 1), matrix, "cx", False)
    slow = P.Unitary((0, 1), matrix, label="cx")
    assert type(fast) is P.Unitary and vars(fast).keys() == vars(slow).keys()
    assert all(getattr(fast, name) is getattr(slow, name) or getattr(fast, name) == getattr(slow, name) for name in vars(slow))
    diagonal = np.ones(2, dtype=np.complex128)
    fast = P.gate_op((3,), diagonal, "rz", True)
    slow = P.Diagonal((3,), diagonal, "rz")
    assert type(fast) is P.Diagonal and vars(fast).keys() == vars(slow).keys()
    with pytest.raises(Exception):  # still frozen
        fast.label = "x"


# ---------------------------------------------------------------------------
# operations beyond the standard library


def _library_operations():
    from qiskit.circuit.annotated_operation import AnnotatedOperation, InverseModifier, PowerModifier
    from qiskit.circuit.library import (
        DiagonalGate,
        HamiltonianGate,
        LinearFunction,
        MCMTGate,
        MCPhaseGate,
        PauliEvolutionGate,
        PauliGate,
        PermutationGate,
        RYGate,
        SXGate,
        UCRYGate,
        XGate,
    )
    from qiskit.quantum_info import SparsePauliOp, random_clifford

    rng = np.random.default_rng(0)
    return {
        "annotated_control": XGate().control(3, annotated=True),
        "annotated_inverse_power": AnnotatedOperation(SXGate(), [InverseModifier(), PowerModifier(3)]),
        "annotated_controlled_unitary": UnitaryGate(random_unitary(2, seed=1)).control(2, ctrl_state=1, annotated=True),
        "clifford": random_clifford(3, seed=1),
        "pauli": PauliGate("XYZ"),
        "permutation": PermutationGate([2, 0, 1]),
        "linear_function": LinearFunction([[1, 1, 0], [0, 1, 0], [0, 0, 1]]),
        "diagonal": DiagonalGate(list(np.exp(1j * rng.uniform(0, 6, 8)))),
        "ucry": UCRYGate([0.1, 0.2, 0.3, 0.4]),
        "pauli_evolution": PauliEvolutionGate(SparsePauliOp(["XZ", "YY"], [0.3, 0.5]), time=0.7),
        "hamiltonian": HamiltonianGate(np.array([[1, 0.5], [0.5, -1]]), 0.3),
        "mcmt": MCMTGate(RYGate(0.4), 2, 2),
        "mcphase": MCPhaseGate(0.7, 3),
        "sx_power": SXGate().power(0.37),
    }


@pytest.mark.filterwarnings("ignore::scipy.sparse.SparseEfficiencyWarning")
@pytest.mark.parametrize("name", sorted(_library_operations()))
def test_library_operations_and_bare_operations(name):
    # Gates with a matrix, gates with a definition, and bare Operations (Clifford,
    # AnnotatedOperation) that have neither params nor definition but an Operator.
    operation = _library_operations()[name]
    rng = np.random.default_rng(1)
    n = operation.num_qubits + 1
    circuit = QuantumCircuit(n)
    random_entangled_state(circuit, rng)
    circuit.append(operation, random_positions(rng, n, operation.num_qubits))
    assert_program_matches(circuit)


def test_wide_high_level_objects_without_a_definition_are_synthesized():
    """A 12-qubit PermutationGate and Clifford have no definition in Qiskit 2 and are wider than a dense
    matrix is built for: Qiskit's HighLevelSynthesis gives their circuits. Narrower dense widths
    (a stabilizer state asks for 6) expand a 7-qubit permutation and Clifford the same way.
    Oracles: Statevector (the permutation after an entangled state, phases included) and Qiskit's
    Clifford algebra (the Clifford after Clifford gates: exact probabilities; Statevector would build
    the 12-qubit Clifford's 4096 x 4096 operator, which takes a minute)."""
    from qiskit.circuit.library import PermutationGate
    from qiskit.quantum_info import Clifford, StabilizerState, random_clifford

    from gpu_provider.engine.stabilizer import MAX_GATE_QUBITS

    rng = np.random.default_rng(3)
    circuit = QuantumCircuit(13)
    random_entangled_state(circuit, rng)
    circuit.append(PermutationGate(rng.permutation(12).tolist()), random_positions(rng, 13, 12))
    program = assert_program_matches(circuit, atol=1e-10)
    assert max(len(op.qubits) for op in flat_gate_ops(program)) <= 10
    clifford = QuantumCircuit(13)
    clifford.h(range(0, 13, 2))
    clifford.cx(0, 5)
    clifford.s(7)
    clifford.append(random_clifford(12, seed=4), random_positions(rng, 13, 12))
    probabilities = np.abs(reference_evolve(translate(clifford))) ** 2
    exact = StabilizerState(Clifford(clifford)).probabilities()
    np.testing.assert_allclose(probabilities, exact, atol=1e-10)
    narrow = QuantumCircuit(8)
    random_entangled_state(narrow, rng)
    narrow.append(PermutationGate(rng.permutation(7).tolist()), range(7))
    narrow.append(random_clifford(7, seed=5), range(1, 8))
    expected = Statevector(narrow).data
    assert any(len(op.qubits) == 7 for op in flat_gate_ops(translate(narrow)))
    program = translate(narrow, dense_max_qubits=MAX_GATE_QUBITS)
    assert all(len(op.qubits) + len(getattr(op, "controls", ())) <= MAX_GATE_QUBITS for op in flat_gate_ops(program))
    np.testing.assert_allclose(reference_evolve(program), expected, atol=1e-10, rtol=0)
    # A gate that holds its matrix stays that matrix at any dense width: its definition is a synthesis.
    held = QuantumCircuit(8)
    held.unitary(random_unitary(2**7, seed=6), range(7))
    assert [len(op.qubits) for op in flat_gate_ops(translate(held, dense_max_qubits=MAX_GATE_QUBITS))] == [7]


def test_store_to_one_bit_of_a_variable_or_register():
    circuit = QuantumCircuit(1, 3)
    value = circuit.add_var("value", expr.lift(0b101, types.Uint(3)))
    position = circuit.add_var("position", expr.lift(2, types.Uint(2)))
    circuit.store(expr.index(value, 1), True)
    circuit.store(expr.index(value, 0), False)
    circuit.store(expr.index(circuit.cregs[0], position), True)
    ops = translate(circuit).ops
    assert [type(op) for op in ops] == [P.Store] * 5
    clbits, variables = [0, 0, 0], {}
    for op in ops:
        result = P.evaluate(op.value, clbits, variables)
        if isinstance(op.target, P.Var):
            variables[op.target.name] = result
        else:
            for position_, clbit in enumerate(op.target.clbits):
                clbits[clbit] = (int(result) >> position_) & 1
    assert variables[str(value.var)] == 0b110
    assert clbits == [0, 0, 1]
