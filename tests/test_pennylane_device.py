"""The PennyLane device ``gpu_provider.qubit`` (gpu_provider/pennylane_device.py).

Oracle: PennyLane's ``default.qubit`` (exact), and PennyLane's own device test suite
run against both devices in subprocesses (every case default.qubit passes must pass).
Skipped where the ``pennylane`` extra is not installed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from importlib import metadata

import numpy as np
import pytest

from tests.helpers import import_host  # noqa: E402

qml = import_host("pennylane")  # CI installs the pennylane extra and fails without it
from pennylane import numpy as pnp  # noqa: E402
from pennylane.exceptions import DeviceError, QuantumFunctionError, WireError  # noqa: E402

from gpu_provider.engine.devices import probe_gpu  # noqa: E402
from gpu_provider.pennylane_device import GPUQubitDevice  # noqa: E402
from tests.engine.test_gpu_plumbing import fake_gpu  # noqa: E402,F401  (a fixture)

DEVICE = "gpu_provider.qubit"
DEVICES = [pytest.param("CPU", id="CPU"), pytest.param("GPU", id="GPU", marks=pytest.mark.gpu)]
HERMITIAN = np.array([[1.0, 2 - 1j, 0, 0.5], [2 + 1j, -1.0, 0.3j, 0], [0, -0.3j, 0.5, 1], [0.5, 0, 1, 2.0]])


def circuit_body(x, wires):
    a, b, c, d = wires
    qml.StatePrep(np.array([1, 1j, -1, 0.5, 0, 0, 0.2, 1]) / np.linalg.norm([1, 1, 1, 0.5, 0, 0, 0.2, 1]), wires=[a, b, d])
    qml.RX(x[0], a)
    qml.RY(x[1], b)
    qml.CNOT([a, c])
    qml.CRZ(x[2], [b, d])
    qml.Rot(x[0], x[1], x[2], wires=c)
    qml.IsingXY(x[1], [a, d])
    qml.MultiRZ(x[2], [a, b, c])
    qml.ctrl(qml.RY(x[0], wires=d), control=[a, b])
    qml.adjoint(qml.S(c))
    qml.QubitUnitary(qml.matrix(qml.Rot(0.3, 0.2, 0.1, wires=0)), wires=b)
    qml.GlobalPhase(0.4)


def measurements(wires):
    a, b, c, d = wires
    hamiltonian = qml.Hamiltonian([0.3, -1.2, 0.5, 0.25], [qml.X(a) @ qml.Z(b), qml.Y(d), qml.Hermitian(HERMITIAN, [c, a]), qml.Identity(b)])
    return [
        qml.expval(hamiltonian),
        qml.expval(qml.X(b) @ qml.Y(c) @ qml.Z(d)),
        qml.expval(qml.Hermitian(HERMITIAN, [d, b]) @ qml.Z(a)),
        qml.expval(qml.Projector([1, 0], wires=[c, a])),
        qml.expval(qml.Hadamard(c)),
        qml.var(hamiltonian),
        qml.var(qml.Hermitian(HERMITIAN, [b, c])),
        qml.var(qml.Y(a) @ qml.X(c)),
        qml.probs(wires=[d, a]),
        qml.probs(op=qml.X(b) @ qml.Z(c)),
        qml.state(),
        qml.density_matrix(wires=[c, a]),
    ]


def run(name, x, wires=(0, 1, 2, 3), **kwargs):
    dev = qml.device(name, wires=list(wires), **kwargs)

    @qml.qnode(dev)
    def circuit(x):
        circuit_body(x, wires)
        return measurements(wires)

    return circuit(x)


def test_discovered_through_the_pennylane_entry_point():
    names = {entry.name: entry.value for entry in metadata.entry_points(group="pennylane.plugins")}
    assert names[DEVICE] == "gpu_provider.pennylane_device:GPUQubitDevice"
    dev = qml.device(DEVICE, wires=3, device="CPU")
    assert isinstance(dev, GPUQubitDevice) and dev.engine_device == "CPU" and dev.capabilities is not None
    assert dev.capabilities.supports_operation("RX") and "one-shot" in dev.capabilities.supported_mcm_methods


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("wires", [(0, 1, 2, 3), ("q", 7, -1, "aux")])
def test_exact_results_match_default_qubit(device, wires):
    x = np.array([0.31, -0.72, 1.13])
    got = run(DEVICE, x, wires, device=device)
    expected = run("default.qubit", x, wires)
    for g, e in zip(got, expected):
        np.testing.assert_allclose(np.asarray(g), np.asarray(e), atol=1e-10)


def test_single_precision_is_close():
    x = np.array([0.31, -0.72, 1.13])
    got = run(DEVICE, x, device="CPU", precision="single")
    expected = run("default.qubit", x)
    for g, e in zip(got, expected):
        np.testing.assert_allclose(np.asarray(g), np.asarray(e), atol=2e-5)


def test_wide_circuit_through_fusion_matches_default_qubit():
    n = 15  # above the fusion threshold, so the forward run is fused
    weights = np.random.default_rng(3).uniform(0, 2 * np.pi, size=qml.StronglyEntanglingLayers.shape(2, n))
    obs = qml.Hamiltonian([0.5, -0.3, 1.0], [qml.Z(0) @ qml.Z(n - 1), qml.X(3) @ qml.Y(7), qml.Z(5)])

    def circuit(w):
        qml.StronglyEntanglingLayers(w, wires=range(n))
        return qml.expval(obs), qml.probs(wires=[0, 9])

    got = qml.QNode(circuit, qml.device(DEVICE, wires=n, device="CPU"))(weights)
    expected = qml.QNode(circuit, qml.device("default.qubit", wires=n))(weights)
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e, atol=1e-10)


def test_sparse_hamiltonian_and_wires_none():
    h = qml.Hamiltonian([0.4, 1.5], [qml.X(0) @ qml.X(1), qml.Z(1)])
    sparse = qml.SparseHamiltonian(h.sparse_matrix(wire_order=[0, 1]), wires=[0, 1])

    def circuit():
        qml.Hadamard(0)
        qml.RY(0.4, 1)
        return qml.expval(sparse), qml.state()

    got = qml.QNode(circuit, qml.device(DEVICE))()
    expected = qml.QNode(circuit, qml.device("default.qubit"))()
    np.testing.assert_allclose(got[0], expected[0], atol=1e-12)
    np.testing.assert_allclose(got[1], expected[1], atol=1e-12)


# ---------------------------------------------------------------------------
# shots


def test_samples_and_counts_follow_the_exact_distribution():
    dev = qml.device(DEVICE, wires=3, seed=11)

    @qml.set_shots(20000)
    @qml.qnode(dev)
    def circuit():
        qml.Hadamard(0)
        qml.CNOT([0, 1])
        qml.RY(1.1, 2)
        return qml.counts(wires=[0, 1]), qml.sample(qml.Z(1)), qml.expval(qml.Z(2)), qml.probs(op=qml.X(0)), qml.expval(qml.Hamiltonian([2.0, 1.0], [qml.Z(2), qml.X(0) @ qml.X(1)]))

    counts, sample, z2, probs_x, ham = circuit()
    assert set(counts) == {"00", "11"} and abs(counts["00"] - 10000) < 600
    assert sample.shape == (20000,) and set(np.unique(sample)) == {-1.0, 1.0}
    assert abs(z2 - np.cos(1.1)) < 0.03
    np.testing.assert_allclose(probs_x, [0.5, 0.5], atol=0.03)
    assert abs(ham - (2 * np.cos(1.1) + 1.0)) < 0.06


def test_shot_vectors_and_seeds_repeat():
    def make():
        dev = qml.device(DEVICE, wires=2, seed=5)

        @qml.set_shots([100, (10, 2)])
        @qml.qnode(dev)
        def circuit():
            qml.RX(0.7, 0)
            return qml.sample(wires=[0, 1])

        return circuit()

    first, second = make(), make()
    assert [r.shape for r in first] == [(100, 2), (10, 2), (10, 2)]
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)


def test_mid_circuit_measurements_one_shot_and_deferred():
    def circuit():
        qml.Hadamard(0)
        qml.RY(0.8, 1)
        m0 = qml.measure(0)
        m1 = qml.measure(1, reset=True)
        qml.cond(m0 & ~m1, qml.RX)(1.3, 2)
        qml.cond(m1, qml.PauliX)(1)
        return qml.expval(qml.Z(2)), qml.probs(wires=[1]), qml.expval(m0)

    exact = qml.QNode(circuit, qml.device("default.qubit", wires=5), mcm_method="deferred")()
    deferred = qml.QNode(circuit, qml.device(DEVICE, wires=5), mcm_method="deferred")()
    for g, e in zip(deferred, exact):
        np.testing.assert_allclose(g, e, atol=1e-12)
    one_shot = qml.set_shots(qml.QNode(circuit, qml.device(DEVICE, wires=3, seed=2), mcm_method="one-shot"), 4000)()
    for g, e in zip(one_shot, exact):
        np.testing.assert_allclose(g, e, atol=0.05)


def test_postselection_one_shot_matches_deferred():
    def circuit():
        qml.RY(1.0, 0)
        qml.RY(0.4, 1)
        m0 = qml.measure(0, postselect=1)
        qml.cond(m0, qml.RX)(0.9, 1)
        return qml.expval(qml.Z(1))

    exact = qml.QNode(circuit, qml.device("default.qubit", wires=3), mcm_method="deferred")()
    sampled = qml.set_shots(qml.QNode(circuit, qml.device(DEVICE, wires=2, seed=4), mcm_method="one-shot", postselect_mode="hw-like"), 6000)()
    assert abs(sampled - exact) < 0.08  # about 1400 shots survive the postselection
    with pytest.raises(DeviceError, match="fill-shots"):
        qml.set_shots(qml.QNode(circuit, qml.device(DEVICE, wires=2), mcm_method="one-shot", postselect_mode="fill-shots"), 10)()


def _tree_circuits():
    def feed_forward():
        qml.RX(0.7, 0)
        qml.CNOT([0, 1])
        m0 = qml.measure(0)
        qml.cond(m0, qml.RY)(0.4, 1)
        qml.RX(0.3, 2)
        m1 = qml.measure(1, reset=True)
        qml.cond(m0 & ~m1, qml.PauliX)(2)
        qml.CNOT([2, 1])
        return (qml.expval(qml.Z(1) @ qml.Y(2)), qml.var(qml.Y(2)), qml.probs(wires=[1, 2]), qml.expval(m0 + 2 * m1),
                qml.var(m1), qml.probs(op=[m0, m1]), qml.probs(op=m0))

    def postselected():
        qml.Hadamard(0)
        qml.RY(1.1, 1)
        m0 = qml.measure(0, postselect=1)
        qml.cond(m0, qml.CRX)(0.5, [1, 2])
        qml.cond(~m0, qml.PauliX)(2)  # never runs: that branch is postselected away
        m1 = qml.measure(1)
        qml.cond(m1, qml.Hadamard)(2)
        return qml.expval(qml.Z(2)), qml.probs(wires=[0, 1, 2]), qml.var(qml.X(1) + 0.5 * qml.Z(2)), qml.expval(m1)

    def many():  # eight measurements: 2^8 leaves at most, nine states at once
        for wire in range(3):
            qml.RY(0.3 + wire, wire)
        for round_ in range(4):
            qml.CNOT([round_ % 3, (round_ + 1) % 3])
            m = qml.measure(round_ % 3)
            qml.cond(m, qml.RX)(0.2 * round_ + 0.1, (round_ + 2) % 3)
            qml.measure((round_ + 1) % 3, reset=True)
        return qml.expval(qml.Z(0) @ qml.Z(2)), qml.probs(wires=[0, 1, 2])

    return {"feed_forward": feed_forward, "postselected": postselected, "many": many}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["feed_forward", "postselected", "many"])
def test_tree_traversal_is_exact_as_default_qubit(name, device):
    circuit = _tree_circuits()[name]
    exact = qml.QNode(circuit, qml.device("default.qubit", wires=3), mcm_method="tree-traversal")()
    deferred = qml.QNode(circuit, qml.device("default.qubit", wires=3 + 8), mcm_method="deferred")()
    ours = qml.QNode(circuit, qml.device(DEVICE, wires=3, device=device), mcm_method="tree-traversal")()
    device_method = qml.QNode(circuit, qml.device(DEVICE, wires=3, device=device), mcm_method="device")()
    for mine, by_method, theirs, other in zip(ours, device_method, exact, deferred):
        np.testing.assert_allclose(mine, theirs, atol=1e-10)
        np.testing.assert_allclose(mine, other, atol=1e-10)
        np.testing.assert_allclose(by_method, theirs, atol=1e-10)


def test_tree_traversal_edge_cases():
    def impossible():
        qml.PauliX(0)
        qml.measure(0, postselect=0)
        return qml.expval(qml.Z(1)), qml.probs(wires=[0, 1])

    mean, probs = qml.QNode(impossible, qml.device(DEVICE, wires=2), mcm_method="tree-traversal")()
    assert np.isnan(mean) and probs.shape == (4,) and np.all(np.isnan(probs))  # as default.qubit

    def impossible_after_rounding():  # P(1) = 1 only up to rounding here: still impossible, still NaN
        qml.Hadamard(0)
        qml.PauliX(1)
        qml.measure(1, postselect=0)
        return qml.expval(qml.Z(0)), qml.probs(wires=[0, 1])

    for name in (DEVICE, "default.qubit"):
        mean, probs = qml.QNode(impossible_after_rounding, qml.device(name, wires=2), mcm_method="tree-traversal")()
        assert np.isnan(mean) and np.all(np.isnan(probs)), name
    for precision in ("double", "single"):
        device = qml.device(DEVICE, wires=2, precision=precision)

        def rounded():
            qml.Hadamard(1)
            qml.RY(0.3, 0)
            qml.Hadamard(1)  # back to |0> up to rounding
            qml.measure(1, postselect=1)
            return qml.expval(qml.Z(0))

        assert np.isnan(qml.QNode(rounded, device, mcm_method="tree-traversal")()), precision

    def state_after_measure():
        qml.Hadamard(0)
        qml.measure(0)
        return qml.state()

    with pytest.raises(DeviceError, match="no single state|mcm_method"):
        qml.QNode(state_after_measure, qml.device(DEVICE, wires=1), mcm_method="tree-traversal")()
    # With shots the engine's shot branching runs it, gathered as one-shot results are.
    circuit = _tree_circuits()["feed_forward"]
    exact = qml.QNode(circuit, qml.device("default.qubit", wires=3), mcm_method="tree-traversal")()
    sampled = qml.set_shots(qml.QNode(circuit, qml.device(DEVICE, wires=3, seed=6), mcm_method="tree-traversal"), 6000)()
    for mine, theirs in zip(sampled, exact):
        np.testing.assert_allclose(mine, theirs, atol=0.06)


def test_one_shot_branches_shots_and_keeps_their_distribution(monkeypatch):
    """Shots share the engine's trajectories: each gate runs once per path, not once per shot."""
    from gpu_provider.engine import statevector

    applied = []
    apply_unitary = statevector.StateVector.apply_unitary
    monkeypatch.setattr(statevector.StateVector, "apply_unitary", lambda self, *args: applied.append(1) or apply_unitary(self, *args))

    def body():
        qml.Hadamard(0)
        qml.RY(1.1, 1)
        m0 = qml.measure(0)
        m1 = qml.measure(1, reset=True)
        qml.cond(m0 + m1 == 1, qml.RY)(0.7, 2)  # a condition on two measurements at once
        for _ in range(10):
            qml.RX(0.2, 1)
            qml.CNOT([1, 2])
        return m0, m1

    def circuit():
        m0, m1 = body()
        return qml.sample(wires=[1, 2]), qml.sample(m0), qml.expval(m1)

    def probabilities():
        body()
        return qml.probs(wires=[1, 2])

    shots = 3000
    exact_probs = qml.QNode(probabilities, qml.device("default.qubit", wires=5), mcm_method="deferred")
    samples, m0_samples, m1_mean = qml.set_shots(qml.QNode(circuit, qml.device(DEVICE, wires=3, seed=5), mcm_method="one-shot", diff_method=None), shots)()
    assert len(applied) <= 2 + 4 * 20 + 10  # per path of (m0, m1), not per shot (3000 x 20)
    assert samples.shape == (shots, 2) and m0_samples.shape == (shots,)
    p1 = np.sin(0.55) ** 2
    assert abs(float(m1_mean) - p1) < 5 * np.sqrt(p1 * (1 - p1) / shots)
    # The shots come in the order of independent shots, not grouped by trajectory.
    changes = int(np.count_nonzero(np.diff(m0_samples)))
    assert 1300 < changes < 1700, changes
    values = samples[:, 0] * 2 + samples[:, 1]
    observed = np.bincount(values, minlength=4) / shots
    np.testing.assert_allclose(observed, exact_probs(), atol=5 * np.sqrt(0.25 / shots))


