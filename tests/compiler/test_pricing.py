"""Gates priced before their matrix is built: evolutions synthesized exactly, wide library blocks expanded.

Every state is compared with ``qiskit.quantum_info.Statevector`` (which uses the
gates' exact matrices), global phase included.
"""

from __future__ import annotations

import numpy as np
import pytest
from qiskit import QuantumCircuit
from qiskit.circuit.library import PauliEvolutionGate, QAOAAnsatz, QFTGate, UnitaryGate
from qiskit.quantum_info import Operator, SparsePauliOp, Statevector, random_unitary

from gpu_provider import GPUSimulator
from gpu_provider.compiler import pricing
from gpu_provider.compiler.translate import translate
from gpu_provider.engine import program as P
from tests.engine.test_gpu_plumbing import fake_gpu  # noqa: F401  (fixture)
from tests.helpers import assert_state_matches


def _evolution(n: int, labels, coefficients, time: float = 0.7) -> QuantumCircuit:
    qc = QuantumCircuit(n)
    for q in range(n):
        qc.u(0.3 + 0.2 * q, 0.1 * q, -0.4, q)  # a generic product state to start from
    qc.append(PauliEvolutionGate(SparsePauliOp(labels, coefficients), time=time), range(n))
    return qc


def _random_terms(n: int, m: int, seed: int):
    rng = np.random.default_rng(seed)
    return ["".join(rng.choice(list("IXYZ"), n)) for _ in range(m)], rng.normal(size=m)


def _reference(qc: QuantumCircuit) -> np.ndarray:
    """The exact state: Statevector of every instruction but a final evolution, then exp(-itH) exactly.

    Up to 8 qubits through a dense matrix exponential; wider only for commuting
    terms, as the product of cos(a) - i sin(a) P over the terms.
    """
    from qiskit.quantum_info import Pauli
    from scipy.linalg import expm

    gate = qc.data[-1].operation
    if not isinstance(gate, PauliEvolutionGate):
        return Statevector(qc).data
    prefix = qc.copy()
    prefix.data.pop()
    state = Statevector(prefix)
    operators = gate.operator if isinstance(gate.operator, list) else [gate.operator]
    hamiltonian = sum(operators[1:], operators[0]).simplify()
    time = float(gate.time)
    qargs = [qc.find_bit(q).index for q in qc.data[-1].qubits]
    if gate.num_qubits <= 8:
        return state.evolve(Operator(expm(-1j * time * hamiltonian.to_matrix())), qargs=qargs).data
    paulis = hamiltonian.paulis
    assert all(not paulis.anticommutes(pauli).any() for pauli in paulis)
    data = state.data
    for pauli, coefficient in zip(paulis, hamiltonian.coeffs):
        angle = time * coefficient.real
        data = np.cos(angle) * data - 1j * np.sin(angle) * Statevector(data).evolve(Pauli(pauli), qargs=qargs).data
    return data


@pytest.mark.parametrize("n, m, seed", [(3, 6, 1), (5, 12, 2), (8, 20, 3)])
def test_non_commuting_evolution_is_exact(n, m, seed):
    qc = _evolution(n, *_random_terms(n, m, seed))
    expected = _reference(qc)
    with pytest.MonkeyPatch.context() as patch:  # nothing may build the gate's matrix (SciPy's expm)
        patch.setattr(PauliEvolutionGate, "to_matrix", lambda self: (_ for _ in ()).throw(AssertionError("matrix built")))
        program = translate(qc)
        state = GPUSimulator(device="CPU").run(qc, shots=1, statevector=True).result().get_statevector()
    kinds = {type(op) for op in program.ops}
    assert (P.PauliEvolution in kinds) == (n > pricing.DENSE_EVOLUTION_MAX_QUBITS)
    assert_state_matches(state, expected)


def test_long_evolution_converges():
    qc = _evolution(6, *_random_terms(6, 12, 9), time=9.0)  # sum of |angles| about 80
    assert_state_matches(GPUSimulator(device="CPU").run(qc, shots=1, statevector=True).result().get_statevector(), _reference(qc))


def test_single_precision_evolution():
    qc = _evolution(8, *_random_terms(8, 20, 4))
    state = GPUSimulator(device="CPU", precision="single").run(qc, shots=1, statevector=True).result().get_statevector()
    assert_state_matches(state, _reference(qc), precision="single")


