"""The CUDA kernels against the NumPy statevector, on a real GPU.

Each ``check_*`` helper runs one kernel on a device state and the same
operation through ``StateVector(numpy, ...)`` (the CPU path, no kernels), then
compares amplitudes. The helpers take the array module and the kernels as
arguments, so the tests below only choose the cases; every test is marked
``gpu`` and the root conftest skips it where no GPU is usable.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import pytest

from gpu_provider.engine.kernels import (
    MAX_DIAGONAL_QUBITS,
    MAX_MATRIX_QUBITS,
    SMALL_DEFAULT_QUBITS,
    kernels_for,
)
from gpu_provider.engine.statevector import StateVector

pytestmark = pytest.mark.gpu

DTYPES = {"double": np.complex128, "single": np.complex64}
# Largest |amplitude| difference allowed against the NumPy path.
TOLERANCE = {"double": 1e-12, "single": 1e-5}
# Wider than one shared-memory tile (2^11 or 2^12 amplitudes), so the tiled
# kernel meets several tiles and targets above them.
NUM_QUBITS = 14
PLACEMENTS = ["low", "high", "mixed"]
METHODS = ["auto", "strided", "strided_multi", "tiled", "tiled_async", "warp"]


# ---------------------------------------------------------------------------
# helpers shared by the tests (array module and kernels are parameters)


def random_state(rng: np.random.Generator, n: int) -> np.ndarray:
    """A random normalized state, never all zeros, so every amplitude counts."""
    state = rng.normal(size=1 << n) + 1j * rng.normal(size=1 << n)
    return state / np.linalg.norm(state)


def random_unitary(rng: np.random.Generator, dim: int) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(dim, dim)) + 1j * rng.normal(size=(dim, dim)))
    return q * (np.diagonal(r) / np.abs(np.diagonal(r)))


def random_phases(rng: np.random.Generator, dim: int) -> np.ndarray:
    return np.exp(1j * rng.uniform(0, 2 * np.pi, size=dim))


def place_targets(rng: np.random.Generator, n: int, k: int, placement: str) -> list[int]:
    """k distinct bits: the lowest, the highest, or anywhere; shuffled so matrix bit j != bit j."""
    if placement == "low":
        bits = list(range(k))
    elif placement == "high":
        bits = list(range(n - k, n))
    else:
        bits = [int(b) for b in rng.choice(n, size=k, replace=False)]
    rng.shuffle(bits)
    return bits


def device_state(xp: Any, n: int, dtype: Any, initial: np.ndarray, kernels: Any = None) -> StateVector:
    state = StateVector(xp, n, dtype, kernels)
    state.data[...] = xp.asarray(initial.astype(dtype))
    return state


def host_state(n: int, dtype: Any, initial: np.ndarray) -> StateVector:
    state = StateVector(np, n, dtype)
    state.data[...] = initial.astype(dtype)
    return state


def to_numpy(xp: Any, array: Any) -> np.ndarray:
    return np.asarray(array) if xp is np else xp.asnumpy(array)


def assert_close(actual: np.ndarray, expected: np.ndarray, tolerance: float) -> None:
    error = float(np.max(np.abs(actual.astype(np.complex128) - expected.astype(np.complex128))))
    assert error <= tolerance, f"max amplitude error {error:.3e} > {tolerance:.0e}"


def check_apply_matrix(xp: Any, kernels: Any, precision: str, n: int, bits: Sequence[int], method: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    dtype = DTYPES[precision]
    initial = random_state(rng, n)
    matrix = random_unitary(rng, 1 << len(bits))
    state = device_state(xp, n, dtype, initial)
    kernels.apply_matrix(state, list(bits), xp.asarray(matrix.astype(dtype)), method=method)
    oracle = host_state(n, dtype, initial)
    oracle.apply_unitary(list(bits), matrix)  # canonical order: qubit q is bit q
    assert_close(to_numpy(xp, state.data), oracle.to_host(), TOLERANCE[precision])


def check_same_as(xp: Any, kernels: Any, precision: str, n: int, bits: Sequence[int], method: str, reference: str, seed: int) -> None:
    """``method`` against NumPy, and bit for bit against ``reference``, the kernel it must match exactly
    (per group the same slots and FMA chains)."""
    check_apply_matrix(xp, kernels, precision, n, bits, method, seed)
    rng = np.random.default_rng(seed + 1)
    dtype = DTYPES[precision]
    initial = random_state(rng, n)
    matrix = xp.asarray(random_unitary(rng, 1 << len(bits)).astype(dtype))
    expected = device_state(xp, n, dtype, initial)
    got = device_state(xp, n, dtype, initial)
    kernels.apply_matrix(expected, list(bits), matrix, method=reference)
    kernels.apply_matrix(got, list(bits), matrix, method=method)
    np.testing.assert_array_equal(to_numpy(xp, got.data), to_numpy(xp, expected.data))


def check_apply_matrix_multi(xp: Any, kernels: Any, precision: str, n: int, bits: Sequence[int], seed: int) -> None:
    """"strided_multi" against NumPy, and bit for bit against "strided"."""
    check_same_as(xp, kernels, precision, n, bits, "strided_multi", "strided", seed)


def check_apply_matrix_async(xp: Any, kernels: Any, precision: str, n: int, bits: Sequence[int], seed: int) -> None:
    """"tiled_async" against NumPy, and bit for bit against "tiled"."""
    check_same_as(xp, kernels, precision, n, bits, "tiled_async", "tiled", seed)


def async_target_sets(rng: np.random.Generator, n: int, k: int) -> list[list[int]]:
    """Targets 0..k-1; split (the lower half of them among bits 0.., the rest the highest); a random set; each shuffled."""
    low = (k + 1) // 2
    sets = [list(range(k)), list(range(low)) + list(range(n - (k - low), n)), [int(b) for b in rng.choice(n, size=k, replace=False)]]
    for bits in sets:
        rng.shuffle(bits)
    return sets


def check_apply_diagonal(xp: Any, kernels: Any, precision: str, n: int, bits: Sequence[int], seed: int) -> None:
    rng = np.random.default_rng(seed)
    dtype = DTYPES[precision]
    initial = random_state(rng, n)
    diagonal = random_phases(rng, 1 << len(bits))
    state = device_state(xp, n, dtype, initial)
    kernels.apply_diagonal(state, list(bits), xp.asarray(diagonal.astype(dtype)))
    oracle = host_state(n, dtype, initial)
    oracle.apply_diagonal(list(bits), diagonal)
    assert_close(to_numpy(xp, state.data), oracle.to_host(), TOLERANCE[precision])


def check_probability_one(xp: Any, kernels: Any, precision: str, n: int, bit: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    dtype = DTYPES[precision]
    initial = random_state(rng, n)
    state = device_state(xp, n, dtype, initial)
    p1 = kernels.probability_one(state, bit)
    assert isinstance(p1, float)
    expected = host_state(n, dtype, initial).probability_one(bit)
    assert abs(p1 - expected) <= TOLERANCE[precision], (p1, expected)


def check_collapse(xp: Any, kernels: Any, precision: str, n: int, bit: int, outcome: int, flip: bool, seed: int) -> None:
    rng = np.random.default_rng(seed)
    dtype = DTYPES[precision]
    initial = random_state(rng, n)
    oracle = host_state(n, dtype, initial)
    p1 = oracle.probability_one(bit)
    probability = p1 if outcome else 1.0 - p1
    state = device_state(xp, n, dtype, initial)
    kernels.collapse(state, bit, outcome, 1.0 / np.sqrt(probability), flip)
    oracle.collapse(bit, outcome, probability, flip=flip)
    actual = to_numpy(xp, state.data)
    assert_close(actual, oracle.to_host(), TOLERANCE[precision])
    assert abs(float(np.vdot(actual, actual).real) - 1.0) <= 10 * TOLERANCE[precision]


def check_statevector_program(xp: Any, kernels: Any, precision: str, n: int, seed: int, steps: int = 60) -> None:
    """A random program through StateVector with kernels and through StateVector(numpy)."""
    rng = np.random.default_rng(seed)
    dtype = DTYPES[precision]
    initial = random_state(rng, n)
    device = device_state(xp, n, dtype, initial, kernels)
    host = host_state(n, dtype, initial)
    for step in range(steps):
        kind = rng.choice(["unitary", "unitary", "wide", "diagonal", "measure", "reset"])
        if kind in ("unitary", "wide"):
            # Wide matrices take the array-module path, which reorders axes:
            # later kernels then act on non-canonical bit positions.
            k = int(rng.integers(1, MAX_MATRIX_QUBITS + 1)) if kind == "unitary" else min(n, MAX_MATRIX_QUBITS + 1)
            qubits = [int(q) for q in rng.choice(n, size=k, replace=False)]
            matrix = random_unitary(rng, 1 << k)
            device.apply_unitary(qubits, matrix)
            host.apply_unitary(qubits, matrix)
        elif kind == "diagonal":
            k = int(rng.integers(1, min(n, MAX_DIAGONAL_QUBITS) + 1))
            qubits = [int(q) for q in rng.choice(n, size=k, replace=False)]
            diagonal = random_phases(rng, 1 << k)
            device.apply_diagonal(qubits, diagonal)
            host.apply_diagonal(qubits, diagonal)
        else:
            qubit = int(rng.integers(n))
            # Measure on the host first: a uniform sample near the threshold
            # could fall either side within rounding, so pick the host outcome.
            p1 = host.probability_one(qubit)
            assert abs(device.probability_one(qubit) - p1) <= 10 * TOLERANCE[precision]
            outcome = host.measure(qubit, float(rng.random()), reset=kind == "reset")
            probability = p1 if outcome else 1.0 - p1
            device.collapse(qubit, outcome, probability, flip=kind == "reset")
        if step % 15 == 14:
            assert_close(device.to_host(), host.to_host(), 10 * TOLERANCE[precision])
    assert_close(device.to_host(), host.to_host(), 10 * TOLERANCE[precision])


def check_in_place_canonical(xp: Any, kernels: Any, precision: str, n: int, seed: int) -> None:
    """to_canonical through the kernels (SWAPs, no buffer) moves exactly what a transposing copy moves."""
    rng = np.random.default_rng(seed)
    dtype = DTYPES[precision]
    initial = random_state(rng, n)
    order = [int(q) for q in rng.permutation(n)]
    device = device_state(xp, n, dtype, initial, kernels)
    host = host_state(n, dtype, initial)
    device.order, host.order = list(order), list(order)  # the same data, read in a shuffled axis order
    device.to_canonical()
    host.to_canonical()
    assert device._buffer is None  # in place: no second state array
    assert device.order == host.order
    np.testing.assert_array_equal(to_numpy(xp, device.data), host.data)


def random_pauli_terms(rng: np.random.Generator, n: int, count: int, x_masks: int = 3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``count`` random (x, z, coeff) terms sharing ``x_masks`` X masks (one of them 0), so groups have many terms."""
    xs = [0] + [int(rng.integers(1, 1 << n)) for _ in range(x_masks - 1)]
    x = np.array([xs[int(rng.integers(len(xs)))] for _ in range(count)], dtype=np.uint64)
    z = rng.integers(0, 1 << n, size=count).astype(np.uint64)
    coeffs = rng.normal(size=count) + 0.5j * rng.normal(size=count)
    return x, z, coeffs