# ---------------------------------------------------------------------------
# gradients


def gradient_circuit(x, n=4):
    qml.BasisState(np.array([1, 0, 0, 1])[:n], wires=range(n))
    qml.RX(x[0], 0)
    qml.RY(x[1], 1)
    qml.CNOT([0, 1])
    qml.CRX(x[2], [1, 2])
    qml.Rot(x[0], x[3], x[1], wires=3)
    qml.IsingZZ(x[3], [0, 3])
    qml.PhaseShift(x[2], 2)
    qml.SingleExcitation(x[1], [2, 3])
    qml.GlobalPhase(x[0])
    return (
        qml.expval(qml.Hamiltonian([0.3, -1.2, 0.7], [qml.X(0) @ qml.Z(1), qml.Y(3), qml.Z(2) @ qml.Z(3)])),
        qml.expval(qml.Hermitian(HERMITIAN, [1, 3])),
        qml.expval(qml.Y(2)),
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ["adjoint", "parameter-shift"])
def test_gradients_match_default_qubit(device, method):
    x = pnp.array([0.31, -0.72, 1.13, 0.4], requires_grad=True)
    dev = qml.device(DEVICE, wires=4, device=device)
    got = qml.jacobian(lambda v: qml.math.stack(qml.QNode(gradient_circuit, dev, diff_method=method)(v)))(x)
    reference = qml.device("default.qubit", wires=4)
    expected = qml.jacobian(lambda v: qml.math.stack(qml.QNode(gradient_circuit, reference, diff_method="adjoint")(v)))(x)
    np.testing.assert_allclose(got, expected, atol=1e-8)
    backprop = qml.jacobian(lambda v: qml.math.stack(qml.QNode(gradient_circuit, reference, diff_method="backprop")(v)))(x)
    np.testing.assert_allclose(got, backprop, atol=1e-8)


