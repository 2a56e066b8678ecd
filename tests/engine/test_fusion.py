"""Gate fusion: fused and unfused runs agree to 1e-12, on the engine and through the backend.

Two oracles: the same engine running the unfused program, and the
engine-independent ``reference_evolve`` (qiskit.quantum_info) applying the fused
program, so a fusion bug cannot hide behind an engine bug with the same shape.
"""

from __future__ import annotations

import numpy as np
import pytest
from qiskit import QuantumCircuit
from qiskit.circuit.library import MCXGate, UnitaryGate
from qiskit.quantum_info import Operator, Statevector, random_statevector, random_unitary

from gpu_provider.compiler.fusion import fuse
from gpu_provider.compiler.translate import translate
from gpu_provider.engine import program as P
from gpu_provider.engine.devices import resolve_device
from gpu_provider.engine.executor import RunConfig, run_program
from tests.helpers import make_backend, random_layer, random_positions, reference_evolve, run_statevector

ATOL = 1e-12
SINGLE_QUBIT = ["h", "x", "y", "sx", "t", "s", "rx", "ry", "rz", "p", "u"]
TWO_QUBIT = ["cx", "cz", "cp", "crx", "rzz", "rxx", "swap", "iswap", "cu", "ecr"]
DIAGONAL_1 = ["z", "s", "sdg", "t", "tdg", "rz", "p"]
DIAGONAL_2 = ["cz", "cp", "crz", "rzz", "cs"]


def _append(circuit: QuantumCircuit, name: str, qubits, rng) -> None:
    from tests.helpers import standard_gate

    circuit.append(standard_gate(name, rng), qubits)


def random_gate_circuit(n: int, depth: int, seed: int, diagonal_only: bool = False) -> QuantumCircuit:
    """Random 1-, 2- and 3-qubit gates on random (non-adjacent, reversed) qubits."""
    rng = np.random.default_rng(seed)
    circuit = QuantumCircuit(n)
    if not diagonal_only:
        random_layer(circuit, rng)
    for _ in range(depth):
        roll = rng.random()
        if diagonal_only:
            if roll < 0.5 or n < 2:
                _append(circuit, str(rng.choice(DIAGONAL_1)), random_positions(rng, n, 1), rng)
            elif roll < 0.9 or n < 3:
                _append(circuit, str(rng.choice(DIAGONAL_2)), random_positions(rng, n, 2), rng)
            else:
                circuit.ccz(*random_positions(rng, n, 3))
        elif roll < 0.45 or n < 2:
            _append(circuit, str(rng.choice(SINGLE_QUBIT)), random_positions(rng, n, 1), rng)
        elif roll < 0.85 or n < 3:
            _append(circuit, str(rng.choice(TWO_QUBIT)), random_positions(rng, n, 2), rng)
        elif roll < 0.95:
            circuit.ccx(*random_positions(rng, n, 3))
        else:
            k = min(3, n)
            circuit.unitary(random_unitary(2**k, seed=int(rng.integers(1 << 30))), random_positions(rng, n, k))
    return circuit


def engine_statevector(program: P.Program, device: str, precision: str = "double") -> np.ndarray:
    dev, _ = resolve_device(device)
    output = run_program(program, dev, RunConfig(shots=1, seed=1, statevector=True, precision=precision))
    return np.asarray(output.statevector)