def check_pauli_expectation(xp: Any, kernels: Any, precision: str, n: int, seed: int, count: int = 40) -> None:
    """The kernel's grouped expectation against the xp path, with the state in a shuffled axis order."""
    from gpu_provider.engine.expectation import PauliSum, expectation_values

    rng = np.random.default_rng(seed)
    dtype = DTYPES[precision]
    initial = random_state(rng, n)
    x, z, coeffs = random_pauli_terms(rng, n, count)
    observables = [PauliSum(n, x, z, coeffs), PauliSum(n, x[:5], z[:5], np.ones(5))]
    oracle = host_state(n, dtype, initial)
    order = [int(q) for q in rng.permutation(n)]
    oracle._reorder(order)  # physical bits differ from qubits: the masks must be mapped
    expected = expectation_values(oracle, observables)
    state = device_state(xp, n, dtype, initial, kernels)
    state._reorder(order)
    actual = expectation_values(state, observables)
    scale = float(np.sum(np.abs(coeffs)))
    assert np.max(np.abs(actual - expected)) <= 10 * TOLERANCE[precision] * scale, (actual, expected)
    # One group straight through the kernel: the same as the xp path's weighted sum.
    members = np.nonzero(x == x[0])[0]
    bits = [state.bit(q) for q in range(n)]
    from gpu_provider.engine.expectation import _physical

    direct = kernels.pauli_expectation(state, int(_physical(x[:1], bits)[0]), _physical(z[members], bits), coeffs[members])
    single = expectation_values(oracle, [PauliSum(n, x[members], z[members], coeffs[members])])[0]
    assert abs(direct - single) <= 10 * TOLERANCE[precision] * scale


