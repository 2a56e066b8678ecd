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
from braket.default_simulator.openqasm.parser.openqasm_parser import QASM3ParsingError  # noqa: E402
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
    assert {rt.name for rt in action.supportedResultTypes} == {"Sample", "Expectation", "Variance", "Probability", "StateVector", "DensityMatrix", "Amplitude"}
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
    ("OPENQASM 3.0; qubit[2] q; h q[0]; cnot q[0]", {}, 0, QASM3ParsingError, None),  # braket_sv raises it without a message
    ("OPENQASM 3.0; qubit[2] q; h q[2];", {}, 5, IndexError, "out of range"),
    ("OPENQASM 3.0; qubit[1] q; h q[0]; frobnicate q[0];", {}, 10, Exception, "frobnicate"),
    ("OPENQASM 3.0; qubit[2] q; h q[0];\n#pragma braket result density_matrix q[0]", {}, 10, ValueError, "not available when shots>0"),
    ("OPENQASM 3.0; qubit[2] q; h q[0];\n#pragma braket result expectation hermitian([[1, 0], [0, 1]]) q[0], q[1]", {}, 0, ValueError, "Invalid observable"),
    ("OPENQASM 3.0; qubit[2] q; h q[0];\n#pragma braket result expectation hermitian([[1, 1], [0, 1]]) q[0]", {}, 0, ValueError, "Invalid observable"),
    ("OPENQASM 3.0; qubit[1] q; h q[0];\n#pragma braket noise bit_flip(0.1) q[0]", {}, 10, TypeError, "not supported"),
    ("OPENQASM 3.0; qubit[1] q; h q[0];", {}, 0, ValueError, "Result types must be specified"),
    ("OPENQASM 3.0; qubit[1] q; h q[0];\n#pragma braket result sample z(q[0])", {}, 0, ValueError, "sample can only"),
    ("OPENQASM 3.0; qubit[1] q; h q[0];\n#pragma braket result state_vector", {}, 10, ValueError, "not available when shots>0"),
    ("OPENQASM 3.0; qubit[2] q; h q[0]; h q[1];\n#pragma braket result amplitude \"0\"", {}, 0, ValueError, "Length of state"),
    ("OPENQASM 3.0; input float a; qubit[1] q; rx(a) q[0];", {}, 10, NameError, "a"),
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
    assert np.asarray(simulator.run(Program(source="OPENQASM 3.0; qubit[1] q; x q[0];"), shots=3).measurements, dtype=int).tolist() == [[1], [1], [1]]


def test_state_too_large_fails_before_running():
    from gpu_provider.errors import CircuitTooLargeError

    source = "OPENQASM 3.0; qubit[60] q; h q;\n#pragma braket result expectation z(q[0])"
    # The least it needs: one state, in place (an expectation value is read a chunk at a time).
    with pytest.raises(CircuitTooLargeError, match=r"60-qubit state .*\(1 array of 2\^60 x 16 bytes, [0-9,]+ bytes of sampling table and 64 MiB of workspace\)"):
        GPUBraketSimulator(device="CPU").run(Program(source=source), shots=0)


def test_non_openqasm_input_is_a_type_error():
    with pytest.raises(TypeError, match="OpenQASM 3"):
        GPUBraketSimulator().run("h q[0];", shots=1)


def test_unknown_run_option_warns():
    with pytest.warns(UserWarning, match="batch_size is not used"):
        LocalSimulator("gpu_provider").run(Circuit().h(0), shots=2, batch_size=4)


# ---------------------------------------------------------------------------
# Every program kind Braket's simulators take, through Braket's BaseLocalSimulator:
# JAQCD programs, program sets, density matrices, mid-circuit measurements, run_batch.


def _jaqcd_bell(results):
    from braket.ir.jaqcd import Program as JaqcdProgram

    return JaqcdProgram.parse_raw(
        '{"instructions": [{"type": "h", "target": 0}, {"type": "cnot", "control": 0, "target": 1}, '
        '{"type": "ry", "angle": 0.7, "target": 3}, {"type": "cz", "control": 3, "target": 1}], "results": ' + results + "}"
    )


