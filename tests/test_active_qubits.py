"""Only the qubits some op touches are simulated; results are as for the full width.

The oracle for counts and memory is the same circuit written on only its used
qubits (same clbits, same seed): the compacted program is that circuit's
program, so every sample must be identical. Statevectors are checked against
``qiskit.quantum_info.Statevector`` of the full-width circuit.
"""

from __future__ import annotations


import numpy as np
import pytest
from qiskit import QuantumCircuit, transpile
from qiskit.quantum_info import Statevector

from gpu_provider import GPUSimulator
from gpu_provider.engine import devices
from gpu_provider.engine import program as P
from gpu_provider.errors import CircuitTooLargeError
from tests.engine.test_gpu_plumbing import fake_gpu  # noqa: F401  (fixture)
from tests.helpers import assert_state_matches


def _spread(width: int, used: list[int]) -> QuantumCircuit:
    """A circuit on ``used`` qubits of a ``width``-qubit register: gates, mid-circuit measure, reset, control flow."""
    a, b, c = used
    qc = QuantumCircuit(width, 3)
    qc.h(a)
    qc.cx(a, b)
    qc.ry(0.7, c)
    qc.measure(a, 0)
    with qc.if_test((qc.clbits[0], 1)):
        qc.x(c)
    qc.reset(a)
    qc.h(a)
    qc.cp(0.3, a, c)
    qc.measure([b, c], [1, 2])
    return qc


@pytest.mark.parametrize("device", ["CPU", "GPU-standin"])
def test_idle_qubits_change_no_sample(device, request):
    if device == "GPU-standin":
        request.getfixturevalue("fake_gpu")
    backend = GPUSimulator(device="GPU" if device == "GPU-standin" else "CPU")
    wide = backend.run(_spread(24, [3, 11, 20]), shots=400, seed_simulator=5, memory=True).result()
    narrow = backend.run(_spread(3, [0, 1, 2]), shots=400, seed_simulator=5, memory=True).result()
    assert wide.get_memory() == narrow.get_memory()
    assert wide.get_counts() == narrow.get_counts()
    metadata = wide.results[0].metadata
    assert metadata["active_qubits"] == [3, 11, 20]
    assert metadata["simulated_qubits"] == 3 and metadata["num_qubits"] == 24
    assert wide.results[0].header["n_qubits"] == 24


def test_sampled_terminal_measurements_match_the_narrow_circuit():
    wide = QuantumCircuit(30, 3)
    narrow = QuantumCircuit(3, 3)
    for qc, (a, b, c) in ((wide, (29, 2, 17)), (narrow, (2, 0, 1))):
        qc.h(a)
        qc.cx(a, b)
        qc.rx(1.1, c)
        qc.measure([a, b, c], [0, 1, 2])
    backend = GPUSimulator(device="CPU")
    wide_result = backend.run(wide, shots=1000, seed_simulator=3, memory=True).result()
    narrow_result = backend.run(narrow, shots=1000, seed_simulator=3, memory=True).result()
    assert wide_result.get_memory() == narrow_result.get_memory()
    assert wide_result.results[0].metadata["measure_sampling"]


@pytest.mark.parametrize("device", ["CPU", "GPU-standin"])
def test_statevector_has_the_full_width(device, request):
    if device == "GPU-standin":
        request.getfixturevalue("fake_gpu")
    qc = QuantumCircuit(9)
    qc.h(6)
    qc.cx(6, 2)
    qc.u(0.3, 1.2, -0.4, 4)
    qc.cp(0.9, 4, 2)
    backend = GPUSimulator(device="GPU" if device == "GPU-standin" else "CPU")
    result = backend.run(qc, shots=1, statevector=True).result()
    assert result.results[0].metadata["active_qubits"] == [2, 4, 6]
    assert_state_matches(result.get_statevector(), qc)