def controlled_unitary(matrix: np.ndarray, controls: int, ctrl_state: int) -> np.ndarray:
    """``matrix`` (on the low index bits) applied where the ``controls`` high bits equal ``ctrl_state``, identity elsewhere."""
    size = matrix.shape[0]
    full = np.eye(size << controls, dtype=np.complex128)
    start = ctrl_state * size
    full[start : start + size, start : start + size] = matrix
    return full


def random_small_program(rng: np.random.Generator, n: int, ops: int, name: str = "small", matrix_widths: Sequence[int] = ()):
    """A random gate-only Program on n qubits for the bulk kernel, and its Qiskit circuit (the oracle).

    First, for each k in ``matrix_widths`` (those that fit n), a dense matrix on k
    random targets and one with a control; then ``ops`` random ones: dense
    matrices on 1..5 targets (some with controls), diagonals on 1..min(n, 10)
    targets, global phases; a width-0 gate; then measurements of every qubit.
    """
    from qiskit import QuantumCircuit
    from qiskit.circuit.library import DiagonalGate, UnitaryGate

    from gpu_provider.engine.program import (
        Diagonal,
        GlobalPhase,
        Measure,
        Program,
        Unitary,
    )

    circuit = QuantumCircuit(n, n)
    program_ops = []
    kinds = ["matrix", "matrix", "controlled", "diagonal", "phase"]
    planned = [(kind, k) for k in matrix_widths if k <= n for kind in ("matrix", "controlled") if kind == "matrix" or k < n]
    for index in range(len(planned) + ops):
        if index < len(planned):
            kind, width = planned[index]
        else:
            random_index = index - len(planned)
            kind = kinds[random_index % len(kinds)] if random_index < len(kinds) else str(rng.choice(kinds))
            width = None
        if kind == "phase":
            angle = float(rng.uniform(-np.pi, np.pi))
            program_ops.append(GlobalPhase(angle))
            circuit.global_phase += angle
        elif kind == "diagonal":
            k = int(rng.integers(1, min(n, MAX_DIAGONAL_QUBITS) + 1))
            qubits = tuple(int(q) for q in rng.choice(n, size=k, replace=False))
            diagonal = random_phases(rng, 1 << k)
            program_ops.append(Diagonal(qubits, diagonal))
            circuit.append(DiagonalGate(list(diagonal)), list(qubits))
        else:
            controls_wanted = min(int(rng.integers(1, 3)), n - 1) if kind == "controlled" else 0
            if width is not None:
                controls_wanted = min(controls_wanted, n - width)
            k = width if width is not None else int(rng.integers(1, min(n - controls_wanted, MAX_MATRIX_QUBITS) + 1))
            chosen = [int(q) for q in rng.choice(n, size=k + controls_wanted, replace=False)]
            qubits, controls = tuple(chosen[:k]), tuple(chosen[k:])
            matrix = random_unitary(rng, 1 << k)
            ctrl_state = int(rng.integers(0, 1 << len(controls))) if controls else 0
            program_ops.append(Unitary(qubits, matrix, controls, ctrl_state))
            if controls:
                # The controlled gate as one unitary (Qiskit's synthesis of UnitaryGate.control takes
                # seconds a gate; test_controlled_unitary_is_qiskits checks this equals it).
                circuit.append(UnitaryGate(controlled_unitary(matrix, len(controls), ctrl_state)), list(qubits) + list(controls))
            else:
                circuit.append(UnitaryGate(matrix), list(qubits))
    width_zero = np.array([[np.exp(0.3j)]])
    program_ops.append(Unitary((), width_zero))
    circuit.global_phase += 0.3
    program_ops += [Measure(q, q) for q in range(n)]
    return Program(n, n, tuple(program_ops), name=name), circuit


