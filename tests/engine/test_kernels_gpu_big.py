"""Every kernel on states past 32-bit indices: 2^32 amplitudes in complex64, 2^31 in complex128.

Flat indices then pass 2^31 and 2^32 and byte offsets 2^34 and 2^35, where an
``int`` index or offset anywhere in a kernel would wrap. A NumPy copy of such a
state (32 GiB) is no oracle, so the checks are cheap and independent of the
kernels:

- a matrix or diagonal: a few thousand groups, always the first and the last
  ones in memory, gathered before and after the launch and compared with the
  host's product;
- ``probability_one`` and ``pauli_expectation``: sums taken chunk by chunk with
  array operations (``chunked_*``);
- ``collapse``: sampled groups and the norm.

The GPU tests need a usable GPU with room for the state (they skip otherwise);
``test_kernels_compile.py`` runs the same checks with the host-emulated kernels
on small states, with planted kernel errors that they must catch.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import pytest

from gpu_provider.engine import kernels as K
from gpu_provider.engine.statevector import StateVector
from tests.engine.test_kernels_gpu import random_unitary

TOLERANCE = {np.dtype(np.complex64): 2e-5, np.dtype(np.complex128): 1e-12}
SUM_TOLERANCE = {np.dtype(np.complex64): 1e-5, np.dtype(np.complex128): 1e-10}
CHUNK = 1 << 24


def fill_random(xp: Any, data: Any, seed: int) -> None:
    """Normalised random amplitudes, a chunk at a time (no temporary the size of the state)."""
    flat = data.view(data.real.dtype)
    rng = np.random.default_rng(seed) if xp is np else None
    if xp is not np:
        xp.random.seed(seed)
    for start in range(0, flat.size, CHUNK):
        count = min(CHUNK, flat.size - start)
        values = rng.standard_normal(count) if xp is np else xp.random.standard_normal(count, dtype=np.float64)
        flat[start : start + count] = values.astype(flat.dtype)
    data *= data.dtype.type(1.0 / math.sqrt(chunked_norm(xp, data)))


def chunked_norm(xp: Any, data: Any) -> float:
    return sum(float(xp.vdot(data[s : s + CHUNK], data[s : s + CHUNK]).real) for s in range(0, data.size, CHUNK))


def group_indices(n: int, bits: Sequence[int], bases: np.ndarray) -> np.ndarray:
    """Flat indices ``(len(bases), 2^k)``: row g is group ``bases[g]`` (its other bits in order), column c
    the amplitude whose target bit ``bits[j]`` is bit j of c."""
    index = np.asarray(bases, dtype=np.uint64)
    for bit in sorted(bits):  # open a zero at each target, lowest first
        low = index & np.uint64((1 << bit) - 1)
        index = ((index >> np.uint64(bit)) << np.uint64(bit + 1)) | low
    offsets = np.zeros(1 << len(bits), dtype=np.uint64)
    for c in range(1 << len(bits)):
        for j, bit in enumerate(bits):
            if (c >> j) & 1:
                offsets[c] |= np.uint64(1 << bit)
    return (index[:, None] | offsets[None, :]).astype(np.int64)


def sample_groups(rng: np.random.Generator, n: int, k: int, count: int = 4096) -> np.ndarray:
    groups = 1 << (n - k)
    edges = np.concatenate([np.arange(min(64, groups)), np.arange(max(0, groups - 64), groups)])  # the first and last in memory
    return np.unique(np.concatenate([rng.integers(0, groups, size=count, dtype=np.int64), edges]))


def gather(xp: Any, data: Any, index: np.ndarray) -> np.ndarray:
    values = data[index] if xp is np else data[xp.asarray(index)].get()
    return np.asarray(values, dtype=np.complex128)


def chunked_probability_one(xp: Any, data: Any, n: int, bit: int) -> float:
    """Sum of |a|^2 over the amplitudes whose ``bit`` is 1, in blocks of at most ``CHUNK``."""
    ones = data.reshape(1 << (n - 1 - bit), 2, 1 << bit)[:, 1, :]
    rows, cols = ones.shape
    col_step = min(cols, CHUNK)
    row_step = max(1, CHUNK // col_step)
    total = 0.0
    for r in range(0, rows, row_step):
        for c in range(0, cols, col_step):
            part = ones[r : r + row_step, c : c + col_step].astype(np.complex128)
            total += float(xp.sum(part.real**2 + part.imag**2))
    return total


def _parity(xp: Any, values: Any) -> Any:
    for shift in (32, 16, 8, 4, 2, 1):
        values = values ^ (values >> shift)
    return values & 1


def chunked_pauli(xp: Any, data: Any, n: int, x_mask: int, z_masks: Sequence[int], weights: Sequence[complex]) -> complex:
    """``sum_i f(i) conj(psi[i ^ x]) psi[i]``, ``f(i) = sum_t w_t (-1)^popcount(i & z_t)``, chunk by chunk:
    chunk j meets chunk ``j ^ (x >> c)``, its amplitudes in the order of the low bits of ``x`` flipped."""
    c = min(n, 22)
    size = 1 << c
    local = xp.arange(size, dtype=np.int64)
    flipped = local ^ (x_mask & (size - 1))
    total = 0j
    for j in range(1 << (n - c)):
        partner = j ^ (x_mask >> c)
        own = data[j * size : (j + 1) * size].astype(np.complex128)
        other = data[partner * size : (partner + 1) * size][flipped].astype(np.complex128)
        product = xp.conj(other) * own
        index = local | (j << c)
        f = xp.zeros(size, dtype=np.complex128)
        for z, w in zip(z_masks, weights):
            f += complex(w) * (1 - 2 * _parity(xp, index & z))
        total += complex(xp.sum(f * product))
    return total


def big_state_checks(xp: Any, kernels: Any, n: int, seed: int = 5, methods: Sequence[str] | None = None) -> list[tuple[str, float, float]]:
    """Every kernel once on an n-qubit state (``kernels.dtype``): rows (check, error, tolerance).

    Matrices with every method on targets that include the top bit and bit 0; diagonals on
    10 targets; the top bit's probability; a Pauli expectation whose X flips the top bit;
    a collapse on the top bit; the norm at the end. ``methods``: only the matrix cases of these methods.
    """
    if n < 13:
        raise ValueError(f"big_state_checks needs at least 13 qubits, not {n}")
    dtype = np.dtype(kernels.dtype)
    rng = np.random.default_rng(seed)
    state = StateVector(xp, n, dtype, kernels)
    fill_random(xp, state.data, seed)
    tol = TOLERANCE[dtype]
    rows: list[tuple[str, float, float]] = []

    def matrix_case(bits: list[int], method: str) -> float:
        index = group_indices(n, bits, sample_groups(rng, n, len(bits)))
        before = gather(xp, state.data, index)
        matrix = random_unitary(rng, 1 << len(bits))
        kernels.apply_matrix(state, bits, xp.asarray(matrix.astype(dtype)), method=method)
        return float(np.max(np.abs(gather(xp, state.data, index) - before @ matrix.T)))

    top, mid = n - 1, 6  # n >= 13: bits 0..4 (lane bits), 5..7 and top - 4..top are distinct
    cases = [
        ("strided", [top]),
        ("strided", [top, 5, mid]),
        ("strided", [top - 1, top, top - 4, top - 2, top - 3]),
        ("strided_multi", [top, mid, 7]),
        ("strided_multi", [top, 5, mid, top - 1, 7]),
        ("tiled", [0]),
        ("tiled", [2, top, 0, mid]),
        ("tiled", [3, 0, 4, 1, 2]),
        ("tiled_async", [1, top]),
        ("tiled_async", [0, top, mid, 3, top - 1]),
        ("warp", [0, top]),
        ("warp", [4, 1, top, mid]),
        ("auto", [0, 1]),
        ("auto", [top, 0, mid]),
    ]
    for method, bits in cases:
        if methods is not None and method not in methods:
            continue
        rows.append((f"apply_matrix {method} {bits}", matrix_case(bits, method), tol))

    for bits in ([top], [0, top, mid], sorted({int(b) for b in np.linspace(0, top, K.MAX_DIAGONAL_QUBITS)})):
        index = group_indices(n, bits, sample_groups(rng, n, len(bits)))
        before = gather(xp, state.data, index)
        diagonal = np.exp(1j * rng.uniform(0, 2 * np.pi, 1 << len(bits)))
        kernels.apply_diagonal(state, bits, xp.asarray(diagonal.astype(dtype)))
        rows.append((f"apply_diagonal {bits}", float(np.max(np.abs(gather(xp, state.data, index) - before * diagonal))), tol))

    for bit in (0, top):
        expected = chunked_probability_one(xp, state.data, n, bit)
        rows.append((f"probability_one bit {bit}", abs(kernels.probability_one(state, bit) - expected), SUM_TOLERANCE[dtype]))

    x_mask = (1 << top) | (1 << 3) | 1
    z_masks = [0, 1 << top, (1 << top) | (1 << 5) | 1, (1 << mid) | 2]
    weights = [0.5, -1.25 + 0.5j, 0.75, 2.0 - 1.0j]
    expected = chunked_pauli(xp, state.data, n, x_mask, z_masks, weights)
    got = kernels.pauli_expectation(state, x_mask, np.array(z_masks, dtype=np.uint64), np.array(weights, dtype=np.complex128))
    rows.append(("pauli_expectation, X on the top bit", abs(got - expected), SUM_TOLERANCE[dtype]))

    # Collapse on the top bit to outcome 1 and move it to 0 (a reset): the kept half, rescaled, lands at bit 0.
    p1 = chunked_probability_one(xp, state.data, n, top)
    index = group_indices(n, [top], sample_groups(rng, n, 1))
    before = gather(xp, state.data, index)
    kernels.collapse(state, top, 1, 1.0 / math.sqrt(p1), True)
    expected = np.stack([before[:, 1] / math.sqrt(p1), np.zeros(len(before))], axis=1)
    rows.append(("collapse top bit (reset after outcome 1)", float(np.max(np.abs(gather(xp, state.data, index) - expected))), 10 * tol))
    rows.append(("norm at the end", abs(chunked_norm(xp, state.data) - 1.0), 1e-4 if dtype == np.complex64 else 1e-10))
    return rows


def failures(rows: list[tuple[str, float, float]]) -> list[str]:
    return [f"{name}: error {error:.3e} > {tolerance:.0e}" for name, error, tolerance in rows if not error <= tolerance]


# ---------------------------------------------------------------------------
# On the GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, n", [(np.complex64, 32), (np.complex128, 31)], ids=["complex64-2^32", "complex128-2^31"])
def test_every_kernel_past_32_bit_indices(dtype, n):
    cupy = pytest.importorskip("cupy")
    pool = cupy.get_default_memory_pool()
    pool.free_all_blocks()
    free = cupy.cuda.runtime.memGetInfo()[0]
    needed = (1 << n) * np.dtype(dtype).itemsize
    # the state, plus the oracle's chunks (a few arrays of 2^22 complex128 and int64)
    if needed + (1 << 30) > free:
        pytest.skip(f"a 2^{n} {np.dtype(dtype)} state needs {needed + (1 << 30):,} bytes; the GPU has {free:,} free")
    try:
        rows = big_state_checks(cupy, K.kernels_for(dtype), n)
    finally:
        pool.free_all_blocks()
    assert not failures(rows), failures(rows)


def planted(kernels: Any, plant: str) -> Any:
    """``kernels`` with one planted error, for the CPU tests that show these checks catch it."""

    class Planted:
        def __getattr__(self, name: str) -> Any:
            return getattr(kernels, name)

        def apply_matrix(self, state: Any, bits: Sequence[int], matrix: Any, method: str = "auto") -> None:
            if plant == "transpose":
                matrix = np.ascontiguousarray(np.asarray(matrix).T)
            last = None
            if plant == "tail":  # the last group in memory left alone (a bound or index bug at the end of the state)
                last = group_indices(state.num_qubits, bits, np.array([(1 << (state.num_qubits - len(bits))) - 1]))
                saved = state.data[last].copy()
            kernels.apply_matrix(state, bits, matrix, method=method)
            if last is not None:
                state.data[last] = saved

        def probability_one(self, state: Any, bit: int) -> float:
            p = kernels.probability_one(state, bit)
            if plant == "prob-tail":  # a reduction that drops its last 1024 amplitudes
                index = np.arange(state.data.size - 1024, state.data.size)
                tail = state.data[index[((index >> bit) & 1) == 1]]
                p -= float(np.sum(np.abs(tail) ** 2))
            return p

        def pauli_expectation(self, state: Any, x_mask: int, z_masks: Any, weights: Any) -> complex:
            if plant == "pauli-x-low":  # the X mask's top bit lost (a 32-bit mask)
                x_mask &= (1 << (state.num_qubits - 1)) - 1
            return kernels.pauli_expectation(state, x_mask, z_masks, weights)

        def collapse(self, state: Any, bit: int, outcome: int, scale: float, flip: bool) -> None:
            kernels.collapse(state, bit, outcome, 1.0 if plant == "collapse-noscale" else scale, flip)

    return Planted()


PLANTS = ("transpose", "tail", "prob-tail", "pauli-x-low", "collapse-noscale")