def test_initial_statevector_simulates_every_qubit():
    rng = np.random.default_rng(1)
    vector = rng.normal(size=16) + 1j * rng.normal(size=16)
    vector /= np.linalg.norm(vector)
    qc = QuantumCircuit(4)
    qc.h(1)
    result = GPUSimulator().run(qc, shots=1, statevector=True, initial_statevector=vector).result()
    assert result.results[0].metadata["active_qubits"] == [0, 1, 2, 3]
    assert_state_matches(result.get_statevector(), Statevector(vector).evolve(qc).data)


def test_layout_transpiled_circuit_runs_on_its_used_qubits():
    backend = GPUSimulator(device="CPU")
    qc = QuantumCircuit(2)
    qc.h(0)
    qc.cx(0, 1)
    qc.measure_all()
    transpiled = transpile(qc, backend, initial_layout=[7, 12], seed_transpiler=1)
    assert transpiled.num_qubits == backend.target.num_qubits
    result = backend.run(transpiled, shots=2000, seed_simulator=9).result()
    counts = result.get_counts()
    assert set(counts) == {"00", "11"} and 850 < counts["00"] < 1150
    assert result.results[0].metadata["active_qubits"] == [7, 12]


def test_memory_check_applies_to_the_simulated_width():
    qc = QuantumCircuit(60, 2)  # 2^60 amplitudes would never fit; two of them are used
    qc.h(41)
    qc.cx(41, 59)
    qc.measure([41, 59], [0, 1])
    counts = GPUSimulator(device="CPU").run(qc, shots=200, seed_simulator=1).result().get_counts()
    assert set(counts) == {"00", "11"}


def test_full_width_statevector_that_does_not_fit_is_a_clear_error(monkeypatch):

    qc = QuantumCircuit(26)
    qc.h(0)
    monkeypatch.setattr(devices, "host_available_bytes", lambda: 1 << 20)
    with pytest.raises(CircuitTooLargeError, match=r"statevector=True returns all 26 qubits.*1 of them are used") as info:
        GPUSimulator(device="CPU").run(qc, statevector=True)
    assert info.value.num_qubits == 26 and info.value.bytes_free == 1 << 20


def test_compact_relabels_every_kind_of_op():
    body = (P.Unitary((5,), np.eye(2), controls=(9,)), P.Measure(5, 0))
    program = P.Program(
        num_qubits=12,
        num_clbits=1,
        ops=(
            P.Diagonal((9,), np.ones(2)),
            P.IfElse(P.Bits((0,), True), body, (P.Reset(3),)),
            P.ForLoop((body, body)),
            P.GlobalPhase(0.5),
        ),
    )
    compacted = P.compact(program)
    assert compacted.layout == (3, 5, 9) and compacted.num_qubits == 3 and compacted.width == 12
    diagonal, if_else, for_loop, phase = compacted.ops
    assert diagonal.qubits == (2,)
    assert if_else.true_body[0].qubits == (1,) and if_else.true_body[0].controls == (2,)
    assert if_else.false_body[0].qubit == 0
    assert for_loop.iterations[0] is for_loop.iterations[1]
    assert phase.phase == 0.5
    assert P.compact(compacted) is compacted
    full = P.Program(2, 0, (P.Unitary((0, 1), np.eye(4)),))
    assert P.compact(full) is full


def test_expand_state_places_qubits_by_layout():
    vector = np.array([0.6, 0.0, 0.0, 0.8j])
    full = P.expand_state(vector, (1, 3), 4)
    expected = np.zeros(16, dtype=complex)
    expected[0], expected[0b1010] = 0.6, 0.8j
    np.testing.assert_array_equal(full, expected)


def test_wide_for_loop_with_an_idle_qubit_stays_lazy():
    from qiskit.circuit import Parameter

    p = Parameter("p")
    qc = QuantumCircuit(3, 1)  # qubit 1 idle: the program is compacted
    scale = np.pi / sum(range(9000))  # the rotations add up to pi: |1> for sure
    with qc.for_loop(range(9000), p):
        qc.rx(p * scale, 0)
    qc.measure(0, 0)
    result = GPUSimulator(device="CPU").run(qc, shots=3, seed_simulator=3).result()
    assert result.get_counts() == {"1": 3}
    assert result.results[0].metadata["simulated_qubits"] == 1