@pytest.mark.parametrize("width", range(1, 9))
def test_fused_program_matches_unfused_for_every_width(device, width):
    for seed in range(3):
        n = 3 + (seed * 3 + width) % 7  # 3..9 qubits
        circuit = random_gate_circuit(n, depth=40, seed=100 * width + seed)
        program = translate(circuit)
        fused = fuse(program, "GPU" if device == "GPU" else "CPU", max_qubits=width, threshold=0)
        assert fused.num_ops <= program.num_ops
        if width >= 2:
            assert fused.num_ops < program.num_ops, "fusion did nothing: the test would be vacuous"
        for op in fused.ops:
            if isinstance(op, P.Unitary) and op.label == "fused":
                assert len(op.qubits) <= max(width, 3)  # no block wider than asked (bar wider input gates)
        # Engine-independent: the fused program is the same map as the circuit.
        np.testing.assert_allclose(reference_evolve(fused), Statevector(circuit).data, atol=ATOL, rtol=0)
        # Engine: fused and unfused runs agree.
        np.testing.assert_allclose(engine_statevector(fused, device), engine_statevector(program, device), atol=ATOL, rtol=0)


@pytest.mark.parametrize("width", [1, 2, 4, 8])
def test_diagonal_only_runs(device, width):
    n = 9
    circuit = random_gate_circuit(n, depth=60, seed=width, diagonal_only=True)
    start = random_statevector(2**n, seed=width).data  # a generic state, so every phase shows
    program = translate(circuit)
    program = program.replace(ops=(P.Initialize(tuple(range(n)), start),) + program.ops)
    fused = fuse(program, "CPU", max_qubits=width, threshold=0)
    gates = [op for op in fused.ops if isinstance(op, (P.Unitary, P.Diagonal))]
    assert gates and all(isinstance(op, P.Diagonal) for op in gates), "diagonal runs must stay diagonal"
    assert fused.num_ops < program.num_ops
    expected = Statevector(start).evolve(circuit).data
    np.testing.assert_allclose(reference_evolve(fused), expected, atol=ATOL, rtol=0)
    np.testing.assert_allclose(engine_statevector(fused, device), engine_statevector(program, device), atol=ATOL, rtol=0)
    np.testing.assert_allclose(engine_statevector(fused, device), expected, atol=ATOL, rtol=0)


def test_below_threshold_gates_merge_into_blocks_of_at_most_two_qubits(device):
    circuit = random_gate_circuit(5, depth=60, seed=1)
    circuit.measure_all(add_bits=True)
    circuit.rx(0.4, 0)  # after its measure: must stay after it
    circuit.ry(0.2, 1)
    program = translate(circuit)
    merged = fuse(program, "CPU", max_qubits=5, threshold=6)
    gates = lambda prog: [op for op in prog.ops if isinstance(op, (P.Unitary, P.Diagonal))]  # noqa: E731
    # Wider ops stay as they were, every block is on one or two qubits, and some merged.
    assert [op for op in gates(merged) if len(P.op_qubits(op)) > 2] == [op for op in gates(program) if len(P.op_qubits(op)) > 2]
    assert sum(len(P.op_qubits(op)) == 2 for op in gates(merged)) < sum(len(P.op_qubits(op)) == 2 for op in gates(program))
    assert merged.num_ops < program.num_ops
    kinds = [type(op).__name__ for op in merged.ops]
    assert kinds[-2:] == ["Unitary", "Unitary"] and kinds.count("Measure") == 5
    gates_only = random_gate_circuit(5, depth=60, seed=1)
    fused = fuse(translate(gates_only), "CPU", threshold=6)
    np.testing.assert_allclose(reference_evolve(fused), Statevector(gates_only).data, atol=ATOL, rtol=0)
    np.testing.assert_allclose(engine_statevector(fused, device), Statevector(gates_only).data, atol=ATOL, rtol=0)


@pytest.mark.parametrize("seed", range(6))
def test_pair_fusion_matches_statevector_on_random_circuits(device, seed):
    # Gates on qubits in both orders, diagonals on either qubit of a pair, 3-qubit gates between.
    circuit = random_gate_circuit(6, depth=120, seed=seed)
    diagonals = random_gate_circuit(4, depth=40, seed=seed, diagonal_only=True)
    circuit.compose(diagonals, qubits=[5, 1, 3, 0], inplace=True)
    program = translate(circuit)
    fused = fuse(program, "CPU", threshold=7)
    assert all(len(P.op_qubits(op)) <= 2 or op in program.ops for op in fused.ops)
    np.testing.assert_allclose(reference_evolve(fused), Statevector(circuit).data, atol=ATOL, rtol=0)
    np.testing.assert_allclose(engine_statevector(fused, device), Statevector(circuit).data, atol=ATOL, rtol=0)