def check_small_circuits(
    xp: Any, kernels: Any, precision: str, widths: Sequence[int], seed: int, ops: int = 12, matrix_widths: Sequence[int] = ()
) -> None:
    """Random circuits of the given widths in one bulk launch, amplitudes and probabilities against Qiskit's Statevector
    (each circuit with a plain and a controlled dense matrix of every width in ``matrix_widths`` first)."""
    from qiskit.quantum_info import Statevector

    from gpu_provider.engine import small_batch

    rng = np.random.default_rng(seed)
    dtype = DTYPES[precision]
    pairs = [random_small_program(rng, n, ops, name=f"c{i}", matrix_widths=matrix_widths) for i, n in enumerate(widths)]
    packed = small_batch.pack([program for program, _ in pairs], dtype)
    out = xp.zeros(packed.amplitudes, dtype=dtype)
    kernels.run_small_circuits(out, xp.asarray(packed.headers), xp.asarray(packed.ops), xp.asarray(packed.pool), packed.num_qubits)
    amplitudes = to_numpy(xp, out)
    for (program, circuit), offset in zip(pairs, packed.offsets):
        size = 1 << program.num_qubits
        actual = amplitudes[offset : offset + size]
        expected = Statevector(circuit.remove_final_measurements(inplace=False)).data
        tolerance = TOLERANCE[precision]
        np.testing.assert_allclose(np.abs(actual.astype(np.complex128)) ** 2, np.abs(expected) ** 2, rtol=0, atol=tolerance, err_msg=program.name)
        assert_close(actual, expected, 10 * tolerance)