def test_adjoint_is_one_forward_run_and_the_default_for_best():
    x = pnp.array([0.31, -0.72, 1.13, 0.4], requires_grad=True)
    dev = qml.device(DEVICE, wires=4)
    def circuit(v):
        qml.RX(v[0], 0)
        qml.CRY(v[1], [0, 1])
        qml.IsingXX(v[2], [1, 3])
        qml.RZ(v[3], 2)
        return qml.expval(qml.X(2) @ qml.Z(3) + 0.5 * qml.Y(1))

    qnode = qml.QNode(circuit, dev)
    with qml.Tracker(dev) as tracker:
        qml.grad(qnode)(x)
    assert tracker.totals["executions"] == 1 and tracker.totals.get("derivatives", 0) == 1
    assert qml.workflow.get_best_diff_method(qnode)(x) == "adjoint"


def test_strongly_entangling_adjoint_gradient():
    n = 6
    weights = pnp.array(np.random.default_rng(0).uniform(0, 2 * np.pi, qml.StronglyEntanglingLayers.shape(3, n)), requires_grad=True)

    def circuit(w):
        qml.StronglyEntanglingLayers(w, wires=range(n))
        return qml.expval(qml.Z(0) @ qml.Z(n - 1) + 0.5 * qml.X(2))

    got = qml.grad(qml.QNode(circuit, qml.device(DEVICE, wires=n), diff_method="adjoint"))(weights)
    expected = qml.grad(qml.QNode(circuit, qml.device("default.qubit", wires=n), diff_method="adjoint"))(weights)
    np.testing.assert_allclose(got, expected, atol=1e-8)


