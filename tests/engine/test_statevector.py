"""The engine's StateVector on each device, against qiskit.quantum_info.Statevector.

Sequences of ops on random qubit tuples exercise the lazily tracked axis order:
every result is read back in canonical order and compared with the exact state.
"""

from __future__ import annotations

import numpy as np
import pytest
from qiskit.quantum_info import Operator, Statevector, random_statevector, random_unitary

from gpu_provider.engine.devices import PRECISIONS, resolve_device
from gpu_provider.engine.executor import new_state
from gpu_provider.engine.statevector import controlled_matrix
from tests.helpers import AMPLITUDE_TOLERANCE, FIDELITY_TOLERANCE, chi_square_goodness, fidelity, random_positions

ALPHA = 1e-6


def make_state(device: str, n: int, precision: str = "double", initial=None):
    dev, _ = resolve_device(device)
    state = new_state(dev, n, PRECISIONS[precision])
    if initial is not None:
        state.data[...] = dev.xp.asarray(np.asarray(initial, dtype=state.dtype))
    return state


def random_start(n: int, seed: int) -> np.ndarray:
    return random_statevector(2**n, seed=seed).data


def assert_close(state, expected, precision: str) -> None:
    actual = state.to_host()
    assert actual.dtype == np.dtype(PRECISIONS[precision])
    f = fidelity(actual, expected)
    assert f >= 1 - FIDELITY_TOLERANCE[precision], f"1 - F = {1 - f:.3e}"
    error = float(np.max(np.abs(actual - np.asarray(expected))))
    assert error <= AMPLITUDE_TOLERANCE[precision], f"max amplitude error {error:.3e}"


@pytest.mark.parametrize("precision", ["double", "single"])
def test_sequences_of_dense_unitaries(device, precision):
    rng = np.random.default_rng(1)
    n = 9
    start = random_start(n, 1)
    state = make_state(device, n, precision, start)
    expected = Statevector(start)
    for step in range(40):
        k = int(rng.integers(1, 6))
        qubits = random_positions(rng, n, k)
        matrix = random_unitary(2**k, seed=step).data
        state.apply_unitary(qubits, matrix)
        expected = expected.evolve(Operator(matrix), qargs=qubits)
        if step % 10 == 9:  # reading back mid-way must not disturb later ops
            assert_close(state, expected.data, precision)
    assert_close(state, expected.data, precision)


@pytest.mark.parametrize("k", [1, 2, 3, 5, 8])
def test_diagonals_on_random_qubits(device, k):
    rng = np.random.default_rng(k)
    n = 9
    start = random_start(n, 2)
    state = make_state(device, n, "double", start)
    expected = Statevector(start)
    for step in range(6):
        qubits = random_positions(rng, n, k)
        diagonal = np.exp(1j * rng.uniform(-np.pi, np.pi, 2**k))
        if step == 2:  # interleave a dense gate so the axis order is not canonical
            state.apply_unitary([5, 0], random_unitary(4, seed=9).data)
            expected = expected.evolve(Operator(random_unitary(4, seed=9).data), qargs=[5, 0])
        state.apply_diagonal(qubits, diagonal)
        expected = expected.evolve(Operator(np.diag(diagonal)), qargs=qubits)
    assert_close(state, expected.data, "double")


@pytest.mark.parametrize("num_controls,num_targets", [(1, 1), (2, 1), (3, 2), (5, 1), (4, 3), (7, 1), (6, 2)])
def test_controlled_unitaries_with_ctrl_state(device, num_controls, num_targets):
    rng = np.random.default_rng(10 * num_controls + num_targets)
    n = num_controls + num_targets + 2
    start = random_start(n, 3)
    state = make_state(device, n, "double", start)
    expected = Statevector(start)
    for step in range(3):
        qubits = random_positions(rng, n, num_controls + num_targets)
        controls, targets = qubits[:num_controls], qubits[num_controls:]
        ctrl_state = int(rng.integers(0, 2**num_controls))
        matrix = random_unitary(2**num_targets, seed=step).data
        state.apply_controlled(controls, ctrl_state, targets, matrix)
        full = controlled_matrix(matrix, num_controls, ctrl_state)
        expected = expected.evolve(Operator(full), qargs=controls + targets)
    assert_close(state, expected.data, "double")


def test_controlled_matrix_matches_qiskit_control():
    from qiskit.circuit.library import UnitaryGate

    base = random_unitary(4, seed=5).data
    for ctrl_state in range(8):
        qiskit_matrix = Operator(UnitaryGate(base).control(3, ctrl_state=ctrl_state)).data
        np.testing.assert_allclose(controlled_matrix(base, 3, ctrl_state), qiskit_matrix, atol=1e-12)