def test_pair_fusion_of_a_brick_circuit_leaves_one_op_per_pair_run():
    # u on every qubit, then cx on alternating pairs: each cx takes in the u gates around it.
    rng = np.random.default_rng(3)
    circuit = QuantumCircuit(6)
    for layer in range(8):
        for q in range(6):
            circuit.u(*rng.uniform(-np.pi, np.pi, 3), q)
        for q in range(layer % 2, 5, 2):
            circuit.cx(q, q + 1)
    program = translate(circuit)
    fused = fuse(program, "CPU", threshold=7)
    cx_count = sum(1 for instruction in circuit.data if instruction.operation.name == "cx")
    # Only the first layer's u gates on qubits 0 and 5 before any cx stay apart from a pair... and they
    # are absorbed too, by the first cx on their qubit: one op per cx, plus the last layer's lone u on edge qubits.
    assert cx_count <= fused.num_ops <= cx_count + 2
    assert all(len(op.qubits) <= 2 for op in fused.ops)
    np.testing.assert_allclose(reference_evolve(fused), Statevector(circuit).data, atol=ATOL, rtol=0)


def test_pair_fusion_finds_a_controlled_phase_and_keeps_lone_ops():
    circuit = QuantumCircuit(3, 1)
    circuit.cx(0, 1)
    circuit.rz(0.3, 1)
    circuit.cx(0, 1)  # cx rz cx: a diagonal on (0, 1)
    circuit.h(2)  # alone: kept as the very same op
    circuit.measure(2, 0)
    circuit.x(2)  # after the measure: a new block
    program = translate(circuit)
    fused = fuse(program, "CPU", threshold=4)
    assert isinstance(fused.ops[0], P.Diagonal) and fused.ops[0].qubits == (0, 1)
    assert fused.ops[1] is program.ops[3]
    assert isinstance(fused.ops[2], P.Measure) and fused.ops[3] is program.ops[5]
    phase = QuantumCircuit(2)
    phase.cx(0, 1)
    phase.rz(0.3, 1)
    phase.cx(0, 1)
    np.testing.assert_allclose(np.diag(fused.ops[0].diagonal), Operator(phase).data, atol=ATOL, rtol=0)


def test_pair_fusion_inside_control_flow_keeps_bodies_apart():
    circuit = QuantumCircuit(3, 1)
    circuit.h(0)
    circuit.measure(0, 0)
    with circuit.if_test((circuit.clbits[0], 1)) as otherwise:
        circuit.rx(0.3, 1)
        circuit.cx(1, 2)
        circuit.ry(0.2, 2)
    with otherwise:
        circuit.h(1)
    circuit.rz(0.4, 1)  # after the if_else: not merged into its bodies
    circuit.cx(1, 2)
    program = translate(circuit)
    fused = fuse(program, "CPU", threshold=4)
    if_else = next(op for op in fused.ops if isinstance(op, P.IfElse))
    assert len(if_else.true_body) == 1 and len(if_else.false_body) == 1
    assert isinstance(fused.ops[-1], P.Unitary) and fused.ops[-1].qubits == (1, 2)
    assert fused.ops.index(if_else) < len(fused.ops) - 1
    for seed in (1, 2):
        on = make_backend("CPU", fusion_threshold=4).run(circuit, shots=200, seed_simulator=seed, memory=True).result()
        off = make_backend("CPU", fusion_enable=False).run(circuit, shots=200, seed_simulator=seed, memory=True).result()
        assert on.get_memory() == off.get_memory()