def test_the_gpu_device_path_through_a_numpy_backed_cupy_stand_in(fake_gpu):
    """The device's GPU path (device arrays, .get() copies, the engine's xp code) without a GPU."""
    x = np.array([0.31, -0.72, 1.13])
    dev = qml.device(DEVICE, wires=4, device="GPU")
    assert dev.engine_device == "GPU:0"
    got = run(DEVICE, x, device="GPU")
    expected = run("default.qubit", x)
    for g, e in zip(got, expected):
        np.testing.assert_allclose(np.asarray(g), np.asarray(e), atol=1e-10)
    w = pnp.array([0.31, -0.72, 1.13, 0.4], requires_grad=True)
    adjoint = qml.jacobian(lambda v: qml.math.stack(qml.QNode(gradient_circuit, dev, diff_method="adjoint")(v)))(w)
    reference = qml.jacobian(lambda v: qml.math.stack(qml.QNode(gradient_circuit, qml.device("default.qubit", wires=4), diff_method="adjoint")(v)))(w)
    np.testing.assert_allclose(adjoint, reference, atol=1e-8)
    def coin():
        qml.Hadamard(0)
        return qml.counts(wires=[0])

    sampled = qml.set_shots(qml.QNode(coin, qml.device(DEVICE, wires=1, device="GPU", seed=1)), 400)()
    assert set(sampled) == {"0", "1"} and sum(sampled.values()) == 400
    tree = _tree_circuits()["postselected"]
    on_gpu = qml.QNode(tree, qml.device(DEVICE, wires=3, device="GPU"), mcm_method="tree-traversal")()
    exact = qml.QNode(tree, qml.device("default.qubit", wires=3), mcm_method="tree-traversal")()
    for g, e in zip(on_gpu, exact):
        np.testing.assert_allclose(g, e, atol=1e-10)