def test_global_phase_and_zero_qubit_ops(device):
    start = random_start(3, 4)
    state = make_state(device, 3, "double", start)
    state.apply_phase(0.4)
    state.apply_unitary((), np.array([[np.exp(0.3j)]]))
    state.apply_diagonal((), np.array([np.exp(-0.1j)]))
    assert_close(state, start * np.exp(0.6j), "double")


def test_initialize_qubits_in_zero(device):
    from qiskit import QuantumCircuit

    n = 6
    state = make_state(device, n)
    circuit = QuantumCircuit(n)
    for q in (0, 3, 5):
        matrix = random_unitary(2, seed=q).data
        state.apply_unitary([q], matrix)
        circuit.unitary(matrix, [q])
    vector = random_statevector(8, seed=7).data
    state.initialize([4, 1, 2], vector)
    circuit.initialize(vector, [4, 1, 2])
    assert_close(state, Statevector(circuit).data, "double")


def test_measure_probabilities_and_collapse(device):
    n = 5
    start = random_start(n, 8)
    for qubit in range(n):
        for outcome_wanted in (0, 1):
            state = make_state(device, n, "double", start)
            state.apply_unitary([2, 4], random_unitary(4, seed=1).data)  # non-canonical order
            reference = Statevector(start).evolve(Operator(random_unitary(4, seed=1).data), qargs=[2, 4])
            p1 = reference.probabilities([qubit])[1]
            assert state.probability_one(qubit) == pytest.approx(p1, abs=1e-12)
            random = p1 / 2 if outcome_wanted else (p1 + 1) / 2  # uniform sample picking the outcome
            outcome = state.measure(qubit, random)
            assert outcome == outcome_wanted
            projector = np.diag([1.0 - outcome, float(outcome)])
            collapsed = reference.evolve(Operator(projector), qargs=[qubit]).data
            collapsed = collapsed / np.linalg.norm(collapsed)
            assert_close(state, collapsed, "double")


def test_reset_moves_the_kept_half_to_zero(device):
    n = 4
    start = random_start(n, 9)
    reference = Statevector(start)
    p1 = reference.probabilities([1])[1]
    state = make_state(device, n, "double", start)
    outcome = state.measure(1, p1 / 2, reset=True)  # outcome 1, then flipped to |0>
    assert outcome == 1
    kept = reference.evolve(Operator(np.array([[0, 1], [0, 0]])), qargs=[1]).data  # |0><1|
    assert_close(state, kept / np.linalg.norm(kept), "double")


@pytest.mark.parametrize("qubits", [[0, 1, 2, 3], [3, 0, 2], [4], [2, 4, 1, 0, 3]])
def test_sample_matches_exact_marginals(device, qubits):
    n = 5
    start = random_start(n, 10)
    state = make_state(device, n, "double", start)
    state.apply_unitary([3, 1], random_unitary(4, seed=2).data)
    reference = Statevector(start).evolve(Operator(random_unitary(4, seed=2).data), qargs=[3, 1])
    shots = 4000
    outcomes = state.sample(qubits, shots, np.random.default_rng(0))
    assert outcomes.shape == (shots,)
    probabilities = reference.probabilities(qubits)  # index bit j is qubits[j]
    expected = {str(i): float(p) for i, p in enumerate(probabilities)}
    observed: dict = {}
    for value in outcomes.tolist():
        observed[str(value)] = observed.get(str(value), 0) + 1
    assert chi_square_goodness(observed, expected) > ALPHA


def test_snapshot_and_copy_from_are_independent(device):
    n = 4
    start = random_start(n, 11)
    state = make_state(device, n, "double", start)
    state.apply_unitary([3, 0], random_unitary(4, seed=3).data)
    saved = state.snapshot()
    expected = state.to_host().copy()
    state.apply_unitary([1], random_unitary(2, seed=4).data)
    state.copy_from(saved)
    assert_close(state, expected, "double")
    saved.apply_unitary([2], random_unitary(2, seed=5).data)  # the snapshot owns its memory
    assert_close(state, expected, "double")


# ---------------------------------------------------------------------------
# states wider than one row of amplitudes (the engine works in rows of 2^10)


@pytest.mark.parametrize("precision", ["double", "single"])
def test_wide_state_mixed_sequence(device, precision):
    rng = np.random.default_rng(20)
    n = 15
    start = random_start(n, 20)
    state = make_state(device, n, precision, start)
    expected = Statevector(start)
    for step in range(36):
        kind = step % 3
        if kind == 0:
            k = int(rng.integers(1, 5))
            qubits = random_positions(rng, n, k)
            matrix = random_unitary(2**k, seed=100 + step).data
            state.apply_unitary(qubits, matrix)
            expected = expected.evolve(Operator(matrix), qargs=qubits)
        elif kind == 1:
            k = int(rng.integers(1, 11))
            qubits = random_positions(rng, n, k)
            diagonal = np.exp(1j * rng.uniform(-np.pi, np.pi, 2**k))
            state.apply_diagonal(qubits, diagonal)
            expected = expected.evolve(Operator(np.diag(diagonal)), qargs=qubits)
        else:
            qubits = random_positions(rng, n, 8)
            controls, targets = qubits[:7], qubits[7:]
            ctrl_state = int(rng.integers(0, 2**7))
            matrix = random_unitary(2, seed=step).data
            state.apply_controlled(controls, ctrl_state, targets, matrix)
            expected = expected.evolve(Operator(controlled_matrix(matrix, 7, ctrl_state)), qargs=controls + targets)
    assert_close(state, expected.data, precision)