# ---------------------------------------------------------------------------
# the GPU tests


@pytest.fixture(scope="module")
def cp():
    return pytest.importorskip("cupy")


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("k", range(1, MAX_MATRIX_QUBITS + 1))
@pytest.mark.parametrize("precision", list(DTYPES))
def test_apply_matrix(cp, precision, k, placement, method):
    seed = 1000 * k + 10 * PLACEMENTS.index(placement) + METHODS.index(method)
    bits = place_targets(np.random.default_rng(seed), NUM_QUBITS, k, placement)
    check_apply_matrix(cp, kernels_for(DTYPES[precision]), precision, NUM_QUBITS, bits, method, seed)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("n,bits", [(1, [0]), (3, [2, 0, 1]), (5, [4, 0, 2, 1, 3]), (7, [6, 1]), (12, [11, 0, 5])])
@pytest.mark.parametrize("precision", list(DTYPES))
def test_apply_matrix_small_states(cp, precision, n, bits, method):
    check_apply_matrix(cp, kernels_for(DTYPES[precision]), precision, n, bits, method, seed=n)


@pytest.mark.parametrize("n", [3, 4, 5, 9, 12, NUM_QUBITS, 20])
@pytest.mark.parametrize("k", [3, 4, 5])
@pytest.mark.parametrize("precision", list(DTYPES))
def test_apply_matrix_multi(cp, precision, k, n):
    """apply_matrix_multi (k = 3..5; "strided" where it is not built): targets 0..k-1, the highest,
    target 0 with the highest, random; states with fewer groups than a block's threads take, and n = k."""
    if n < k:
        pytest.skip("fewer qubits than targets")
    rng = np.random.default_rng(10 * n + k)
    target_sets = [list(range(k)), list(range(n - k, n)), [0] + list(range(n - k + 1, n)), [int(b) for b in rng.choice(n, size=k, replace=False)]]
    for index, bits in enumerate(target_sets):
        rng.shuffle(bits)
        check_apply_matrix_multi(cp, kernels_for(DTYPES[precision]), precision, n, bits, seed=100 * n + 10 * k + index)