def test_fusion_keeps_non_gates_in_place():
    # Gates on other qubits may move across a measure or reset; gates on the same qubits may not.
    circuit = QuantumCircuit(4, 2)
    rng = np.random.default_rng(2)
    random_layer(circuit, rng)
    circuit.cx(0, 1)
    circuit.measure(0, 0)
    circuit.rx(0.3, 0)  # after the measure on qubit 0: must stay after it
    circuit.ry(0.4, 2)  # may be pulled before
    circuit.reset(1)
    circuit.cz(1, 3)
    circuit.measure(1, 1)
    program = translate(circuit)
    fused = fuse(program, "CPU", max_qubits=4, threshold=0)
    kinds = [type(op).__name__ for op in fused.ops]
    measure0 = fused.ops.index(P.Measure(0, 0))
    after = [op for op in fused.ops[measure0 + 1 :] if isinstance(op, (P.Unitary, P.Diagonal))]
    assert any(0 in P.op_qubits(op) for op in after), kinds
    assert [type(op) for op in fused.ops if not isinstance(op, (P.Unitary, P.Diagonal))] == [P.Measure, P.Reset, P.Measure]


@pytest.mark.parametrize("width", [1, 3, 5, 8])
def test_backend_fusion_on_and_off_agree(device, width):
    circuit = random_gate_circuit(8, depth=50, seed=width)
    circuit.append(MCXGate(6), [7, 0, 5, 2, 6, 1, 3])  # too wide to fuse: stays a controlled op
    circuit.append(UnitaryGate(random_unitary(4, seed=3)).control(2, ctrl_state=1), [4, 6, 1, 0])
    circuit.global_phase = 0.77
    on = make_backend(device, fusion_threshold=1, fusion_max_qubits=width)
    off = make_backend(device, fusion_enable=False)
    fused_state = run_statevector(on, circuit)
    plain_state = run_statevector(off, circuit)
    np.testing.assert_allclose(fused_state, plain_state, atol=ATOL, rtol=0)
    np.testing.assert_allclose(fused_state, Statevector(circuit).data, atol=ATOL, rtol=0)
    metadata = on.run(circuit, shots=1).result().results[0].metadata
    if width > 1:
        assert metadata["fusion_ops_after"] < metadata["fusion_ops_before"]


def test_default_threshold_fuses_only_large_circuits(device):
    backend = make_backend(device)
    small = random_gate_circuit(6, depth=30, seed=1)
    result = backend.run(small, shots=1, statevector=True).result()
    metadata = result.results[0].metadata
    wide = sum(1 for instruction in small.data if instruction.operation.num_qubits > 2)
    # Below the threshold gates merge into blocks of at most two qubits: every wider gate stays.
    assert wide <= metadata["fusion_ops_after"] < metadata["fusion_ops_before"]
    np.testing.assert_allclose(result.get_statevector(0), Statevector(small).data, atol=ATOL, rtol=0)
    large = random_gate_circuit(14, depth=40, seed=2)
    result = backend.run(large, shots=1, statevector=True).result()
    metadata = result.results[0].metadata
    assert metadata["fusion_ops_after"] < metadata["fusion_ops_before"]
    np.testing.assert_allclose(result.get_statevector(0), Statevector(large).data, atol=ATOL, rtol=0)


def test_fused_dynamic_circuit_gives_the_same_shots(device):
    # Same seed, same random draws: fusing must not change a single shot.
    circuit = QuantumCircuit(5, 5)
    rng = np.random.default_rng(4)
    random_layer(circuit, rng)
    circuit.cx(0, 3)
    circuit.measure(3, 0)
    with circuit.if_test((circuit.clbits[0], 1)):
        circuit.rx(1.1, 2)
        circuit.cz(2, 4)
    circuit.rzz(0.5, 1, 4)
    circuit.h(3)
    circuit.reset(0)
    circuit.cry(0.7, 4, 0)
    circuit.measure(range(5), range(5))
    on = make_backend(device, fusion_threshold=1, fusion_max_qubits=3)
    off = make_backend(device, fusion_enable=False)
    fused = on.run(circuit, shots=300, seed_simulator=9, memory=True).result()
    plain = off.run(circuit, shots=300, seed_simulator=9, memory=True).result()
    assert fused.results[0].metadata["fusion_ops_after"] < fused.results[0].metadata["fusion_ops_before"]
    assert fused.get_memory() == plain.get_memory()