@pytest.mark.parametrize("device", DEVICES)
def test_jaqcd_programs_match_braket_sv(device):
    # LocalSimulator no longer builds JAQCD payloads; Braket's simulators still run them directly.
    from braket.default_simulator import StateVectorSimulator

    program = _jaqcd_bell(
        '[{"type": "probability", "targets": [3, 0]}, {"type": "expectation", "observable": ["x", "z"], "targets": [3, 1]},'
        ' {"type": "variance", "observable": ["y"], "targets": [0]}, {"type": "densitymatrix", "targets": [1, 3]},'
        ' {"type": "amplitude", "states": ["000", "101"]}, {"type": "statevector"}]'
    )
    reference = StateVectorSimulator().run(program, shots=0)
    ours = GPUBraketSimulator(device=device).run(program, shots=0)
    assert [value.type for value in ours.resultTypes] == [value.type for value in reference.resultTypes]
    _assert_values_match([v.value for v in ours.resultTypes], [v.value for v in reference.resultTypes], 1e-9)
    # Sampled: the distribution of braket_sv's exact probabilities over the qubits used (0, 1, 3).
    exact = StateVectorSimulator().run(_jaqcd_bell('[{"type": "probability"}]'), shots=0).resultTypes[0].value
    probabilities = {format(i, "03b"): float(p) for i, p in enumerate(exact) if p > 1e-12}
    sampled = GPUBraketSimulator(device=device).run(_jaqcd_bell("[]"), shots=3000, seed=4)
    assert sampled.measuredQubits == [0, 1, 2]
    counts: dict[str, int] = {}
    for row in sampled.measurements:
        key = "".join(str(bit) for bit in row)
        counts[key] = counts.get(key, 0) + 1
    assert_counts_match(counts, probabilities, shots=3000)


@pytest.mark.parametrize("precision", ["double", "single"])
def test_density_matrices_match_braket_sv(braket_sv, precision):
    body = Circuit().h(0).cnot(0, 1).ry(2, 0.9).cnot(2, 4).rx(3, 0.3).cnot(4, 3)
    for targets in ([0, 2, 4], [3, 1], [2], None):
        circuit = body.copy().density_matrix(targets)
        reference = braket_sv.run(circuit, shots=0).result().values[0]
        ours = LocalSimulator("gpu_provider").run(circuit, shots=0, precision=precision).result().values[0]
        np.testing.assert_allclose(np.asarray(ours), np.asarray(reference), atol=TOLERANCE[precision], rtol=0)
    # Targets in a 3-cycle order: rows and columns follow the targets as given (as sampled
    # probabilities do); braket_sv permutes them the other way round, so the reference is its
    # sorted-target matrix with the axes put in target order.
    sorted_matrix = np.asarray(braket_sv.run(body.copy().density_matrix([0, 2, 4]), shots=0).result().values[0])
    expected = sorted_matrix.reshape((2,) * 6).transpose(2, 0, 1, 5, 3, 4).reshape(8, 8)
    ours = LocalSimulator("gpu_provider").run(body.copy().density_matrix([4, 0, 2]), shots=0, precision=precision).result().values[0]
    np.testing.assert_allclose(np.asarray(ours), expected, atol=TOLERANCE[precision], rtol=0)


def test_density_matrix_too_wide_is_refused():
    from gpu_provider.engine.observables import DENSITY_MATRIX_MAX_QUBITS

    width = DENSITY_MATRIX_MAX_QUBITS + 1
    source = f"OPENQASM 3.0; qubit[{width}] q; h q;\n#pragma braket result density_matrix"
    with pytest.raises(ValueError, match=f"at most {DENSITY_MATRIX_MAX_QUBITS} qubits"):
        GPUBraketSimulator(device="CPU").run(Program(source=source), shots=0)


MID_CIRCUIT = {
    # feed-forward: q1 copies q0's outcome
    "feed_forward": ("OPENQASM 3.0; qubit[2] q; bit[2] b; h q[0]; b[0] = measure q[0]; if (b[0]) { x q[1]; } b[1] = measure q[1];",
                     {"00": 0.5, "11": 0.5}),
    # a gate on a measured qubit: the second measurement is uniform whatever the first gave
    "gate_after_measure": ("OPENQASM 3.0; qubit[1] q; bit[2] b; h q[0]; b[0] = measure q[0]; h q[0]; b[1] = measure q[0];",
                           {"00": 0.25, "01": 0.25, "10": 0.25, "11": 0.25}),
    # measure, reset, prepare again: ry(2 asin(sqrt 0.2)) gives 1 with probability 0.2, twice, independently
    "reset": ("OPENQASM 3.0; qubit[1] q; bit[2] b; ry(2 * arcsin(sqrt(0.2))) q[0]; b[0] = measure q[0]; reset q[0];"
              " ry(2 * arcsin(sqrt(0.2))) q[0]; b[1] = measure q[0];",
              {"00": 0.64, "01": 0.16, "10": 0.16, "11": 0.04}),
    # an entangled partner of the measured qubit collapses with it; the else branch flips q2
    "entangled_branch": ("OPENQASM 3.0; qubit[3] q; bit[3] b; h q[0]; cnot q[0], q[1]; b[0] = measure q[0];"
                         " if (b[0] == 0) { x q[2]; } else { h q[2]; } b[1] = measure q[1]; b[2] = measure q[2];",
                         {"001": 0.5, "110": 0.25, "111": 0.25}),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(MID_CIRCUIT))
def test_mid_circuit_measurements_branch_as_braket_sv_does(braket_sv, name, device):
    source, probabilities = MID_CIRCUIT[name]
    ours = LocalSimulator("gpu_provider").run(Program(source=source), shots=4000, device=device, seed=11).result()
    reference = braket_sv.run(Program(source=source), shots=4000).result()
    assert ours.measured_qubits == reference.measured_qubits
    assert_counts_match(dict(ours.measurement_counts), probabilities, shots=4000)
    assert_counts_match(dict(reference.measurement_counts), probabilities, shots=4000)
    again = LocalSimulator("gpu_provider").run(Program(source=source), shots=4000, device=device, seed=11).result()
    np.testing.assert_array_equal(again.measurements, ours.measurements)  # a seed repeats every path's draws