# ---------------------------------------------------------------------------
# bad input


def test_bad_input_gives_clear_errors():
    dev = qml.device(DEVICE, wires=2)

    @qml.qnode(dev)
    def outside():
        qml.RX(0.1, 5)
        return qml.expval(qml.Z(0))

    with pytest.raises(WireError, match="wires"):
        outside()

    @qml.qnode(dev)
    def shadow():
        qml.Hadamard(0)
        return qml.classical_shadow(wires=[0])

    with pytest.raises(DeviceError, match="classical_shadow|ClassicalShadow|not accepted"):
        qml.set_shots(shadow, 10)()

    with pytest.raises(DeviceError, match="precision"):
        qml.device(DEVICE, wires=2, precision="half")
    with pytest.raises(DeviceError, match="device must be one of"):
        qml.device(DEVICE, wires=2, device="TPU")

    @qml.qnode(dev, diff_method="adjoint")
    def sampled(x):
        qml.RX(x, 0)
        return qml.expval(qml.Z(0))

    with pytest.raises(QuantumFunctionError):
        qml.grad(qml.set_shots(sampled, 100))(pnp.array(0.3, requires_grad=True))


@pytest.mark.skipif(probe_gpu().usable, reason="a GPU is usable here")
def test_asking_for_a_gpu_where_none_is_usable_says_why():
    with pytest.raises(DeviceError, match="no GPU is usable") as info:
        qml.device(DEVICE, wires=2, device="GPU")
    assert probe_gpu().reason in str(info.value)
    assert qml.device(DEVICE, wires=2, device="auto").engine_device == "CPU"


