"""Parametrized circuits compiled once (compiler/parameters.py) against Qiskit's Statevector."""

from __future__ import annotations

import numpy as np
import pytest
from qiskit import QuantumCircuit
from qiskit.circuit import Gate, Parameter, ParameterVector
from qiskit.circuit.library import efficient_su2
from qiskit.quantum_info import Statevector

from gpu_provider.compiler import parameters as params_module
from gpu_provider.compiler.parameters import FusionOptions, compile_circuit
from gpu_provider.engine.devices import resolve_device
from gpu_provider.engine.executor import RunConfig, run_program
from gpu_provider.errors import InvalidInputError


def final_state(program) -> np.ndarray:
    device, _ = resolve_device("CPU", 0)
    return run_program(program, device, RunConfig(shots=1, statevector=True)).statevector


def assert_same_state(program, circuit, values):
    expected = Statevector(circuit.assign_parameters(values)).data
    actual = final_state(program)
    assert np.allclose(actual, expected, atol=1e-10), np.max(np.abs(actual - expected))


class Wrapped(Gate):
    """A non-standard gate with a parametrized definition (expanded into slots)."""

    def __init__(self, theta):
        super().__init__("wrapped", 2, [theta])

    def _define(self):
        qc = QuantumCircuit(2, global_phase=self.params[0] / 2)
        qc.rx(2 * self.params[0], 0)
        qc.cp(self.params[0] + 0.1, 0, 1)
        self.definition = qc


def mixed_circuit(n: int) -> QuantumCircuit:
    theta = ParameterVector("t", 6)
    phi = Parameter("phi")
    qc = QuantumCircuit(n, global_phase=phi)
    for q in range(n):
        qc.h(q)
        qc.rz(theta[q % 6] * 2 + 0.3, q)
    for q in range(n - 1):
        qc.cx(q, q + 1)
        qc.crx(theta[(q + 1) % 6], q + 1, q)
        qc.rzz(phi, q, (q + 2) % n)
    qc.append(Wrapped(theta[2] - phi), [0, n - 1])
    qc.u(theta[0], phi, 0.4, n - 1)
    qc.cu(theta[1], 0.2, phi, 0.1, 0, 1, ctrl_state=0)
    return qc


@pytest.mark.parametrize("fusion", [False, True])
@pytest.mark.parametrize("n", [3, 15])
def test_bound_programs_match_assign_parameters(n, fusion):
    qc = mixed_circuit(n)
    compiled = compile_circuit(qc, FusionOptions(enable=fusion, threshold=1))
    assert not compiled.per_binding_translation and compiled.num_slots > 0
    rng = np.random.default_rng(n)
    for _ in range(3):
        values = rng.uniform(-np.pi, np.pi, qc.num_parameters)
        assert_same_state(compiled.bind(values), qc, values)


def test_binding_rebuilds_only_parametrized_ops(monkeypatch):
    qc = QuantumCircuit(14)
    for q in range(5):  # constant gates on qubits 0..4: blocks without parameters
        qc.h(q)
        qc.t(q)
    for q in range(4):
        qc.cx(q, q + 1)
    qc.compose(efficient_su2(9, reps=2), range(5, 14), inplace=True)
    compiled = compile_circuit(qc, FusionOptions(threshold=1))
    calls = []
    monkeypatch.setattr(params_module, "translate", lambda *a, **k: calls.append(a))  # no re-translation
    first = compiled.bind(np.zeros(qc.num_parameters))
    second = compiled.bind(np.ones(qc.num_parameters))
    assert not calls
    assert len(first.ops) == len(second.ops) == len(compiled.plan)
    kinds = [kind for kind, _ in compiled.plan]
    assert "op" in kinds and "block" in kinds
    for (kind, _), a, b in zip(compiled.plan, first.ops, second.ops):
        assert (a is b) == (kind == "op")  # constant ops are shared, only slot-holding ones are rebuilt
    assert_same_state(second, qc, np.ones(qc.num_parameters))