@pytest.mark.parametrize("precision", ["double", "single"])
def test_fusion_in_single_and_double_precision(device, precision):
    circuit = random_gate_circuit(7, depth=60, seed=5)
    program = translate(circuit)
    fused = fuse(program, "CPU", max_qubits=5, threshold=0)
    tolerance = ATOL if precision == "double" else 1e-5
    np.testing.assert_allclose(engine_statevector(fused, device, precision), Statevector(circuit).data, atol=tolerance, rtol=0)


def test_gpu_width_comes_from_the_pass_cost_table():
    """One measured cost per pass, k = 1..5, per precision; the GPU default widths follow from it."""
    from gpu_provider.compiler import fusion
    from gpu_provider.engine.kernels import MAX_MATRIX_QUBITS

    for precision, costs in fusion.GPU_PASS_COST.items():
        assert len(costs) == MAX_MATRIX_QUBITS  # a cost for every width with a kernel
        assert all(1.0 <= cost < 4.0 for cost in costs)  # no pass beats a copy
        assert fusion.DEFAULT_MAX_QUBITS[("GPU", precision)] == fusion.width_from_pass_costs(costs)
    # The H200 table gives today's defaults: the 5-qubit complex64 pass is the one that does not pay.
    assert fusion.width_from_pass_costs(fusion.GPU_PASS_COST["single"]) == 4
    assert fusion.width_from_pass_costs(fusion.GPU_PASS_COST["double"]) == 5


def test_width_from_pass_costs_rule():
    from gpu_provider.compiler.fusion import WIDEN_LIMIT, width_from_pass_costs

    assert width_from_pass_costs([1.1] * 5) == 5
    assert width_from_pass_costs([1.1]) == 1
    # Stops at the first step that costs more than the limit, whatever comes after.
    assert width_from_pass_costs([1.0, 1.0, 2.0, 2.0, 2.0]) == 2
    assert width_from_pass_costs([1.0, 1.0, 1.0, 1.0, WIDEN_LIMIT]) == 5
    assert width_from_pass_costs([1.0, 1.0, 1.0, 1.0, WIDEN_LIMIT * 1.001]) == 4
    # A cheaper 5-qubit complex64 pass (e.g. 0.75 of copy bandwidth) would move that default to 5.
    assert width_from_pass_costs([1 / 0.91, 1 / 0.92, 1 / 0.90, 1 / 0.84, 1 / 0.75]) == 5
    assert width_from_pass_costs([1.0, 1.0], limit=0.9) == 1
    for bad in ([], [1.0, 0.0], [1.0, float("nan")]):
        with pytest.raises(ValueError):
            width_from_pass_costs(bad)


@pytest.mark.parametrize("device_kind, precision, width", [("GPU", "single", 4), ("GPU", "double", 5), ("CPU", "single", 5), ("CPU", "double", 5)])
def test_default_width_per_device_and_precision(device_kind, precision, width):
    from gpu_provider.compiler.fusion import default_width

    assert default_width(device_kind, precision) == width
    circuit = random_gate_circuit(8, depth=80, seed=5)
    program = translate(circuit)
    fused = fuse(program, device_kind, threshold=0, precision=precision)
    widths = {len(op.qubits) for op in fused.ops if isinstance(op, P.Unitary) and op.label == "fused"}
    assert max(widths) == width  # the default is used, and reached on a dense 8-qubit circuit
    np.testing.assert_allclose(reference_evolve(fused), Statevector(circuit).data, atol=ATOL, rtol=0)