@pytest.mark.parametrize("n", [1, 3, 5, 9, 10, 11, 12, NUM_QUBITS, 20])
@pytest.mark.parametrize("k", range(1, MAX_MATRIX_QUBITS + 1))
@pytest.mark.parametrize("precision", list(DTYPES))
def test_apply_matrix_tiled_async(cp, precision, k, n):
    """apply_matrix_low_async ("tiled_async"): low, split and random targets on states from one tile
    (or less) to many tiles per resident block, against NumPy and bit for bit against "tiled"."""
    if n < k:
        pytest.skip("fewer qubits than targets")
    rng = np.random.default_rng(20 * n + k)
    for index, bits in enumerate(async_target_sets(rng, n, k)):
        check_apply_matrix_async(cp, kernels_for(DTYPES[precision]), precision, n, bits, seed=100 * n + 10 * k + index)


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("k", [1, 2, 3, 5, 7, MAX_DIAGONAL_QUBITS])
@pytest.mark.parametrize("precision", list(DTYPES))
def test_apply_diagonal(cp, precision, k, placement):
    seed = 100 * k + PLACEMENTS.index(placement)
    bits = place_targets(np.random.default_rng(seed), NUM_QUBITS, k, placement)
    check_apply_diagonal(cp, kernels_for(DTYPES[precision]), precision, NUM_QUBITS, bits, seed)


@pytest.mark.parametrize("bit", [0, 1, 5, NUM_QUBITS - 1])
@pytest.mark.parametrize("precision", list(DTYPES))
def test_probability_one(cp, precision, bit):
    check_probability_one(cp, kernels_for(DTYPES[precision]), precision, NUM_QUBITS, bit, seed=bit)


@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("outcome", [0, 1])
@pytest.mark.parametrize("bit", [0, 3, NUM_QUBITS - 1])
@pytest.mark.parametrize("precision", list(DTYPES))
def test_collapse(cp, precision, bit, outcome, flip):
    check_collapse(cp, kernels_for(DTYPES[precision]), precision, NUM_QUBITS, bit, outcome, flip, seed=bit + 2 * outcome)


@pytest.mark.parametrize("n", [6, NUM_QUBITS])
@pytest.mark.parametrize("precision", list(DTYPES))
def test_statevector_with_kernels_matches_numpy(cp, precision, n):
    check_statevector_program(cp, kernels_for(DTYPES[precision]), precision, n, seed=n)


@pytest.mark.parametrize("n", [2, 9, NUM_QUBITS])
@pytest.mark.parametrize("precision", list(DTYPES))
def test_to_canonical_in_place(cp, precision, n):
    check_in_place_canonical(cp, kernels_for(DTYPES[precision]), precision, n, seed=n)