# ---------------------------------------------------------------------------
# PennyLane's own device test suite


def _suite(device: str, shots: str, tmp_path) -> dict:
    """Outcome of each case of ``pennylane.devices.tests`` run against ``device``."""
    import_host("pytest_mock")
    import_host("flaky")
    report = tmp_path / f"{device}-{shots}.xml"
    import pennylane.devices.tests as suite

    command = [
        sys.executable, "-m", "pytest", os.path.dirname(suite.__file__), f"--device={device}", f"--shots={shots}",
        "-q", "-p", "no:cacheprovider", "-o", "addopts=", f"--junitxml={report}",
    ]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    subprocess.run(command, capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    outcomes = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        kinds = {child.tag for child in case}
        outcomes[name] = "failed" if kinds & {"failure", "error"} else "skipped" if "skipped" in kinds else "passed"
    return outcomes


@pytest.mark.parametrize("shots", ["None", "10000"])
def test_pennylane_device_suite_passes_what_default_qubit_passes(shots, tmp_path):
    ours = _suite(DEVICE, shots, tmp_path)
    reference = _suite("default.qubit", shots, tmp_path)
    failed = sorted(name for name, outcome in ours.items() if outcome == "failed")
    assert not failed, failed
    missing = sorted(name for name, outcome in reference.items() if outcome == "passed" and ours.get(name) != "passed")
    # default.qubit differentiates by backpropagation; this device does not (adjoint or parameter-shift).
    assert all("backprop" in name for name in missing), missing
    assert sum(outcome == "passed" for outcome in ours.values()) >= 360


def test_tape_digest_parts_name_mid_circuit_measurements_by_place():
    """What MPI ranks compare: equal for the same circuit built twice (measurement ids are random
    per build), different where a reset, postselection or condition differs."""
    from gpu_provider.pennylane_device import _tape_parts

    def build(reset=False, postselect=None, flip=False):
        def circuit():
            qml.Hadamard(0)
            m0 = qml.measure(0, reset=reset, postselect=postselect)
            m1 = qml.measure(1)
            qml.cond((~m0 if flip else m0) & m1, qml.RX)(0.4, 1)
            return qml.expval(m1 + 2 * m0), qml.probs(op=[m1, m0])

        return qml.tape.make_qscript(circuit)()

    same = [_tape_parts(build()) for _ in range(6)]
    assert all(str(parts) == str(same[0]) for parts in same)
    for other in (build(reset=True), build(postselect=1), build(flip=True)):
        assert str(_tape_parts(other)) != str(same[0])


def test_postselection_without_shots_runs_by_default_and_deferred_says_why_not():
    def circuit():
        qml.RY(1.1, 0)
        qml.CNOT([0, 1])
        qml.measure(0, postselect=1)
        return qml.expval(qml.Z(1)), qml.probs(wires=[1])

    ours = qml.QNode(circuit, qml.device(DEVICE, wires=2))()  # no mcm_method: exact, as default.qubit's
    theirs = qml.QNode(circuit, qml.device("default.qubit", wires=2))()
    for mine, reference in zip(ours, theirs):
        np.testing.assert_allclose(mine, reference, atol=1e-12)
    with pytest.raises(DeviceError, match="tree-traversal"):
        qml.QNode(circuit, qml.device(DEVICE, wires=2), mcm_method="deferred")()


def test_a_sparse_hamiltonian_with_shots_is_refused_before_running():
    hamiltonian = qml.SparseHamiltonian(qml.Hamiltonian([1.0, 0.5], [qml.Z(0), qml.X(1)]).sparse_matrix(), wires=[0, 1])

    def circuit():
        qml.RX(0.3, 0)
        return qml.expval(hamiltonian)

    exact = qml.QNode(circuit, qml.device(DEVICE, wires=2))()
    assert exact == pytest.approx(np.cos(0.3), abs=1e-12)
    with pytest.raises(DeviceError, match="SparseHamiltonian"):
        qml.set_shots(qml.QNode(circuit, qml.device(DEVICE, wires=2)), 100)()


def test_device_vjp_contracts_the_adjoint_jacobian(monkeypatch):
    """device_vjp=True: the device's VJP (adjoint Jacobian times the cotangents), as default.qubit's."""
    from gpu_provider.pennylane_device import GPUQubitDevice

    calls = []
    original = GPUQubitDevice.execute_and_compute_vjp
    monkeypatch.setattr(GPUQubitDevice, "execute_and_compute_vjp", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    original_vjp = GPUQubitDevice.compute_vjp
    monkeypatch.setattr(GPUQubitDevice, "compute_vjp", lambda self, *a, **k: calls.append(2) or original_vjp(self, *a, **k))

    def circuit(a, b):
        qml.RX(a, 0)
        qml.RY(b, 1)
        qml.CNOT([0, 1])
        qml.RZ(a * b, 2)
        qml.Hadamard(2)
        return qml.expval(qml.Z(1)), qml.expval(qml.X(2) @ qml.Z(0) + 0.5 * qml.Y(1))

    a, b = pnp.array(0.3, requires_grad=True), pnp.array(0.7, requires_grad=True)
    results = {}
    for name in (DEVICE, "default.qubit"):
        qnode = qml.QNode(circuit, qml.device(name, wires=3), diff_method="adjoint", device_vjp=True)
        results[name] = (qml.grad(lambda a, b: 2 * qnode(a, b)[0] + qnode(a, b)[1])(a, b), qml.jacobian(lambda a, b: pnp.stack(qnode(a, b)))(a, b))
    assert calls, "the device's VJP was not used"
    for mine, theirs in zip(results[DEVICE], results["default.qubit"]):
        np.testing.assert_allclose(np.asarray(mine, dtype=float), np.asarray(theirs, dtype=float), atol=1e-10)