def test_commuting_evolution_becomes_small_rotations():
    labels = ["IIIIIZZ", "IIIIIXX", "IIIIIYY", "IIIIIII", "XYZIIII", "IIIZZII", "XIIZIII"]
    paulis = SparsePauliOp(labels).paulis
    assert all(not paulis.anticommutes(pauli).any() for pauli in paulis)
    qc = _evolution(7, labels, [0.5, -0.3, 0.8, 0.25, 0.6, 0.4, -0.9])
    expected = _reference(qc)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(PauliEvolutionGate, "to_matrix", lambda self: (_ for _ in ()).throw(AssertionError("matrix built")))
        program = translate(qc)
        state = GPUSimulator(device="CPU").run(qc, shots=1, statevector=True).result().get_statevector()
    widths = [len(op.qubits) for op in program.ops if isinstance(op, (P.Unitary, P.Diagonal))]
    assert max(widths) <= 3 and not any(isinstance(op, P.PauliEvolution) for op in program.ops)
    assert any(isinstance(op, P.GlobalPhase) for op in program.ops)  # the identity term
    assert_state_matches(state, expected)


def test_wide_parity_and_basis_changes_are_exact():
    qc = _evolution(12, ["Z" * 12, "X" * 12, "IYXZ" * 3], [0.4, 0.3, -0.2], time=1.0)
    state = GPUSimulator(device="CPU").run(qc, shots=1, statevector=True).result().get_statevector()
    assert_state_matches(state, _reference(qc))


def test_operator_list_and_qaoa():
    qc = QuantumCircuit(2)
    qc.h(0)
    qc.append(PauliEvolutionGate([SparsePauliOp(["XY"], [0.3]), SparsePauliOp(["ZZ", "XI"], [0.5, 0.2])], time=1.0), [0, 1])
    state = GPUSimulator(device="CPU").run(qc, shots=1, statevector=True).result().get_statevector()
    x_y, zz, xi = (SparsePauliOp(label).to_matrix() for label in ("XY", "ZZ", "XI"))
    from scipy.linalg import expm

    expected = expm(-1j * (0.3 * x_y + 0.5 * zz + 0.2 * xi)) @ Statevector.from_label("0+").data
    assert_state_matches(state, expected)

    ring = SparsePauliOp.from_sparse_list([("ZZ", [i, (i + 1) % 8], 1.0) for i in range(8)], num_qubits=8)
    qaoa = QAOAAnsatz(ring, reps=2)
    qaoa = qaoa.assign_parameters([0.3, 0.7, 1.1, 0.2])
    program = translate(qaoa)
    assert max(len(op.qubits) for op in program.ops if hasattr(op, "qubits")) <= 2


def test_wide_library_gate_is_expanded_and_narrow_unitary_stays_dense():
    assert pricing.price(QFTGate(10), tuple(range(10))) == pricing.EXPAND
    assert pricing.price(UnitaryGate(random_unitary(64, seed=1)), tuple(range(6))) is None
    assert pricing.price(QFTGate(4), tuple(range(4))) is None
    qc = QuantumCircuit(10)
    qc.h([0, 3, 7])
    qc.append(QFTGate(10), range(10))
    program = translate(qc)
    assert max(len(op.qubits) for op in program.ops if hasattr(op, "qubits")) <= 2
    assert_state_matches(GPUSimulator(device="CPU").run(qc, shots=1, statevector=True).result().get_statevector(), _reference(qc))


def test_evolution_on_the_gpu_path(fake_gpu):
    qc = _evolution(7, *_random_terms(7, 15, 6))
    expected = _reference(qc)
    state = GPUSimulator(device="GPU").run(qc, shots=1, statevector=True).result().get_statevector()
    assert_state_matches(state, expected)


def test_evolution_on_idle_padded_register_is_relabelled():
    qc = QuantumCircuit(8)
    labels, coefficients = _random_terms(6, 10, 8)
    qc.h(3)
    qc.append(PauliEvolutionGate(SparsePauliOp(labels, coefficients), time=0.5), [1, 2, 4, 5, 6, 7])
    result = GPUSimulator(device="CPU").run(qc, shots=1, statevector=True).result()
    assert result.results[0].metadata["active_qubits"] == [1, 2, 3, 4, 5, 6, 7]
    assert_state_matches(result.get_statevector(), _reference(qc))


@pytest.mark.parametrize("x", [1e-3, 0.5, 4.8, 40.0, 300.0])
def test_engine_bessel_coefficients_match_scipy(x):
    from scipy.special import jv

    from gpu_provider.engine.statevector import _bessel_j

    count = int(x + 40)
    np.testing.assert_allclose(_bessel_j(x, count), jv(np.arange(count), x), atol=1e-14, rtol=0)


def test_memory_check_counts_the_evolution_workspace():
    qc = _evolution(6, *_random_terms(6, 10, 5))
    program = translate(qc)
    from gpu_provider.engine.executor import RunConfig, state_arrays

    assert state_arrays(program, RunConfig()) == 2 + 4
    shot_by_shot = translate(QuantumCircuit(1, 1)).replace(ops=(P.Reset(0), P.Measure(0, 0)))
    assert state_arrays(shot_by_shot, RunConfig(shot_branching=False)) == 3
    # With shot branching, also the copies forked trajectories may keep: log2(shots) of them.
    assert state_arrays(shot_by_shot, RunConfig(shots=1024)) == 3 + 11