def test_kernels_run_on_the_current_stream(cp):
    """Launched inside a non-default stream, the work is ordered on that stream."""
    rng = np.random.default_rng(7)
    n = 20
    initial = random_state(rng, n)
    matrix = random_unitary(rng, 4)
    kernels = kernels_for(np.complex128)
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        state = device_state(cp, n, np.complex128, initial)
        device_matrix = cp.asarray(matrix)
        for _ in range(5):
            kernels.apply_matrix(state, [0, n - 1], device_matrix)
        done = cp.cuda.Event()
        done.record(stream)
    done.synchronize()
    oracle = host_state(n, np.complex128, initial)
    for _ in range(5):
        oracle.apply_unitary([0, n - 1], matrix)
    assert_close(cp.asnumpy(state.data, stream=stream), oracle.to_host(), TOLERANCE["double"])


@pytest.mark.parametrize("n", [1, 5, NUM_QUBITS])
@pytest.mark.parametrize("precision", list(DTYPES))
def test_pauli_expectation_kernel_matches_xp_path(cp, precision, n):
    check_pauli_expectation(cp, kernels_for(DTYPES[precision]), precision, n, seed=n)


def test_pauli_expectation_kernel_with_more_terms_than_one_launch(cp):
    from gpu_provider.engine.kernels import MAX_PAULI_TERMS

    check_pauli_expectation(cp, kernels_for(np.complex128), "double", 12, seed=5, count=3 * MAX_PAULI_TERMS)



@pytest.mark.parametrize("precision", list(DTYPES))
def test_small_circuits_in_bulk(cp, precision):
    """run_small_circuits on every width up to what the default 48 KiB of shared memory holds,
    many circuits per launch (grid-stride over circuits)."""
    widest = SMALL_DEFAULT_QUBITS["float" if precision == "single" else "double"]
    widths = [n for n in range(1, widest + 1) for _ in range(3)]
    check_small_circuits(cp, kernels_for(DTYPES[precision]), precision, widths, seed=11, ops=40)


@pytest.mark.parametrize("precision", list(DTYPES))
def test_wide_small_circuits_in_bulk(cp, precision):
    """The widths past the default 48 KiB (dynamic shared memory opt-in): up to what this device
    allows (14 in single and 13 in double on sm_80 and sm_90), alone and mixed with narrow ones."""
    kernels = kernels_for(DTYPES[precision])
    real = "float" if precision == "single" else "double"
    widest = kernels.small_max_qubits(cp.cuda.Device().id)
    if widest <= SMALL_DEFAULT_QUBITS[real]:
        pytest.skip(f"this device's shared memory per block holds {widest} qubits in {precision}, the default")
    wide = list(range(SMALL_DEFAULT_QUBITS[real] + 1, widest + 1))
    matrix_widths = range(1, MAX_MATRIX_QUBITS + 1)
    check_small_circuits(cp, kernels, precision, wide * 3, seed=12, ops=30, matrix_widths=matrix_widths)
    check_small_circuits(cp, kernels, precision, [2, widest, 5, widest - 1, 9], seed=13, ops=30, matrix_widths=matrix_widths)


@pytest.mark.parametrize("precision", list(DTYPES))
def test_small_circuits_through_the_backend_match_one_at_a_time(precision):
    """1000-ish circuits through the bulk path give the counts the one-at-a-time path gives."""
    from gpu_provider import GPUSimulator
    from tests.engine.test_small_batch import random_u_cx

    circuits = [random_u_cx(10, 20, seed) for seed in range(300)]
    backend = GPUSimulator(device="GPU", precision=precision, seed_simulator=5)
    bulk = backend.run(circuits, shots=256).result()
    single = backend.run(circuits, shots=256, batch_small_circuits=False).result()
    same = sum(bulk.get_counts(i) == single.get_counts(i) for i in range(len(circuits)))
    assert same >= len(circuits) - 3  # rounding of the probabilities may move a draw across a boundary