def test_reset_without_measurement_is_braket_svs_map(braket_sv):
    # No measurement before the reset: Braket applies its coherent map (|1> half added into |0>).
    source = "OPENQASM 3.0; qubit[2] q; h q[0]; cnot q[0], q[1]; ry(0.4) q[0]; reset q[0];\n#pragma braket result state_vector"
    reference = braket_sv.run(Program(source=source), shots=0).result().values[0]
    ours = LocalSimulator("gpu_provider").run(Program(source=source), shots=0).result().values[0]
    np.testing.assert_allclose(ours, reference, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_program_sets_match_braket_sv(braket_sv, device):
    from braket.ir.openqasm import ProgramSet

    program_set = ProgramSet(
        programs=[
            Program(source="OPENQASM 3.0; bit[2] b; qubit[3] q; x q[2]; h q[0]; b[0] = measure q[2]; b[1] = measure q[0];"),
            Program(source="OPENQASM 3.0; input float a; bit[1] b; qubit[1] q; ry(a) q[0]; b[0] = measure q[0];",
                    inputs={"a": [0.0, np.pi, 2 * np.arcsin(np.sqrt(0.3))]}),
        ]
    )
    ours = LocalSimulator("gpu_provider").run(program_set, shots=8000, device=device, seed=2).result()
    reference = braket_sv.run(program_set, shots=8000).result()
    assert len(ours) == len(reference) == 2
    assert [len(program) for program in ours] == [len(program) for program in reference] == [1, 3]
    expected = [[{"10": 0.5, "11": 0.5}], [{"0": 1.0}, {"1": 1.0}, {"0": 0.7, "1": 0.3}]]
    for program, probabilities in zip(ours, expected):
        for executable, exact in zip(program, probabilities):
            assert_counts_match(dict(executable.counts), exact, shots=2000)
    with pytest.raises(ValueError, match="Shots must not be zero"):
        LocalSimulator("gpu_provider").run(program_set, shots=0)
    with pytest.raises(ValueError, match="divisible"):
        LocalSimulator("gpu_provider").run(program_set, shots=8001)


def test_jaqcd_noise_is_refused_and_simulator_stays_usable():
    from braket.ir.jaqcd import Program as JaqcdProgram

    noisy = JaqcdProgram.parse_raw('{"instructions": [{"type": "h", "target": 0}, {"type": "bit_flip", "probability": 0.1, "target": 0}]}')
    simulator = GPUBraketSimulator()
    with pytest.raises(TypeError, match="[Nn]oise"):
        simulator.run(noisy, shots=10)
    assert simulator.run(_jaqcd_bell('[{"type": "probability", "targets": [0]}]'), shots=0).resultTypes[0].value == pytest.approx([0.5, 0.5])


def test_run_batch_matches_braket_sv(braket_sv):
    circuits = [Circuit().h(0).cnot(0, 1).ry(2, angle).probability() for angle in (0.1, 0.9, 2.0)]
    ours = LocalSimulator("gpu_provider").run_batch(circuits, shots=0, max_parallel=2).results()
    reference = braket_sv.run_batch(circuits, shots=0).results()
    for mine, theirs in zip(ours, reference):
        np.testing.assert_allclose(mine.values[0], theirs.values[0], atol=1e-12)


from tests.engine.test_gpu_plumbing import fake_gpu  # noqa: E402,F401  (a fixture)


def test_the_gpu_path_through_a_numpy_backed_cupy_stand_in(fake_gpu):  # noqa: F811
    """Branching, resets, density matrices and exact values on the device path, without a GPU."""
    exact = (
        "OPENQASM 3.0; qubit[3] q; h q[0]; cnot q[0], q[1]; ry(0.4) q[0]; reset q[0]; rx(0.3) q[2]; cnot q[1], q[2];\n"
        "#pragma braket result density_matrix q[2], q[1]\n#pragma braket result probability q[1]\n"
        "#pragma braket result expectation x(q[0]) @ z(q[2])\n#pragma braket result state_vector"
    )
    on_gpu = GPUBraketSimulator(device="GPU").run(Program(source=exact), shots=0)
    on_cpu = GPUBraketSimulator(device="CPU").run(Program(source=exact), shots=0)
    _assert_values_match([v.value for v in on_gpu.resultTypes], [v.value for v in on_cpu.resultTypes], 1e-12)
    source, probabilities = MID_CIRCUIT["entangled_branch"]
    counts = LocalSimulator(GPUBraketSimulator(device="GPU")).run(Program(source=source), shots=3000, seed=3).result().measurement_counts
    assert_counts_match(dict(counts), probabilities, shots=3000)
