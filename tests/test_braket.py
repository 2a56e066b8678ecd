"""Amazon Braket: LocalSimulator("gpu_provider") agrees with LocalSimulator("braket_sv").

Skipped where the ``braket`` extra is not installed; CI installs it.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.helpers import import_host  # noqa: E402

import_host("braket.devices")

from braket.circuits import Circuit, FreeParameter, Observable  # noqa: E402
from braket.devices import LocalSimulator  # noqa: E402
from braket.ir.openqasm import Program  # noqa: E402

from gpu_provider.braket_simulator import BRAKET_GROUP, GPUBraketSimulator  # noqa: E402
from tests.helpers import DEVICES, assert_counts_match  # noqa: E402

TOLERANCE = {"double": 1e-9, "single": 2e-5}

BELL = """
OPENQASM 3.0;
qubit[2] q;
h q[0];
cnot q[0], q[1];
#pragma braket result expectation z(q[0]) @ z(q[1])
#pragma braket result probability
#pragma braket result state_vector
#pragma braket result amplitude "00", "01", "11"
"""

GHZ = """
OPENQASM 3.0;
qubit[5] q;
h q[0];
for int i in [0:3] { cnot q[i], q[i + 1]; }
#pragma braket result probability q[4], q[0], q[2]
#pragma braket result expectation x(q[0]) @ x(q[1]) @ x(q[2]) @ x(q[3]) @ x(q[4])
#pragma braket result variance z(q[3])
#pragma braket result state_vector
"""

QFT = """
OPENQASM 3.0;
qubit[4] q;
x q[0];
x q[2];
h q[3];
cphaseshift(pi / 2) q[2], q[3];
cphaseshift(pi / 4) q[1], q[3];
cphaseshift(pi / 8) q[0], q[3];
h q[2];
cphaseshift(pi / 2) q[1], q[2];
cphaseshift(pi / 4) q[0], q[2];
h q[1];
cphaseshift(pi / 2) q[0], q[1];
h q[0];
swap q[0], q[3];
swap q[1], q[2];
#pragma braket result state_vector
#pragma braket result probability q[0], q[1]
#pragma braket result expectation y(q[1]) @ h(q[3])
"""

ROTATIONS = """
OPENQASM 3.0;
input float theta;
input float phi;
qubit[3] q;
rx(theta) q[0];
ry(phi) q[1];
rz(theta + phi) q[2];
xx(phi) q[0], q[2];
U(theta, phi, 0.3) q[1];
prx(theta, phi) q[2];
ms(0.1, 0.2, theta) q[0], q[1];
#pragma braket result expectation z(q[0])
#pragma braket result expectation x all
#pragma braket result variance y(q[1]) @ z(q[2])
#pragma braket result expectation hermitian([[1, 2-1im], [2+1im, -0.5]]) q[2]
#pragma braket result variance hermitian([[1, 0, 0, 1im], [0, 2, 0, 0], [0, 0, 3, 0], [-1im, 0, 0, 4]]) q[2], q[0]
#pragma braket result state_vector
"""

MODIFIERS = """
OPENQASM 3.0;
qubit[4] q;
gate entangle(a) c, t { h c; ctrl @ rx(a) c, t; }
h q;
entangle(0.7) q[0], q[3];
negctrl @ x q[1], q[2];
ctrl(2) @ s q[0], q[1], q[3];
inv @ t q[2];
pow(0.5) @ x q[1];
pow(2) @ iswap q[0], q[2];
ctrl @ gphase(0.4) q[3];
gphase(0.25);
ccnot q[3], q[1], q[0];
cswap q[2], q[0], q[3];
cv q[1], q[2];
ecr q[3], q[0];
gpi(0.3) q[1];
gpi2(0.6) q[2];
pswap(0.2) q[1], q[3];
xy(0.4) q[0], q[1];
#pragma braket unitary([[0, -1im], [1im, 0]]) q[2]
#pragma braket unitary([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1], [0, 0, 1, 0]]) q[3], q[1]
#pragma braket result state_vector
#pragma braket result expectation z(q[0]) @ y(q[2])
#pragma braket result probability q[3], q[1]
"""

SPARSE_QUBITS = """
OPENQASM 3.0;
qubit[8] q;
h q[1];
cnot q[1], q[6];
rx(0.4) q[3];
#pragma braket result probability q[6], q[3]
#pragma braket result expectation z(q[1]) @ z(q[6])
#pragma braket result state_vector
"""

PROGRAMS = {"bell": (BELL, {}), "ghz": (GHZ, {}), "qft": (QFT, {}), "rotations": (ROTATIONS, {"theta": 0.42, "phi": -1.3}),
            "modifiers": (MODIFIERS, {}), "sparse_qubits": (SPARSE_QUBITS, {})}  # fmt: skip


def _assert_values_match(ours, reference, tol):
    assert len(ours) == len(reference)
    for mine, theirs in zip(ours, reference):
        if isinstance(theirs, dict):
            assert mine.keys() == theirs.keys()
            for key in theirs:
                assert abs(complex(mine[key]) - complex(theirs[key])) < tol
        else:
            np.testing.assert_allclose(np.asarray(mine), np.asarray(theirs), atol=tol, rtol=0)


@pytest.fixture(scope="module")
def braket_sv():
    return LocalSimulator("braket_sv")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("precision", ["double", "single"])
@pytest.mark.parametrize("name", sorted(PROGRAMS))
def test_exact_result_types_match_braket_sv(braket_sv, name, precision, device):
    source, inputs = PROGRAMS[name]
    program = Program(source=source, inputs=inputs)
    reference = braket_sv.run(program, shots=0).result()
    ours = LocalSimulator("gpu_provider").run(program, shots=0, device=device, precision=precision).result()
    _assert_values_match(ours.values, reference.values, TOLERANCE[precision])
    assert ours.task_metadata.deviceId == "gpu_provider"


@pytest.mark.parametrize("device", DEVICES)
def test_braket_circuits_match_braket_sv(braket_sv, device):
    theta = FreeParameter("theta")
    circuit = (
        Circuit().h(0).cnot(0, 1).rx(2, theta).cphaseshift(1, 2, 0.3).yy(0, 2, 0.8).unitary([1], np.array([[0, 1], [1, 0]]))
        .expectation(Observable.Z() @ Observable.X(), target=[0, 2])
        .variance(Observable.H(), target=[1])
        .probability([2, 0])
        .amplitude(["000", "101"])
        .state_vector()
    )  # fmt: skip
    reference = braket_sv.run(circuit, shots=0, inputs={"theta": 0.3}).result()
    ours = LocalSimulator("gpu_provider").run(circuit, shots=0, inputs={"theta": 0.3}, device=device).result()
    _assert_values_match(ours.values, reference.values, 1e-9)


@pytest.mark.parametrize("device", DEVICES)
def test_sampled_measurements_fit_braket_sv_probabilities(braket_sv, device):
    circuit = Circuit().h(0).cnot(0, 1).ry(2, 0.9).cnot(2, 4).measure([4, 0, 2])
    # braket_sv's exact marginal over sorted targets (q0, q2, q4), re-ordered to (q4, q0, q2).
    sorted_marginal = braket_sv.run(Circuit().h(0).cnot(0, 1).ry(2, 0.9).cnot(2, 4).probability([0, 2, 4]), shots=0).result().values[0]
    exact = np.asarray(sorted_marginal).reshape(2, 2, 2).transpose(2, 0, 1).reshape(-1)
    ours = LocalSimulator("gpu_provider").run(circuit, shots=4000, device=device, seed=5).result()
    reference = braket_sv.run(circuit, shots=4000).result()
    assert ours.measured_qubits == reference.measured_qubits == [4, 0, 2]
    assert ours.measurements.shape == (4000, 3)
    probabilities = {format(i, "03b"): float(p) for i, p in enumerate(exact) if p > 1e-12}
    assert_counts_match(dict(ours.measurement_counts), probabilities, shots=4000)
    assert_counts_match(dict(reference.measurement_counts), probabilities, shots=4000)


def test_unsorted_probability_targets_follow_the_sampled_semantics(braket_sv):
    """Probability over targets in a non-monotone order: bit order follows the targets as given.

    braket_sv's own sampled answer (the SDK reads the columns in target order) agrees with ours;
    its exact shots=0 answer for some such orders does not (it permutes the bits), so here
    ours is checked against braket_sv's sorted-target marginal and its sampled answer.
    """
    body = Circuit().h(0).cnot(0, 1).ry(2, 0.9).cnot(2, 4).x(1)
    sorted_marginal = np.asarray(braket_sv.run(body.copy().probability([0, 2, 4]), shots=0).result().values[0]).reshape(2, 2, 2)
    for targets, axes in (([4, 0, 2], (2, 0, 1)), ([2, 4, 0], (1, 2, 0))):
        ours = LocalSimulator("gpu_provider").run(body.copy().probability(targets), shots=0).result().values[0]
        np.testing.assert_allclose(ours, sorted_marginal.transpose(axes).reshape(-1), atol=1e-12)
        sampled = braket_sv.run(body.copy().probability(targets), shots=20000).result().values[0]
        assert np.max(np.abs(np.asarray(sampled) - ours)) < 0.03


@pytest.mark.parametrize("device", DEVICES)
def test_sampled_result_types_come_from_rotated_measurements(braket_sv, device):
    circuit = Circuit().h(0).cnot(0, 1).rx(1, 0.4).cnot(1, 2).expectation(Observable.X() @ Observable.X(), target=[0, 1]).variance(Observable.Y(), 2)
    exact = braket_sv.run(circuit, shots=0).result().values
    ours = LocalSimulator("gpu_provider").run(circuit, shots=20000, device=device, seed=3).result().values
    # Standard errors are below 0.007 for 20000 shots; 6 of them is far beyond chance.
    assert ours[0] == pytest.approx(exact[0], abs=0.04)
    assert ours[1] == pytest.approx(exact[1], abs=0.04)


def test_seed_repeats_samples():
    circuit = Circuit().h(0).h(1).h(2)
    simulator = LocalSimulator("gpu_provider")
    first = simulator.run(circuit, shots=50, seed=9).result().measurements
    second = simulator.run(circuit, shots=50, seed=9).result().measurements
    np.testing.assert_array_equal(first, second)


# ---------------------------------------------------------------------------
# discovery and properties


def test_discovered_by_braket_lookup():
    from importlib.metadata import entry_points

    assert "gpu_provider" in LocalSimulator.registered_backends()
    (entry,) = [ep for ep in entry_points(group=BRAKET_GROUP) if ep.name == "gpu_provider"]
    assert entry.load() is GPUBraketSimulator
    assert isinstance(LocalSimulator("gpu_provider")._delegate, GPUBraketSimulator)


def test_properties_declare_operations_and_result_types():
    from braket.device_schema import DeviceActionType

    action = LocalSimulator("gpu_provider").properties.action[DeviceActionType.OPENQASM]
    assert {"h", "cnot", "rx", "cphaseshift", "unitary", "U", "GPhase", "ms"} <= set(action.supportedOperations)
    assert {rt.name for rt in action.supportedResultTypes} == {"Sample", "Expectation", "Variance", "Probability", "StateVector", "Amplitude"}
    assert {m.name for m in action.supportedModifiers} == {"ctrl", "negctrl", "pow", "inv"}
    assert GPUBraketSimulator(device="CPU").properties.paradigm.qubitCount >= 20


def test_device_and_precision_selectable():
    circuit = Circuit().h(0).cnot(0, 1).state_vector()
    single = LocalSimulator(GPUBraketSimulator(device="CPU", precision="single")).run(circuit, shots=0).result().values[0]
    double = LocalSimulator("gpu_provider").run(circuit, shots=0, precision="double").result().values[0]
    np.testing.assert_allclose(single, [2**-0.5, 0, 0, 2**-0.5], atol=1e-6)
    np.testing.assert_allclose(double, [2**-0.5, 0, 0, 2**-0.5], atol=1e-12)
    with pytest.raises(ValueError, match="precision"):
        GPUBraketSimulator(precision="half")


def test_gpu_without_gpu_is_an_error():
    from gpu_provider.engine.devices import probe_gpu
    from gpu_provider.errors import DeviceUnavailableError

    if probe_gpu().usable:
        pytest.skip("a GPU is usable here")
    with pytest.raises(DeviceUnavailableError, match="no GPU is usable"):
        LocalSimulator("gpu_provider").run(Circuit().h(0).state_vector(), shots=0, device="GPU")


# ---------------------------------------------------------------------------
# bad input: Braket's conventional errors, and the simulator stays usable


BAD_INPUT = [
    ("OPENQASM 3.0; qubit[2] q; h q[0]; cnot q[0]", {}, 0, ValueError, "parse"),
    ("OPENQASM 3.0; qubit[1] q; h q[0]; frobnicate q[0];", {}, 10, Exception, "frobnicate"),
    ("OPENQASM 3.0; qubit[2] q; h q[0];\n#pragma braket result density_matrix q[0]", {}, 0, TypeError, "DensityMatrix is not supported"),
    ("OPENQASM 3.0; qubit[1] q; h q[0];\n#pragma braket noise bit_flip(0.1) q[0]", {}, 10, TypeError, "not supported"),
    ("OPENQASM 3.0; qubit[1] q; h q[0];", {}, 0, ValueError, "Result types must be specified"),
    ("OPENQASM 3.0; qubit[1] q; h q[0];\n#pragma braket result sample z(q[0])", {}, 0, ValueError, "sample can only"),
    ("OPENQASM 3.0; qubit[1] q; h q[0];\n#pragma braket result state_vector", {}, 10, ValueError, "not available when shots>0"),
    ("OPENQASM 3.0; qubit[2] q; h q[0]; h q[1];\n#pragma braket result amplitude \"0\"", {}, 0, ValueError, "Length of state"),
    ("OPENQASM 3.0; input float a; qubit[1] q; rx(a) q[0];", {}, 10, NameError, "a"),
    ("OPENQASM 3.0; qubit[2] q; bit b; h q[0]; b = measure q[0]; if (b) { x q[1]; }", {}, 10, ValueError, "measures at the end"),
    ("OPENQASM 3.0; qubit[2] q; bit b; h q[0]; b = measure q[0]; h q[0];", {}, 10, ValueError, "measures at the end"),
    ("OPENQASM 3.0; qubit[1] q; h q[0]; reset q[0];", {}, 10, TypeError, "reset is not supported"),
]


@pytest.mark.parametrize("source, inputs, shots, error, message", BAD_INPUT)
def test_bad_programs_raise_and_simulator_stays_usable(source, inputs, shots, error, message):
    simulator = LocalSimulator("gpu_provider")
    with pytest.raises(error, match=message):
        simulator.run(Program(source=source, inputs=inputs), shots=shots).result()
    value = simulator.run(Circuit().h(0).cnot(0, 1).probability(), shots=0).result().values[0]
    np.testing.assert_allclose(value, [0.5, 0, 0, 0.5], atol=1e-12)


@pytest.mark.parametrize("shots", [-1, 10**10, 2.5, "10", True])
def test_shots_out_of_range(shots):
    simulator = GPUBraketSimulator()
    with pytest.raises(ValueError, match="shots must be an integer"):
        simulator.run(Program(source="OPENQASM 3.0; qubit[1] q; h q[0];"), shots=shots)
    assert simulator.run(Program(source="OPENQASM 3.0; qubit[1] q; x q[0];"), shots=3).measurements == [[1], [1], [1]]


def test_state_too_large_fails_before_running():
    from gpu_provider.errors import CircuitTooLargeError

    source = "OPENQASM 3.0; qubit[60] q; h q;\n#pragma braket result expectation z(q[0])"
    with pytest.raises(CircuitTooLargeError, match="60-qubit state .*3 arrays"):
        GPUBraketSimulator(device="CPU").run(Program(source=source), shots=0)


def test_non_openqasm_input_is_a_type_error():
    with pytest.raises(TypeError, match="OpenQASM 3"):
        GPUBraketSimulator().run("h q[0];", shots=1)


def test_unknown_run_option_warns():
    with pytest.warns(UserWarning, match="batch_size is not used"):
        LocalSimulator("gpu_provider").run(Circuit().h(0), shots=2, batch_size=4)