@pytest.mark.parametrize("precision", list(DTYPES))
def test_wide_small_circuits_through_the_backend_match_one_at_a_time(precision):
    """Circuits past the default 48 KiB (13-14 qubits in single, 12-13 in double where the device
    allows), mixed with narrow ones, give the one-at-a-time counts through the bulk path, in order."""
    import cupy

    from gpu_provider import GPUSimulator
    from tests.engine.test_small_batch import random_u_cx

    real = "float" if precision == "single" else "double"
    widest = kernels_for(DTYPES[precision]).small_max_qubits(cupy.cuda.Device().id)
    widths = [4, widest, 10, SMALL_DEFAULT_QUBITS[real] + 1, widest, 2] * 10
    circuits = [random_u_cx(n, 10, seed) for seed, n in enumerate(widths)]
    backend = GPUSimulator(device="GPU", precision=precision, seed_simulator=9)
    bulk = backend.run(circuits, shots=256).result()
    single = backend.run(circuits, shots=256, batch_small_circuits=False).result()
    assert [r.header["name"] for r in bulk.results] == [c.name for c in circuits]
    same = sum(bulk.get_counts(i) == single.get_counts(i) for i in range(len(circuits)))
    assert same >= len(circuits) - 3  # rounding of the probabilities may move a draw across a boundary


@pytest.mark.parametrize("precision", list(DTYPES))
def test_small_shots_draw_numpys_philox(cp, precision):
    """run_small_shots: each shot's measurements are its Philox4x64-10 uniforms (NumPy's generator)."""
    from tests.engine.test_small_shots import check_philox_draws

    check_philox_draws(cp, kernels_for(DTYPES[precision]), shots=2000)


@pytest.mark.parametrize("precision", list(DTYPES))
def test_dynamic_circuits_in_one_launch_agree_with_the_cpu_and_aer(precision):
    """Teleport (exact), loops with break/continue/switch and syndrome rounds (Aer), and the
    widest circuit the device's shared memory holds, their shots in one launch each."""
    import cupy
    from qiskit import QuantumCircuit

    from gpu_provider import GPUSimulator
    from tests.helpers import aer_counts, assert_counts_agree, assert_counts_match
    from tests.test_shot_branching import loops_and_switch, syndrome_rounds, teleport

    backend = GPUSimulator(device="GPU", precision=precision, shot_branching_enable=False)
    shots = 20_000
    result = backend.run(teleport(), shots=shots, seed_simulator=3).result()
    assert result.results[0].metadata["batched_shots"] is True
    p1 = np.sin(0.55) ** 2
    exact = {f"{out}{m1}{m0}": 0.25 * (p1 if out == "1" else 1 - p1) for out in "01" for m1 in "01" for m0 in "01"}
    assert_counts_match(result.get_counts(), exact, shots=shots)
    for circuit in (loops_and_switch(), syndrome_rounds(5, 3)):
        counts = backend.run(circuit, shots=shots, seed_simulator=4).result().get_counts()
        assert_counts_agree(counts, aer_counts(circuit, shots))
    real = "float" if precision == "single" else "double"
    widest = kernels_for(DTYPES[precision]).small_max_qubits(cupy.cuda.Device().id)
    assert widest >= SMALL_DEFAULT_QUBITS[real]
    wide = QuantumCircuit(widest, 2)
    wide.h(0)
    wide.measure(0, 0)
    with wide.if_test((wide.clbits[0], 1)):
        for q in range(1, widest):
            wide.x(q)
    wide.measure(widest - 1, 1)
    counts = backend.run(wide, shots=shots, seed_simulator=5).result().get_counts()
    assert set(counts) == {"00", "11"} and abs(counts["11"] - shots / 2) < 5 * np.sqrt(shots) / 2
