"""Qiskit's BackendSamplerV2 and BackendEstimatorV2 on this backend, against exact values.

Sampler counts are checked with a chi-square test against Statevector
probabilities; estimator values must lie within 5 of their own reported
standard errors (plus a small floor) of ``Statevector.expectation_value``.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from qiskit import ClassicalRegister, QuantumCircuit, QuantumRegister
from qiskit.circuit import Parameter, ParameterVector
from qiskit.primitives import BackendEstimatorV2, BackendSamplerV2
from qiskit.quantum_info import SparsePauliOp, Statevector

from tests.helpers import assert_counts_match, exact_distribution, make_backend

SHOTS = 4000


def ghz(n: int) -> QuantumCircuit:
    circuit = QuantumCircuit(n)
    circuit.h(0)
    for q in range(n - 1):
        circuit.cx(q, q + 1)
    circuit.measure_all()
    return circuit


def sampler(device) -> BackendSamplerV2:
    return BackendSamplerV2(backend=make_backend(device), options={"default_shots": SHOTS, "seed_simulator": 11})


def test_sampler_bell_and_ghz(device):
    circuits = [ghz(2), ghz(3), ghz(5)]
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the primitive passes only options we know
        result = sampler(device).run(circuits).result()
    for circuit, pub_result in zip(circuits, result):
        counts = pub_result.data.meas.get_counts()
        n = circuit.num_qubits
        assert set(counts) <= {"0" * n, "1" * n}
        assert_counts_match(counts, {"0" * n: 0.5, "1" * n: 0.5}, shots=SHOTS)


def test_sampler_parameterized_circuit_with_bound_values(device):
    theta = ParameterVector("theta", 3)
    circuit = QuantumCircuit(3)
    circuit.ry(theta[0], 0)
    circuit.cry(theta[1], 0, 1)
    circuit.rx(theta[2], 2)
    circuit.cx(1, 2)
    circuit.measure_all()
    values = np.array([[0.3, 1.2, -0.7], [2.0, -0.4, 1.5]])
    result = sampler(device).run([(circuit, values)]).result()
    bit_array = result[0].data.meas
    assert bit_array.shape == (2,)
    for i, row in enumerate(values):
        counts = bit_array[i].get_counts()
        assert_counts_match(counts, exact_distribution(circuit.assign_parameters(row)), shots=SHOTS)


def test_sampler_several_registers(device):
    qr = QuantumRegister(3)
    a, b = ClassicalRegister(1, "a"), ClassicalRegister(2, "b")
    circuit = QuantumCircuit(qr, a, b)
    circuit.x(0)
    circuit.h(1)
    circuit.cx(1, 2)
    circuit.measure(0, a[0])
    circuit.measure([1, 2], b)
    result = sampler(device).run([circuit]).result()
    assert result[0].data.a.get_counts() == {"1": SHOTS}
    assert_counts_match(result[0].data.b.get_counts(), {"00": 0.5, "11": 0.5}, shots=SHOTS)


def test_sampler_dynamic_circuit(device):
    circuit = QuantumCircuit(2, 2)
    circuit.h(0)
    circuit.measure(0, 0)
    with circuit.if_test((circuit.clbits[0], 1)):
        circuit.x(1)
    circuit.measure(1, 1)
    result = sampler(device).run([circuit]).result()
    assert_counts_match(result[0].data.c.get_counts(), {"00": 0.5, "11": 0.5}, shots=SHOTS)


def _assert_estimates(evs, stds, exact, label=""):
    evs, stds, exact = np.asarray(evs), np.asarray(stds), np.asarray(exact)
    assert evs.shape == exact.shape, (evs.shape, exact.shape)
    bound = 5 * stds + 1e-3
    assert np.all(np.abs(evs - exact) <= bound), f"{label}: estimates {evs} exact {exact} stds {stds}"


@pytest.mark.parametrize("precision", ["double", "single"])
def test_estimator_parameterized_pauli_expectations(device, precision):
    t = Parameter("t")
    u = Parameter("u")
    circuit = QuantumCircuit(3)
    circuit.ry(t, 0)
    circuit.cx(0, 1)
    circuit.rx(u, 2)
    circuit.cz(1, 2)
    circuit.h(1)
    observables = [
        SparsePauliOp("ZZI"),
        SparsePauliOp("IXX"),
        SparsePauliOp.from_list([("ZIZ", 0.5), ("YYI", -0.3), ("IIX", 1.2)]),
        SparsePauliOp("XYZ"),
    ]
    values = np.array([[0.3, -1.1], [1.7, 0.4], [-2.5, 2.9]])
    estimator = BackendEstimatorV2(
        backend=make_backend(device, precision=precision),
        options={"default_precision": 0.01, "seed_simulator": 5},
    )
    result = estimator.run([(circuit, [[obs] for obs in observables], values)]).result()
    data = result[0].data
    assert data.evs.shape == (len(observables), len(values))
    exact = np.array(
        [[Statevector(circuit.assign_parameters(row)).expectation_value(obs).real for row in values] for obs in observables]
    )
    _assert_estimates(data.evs, data.stds, exact)
    assert np.any(np.abs(exact) > 0.2)  # not a test that only checks zeros


def test_estimator_bell_observables(device):
    circuit = QuantumCircuit(2)
    circuit.h(0)
    circuit.cx(0, 1)
    observables = [SparsePauliOp("ZZ"), SparsePauliOp("XX"), SparsePauliOp("YY"), SparsePauliOp("ZI")]
    estimator = BackendEstimatorV2(backend=make_backend(device), options={"default_precision": 0.01, "seed_simulator": 2})
    result = estimator.run([(circuit, observables)]).result()
    evs = result[0].data.evs
    # ZZ and XX are exactly +1 and YY exactly -1 on a Bell state: every shot agrees.
    np.testing.assert_allclose(evs[:3], [1.0, 1.0, -1.0], atol=1e-12)
    _assert_estimates(evs[3:], result[0].data.stds[3:], [0.0])


def test_estimator_on_a_batch_of_zero_qubit_states():
    """Three parameter sets of a 0-qubit circuit run as one batch of 0-qubit states: each value is
    the identity's coefficient, as Qiskit's StatevectorEstimator gives (the batch's scratch had
    room for two rows' probabilities only)."""
    from qiskit.primitives import StatevectorEstimator

    from gpu_provider import EstimatorV2

    t = Parameter("t")
    pubs = [(QuantumCircuit(0, global_phase=t), SparsePauliOp([""], [2.0]), np.array([[0.1], [0.2], [0.3], [0.4]]))]
    expected = StatevectorEstimator().run(pubs).result()[0].data.evs
    got = EstimatorV2(backend_options={"device": "CPU"}).run(pubs).result()[0].data.evs
    np.testing.assert_allclose(got, expected, atol=1e-12)
    np.testing.assert_allclose(got, [2.0] * 4, atol=1e-12)