def test_circuits_without_parameters_compile_once():
    qc = QuantumCircuit(2)
    qc.h(0)
    qc.cx(0, 1)
    compiled = compile_circuit(qc)
    assert compiled.bind([]) is compiled.bind(np.zeros(0))


def test_parameters_inside_control_flow_fall_back_to_per_binding_translation():
    theta = Parameter("theta")
    qc = QuantumCircuit(2, 1)
    qc.h(0)
    qc.measure(0, 0)
    with qc.if_test((qc.clbits[0], 1)):
        qc.ry(theta, 1)
    compiled = compile_circuit(qc)
    assert compiled.per_binding_translation
    program = compiled.bind([0.7])
    assert program.num_qubits == 2


class MatrixOnly(Gate):
    """A parametrized gate whose definition can only be built once its parameter is bound."""

    def __init__(self, theta):
        super().__init__("matrix_only", 1, [theta])

    def _define(self):
        theta = float(self.params[0])  # TypeError while unbound
        qc = QuantumCircuit(1)
        qc.rx(theta, 0)
        qc.rz(2 * theta, 0)
        self.definition = qc


def test_gates_that_need_their_parameters_bound_are_translated_per_binding():
    """A HamiltonianGate whose time is a parameter, and a gate whose definition fails while its
    parameter is unbound: both translate per binding (a TypeError from run() before)."""
    from qiskit.circuit.library import HamiltonianGate

    t = Parameter("t")
    qc = QuantumCircuit(2)
    qc.h(1)
    qc.append(HamiltonianGate(np.array([[1.0, 0.5], [0.5, -1.0]]), time=t), [0])
    qc.append(MatrixOnly(t * 2), [1])
    qc.cx(0, 1)
    compiled = compile_circuit(qc)
    assert compiled.per_binding_translation
    for value in (0.3, 1.2):
        assert_same_state(compiled.bind([value]), qc, [value])


def test_wrong_number_of_values_and_non_finite_values():
    qc = mixed_circuit(3)
    compiled = compile_circuit(qc)
    count = qc.num_parameters
    with pytest.raises(InvalidInputError, match=f"has {count} parameters but 2 values"):
        compiled.bind([0.1, 0.2])
    with pytest.raises(InvalidInputError, match="finite"):
        compiled.bind([np.nan] * count)
    assert_same_state(compiled.bind(np.arange(count) / count), qc, np.arange(count) / count)


@pytest.mark.parametrize("name", sorted(params_module._VECTORIZED))
def test_vectorized_gate_matrices_match_qiskit(name):
    from qiskit.circuit.library import get_standard_gate_name_mapping

    gate_type = type(get_standard_gate_name_mapping()[name])
    count = len(get_standard_gate_name_mapping()[name].params)
    values = np.random.default_rng(len(name)).uniform(-4, 4, size=(5, count))
    matrices = params_module._VECTORIZED[name](*values.T)
    for row, matrix in zip(values, matrices):
        np.testing.assert_allclose(matrix, gate_type(*row).to_matrix(), atol=1e-14)


def test_bind_columns_match_bind_for_every_row():
    from gpu_provider.engine.batch import columns_of

    qc = mixed_circuit(5)
    qc.rxx(qc.parameters[0] * qc.parameters[1], 0, 2)  # non-affine, not vectorized: row by row
    qc.cry(qc.parameters[2], 1, 3, ctrl_state=0)  # non-default control state: Qiskit's matrix
    for fusion in (FusionOptions(enable=False), FusionOptions(threshold=1)):
        compiled = compile_circuit(qc, fusion)
        assert compiled.can_batch
        values = np.random.default_rng(4).uniform(-np.pi, np.pi, size=(4, qc.num_parameters))
        batched = compiled.bind_columns(values)
        expected = columns_of([compiled.bind(row) for row in values])
        assert len(batched) == len(expected)
        for mine, theirs in zip(batched, expected):
            assert mine.kind == theirs.kind and tuple(mine.qubits) == tuple(theirs.qubits)
            np.testing.assert_allclose(np.broadcast_to(mine.data, np.shape(theirs.data)) if not theirs.stacked else mine.data, theirs.data, atol=1e-12)