@pytest.mark.parametrize("qubits", [[0, 5, 12], [12, 11, 10, 9], [3], list(range(13))])
def test_sample_wide_sparse_state(device, qubits):
    # Most rows of 2^10 amplitudes hold zero probability: a draw must never land there.
    n = 13
    from qiskit import QuantumCircuit

    circuit = QuantumCircuit(n)
    circuit.h(12)
    circuit.cx(12, 0)
    circuit.ry(0.7, 5)
    circuit.x(9)
    circuit.h(3)
    circuit.cry(1.1, 3, 11)
    reference = Statevector(circuit)
    state = make_state(device, n, "double", reference.data)
    state.apply_unitary([11, 2], np.eye(4))  # moves axes: sampling must follow the order
    shots = 4000
    outcomes = state.sample(qubits, shots, np.random.default_rng(1))
    probabilities = reference.probabilities(qubits)
    observed: dict = {}
    for value in outcomes.tolist():
        observed[str(value)] = observed.get(str(value), 0) + 1
    impossible = {k: v for k, v in observed.items() if probabilities[int(k)] < 1e-12}
    assert not impossible, f"drew outcomes of probability 0: {impossible}"
    expected = {str(i): float(p) for i, p in enumerate(probabilities) if p > 1e-12}
    assert chi_square_goodness(observed, expected) > ALPHA


@pytest.mark.parametrize("n", [3, 9, 12, 13])
@pytest.mark.parametrize("precision", ["double", "single"])
def test_small_state_gather_path_and_general_path(device, n, precision, monkeypatch):
    """States up to SMALL_STATE_QUBITS take the gather path; both paths match Statevector."""
    from gpu_provider.engine import statevector as S

    rng = np.random.default_rng(n)
    gates = []
    for i in range(30):
        k = int(rng.integers(1, min(n, 4) + 1))
        gates.append((tuple(int(q) for q in rng.choice(n, k, replace=False)), random_unitary(2**k, seed=i).data))
    start = random_start(n, seed=n)
    expected = Statevector(start)
    for qubits, matrix in gates:
        expected = expected.evolve(Operator(matrix), qargs=list(qubits))
    for small in (0, 64):  # the general path only; the gather path wherever it applies
        monkeypatch.setattr(S, "SMALL_STATE_QUBITS", small)
        state = make_state(device, n, precision, start)
        for qubits, matrix in gates:
            state.apply_unitary(qubits, matrix)
            if qubits[0] % 3 == 0:
                state.apply_diagonal(qubits[:1], np.exp(1j * np.array([0.0, 0.3])))  # mixes in the axis-order paths
                state.apply_diagonal(qubits[:1], np.exp(-1j * np.array([0.0, 0.3])))
        assert_close(state, expected.data, precision)


