"""A statevector on either device, written once against ``xp`` (NumPy or CuPy).

The state is a ``(2,) * n`` tensor with a lazily tracked axis order. A dense
k-qubit matrix is one matrix product from the state into the scratch buffer,
after which the two swap: with its targets on the first axes it multiplies
from the left, on the last axes from the right, and the small matrix is
re-labelled to whatever order the targets have there. Only when the targets
are not already adjacent at one end is the state transposed (one strided copy
into the buffer), and that copy is laid out to keep its innermost loop long
and its reads near-contiguous (see ``StateVector._gather``). Diagonals multiply
in place through a broadcast whose inner loop is a whole row of amplitudes, and
sampling reads the state in canonical order. So a gate costs at most
two passes over memory and allocates nothing of full size: the state and one
scratch buffer are all there is. On the GPU, compiled kernels (see
``gpu_provider.engine.kernels``) apply the common widths in place on the
physical bit positions this order defines.
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import Any, Sequence

import numpy as np

from ..errors import SimulationError

_LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
# Controlled gates with at most this many qubits in all are applied as one dense matrix.
DENSE_CONTROLLED_MAX = 6
# States of at most this many qubits apply dense gates through a cached
# gather index (StateVector._apply_small) instead of axis bookkeeping.
SMALL_STATE_QUBITS = 12
# Small states multiply matrices up to this dimension in real form (StateVector._apply_small).
REAL_FORM_MAX_DIM = 1 << 6
# The sampling table is summed over blocks of at most this many amplitudes.
TABLE_BLOCK_AMPLITUDES = 1 << 22
# Diagonals and sampling work on the state as rows of 2^this amplitudes.
ROW_QUBITS = 10
# Scratch memory one chunk of samples may use, and the most shots drawn in one chunk.
SAMPLE_WORKSPACE_BYTES = 32 << 20
SAMPLE_CHUNK_MAX = 1 << 17
# A diagonal's broadcast factors hold at most 2^this values.
DIAGONAL_FACTORS_MAX_QUBITS = 14
# A state in place (StateVector.in_place) applies a dense gate a chunk of at most this many bytes at
# a time; the chunk and its product are the only temporaries.
IN_PLACE_CHUNK_BYTES = 16 << 20
# StateVector.preload takes arrays of at most this many entries, this many bytes in all.
PRELOAD_MAX_ENTRIES = 1 << 12
PRELOAD_MAX_BYTES = 64 << 20


# Exchanges two qubits: applied by the kernels to two bit positions, it exchanges what they hold.
_SWAP = np.array([[1, 0, 0, 0], [0, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 1]], dtype=np.complex128)


@functools.lru_cache(maxsize=1024)
def _group_index(num_qubits: int, qubits: tuple[int, ...]) -> np.ndarray:
    """Flat indices of every group of a gate on ``qubits``, canonical order: shape (2^(n-k), 2^k).

    Row g is one group (the other qubits' bits fixed by g); column c its member
    whose bit ``qubits[j]`` is bit j of c, so ``rows @ matrix.T`` applies the gate.
    """
    k = len(qubits)
    rest = [q for q in range(num_qubits) if q not in qubits]
    groups = np.arange(1 << (num_qubits - k), dtype=np.intp)
    base = np.zeros_like(groups)
    for j, q in enumerate(rest):
        base |= ((groups >> j) & 1) << q
    members = np.arange(1 << k, dtype=np.intp)
    offset = np.zeros_like(members)
    for j, q in enumerate(qubits):
        offset |= ((members >> j) & 1) << q
    index = base[:, None] | offset[None, :]
    index.setflags(write=False)
    return index


def _real_forms(arrays, dtype) -> dict:
    """``{("real", id(m)): (m, R)}`` for the square matrices among ``arrays``, built in a few array calls.

    ``R`` is the real 2d x 2d matrix with ``g.view(real) @ R == (g @ m.T).view(real)``
    for rows ``g`` of d complex amplitudes stored as interleaved (re, im) pairs:
    for a = m[r, c], R[2c, 2r] = R[2c+1, 2r+1] = a.real, R[2c, 2r+1] = a.imag,
    R[2c+1, 2r] = -a.imag. Matrices of one size are converted together.
    """
    real = np.finfo(dtype).dtype
    by_size: dict[int, dict[int, np.ndarray]] = {}
    for array in arrays:
        if array.ndim == 2 and array.shape[0] == array.shape[1] and 2 <= array.shape[0] <= REAL_FORM_MAX_DIM:
            by_size.setdefault(array.shape[0], {})[id(array)] = array
    forms = {}
    for dim, matrices in by_size.items():
        transposed = np.stack(list(matrices.values())).transpose(0, 2, 1)
        out = np.empty((len(matrices), 2 * dim, 2 * dim), dtype=real)
        out[:, 0::2, 0::2] = transposed.real
        out[:, 1::2, 1::2] = transposed.real
        out[:, 0::2, 1::2] = transposed.imag
        out[:, 1::2, 0::2] = -transposed.imag
        for (key, matrix), form in zip(matrices.items(), out):
            forms[("real", key)] = (matrix, form)
    return forms


@functools.lru_cache(maxsize=512)
def _permuted_indices(source: tuple[int, ...]) -> np.ndarray:
    """Index j of a block maps to the matrix index whose bit ``source[b]`` is bit b of j."""
    dim = 1 << len(source)
    j = np.arange(dim)
    index = np.zeros(dim, dtype=np.intp)
    for b, i in enumerate(source):
        index |= ((j >> b) & 1) << i
    return index


def controlled_matrix(matrix: np.ndarray, num_controls: int, ctrl_state: int) -> np.ndarray:
    """The dense matrix on ``controls + targets`` (controls are the low bits)."""
    k = int(round(math.log2(matrix.shape[0])))
    dim = 1 << (num_controls + k)
    full = np.eye(dim, dtype=matrix.dtype)
    rows = (np.arange(1 << k) << num_controls) | ctrl_state
    full[np.ix_(rows, rows)] = matrix
    return full


class StateVector:
    """An n-qubit state on one device, in ``dtype`` (complex64 or complex128).

    With ``in_place`` the state never allocates its scratch buffer: dense gates apply a chunk
    at a time through strided views (:meth:`_apply_to_axes`), ``initialize`` writes through
    views, and the axes stay in canonical order. That is how the CPU runs a state of which two
    copies do not fit in memory (about one more pass per dense gate), and how a GPU runs one whose
    program its kernels do not cover alone (those ops take this path, the rest the kernels).
    """

    in_place = False

    def __init__(self, xp: Any, num_qubits: int, dtype, kernels: Any = None, in_place: bool = False) -> None:
        self.in_place = in_place
        self.xp = xp
        self.num_qubits = num_qubits
        self.dtype = np.dtype(dtype)
        self.kernels = kernels
        self.data = xp.zeros(1 << num_qubits, dtype=self.dtype)
        self.data[0] = 1
        self._buffer = None
        # order[axis] is the qubit held by tensor axis ``axis`` (axis 0 most significant).
        self.order: list[int] = list(range(num_qubits - 1, -1, -1))
        self._device_arrays: dict[Any, tuple[np.ndarray, Any]] = {}

    # -- bookkeeping ---------------------------------------------------------

    @property
    def buffer(self):
        if self._buffer is None:
            self._buffer = self.xp.empty_like(self.data)
        return self._buffer

    def chunk_qubits(self) -> int:
        """The low qubits (bit positions) a chunk of at most ``IN_PLACE_CHUNK_BYTES`` spans: how a
        state in place, or a read that makes no state-sized temporary, cuts the state."""
        return min(self.num_qubits, max(0, (IN_PLACE_CHUNK_BYTES // self.dtype.itemsize).bit_length() - 1))

    def _swap(self) -> None:
        self.data, self._buffer = self._buffer, self.data

    def _tensor(self, array=None):
        return (self.data if array is None else array).reshape((2,) * self.num_qubits)

    def axis(self, qubit: int) -> int:
        return self.order.index(qubit)

    def bit(self, qubit: int) -> int:
        """Physical bit position of ``qubit`` in the flat state index."""
        return self.num_qubits - 1 - self.order.index(qubit)

    def _on_device(self, array: np.ndarray):
        """Device copy of a small host array, cached by identity for this state."""
        if self.xp is np:
            return array.astype(self.dtype, copy=False)
        key = id(array)
        cached = self._device_arrays.get(key)
        if cached is None or cached[0] is not array:
            cached = (array, self.xp.asarray(array.astype(self.dtype, copy=False)))
            self._device_arrays[key] = cached
        return cached[1]

    def preload(self, arrays) -> None:
        """Copy the small host arrays a program will use to the device in one transfer.

        Each later ``_on_device`` of one of them is then a cache hit instead of a
        host-to-device copy of its own per gate. Only arrays up to
        ``PRELOAD_MAX_ENTRIES`` entries each and ``PRELOAD_MAX_BYTES`` in all are
        taken; the rest are copied when first used, as before. On NumPy a small
        state instead prepares, in a few array calls for the whole program, the
        real form of every dense matrix (see :func:`_real_forms`).
        """
        if self.xp is np:
            if self.num_qubits <= SMALL_STATE_QUBITS:
                self._device_arrays.update(_real_forms(arrays, self.dtype))
            return
        chosen, seen, total = [], set(), 0
        for array in arrays:
            if id(array) in seen or id(array) in self._device_arrays or array.size > PRELOAD_MAX_ENTRIES:
                continue
            size = array.size * self.dtype.itemsize
            if total + size > PRELOAD_MAX_BYTES:
                break
            seen.add(id(array))
            chosen.append(array)
            total += size
        if not chosen:
            return
        flat = np.concatenate([a.astype(self.dtype, copy=False).reshape(-1) for a in chosen])
        device = self.xp.asarray(flat)
        offset = 0
        for array in chosen:
            self._device_arrays[id(array)] = (array, device[offset : offset + array.size].reshape(array.shape))
            offset += array.size

    def _reorder(self, new_order: list[int]) -> None:
        """Copy the state into the buffer with axes in ``new_order``, then swap."""
        if new_order == self.order:
            return
        perm = [self.order.index(q) for q in new_order]
        self.xp.copyto(self._tensor(self.buffer), self._tensor().transpose(perm))
        self._swap()
        self.order = list(new_order)

    def to_canonical(self) -> None:
        canonical = self._canonical_order()
        if self.order == canonical:
            return
        if self.in_place and (self.kernels is None or not self.kernels.can_apply(2)):
            # No buffer to transpose into: exchange axes pairwise, each a SWAP applied in place.
            order = self.order
            for axis, wanted in enumerate(canonical):
                if order[axis] != wanted:
                    other = order.index(wanted)
                    self._apply_to_axes(self._tensor(), [axis, other], _SWAP)
                    order[axis], order[other] = order[other], order[axis]
            return
        if self.kernels is not None and self._buffer is None and self.kernels.can_apply(2):
            # The GPU kernels path holds one state array: reorder in place by SWAPs on
            # pairs of bit positions (a pass each, exact) instead of a copy into a buffer.
            order = self.order
            for axis, wanted in enumerate(canonical):
                if order[axis] != wanted:
                    other = order.index(wanted)
                    n = self.num_qubits
                    self.kernels.apply_matrix(self, [n - 1 - axis, n - 1 - other], self._on_device(_SWAP))
                    order[axis], order[other] = order[other], order[axis]
            return
        self._reorder(canonical)

    def copy_from(self, other: "StateVector") -> None:
        self.xp.copyto(self.data, other.data)
        self.order = list(other.order)

    def snapshot(self, in_place: bool = False) -> "StateVector":
        """A copy of the state. With ``in_place`` the copy never allocates a scratch buffer of its
        own (gates on it apply a chunk at a time): a read's scratch copy costs one array, not two."""
        twin = StateVector.__new__(StateVector)
        twin.__dict__.update(self.__dict__)
        twin.data = self.data.copy()
        twin._buffer = None
        twin.in_place = self.in_place or in_place
        twin.order = list(self.order)
        twin._device_arrays = self._device_arrays  # the program's matrices, read-only: shared by its copies
        return twin

    # -- unitary operations --------------------------------------------------

    def apply_unitary(self, qubits: Sequence[int], matrix: np.ndarray) -> None:
        k = len(qubits)
        if k == 0:
            self.data *= self.dtype.type(matrix[0, 0])
            return
        if self.kernels is not None and self.kernels.can_apply(k):
            self.kernels.apply_matrix(self, [self.bit(q) for q in qubits], self._on_device(matrix))
            return
        n = self.num_qubits
        if n <= SMALL_STATE_QUBITS and k < n:
            self._apply_small(qubits, matrix)
            return
        if self.in_place:
            self._apply_to_axes(self._tensor(), [self.order.index(q) for q in qubits], matrix)
            return
        order = self.order
        axes = [order.index(q) for q in qubits]
        low, high = min(axes), max(axes)
        if high - low != k - 1 or (0 < low and high < n - 1):
            low = self._gather(qubits, axes)
        dim = 1 << k
        matrix = self._block_matrix(qubits, matrix, low)
        xp = self.xp
        if low == 0:
            # Targets lead: one product over the whole state, rows are the targets.
            xp.matmul(matrix, self.data.reshape(dim, -1), out=self.buffer.reshape(dim, -1))
        else:
            xp.matmul(self.data.reshape(-1, dim), matrix.T, out=self.buffer.reshape(-1, dim))
        self._swap()

    def _apply_to_axes(self, tensor, axes: Sequence[int], matrix: np.ndarray) -> None:
        """``matrix`` (bit i of its index on ``axes[i]`` of ``tensor``, the state or a view of it)
        applied in place, a chunk of at most ``IN_PLACE_CHUNK_BYTES`` at a time: the chunk's
        copy and its product are the only temporaries. A chunk fixes the leading axes the gate
        does not touch, so it is a strided view whose inner axes stay contiguous."""
        xp = self.xp
        k = len(axes)
        rest = [a for a in range(tensor.ndim) if a not in axes]
        inner = max(0, self.chunk_qubits() - k)
        outer = rest[: max(0, len(rest) - inner)]
        view = tensor.transpose(outer + list(reversed(axes)) + rest[len(outer) :])
        matrix = self._on_device(matrix)
        dim = 1 << k
        for index in itertools.product((0, 1), repeat=len(outer)):
            chunk = view[index]
            chunk[...] = xp.matmul(matrix, chunk.reshape(dim, -1)).reshape(chunk.shape)

    def _apply_small(self, qubits: Sequence[int], matrix: np.ndarray) -> None:
        """A small state in canonical order: gather the groups, one product, scatter back.

        Below ``SMALL_STATE_QUBITS`` the arithmetic is a few microseconds and the
        axis bookkeeping of the general path is most of a gate's cost; here a
        gate is three array calls on a cached index, and the order stays canonical.
        """
        if self.order != self._canonical_order():
            self.to_canonical()
        index = _group_index(self.num_qubits, tuple(qubits))
        if self.xp is np:
            # A real product on the groups' interleaved (re, im) pairs: BLAS's
            # real kernel has about half the fixed cost of its complex one here.
            key = ("real", id(matrix))
            real = self._device_arrays.get(key)
            if real is None or real[0] is not matrix:
                real = _real_forms((matrix,), self.dtype).get(key)
                if real is not None:
                    self._device_arrays[key] = real
            groups = self.data[index]
            if real is None:  # wider than _real_forms takes
                self.data[index] = groups @ matrix.astype(self.dtype, copy=False).T
            else:
                self.data[index] = (groups.view(real[1].dtype) @ real[1]).view(self.dtype)
            return
        key = ("index", id(index))
        cached = self._device_arrays.get(key)
        if cached is None or cached[0] is not index:
            cached = self._device_arrays[key] = (index, self.xp.asarray(index))
        index = cached[1]
        groups = self.data[index]
        self.data[index] = groups @ self._on_device(matrix).T

    def _canonical_order(self) -> list[int]:
        return list(range(self.num_qubits - 1, -1, -1))

    def _gather(self, qubits: Sequence[int], axes: list[int]) -> int:
        """Transpose so ``qubits`` sit on the first or last axes; return the block's first axis.

        A transposing copy runs at about memcpy speed when its innermost loop is
        long and reads nearly contiguous memory: that is, when the new order ends
        with a long run of axes that are adjacent, in the same order, and close to
        the end of the current order. Each run of non-target axes is a candidate
        for that suffix (the block then leads and the other axes keep their
        order), and so are the targets already at the end (the block then trails).
        The cheapest by :func:`_copy_cost` wins.
        """
        n = self.num_qubits
        order = self.order
        targets = set(qubits)
        sorted_axes = sorted(axes)
        block = [order[a] for a in sorted_axes]
        best_cost, best_order = None, None
        bounds = [-1] + sorted_axes + [n]
        for before, after in zip(bounds, bounds[1:]):
            if after - before < 2:
                continue
            run = order[before + 1 : after]
            inside = set(run)
            candidate = block + [q for q in order if q not in targets and q not in inside] + run
            cost = _copy_cost(len(run), n - after)
            if best_cost is None or cost < best_cost:
                best_cost, best_order = cost, candidate
        at_tail = 0
        while at_tail < n and order[n - 1 - at_tail] in targets:
            at_tail += 1
        if at_tail and (best_cost is None or _copy_cost(at_tail, 0) < best_cost):
            self._reorder([q for q in order if q not in targets] + block)
            return n - len(block)
        self._reorder(best_order)
        return 0

    def _block_matrix(self, qubits: Sequence[int], matrix: np.ndarray, low: int):
        """``matrix`` with its index bits re-labelled to the block at axes ``low``...

        Bit j of a block index belongs to the qubit on axis ``low + k - 1 - j``;
        bit i of the matrix index to ``qubits[i]``.
        """
        k = len(qubits)
        block = self.order[low : low + k]
        source = [qubits.index(block[k - 1 - j]) for j in range(k)]
        if source == list(range(k)):
            return self._on_device(matrix)
        index = _permuted_indices(tuple(source))
        if self.xp is np:
            return matrix.astype(self.dtype, copy=False)[np.ix_(index, index)]
        device_index = self.xp.asarray(index)
        return self._on_device(matrix)[device_index][:, device_index]

    def apply_controlled(self, controls: Sequence[int], ctrl_state: int, qubits: Sequence[int], matrix: np.ndarray) -> None:
        if not controls:
            self.apply_unitary(qubits, matrix)
            return
        if len(controls) + len(qubits) <= DENSE_CONTROLLED_MAX:
            self.apply_unitary(tuple(controls) + tuple(qubits), controlled_matrix(matrix, len(controls), ctrl_state))
            return
        # Act only on the slice where the controls hold ctrl_state (a view), in place, a chunk at a time.
        index = [slice(None)] * self.num_qubits
        for i, control in enumerate(controls):
            index[self.axis(control)] = (ctrl_state >> i) & 1
        view = self._tensor()[tuple(index)]
        rest = [q for q in self.order if q not in controls]
        self._apply_to_axes(view, [rest.index(q) for q in qubits], matrix)

    def apply_diagonal(self, qubits: Sequence[int], diagonal: np.ndarray) -> None:
        k = len(qubits)
        if k == 0:
            self.data *= self.dtype.type(diagonal[0])
            return
        if self.kernels is not None and self.kernels.can_apply_diagonal(k):
            self.kernels.apply_diagonal(self, [self.bit(q) for q in qubits], self._on_device(diagonal))
            return
        # In place, through a broadcast: the state as (2,)*head + (2^tail,) so the
        # innermost loop runs over 2^tail contiguous amplitudes, whatever the qubits.
        n = self.num_qubits
        axes = [self.order.index(q) for q in qubits]
        tail = min(n, ROW_QUBITS)
        while tail > 0 and tail + sum(axis < n - tail for axis in axes) > DIAGONAL_FACTORS_MAX_QUBITS:
            tail -= 1
        factors = diagonal.astype(self.dtype, copy=False)[_diagonal_index(tuple(axes), n, tail)]
        if self.xp is not np:
            factors = self.xp.asarray(factors)
        state = self.data.reshape((2,) * (n - tail) + (1 << tail,))
        self.xp.multiply(state, factors, out=state)

    def apply_pauli_evolution(self, qubits: Sequence[int], x_masks: Sequence[int], z_masks: Sequence[int], angles: Sequence[float]) -> None:
        """exp(-i A) for A = sum_j angles[j] P_j, applied to the state exactly (to rounding); terms need not commute.

        A Chebyshev expansion on the state itself, no 2^k x 2^k matrix: with
        L = sum |angles| >= ||A||, exp(-i A) = J_0(L) + 2 sum_k (-i)^k J_k(L) T_k(A / L),
        and T_k(A / L) v follows a three-term recurrence, so about L + 20
        applications of A reach double precision. Terms that share an X part are
        applied together: one broadcast multiply by their summed Z signs, then
        one flip of the X qubits' axes (a view). Needs four state-sized arrays
        (three terms of the recurrence and one product temporary).
        """
        xp = self.xp
        n = self.num_qubits
        scale = float(sum(abs(a) for a in angles))
        if scale == 0.0:
            return
        if self.in_place and len(qubits) <= IN_PLACE_EVOLUTION_QUBITS:
            # No room for the recurrence's three states: the exponential as a dense matrix.
            self.apply_unitary(qubits, _pauli_exponential(len(qubits), x_masks, z_masks, angles))
            return
        groups: dict[int, np.ndarray] = {}
        for x, z, angle in zip(x_masks, z_masks, angles):
            # P = i^{#Y} X^x Z^z (Y = iXZ): the Z part is a sign per axis, the X part a flip.
            factor = np.full((1,) * n, (angle / scale) * (1j ** bin(x & z).count("1")), dtype=np.complex128)
            for i, q in enumerate(qubits):
                if (z >> i) & 1:
                    shape = [1] * n
                    shape[self.axis(q)] = 2
                    factor = factor * np.array([1.0, -1.0]).reshape(shape)
            groups[x] = factor if x not in groups else groups[x] + factor
        terms = []
        for x, factor in groups.items():
            flips = tuple(self.axis(q) for i, q in enumerate(qubits) if (x >> i) & 1)
            factor = factor.astype(self.dtype)
            terms.append((flips, factor if xp is np else xp.asarray(factor)))

        def apply_scaled(source, out) -> None:  # out = (A / L) source
            out[...] = 0
            for flips, factor in terms:
                part = source * factor
                out += xp.flip(part, axis=flips) if flips else part

        coefficients = _chebyshev_exp_coefficients(scale, 1e-16 if self.dtype == np.complex128 else 1e-8)
        state = self._tensor()
        previous = state.copy()  # T_0 v
        current = xp.empty_like(state)
        following = xp.empty_like(state)
        apply_scaled(previous, current)  # T_1 v
        state *= self.dtype.type(coefficients[0])
        state += self.dtype.type(coefficients[1]) * current
        for coefficient in coefficients[2:]:
            apply_scaled(current, following)
            following *= 2
            following -= previous  # T_{k+1} v = 2 (A/L) T_k v - T_{k-1} v
            state += self.dtype.type(coefficient) * following
            previous, current, following = current, following, previous

    def apply_phase(self, phase: float) -> None:
        if phase:
            self.data *= self.dtype.type(complex(math.cos(phase), math.sin(phase)))

    def initialize(self, qubits: Sequence[int], vector: np.ndarray) -> None:
        """``qubits`` are in |0...0>: put them in ``vector`` (Qiskit's order)."""
        k = len(qubits)
        if self.in_place:
            # Through views: amplitude b of ``vector`` times the |0...0> slice, written into slice b.
            axes = [self.order.index(q) for q in reversed(qubits)]  # the first is bit k - 1
            view = self._tensor().transpose(axes + [a for a in range(self.num_qubits) if a not in axes])
            values = np.asarray(vector).astype(self.dtype, copy=False)  # the caller's vector when it has the dtype
            zero = view[(slice(0, 1),) * k]
            if zero.size * self.dtype.itemsize <= IN_PLACE_CHUNK_BYTES:
                # A small slice (many qubits initialized): copied once, then one broadcast product.
                factors = values.reshape((2,) * k + (1,) * (self.num_qubits - k))
                self.xp.multiply(self.xp.asarray(factors), zero.copy(), out=view)
                return
            for b in range((1 << k) - 1, 0, -1):  # slice 0, the source, last
                self.xp.multiply(zero, values[b], out=view[tuple(slice(bit, bit + 1) for bit in ((b >> (k - 1 - j)) & 1 for j in range(k)))])
            zero *= values[0]
            return
        tail = list(reversed(qubits))
        if self.order[-k:] != tail:
            self._reorder([q for q in self.order if q not in qubits] + tail)
        dim = 1 << k
        source = self.data.reshape(-1, dim)[:, :1]
        self.xp.multiply(source, self._on_device(vector).reshape(1, dim), out=self.buffer.reshape(-1, dim))
        self._swap()

    # -- measurement ---------------------------------------------------------

    def _halves(self, qubit: int):
        index = [slice(None)] * self.num_qubits
        axis = self.axis(qubit)
        index[axis] = slice(0, 1)  # slices, not integers: a 1-qubit state still yields views
        zero = tuple(index)
        index[axis] = slice(1, 2)
        state = self._tensor()
        return state[zero], state[tuple(index)]

    def probability_one(self, qubit: int) -> float:
        if self.kernels is not None:
            return self.kernels.probability_one(self, self.bit(qubit))
        _, one = self._halves(qubit)
        xp = self.xp
        letters = _LETTERS[: one.ndim]
        subscripts = f"{letters},{letters}->"  # a full contraction over a strided view: no copy
        return float(xp.einsum(subscripts, one.real, one.real) + xp.einsum(subscripts, one.imag, one.imag))

    def measure(self, qubit: int, random: float, reset: bool = False) -> int:
        """Projectively measure ``qubit`` with the uniform sample ``random``; collapse.

        With ``reset`` the surviving half is moved to |0> afterwards.
        """
        p1 = min(max(self.probability_one(qubit), 0.0), 1.0)
        outcome = 1 if random < p1 else 0
        probability = p1 if outcome else 1.0 - p1
        if probability <= 0.0:
            raise SimulationError(f"qubit {qubit} was measured in a state of zero norm")
        self.collapse(qubit, outcome, probability, flip=reset)
        return outcome

    def collapse(self, qubit: int, outcome: int, probability: float, flip: bool = False) -> None:
        """Keep the ``outcome`` half, renormalized; ``flip`` moves it to |0> (reset)."""
        if self.kernels is not None:
            self.kernels.collapse(self, self.bit(qubit), outcome, 1.0 / math.sqrt(probability), flip)
            return
        halves = self._halves(qubit)
        keep, drop = halves[outcome], halves[1 - outcome]
        scale = self.dtype.type(1.0 / math.sqrt(probability))
        if flip and outcome == 1:
            self.xp.multiply(keep, scale, out=drop)
            keep[...] = 0
        else:
            drop[...] = 0
            keep *= scale

    def fold_into_zero(self, qubit: int) -> None:
        """Add ``qubit``'s |1> half into its |0> half, clear the |1> half, renormalize.

        Amazon Braket's ``reset`` (its ``Reset`` operation). It equals a reset where the
        qubit is in a definite state (as after a branched measurement); on a qubit
        entangled with others it is Braket's coherent map, not a measurement.
        """
        zero, one = self._halves(qubit)
        zero += one
        one[...] = 0
        xp = self.xp
        letters = _LETTERS[: zero.ndim]
        subscripts = f"{letters},{letters}->"
        norm2 = float(xp.einsum(subscripts, zero.real, zero.real) + xp.einsum(subscripts, zero.imag, zero.imag))
        if norm2 > 0.0:
            zero *= self.dtype.type(1.0 / math.sqrt(norm2))

    def sampling_table(self):
        """Per-row probabilities of the state (rows of 2^ROW_QUBITS amplitudes) and their cumulative sum.

        The state is put in canonical order first (a no-op on the GPU kernels
        path, which never reorders), so a uniform draws the same outcome whatever
        order the gates left the axes in, and a state split over ranks
        (``engine.distributed``) draws what one process draws. One pass over the
        state; every chunk of samples drawn afterwards reuses it.
        """
        self.to_canonical()
        xp = self.xp
        real = np.float64 if self.dtype == np.complex128 else np.float32
        width = min(self.num_qubits, ROW_QUBITS)
        rows = self.data.view(real).reshape(-1, 2 << width)
        # In blocks of rows, so a temporary of the reduction (CuPy may form the
        # product before summing) stays within TABLE_BLOCK_AMPLITUDES, never the
        # size of the state: the GPU kernels path keeps one state array only.
        block = max(1, TABLE_BLOCK_AMPLITUDES >> width)
        row_probs = xp.empty(rows.shape[0], dtype=np.float64)
        for start in range(0, rows.shape[0], block):
            part = rows[start : start + block]
            row_probs[start : start + block] = xp.einsum("ij,ij->i", part, part)
        return row_probs, xp.cumsum(row_probs)

    def sample_chunk_shots(self) -> int:
        """Shots per chunk so one chunk's scratch stays within SAMPLE_WORKSPACE_BYTES.

        Each distinct row a chunk hits costs about 56 bytes per amplitude of the row,
        each shot about 160 bytes of per-shot arrays. A state of few rows (at most
        half the workspace for all of them) is bound by its shots alone; otherwise
        every shot may hit a row of its own.
        """
        width = min(self.num_qubits, ROW_QUBITS)
        rows_bytes = (56 << width) << (self.num_qubits - width)
        if rows_bytes <= SAMPLE_WORKSPACE_BYTES // 2:
            return min(SAMPLE_CHUNK_MAX, (SAMPLE_WORKSPACE_BYTES - rows_bytes) // 160)
        per_shot = 56 * (1 << width) + 160
        return max(1, min(SAMPLE_CHUNK_MAX, SAMPLE_WORKSPACE_BYTES // per_shot))

    def sample(self, qubits: Sequence[int], shots: int, rng: np.random.Generator, table=None) -> np.ndarray:
        """Draw ``shots`` outcomes of measuring distinct ``qubits``; bit j of each is ``qubits[j]``.

        The uniform samples come from the host generator, so a seed gives the same
        draws on every device, and drawing in chunks (passing the same ``table``
        from :meth:`sampling_table`) gives the same draws as one call. A uniform
        picks a row from the rows' cumulative probabilities, then an amplitude
        inside it (:meth:`sample_indices`). Scratch memory grows with ``shots``
        (up to 56 bytes per amplitude of each distinct row hit), so callers draw
        large counts in chunks of :meth:`sample_chunk_shots`.
        """
        row_probs, row_cdf = self.sampling_table() if table is None else table
        total = float(row_cdf[-1])
        index = self.sample_indices(rng.random(shots) * total, (row_probs, row_cdf))
        if len(qubits) == self.num_qubits and all(self.bit(q) == j for j, q in enumerate(qubits)):
            return index  # every qubit, each on its own bit: the outcome is the index
        out = np.zeros(shots, dtype=np.int64)
        for j, q in enumerate(qubits):
            out |= ((index >> self.bit(q)) & 1) << j
        return out

    def sample_indices(self, uniforms: np.ndarray, table) -> np.ndarray:
        """The flat index drawn by each of ``uniforms`` (host floats in [0, total)), on the host as int64.

        The inverse of the state's cumulative distribution in its physical order
        (canonical after :meth:`sampling_table`).
        """
        xp = self.xp
        width = min(self.num_qubits, ROW_QUBITS)
        row_probs, row_cdf = table
        shots = uniforms.shape[0]
        if shots == 0:
            return np.zeros(0, dtype=np.int64)
        uniforms = xp.asarray(uniforms)
        row = xp.minimum(xp.searchsorted(row_cdf, uniforms, side="right"), row_cdf.shape[0] - 1)
        # Where inside its row each draw falls, as a fraction of the row's weight.
        before = xp.where(row > 0, row_cdf[xp.maximum(row - 1, 0)], 0.0)
        weight = row_probs[row]
        fraction = xp.where(weight > 0, (uniforms - before) / xp.where(weight > 0, weight, 1.0), 0.0)
        del uniforms, before, weight
        hit, inverse = xp.unique(row, return_inverse=True)
        chosen = self.data.reshape(-1, 1 << width)[hit]
        inner = xp.cumsum(chosen.real.astype(np.float64) ** 2 + chosen.imag.astype(np.float64) ** 2, axis=1)
        del chosen
        inner_total = inner[:, -1:]
        # Clamp to the row's last non-zero amplitude, so rounding never draws a zero.
        last = xp.argmax(inner >= inner_total, axis=1)
        # Each row's normalised cdf, shifted by its number: one sorted array for all rows.
        inner /= xp.where(inner_total > 0, inner_total, 1.0)
        inner += xp.arange(hit.shape[0], dtype=np.float64)[:, None]
        target = inverse + xp.clip(fraction, 0.0, 1.0)
        position = xp.searchsorted(inner.reshape(-1), target, side="right") - inverse * (1 << width)
        del inner, target
        position = xp.clip(position, 0, last[inverse])
        physical = row.astype(np.int64) * (1 << width) + position.astype(np.int64)
        return np.asarray(physical.get() if xp is not np else physical, dtype=np.int64)

    def to_host(self) -> np.ndarray:
        self.to_canonical()
        if self.xp is np:
            return self.data.copy()
        return self.data.get()

    @classmethod
    def view(cls, xp: Any, data, dtype, kernels: Any = None, buffer=None) -> "StateVector":
        """A state over existing flat ``data`` (canonical order), e.g. one row of a batch; nothing is copied."""
        state = cls.__new__(cls)
        state.xp = xp
        state.num_qubits = int(data.shape[0]).bit_length() - 1
        state.dtype = np.dtype(dtype)
        state.kernels = kernels
        state.data = data
        state._buffer = buffer
        state.order = list(range(state.num_qubits - 1, -1, -1))
        state._device_arrays = {}
        return state

    def reset_to_zero(self) -> None:
        """Back to |0...0> in canonical order, reusing the arrays (for the next binding)."""
        self.data.fill(0)
        self.data[0] = 1
        self.order = list(range(self.num_qubits - 1, -1, -1))
        # The next binding brings its own matrices: keep no device copies of this one's.
        self._device_arrays.clear()


# A state in place applies a Pauli evolution on at most this many qubits as a dense matrix.
IN_PLACE_EVOLUTION_QUBITS = 10


def _pauli_exponential(k: int, x_masks: Sequence[int], z_masks: Sequence[int], angles: Sequence[float]) -> np.ndarray:
    """exp(-i sum_j angles[j] P_j) on ``k`` qubits as a 2^k matrix (P_j = i^#Y X^x Z^z, bit i on
    qubit i), by the eigendecomposition of the Hermitian sum."""
    dim = 1 << k
    columns = np.arange(dim)
    hamiltonian = np.zeros((dim, dim), dtype=np.complex128)
    for x, z, angle in zip(x_masks, z_masks, angles):
        signs = 1.0 - 2.0 * (np.bitwise_count(columns & int(z)) & 1)
        hamiltonian[columns ^ int(x), columns] += angle * (1j ** bin(int(x) & int(z)).count("1")) * signs
    values, vectors = np.linalg.eigh(hamiltonian)
    return (vectors * np.exp(-1j * values)) @ vectors.conj().T


@functools.lru_cache(maxsize=256)
def _chebyshev_exp_coefficients(scale: float, tolerance: float) -> tuple[complex, ...]:
    """c_k with exp(-i scale x) = sum_k c_k T_k(x) on [-1, 1], up to where |c_k| < tolerance.

    c_0 = J_0(scale), c_k = 2 (-i)^k J_k(scale).
    """
    bessel = _bessel_j(scale, int(scale + 10 * max(scale, 1.0) ** (1 / 3) + 30))
    coefficients = bessel * (-1j) ** np.arange(len(bessel))
    coefficients[1:] *= 2
    significant = np.flatnonzero(np.abs(coefficients) >= tolerance)
    last = max(int(significant[-1]) if len(significant) else 0, 1)
    return tuple(complex(c) for c in coefficients[: last + 1])


def _bessel_j(x: float, count: int) -> np.ndarray:
    """J_0(x) .. J_{count-1}(x) for x > 0 by Miller's backward recurrence (stable; NumPy only).

    J_{k-1} = (2k / x) J_k - J_{k+1} from far above ``count``, normalized by
    J_0 + 2 (J_2 + J_4 + ...) = 1.
    """
    start = count + int(x) + 40
    values = np.zeros(start + 2)
    values[start] = 1e-300
    for k in range(start, 0, -1):
        values[k - 1] = (2 * k / x) * values[k] - values[k + 1]
        if abs(values[k - 1]) > 1e250:  # rescale before overflow; only ratios matter until normalizing
            values[k - 1 :] *= 1e-250
    norm = values[0] + 2 * values[2::2].sum()
    return values[:count] / norm


@functools.lru_cache(maxsize=1024)
def _diagonal_index(axes: tuple[int, ...], n: int, tail: int) -> np.ndarray:
    """Which diagonal entry each position of the state shaped (2,)*(n-tail) + (2^tail,) takes.

    ``axes[i]`` is the tensor axis of the qubit that is bit i of the diagonal's
    index. The result broadcasts against that shape; it depends only on the
    layout, so it is cached and reused by every diagonal with the same one.
    """
    head = n - tail
    shape = [1] * head + [1 << tail]
    for axis in axes:
        if axis < head:
            shape[axis] = 2
    index = np.zeros(shape, dtype=np.intp)
    column = np.arange(1 << tail).reshape([1] * head + [-1])
    for i, axis in enumerate(axes):
        if axis < head:
            coordinate = np.arange(2).reshape([1] * axis + [2] + [1] * (head - axis))
            index = index | (coordinate << i)
        else:
            index = index | (((column >> (n - 1 - axis)) & 1) << i)
    index.setflags(write=False)
    return index


def _copy_cost(run: int, after: int) -> float:
    """Relative cost of a transposing copy, in plain copies of the state.

    ``run``: how many axes end the new order as one adjacent, same-order group of
    the old one (the innermost loop is 2^run amplitudes); ``after``: how many
    axes follow that group in the old order (its reads stride 2^after
    amplitudes). Fitted to timings on a 2-core x86 machine: short loops cost
    per-loop overhead, strides past a cache line waste most of each line read.
    """
    stride_penalty = (0.0, 0.1, 0.4, 2.0)[after] if after < 4 else 4.0
    return 1.0 + 2.0 * 0.5**run + stride_penalty
