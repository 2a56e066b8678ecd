"""The Result layout, compared field by field with Qiskit's BasicSimulator.

Deterministic circuits (outcomes fixed by X gates) make the two simulators'
data directly comparable; random ones are compared with exact distributions.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from qiskit import ClassicalRegister, QuantumCircuit, QuantumRegister
from qiskit.circuit import Clbit, Qubit
from qiskit.providers.basic_provider import BasicSimulator
from qiskit.quantum_info import Statevector

from gpu_provider.errors import InvalidInputError
from tests.helpers import assert_counts_match, assert_state_matches, exact_distribution, make_backend, random_entangled_state

HEX = re.compile(r"^0x[0-9a-f]+$")
HEADER_FIELDS = ("name", "n_qubits", "qreg_sizes", "creg_sizes", "memory_slots", "global_phase", "metadata")


def deterministic_circuits() -> list[QuantumCircuit]:
    """Circuits whose outcome is fixed, in several register layouts."""
    q = QuantumRegister(4, "q")
    a, b = ClassicalRegister(2, "a"), ClassicalRegister(3, "b")
    two_registers = QuantumCircuit(q, a, b, name="two_registers", metadata={"experiment": 7, "tag": "x"}, global_phase=0.25)
    two_registers.x([0, 2])
    two_registers.measure(0, a[1])  # a = 10
    two_registers.measure(1, a[0])
    two_registers.measure(2, b[0])  # b = 001 (b[1], b[2] never written)
    one_register = QuantumCircuit(3, 3, name="one_register")
    one_register.x(1)
    one_register.measure([0, 1, 2], [2, 1, 0])
    loose = QuantumCircuit([Qubit(), Qubit()], [Clbit(), Clbit()], name="loose_bits")
    loose.x(0)
    loose.measure([0, 1], [1, 0])
    unmeasured = QuantumCircuit(QuantumRegister(2, "r"), ClassicalRegister(2, "c"), name="clbits_never_written")
    unmeasured.x(0)
    no_clbits = QuantumCircuit(2, name="no_clbits")
    no_clbits.h(0)
    return [two_registers, one_register, loose, unmeasured, no_clbits]


@pytest.mark.parametrize("index", range(5), ids=[c.name for c in deterministic_circuits()])
def test_data_and_header_match_basic_simulator(device, index):
    circuit = deterministic_circuits()[index]
    ours = make_backend(device).run(circuit, shots=7, memory=True, seed_simulator=1).result()
    reference = BasicSimulator().run(circuit, shots=7, memory=True, seed_simulator=1).result()
    assert ours.data(0) == reference.data(0)
    ours_header = ours.results[0].header
    reference_header = reference.results[0].header
    for field in HEADER_FIELDS:
        assert ours_header[field] == reference_header[field], field
    assert ours_header == reference_header
    if circuit.num_clbits:
        assert ours.get_counts() == reference.get_counts()
        assert ours.get_memory() == reference.get_memory()


def test_several_registers_format(device):
    circuit = deterministic_circuits()[0]
    result = make_backend(device).run(circuit, shots=5, memory=True).result()
    assert result.get_counts() == {"001 10": 5}
    assert result.get_memory() == ["001 10"] * 5
    assert result.data(0)["counts"] == {"0x6": 5}  # clbits: a[1] (1) and b[0] (2) set
    assert result.data(0)["memory"] == ["0x6"] * 5
    header = result.results[0].header
    assert header["creg_sizes"] == [["a", 2], ["b", 3]]
    assert header["qreg_sizes"] == [["q", 4]]
    assert header["memory_slots"] == 5
    assert header["n_qubits"] == 4
    assert header["global_phase"] == pytest.approx(0.25)
    assert header["metadata"] == {"experiment": 7, "tag": "x"}
    assert header["name"] == "two_registers"


def test_counts_and_memory_are_hex_and_consistent(device):
    rng = np.random.default_rng(1)
    circuit = QuantumCircuit(QuantumRegister(5, "q"), ClassicalRegister(3, "lo"), ClassicalRegister(2, "hi"))
    random_entangled_state(circuit, rng)
    circuit.measure(range(5), [4, 0, 3, 1, 2])
    shots = 3000
    result = make_backend(device).run(circuit, shots=shots, memory=True, seed_simulator=2).result()
    data = result.data(0)
    assert all(HEX.match(key) for key in data["counts"]), data["counts"]
    assert all(HEX.match(value) for value in data["memory"])
    assert len(data["memory"]) == shots
    assert sum(data["counts"].values()) == shots
    from collections import Counter

    assert Counter(data["memory"]) == data["counts"]
    assert Counter(result.get_memory()) == result.get_counts()
    assert all(re.fullmatch(r"[01]{2} [01]{3}", key) for key in result.get_counts())
    assert_counts_match(result.get_counts(), exact_distribution(circuit), shots=shots)


def test_no_memory_unless_asked(device):
    circuit = deterministic_circuits()[1]
    result = make_backend(device).run(circuit, shots=3).result()
    assert "memory" not in result.data(0)
    assert "statevector" not in result.data(0)


def test_one_experiment_per_circuit_in_order(device):
    circuits = deterministic_circuits()[:3]
    result = make_backend(device).run(circuits, shots=4, memory=True).result()
    assert len(result.results) == 3
    assert [r.header["name"] for r in result.results] == [c.name for c in circuits]
    assert result.get_counts(0) == {"001 10": 4}
    assert result.get_counts(1) == {"010": 4}
    assert result.get_counts(circuits[2]) == {"10": 4}
    assert result.get_counts("one_register") == {"010": 4}
    assert result.get_memory(1) == ["010"] * 4
    assert result.get_counts() == [{"001 10": 4}, {"010": 4}, {"10": 4}]
    assert all(r.shots == 4 and r.success for r in result.results)


def test_result_fields_and_metadata(device):
    backend = make_backend(device)
    circuit = deterministic_circuits()[1]
    job = backend.run(circuit, shots=9, seed_simulator=5)
    result = job.result()
    assert result.success
    assert result.backend_name == backend.name
    assert result.job_id == job.job_id()
    assert result.time_taken >= 0
    assert result.metadata["precision"] == "double"
    experiment = result.results[0]
    assert experiment.seed_simulator == 5
    assert experiment.shots == 9
    assert experiment.status == "DONE"
    assert experiment.metadata["time_taken"] >= 0
    assert experiment.metadata["precision"] == "double"
    expected_device = "CPU" if device == "CPU" else "GPU:0"
    assert experiment.metadata["device"] == expected_device
    assert result.metadata["device"] == expected_device
    single = backend.run(circuit, shots=9, precision="single").result()
    assert single.results[0].metadata["precision"] == "single"
    assert single.metadata["precision"] == "single"


@pytest.mark.parametrize("precision", ["double", "single"])
def test_statevector_for_each_circuit(device, precision):
    rng = np.random.default_rng(3)
    circuits = []
    for n in (2, 4, 6):
        circuit = QuantumCircuit(n, n, name=f"sv{n}")
        random_entangled_state(circuit, rng)
        circuit.measure(range(n), range(n))  # final measurements: removed for the statevector
        circuits.append(circuit)
    shots = 2000
    result = make_backend(device, precision=precision).run(circuits, shots=shots, statevector=True, seed_simulator=4).result()
    for i, circuit in enumerate(circuits):
        state = np.asarray(result.get_statevector(i))
        assert state.dtype == (np.complex128 if precision == "double" else np.complex64)
        assert_state_matches(state, Statevector(circuit.remove_final_measurements(inplace=False)).data, precision)
        assert_counts_match(result.get_counts(i), exact_distribution(circuit), shots=shots)
    assert np.asarray(result.get_statevector(circuits[1])).shape == (16,)


def test_statevector_refused_for_mid_circuit_measurement(device):
    backend = make_backend(device)
    fine = QuantumCircuit(1, 1)
    fine.h(0)
    fine.measure(0, 0)
    mid = QuantumCircuit(2, 2)
    mid.h(0)
    mid.measure(0, 0)
    mid.cx(0, 1)  # acts after the measurement
    with pytest.raises(InvalidInputError, match="statevector"):
        backend.run(mid, statevector=True)
    with pytest.raises(InvalidInputError):
        backend.run([fine, mid], statevector=True)
    # A reset without mid-circuit measurement is allowed: the state of one trajectory (as Aer).
    reset = QuantumCircuit(1)
    reset.h(0)
    reset.reset(0)
    np.testing.assert_allclose(backend.run(reset, statevector=True).result().get_statevector(), [1, 0], atol=1e-12)
    branching = QuantumCircuit(1, 1)
    branching.measure(0, 0)
    with branching.if_test((branching.clbits[0], 1)):
        branching.x(0)
    with pytest.raises(InvalidInputError):
        backend.run(branching, statevector=True)
    # The same backend runs the legal circuit afterwards.
    result = backend.run(fine, statevector=True, shots=1000, seed_simulator=1).result()
    np.testing.assert_allclose(result.get_statevector(0), [2**-0.5, 2**-0.5], atol=1e-12)
    assert_counts_match(result.get_counts(), {"0": 0.5, "1": 0.5}, shots=1000)


def test_measure_then_gate_on_another_qubit_still_samples_from_the_final_state(device):
    # Measuring q0 then acting on q1 only: still one simulation, statevector allowed.
    circuit = QuantumCircuit(2, 2)
    circuit.h(0)
    circuit.measure(0, 0)
    circuit.ry(0.8, 1)
    circuit.measure(1, 1)
    result = make_backend(device).run(circuit, statevector=True, shots=2000, seed_simulator=6).result()
    assert_state_matches(result.get_statevector(0), circuit)
    assert_counts_match(result.get_counts(), exact_distribution(circuit), shots=2000)