@pytest.mark.parametrize("precision", ["double", "single"])
def test_a_state_in_place_matches_the_buffered_state_and_never_allocates_a_buffer(device, precision, monkeypatch):
    """StateVector(in_place=True), how a state of which two copies do not fit runs: dense gates a
    chunk at a time (chunks of 1 KiB here, so every gate takes dozens; on a GPU the kernels take
    the gates up to 5 qubits), wide controlled gates, a Pauli evolution as a dense exponential,
    initialize through views, measurement and reset. Oracle: Statevector for the unitary part; the
    buffered state (checked against it above) for the rest."""
    from scipy.linalg import expm
    from qiskit.circuit.library import StatePreparation
    from qiskit.quantum_info import Pauli, SparsePauliOp

    from gpu_provider.engine import statevector as S

    monkeypatch.setattr(S, "IN_PLACE_CHUNK_BYTES", 1024)
    rng = np.random.default_rng(5)
    n = 13
    dev, _ = resolve_device(device)
    dtype = PRECISIONS[precision]
    in_place, buffered = new_state(dev, n, dtype, in_place=True), new_state(dev, n, dtype)
    fresh = (11, 4, 9)  # still |0>: initialized after the first gates
    vector = random_statevector(8, seed=3).data
    others = [q for q in range(n) if q not in fresh]
    expected = Statevector.from_label("0" * n)
    steps = []
    for step in range(24):
        kind = step % 4
        if kind == 0 or kind == 1:
            k = 7 if step in (4, 12) else int(rng.integers(1, 6))  # 7: wider than the GPU kernels' 5
            qubits = [others[i] for i in rng.choice(len(others), k, replace=False)] if step < 8 else random_positions(rng, n, k)
            matrix = random_unitary(2**k, seed=50 + step).data
            steps.append(("unitary", qubits, matrix))
            expected = expected.evolve(Operator(matrix), qargs=qubits)
        elif kind == 2:
            qubits = [others[i] for i in rng.choice(len(others), 8, replace=False)] if step < 8 else random_positions(rng, n, 8)
            ctrl_state = int(rng.integers(0, 2**6))
            matrix = random_unitary(4, seed=step).data
            steps.append(("controlled", qubits[:6], ctrl_state, qubits[6:], matrix))
            expected = expected.evolve(Operator(controlled_matrix(matrix, 6, ctrl_state)), qargs=qubits)
        else:
            qubits = [others[i] for i in rng.choice(len(others), 3, replace=False)] if step < 8 else random_positions(rng, n, 3)
            labels, angles = ["XYZ", "ZZI", "IXY"], rng.uniform(-1, 1, 3)
            x = [int(sum(int(b) << i for i, b in enumerate(Pauli(label).x))) for label in labels]
            z = [int(sum(int(b) << i for i, b in enumerate(Pauli(label).z))) for label in labels]
            steps.append(("evolution", qubits, x, z, angles))
            expected = expected.evolve(Operator(expm(-1j * SparsePauliOp(labels, angles).to_matrix())), qargs=qubits)
        if step == 7:
            steps.append(("initialize", list(fresh), vector))
            expected = expected.evolve(Operator(StatePreparation(vector)), qargs=list(fresh))
    for state in (in_place, buffered):
        for step in steps:
            if step[0] == "unitary":
                state.apply_unitary(step[1], step[2])
            elif step[0] == "controlled":
                state.apply_controlled(step[1], step[2], step[3], step[4])
            elif step[0] == "evolution":
                state.apply_pauli_evolution(*step[1:])
            else:
                state.initialize(step[1], step[2])
    assert in_place._buffer is None and in_place.order == list(range(n - 1, -1, -1))
    assert_close(in_place, expected.data, precision)
    for q, draw, reset in ((3, 0.3, False), (10, 0.8, True), (0, 0.5, False)):
        assert in_place.probability_one(q) == pytest.approx(buffered.probability_one(q), abs=1e-5)
        assert in_place.measure(q, draw, reset) == buffered.measure(q, draw, reset)
    assert_close(in_place, buffered.to_host(), precision)
    assert in_place._buffer is None


def test_a_state_in_place_reorders_its_axes_by_swaps():
    """to_canonical without a buffer: the axes exchanged pairwise in place (a state given in a
    permuted axis order comes back in canonical order, nothing allocated)."""
    n = 14
    expected = random_start(n, 9)
    dev, _ = resolve_device("CPU")
    state = new_state(dev, n, PRECISIONS["double"], in_place=True)
    order = [int(q) for q in np.random.default_rng(4).permutation(n)]
    canonical = list(range(n - 1, -1, -1))
    state.data[...] = expected.reshape((2,) * n).transpose([canonical.index(q) for q in order]).reshape(-1)
    state.order = order
    assert_close(state, expected, "double")
    assert state.order == canonical and state._buffer is None


@pytest.mark.parametrize("k", [2, 11, 13])
def test_a_state_in_place_initializes_few_or_many_qubits(device, k, monkeypatch):
    """initialize in place: slice by slice when the |0...0> slice is large (few qubits), one broadcast
    product when it is small (many qubits; with 1 KiB chunks here, 11 and 13 of 13). Oracle: the
    product state, amplitude by amplitude (the other qubits in a random state first)."""
    from gpu_provider.engine import statevector as S

    monkeypatch.setattr(S, "IN_PLACE_CHUNK_BYTES", 1024)
    n = 13
    dev, _ = resolve_device(device)
    rng = np.random.default_rng(k)
    qubits = [int(q) for q in rng.permutation(n)[:k]]
    others = [q for q in range(n) if q not in qubits]
    vector = random_statevector(2**k, seed=k).data
    state = new_state(dev, n, PRECISIONS["double"], in_place=True)
    matrix = random_unitary(2 ** len(others), seed=1).data
    if others:
        state.apply_unitary(others, matrix)
    state.initialize(qubits, vector)
    index = np.arange(2**n)
    of_others = sum(((index >> q) & 1) << j for j, q in enumerate(others))
    of_qubits = sum(((index >> q) & 1) << j for j, q in enumerate(qubits))
    others_state = matrix[:, 0] if others else np.ones(1)
    assert_close(state, others_state[of_others] * vector[of_qubits], "double")
    assert state._buffer is None