def test_global_phase_joins_a_gate_and_costs_no_pass(device):
    circuit = QuantumCircuit(3, global_phase=0.7)
    circuit.h(0)
    circuit.cx(0, 1)
    circuit.rz(0.4, 2)
    program = translate(circuit)
    assert any(isinstance(op, P.GlobalPhase) for op in program.ops)
    fused = fuse(program, "CPU", max_qubits=2, threshold=0)
    assert not any(isinstance(op, P.GlobalPhase) for op in fused.ops)
    np.testing.assert_allclose(reference_evolve(fused), Statevector(circuit).data, atol=ATOL, rtol=0)
    np.testing.assert_allclose(engine_statevector(fused, device), Statevector(circuit).data, atol=ATOL, rtol=0)
    # Only controlled gates or control flow to join: the phase stays, as one op, exactly.
    phases_only = P.Program(2, 1, (P.GlobalPhase(0.25), P.GlobalPhase(0.5), P.Measure(0, 0)))
    fused = fuse(phases_only, "CPU", threshold=0)
    assert [op.phase for op in fused.ops if isinstance(op, P.GlobalPhase)] == [0.75]


def test_pair_fusion_bounds_its_blocks_and_its_stacks(monkeypatch):
    from gpu_provider.compiler import fusion

    # A long run on one pair becomes several blocks of at most MAX_BLOCK_MEMBERS gates (plus what they absorb).
    circuit = QuantumCircuit(3)
    rng = np.random.default_rng(8)
    for _ in range(150):
        circuit.rx(float(rng.uniform(0, 3)), 0)
        circuit.cx(0, 1)
    circuit.h(2)
    program = translate(circuit)
    fused = fuse(program, "CPU", threshold=4)
    assert 300 // fusion.MAX_BLOCK_MEMBERS <= fused.num_ops <= 300 // fusion.MAX_BLOCK_MEMBERS + 2
    np.testing.assert_allclose(reference_evolve(fused), Statevector(circuit).data, atol=ATOL, rtol=0)
    # Products stacked in small batches give the same ops as one stack.
    many = random_gate_circuit(6, depth=200, seed=11)
    whole = fuse(translate(many), "CPU", threshold=7)
    monkeypatch.setattr(fusion, "PRODUCT_BATCH_MEMBERS", 3)
    batched = fuse(translate(many), "CPU", threshold=7)
    assert [type(op) for op in batched.ops] == [type(op) for op in whole.ops]
    for a, b in zip(batched.ops, whole.ops):
        if isinstance(a, P.Unitary):
            np.testing.assert_allclose(a.matrix, b.matrix, atol=1e-15, rtol=0)
        elif isinstance(a, P.Diagonal):
            np.testing.assert_allclose(a.diagonal, b.diagonal, atol=1e-15, rtol=0)
    np.testing.assert_allclose(reference_evolve(batched), Statevector(many).data, atol=ATOL, rtol=0)


def test_below_threshold_a_width_of_one_merges_only_one_qubit_runs(device):
    circuit = random_gate_circuit(5, depth=80, seed=4)
    program = translate(circuit)
    fused = fuse(program, "CPU", max_qubits=1, threshold=6)
    gates = lambda prog: [op for op in prog.ops if isinstance(op, (P.Unitary, P.Diagonal))]  # noqa: E731
    wider = [op for op in gates(program) if len(P.op_qubits(op)) > 1]
    assert [op for op in gates(fused) if len(P.op_qubits(op)) > 1] == wider  # the very same ops, in order
    assert program.num_ops > fused.num_ops > len(wider)
    np.testing.assert_allclose(engine_statevector(fused, device), Statevector(circuit).data, atol=ATOL, rtol=0)
    on = make_backend(device, fusion_max_qubits=1).run(circuit, shots=1).result().results[0].metadata
    assert on["fusion_ops_after"] == fused.num_ops
