"""A statevector on either device, written once against ``xp`` (NumPy or CuPy).

The state is a ``(2,) * n`` tensor with a lazily tracked axis order: applying a
dense k-qubit matrix moves its targets to the last tensor axes (one strided
copy into the scratch buffer, skipped when they are already there) and then is
a single matrix product from the state into the buffer, after which the two
swap. Diagonals multiply in place through a broadcast view. So a gate costs at
most two passes over memory and allocates nothing of full size: the state and
one scratch buffer are all there is. On the GPU, compiled kernels (see
``gpu_provider.engine.kernels``) apply the common widths in place on the
physical bit positions this order defines.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from ..errors import SimulationError

_LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
# Controlled gates with at most this many qubits in all are applied as one dense matrix.
DENSE_CONTROLLED_MAX = 6


def controlled_matrix(matrix: np.ndarray, num_controls: int, ctrl_state: int) -> np.ndarray:
    """The dense matrix on ``controls + targets`` (controls are the low bits)."""
    k = int(round(math.log2(matrix.shape[0])))
    dim = 1 << (num_controls + k)
    full = np.eye(dim, dtype=matrix.dtype)
    rows = (np.arange(1 << k) << num_controls) | ctrl_state
    full[np.ix_(rows, rows)] = matrix
    return full


class StateVector:
    """An n-qubit state on one device, in ``dtype`` (complex64 or complex128)."""

    def __init__(self, xp: Any, num_qubits: int, dtype, kernels: Any = None) -> None:
        self.xp = xp
        self.num_qubits = num_qubits
        self.dtype = np.dtype(dtype)
        self.kernels = kernels
        self.data = xp.zeros(1 << num_qubits, dtype=self.dtype)
        self.data[0] = 1
        self._buffer = None
        # order[axis] is the qubit held by tensor axis ``axis`` (axis 0 most significant).
        self.order: list[int] = list(range(num_qubits - 1, -1, -1))
        self._device_arrays: dict[int, tuple[np.ndarray, Any]] = {}

    # -- bookkeeping ---------------------------------------------------------

    @property
    def buffer(self):
        if self._buffer is None:
            self._buffer = self.xp.empty_like(self.data)
        return self._buffer

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

    def _reorder(self, new_order: list[int]) -> None:
        """Copy the state into the buffer with axes in ``new_order``, then swap."""
        if new_order == self.order:
            return
        perm = [self.order.index(q) for q in new_order]
        self.xp.copyto(self._tensor(self.buffer), self._tensor().transpose(perm))
        self._swap()
        self.order = list(new_order)

    def to_canonical(self) -> None:
        self._reorder(list(range(self.num_qubits - 1, -1, -1)))

    def copy_from(self, other: "StateVector") -> None:
        self.xp.copyto(self.data, other.data)
        self.order = list(other.order)

    def snapshot(self) -> "StateVector":
        twin = StateVector.__new__(StateVector)
        twin.__dict__.update(self.__dict__)
        twin.data = self.data.copy()
        twin._buffer = None
        twin.order = list(self.order)
        twin._device_arrays = {}
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
        xp = self.xp
        matrix = self._on_device(matrix)
        tail = list(reversed(qubits))  # qubits[0] on the last axis: the matrix's low bit
        dim = 1 << k
        if self.order[:k] == tail:
            # Targets already lead: left-multiply without moving anything.
            xp.matmul(matrix, self.data.reshape(dim, -1), out=self.buffer.reshape(dim, -1))
        else:
            if self.order[-k:] != tail:
                self._reorder([q for q in self.order if q not in qubits] + tail)
            xp.matmul(self.data.reshape(-1, dim), matrix.T, out=self.buffer.reshape(-1, dim))
        self._swap()

    def apply_controlled(self, controls: Sequence[int], ctrl_state: int, qubits: Sequence[int], matrix: np.ndarray) -> None:
        if not controls:
            self.apply_unitary(qubits, matrix)
            return
        if len(controls) + len(qubits) <= DENSE_CONTROLLED_MAX:
            self.apply_unitary(tuple(controls) + tuple(qubits), controlled_matrix(matrix, len(controls), ctrl_state))
            return
        xp = self.xp
        # Act only on the slice where the controls hold ctrl_state (a view), with
        # a temporary of that slice's size: 2^(n - controls) amplitudes.
        index = [slice(None)] * self.num_qubits
        for i, control in enumerate(controls):
            index[self.axis(control)] = (ctrl_state >> i) & 1
        view = self._tensor()[tuple(index)]
        rest = [q for q in self.order if q not in controls]
        k = len(qubits)
        tensor = self._on_device(matrix).reshape((2,) * (2 * k))
        view_axes = [rest.index(q) for q in reversed(qubits)]
        product = xp.tensordot(tensor, view, axes=(list(range(k, 2 * k)), view_axes))
        view[...] = xp.moveaxis(product, list(range(k)), view_axes)

    def apply_diagonal(self, qubits: Sequence[int], diagonal: np.ndarray) -> None:
        k = len(qubits)
        if k == 0:
            self.data *= self.dtype.type(diagonal[0])
            return
        if self.kernels is not None and self.kernels.can_apply_diagonal(k):
            self.kernels.apply_diagonal(self, [self.bit(q) for q in qubits], self._on_device(diagonal))
            return
        tensor = self._on_device(diagonal).reshape((2,) * k)  # axes: qubits[k-1] .. qubits[0]
        tensor_qubits = list(reversed(qubits))
        by_axis = sorted(qubits, key=self.order.index)
        tensor = tensor.transpose([tensor_qubits.index(q) for q in by_axis])
        shape = [1] * self.num_qubits
        for q in qubits:
            shape[self.axis(q)] = 2
        tensor = tensor.reshape(shape)
        state = self._tensor()
        self.xp.multiply(state, tensor, out=state)

    def apply_phase(self, phase: float) -> None:
        if phase:
            self.data *= self.dtype.type(complex(math.cos(phase), math.sin(phase)))

    def initialize(self, qubits: Sequence[int], vector: np.ndarray) -> None:
        """``qubits`` are in |0...0>: put them in ``vector`` (Qiskit's order)."""
        k = len(qubits)
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

    def probabilities(self):
        """|amplitude|^2 in canonical order, as a real array on the device."""
        self.to_canonical()
        xp = self.xp
        real = np.float64 if self.dtype == np.complex128 else np.float32
        out = xp.empty(self.data.shape, dtype=real)
        xp.abs(self.data, out=out)
        xp.square(out, out=out)
        return out

    def sample(self, qubits: Sequence[int], shots: int, rng: np.random.Generator) -> np.ndarray:
        """Draw ``shots`` outcomes of measuring distinct ``qubits``; bit j of each is ``qubits[j]``.

        The uniform samples come from the host generator, so a seed gives the same
        draws on every device.
        """
        xp = self.xp
        probs = self.probabilities()
        ascending = sorted(qubits)
        if len(ascending) < self.num_qubits:
            keep = set(ascending)
            drop = tuple(self.num_qubits - 1 - q for q in range(self.num_qubits) if q not in keep)
            probs = probs.reshape((2,) * self.num_qubits).sum(axis=drop).reshape(-1)
        cdf = xp.cumsum(probs.astype(np.float64, copy=False))
        total = float(cdf[-1])
        uniforms = xp.asarray(rng.random(shots) * total)
        found = xp.searchsorted(cdf, uniforms, side="right")
        found = xp.minimum(found, cdf.shape[0] - 1)
        indices = np.asarray(found.get() if xp is not np else found, dtype=np.int64)
        if list(qubits) == ascending:
            return indices
        # Re-label the bits of the marginal (ascending qubits) in the caller's order.
        out = np.zeros(shots, dtype=np.int64)
        for j, q in enumerate(qubits):
            out |= ((indices >> ascending.index(q)) & 1) << j
        return out

    def to_host(self) -> np.ndarray:
        self.to_canonical()
        if self.xp is np:
            return self.data.copy()
        return self.data.get()
