"""Clifford circuits as stabilizer tableaux: circuits far wider than a state vector holds.

A program whose every gate is a Clifford (its matrix maps Pauli strings to Pauli
strings under conjugation), run from |0...0>, keeps a stabilizer state: ``n``
commuting Pauli strings that fix it, plus ``n`` destabilizers (Aaronson and
Gottesman, "Improved simulation of stabilizer circuits", 2004). Memory is
``4 n^2`` bytes instead of ``2^n`` amplitudes, a gate costs a pass over the
``2n`` rows, a measurement at most a few.

A row is the Pauli ``i^m X^x Z^z`` (``x``, ``z`` bit vectors over the qubits,
``X^x Z^z`` the product of ``X_q^x_q Z_q^z_q``, ``m`` mod 4). In this form the
product of two rows is ``i^(m1 + m2 + 2 z1.x2) X^(x1^x2) Z^(z1^z2)``. A gate's
action is read off its matrix once (cached): the images of the ``4^k`` Pauli
strings on its ``k`` qubits, built from those of ``X_j`` and ``Z_j``; a gate whose
images are not Pauli strings is not a Clifford (:func:`why_not_clifford`).

:class:`StabilizerState` offers the methods of
:class:`~gpu_provider.engine.statevector.StateVector` the interpreter calls
(gates, ``probability_one``, ``collapse``, ``snapshot``, sampling), so shot
branching, mid-circuit measurement, reset and control flow run unchanged. Its
terminal samples come from the state's support, an affine space over GF(2): a
basis state ``x0`` plus the span of the stabilizers' X parts, all outcomes of
it equally likely; one elimination, then each shot is random bits times that
basis. The tableau lives on the state's device (``xp``: NumPy or CuPy).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Optional, Sequence

import numpy as np

from ..errors import CircuitTooLargeError, InvalidInputError
from .program import Diagonal, ForLoop, GlobalPhase, IfElse, Initialize, Measure, PauliEvolution, Reset, Store, SwitchCase, Unitary, WhileLoop
from .program import Binary, Bits, Cast, Const, Index, Unary, count_ops, evaluate
from .program import BreakLoop, ContinueLoop, LoopBodies

# The widest gate whose Clifford action is read off its matrix (4^k Pauli images of a 2^k matrix).
MAX_GATE_QUBITS = 6
# Tolerance when reading a conjugated matrix as a Pauli string times a power of i.
_TOLERANCE = 1e-6
# Shots drawn per chunk: the random bits and their product with the basis stay near this many bytes.
SAMPLE_CHUNK_BYTES = 32 << 20


class NotCliffordError(InvalidInputError):
    """An op of a program run as a stabilizer state is not a Clifford operation."""


def tableau_bytes(num_qubits: int) -> int:
    """Bytes of one stabilizer state of ``num_qubits`` qubits (X and Z bits of 2n rows, their phases)."""
    return 2 * (2 * num_qubits) * max(num_qubits, 1) + 2 * num_qubits


# -- a gate's action on Pauli strings -----------------------------------------------


def _as_pauli(matrix: np.ndarray, k: int) -> Optional[tuple[int, int, int]]:
    """``(x, z, m)`` with ``matrix == i^m X^x Z^z`` (bit j of x, z for the matrix's bit j), else None."""
    x = int(np.argmax(np.abs(matrix[:, 0])))
    c = complex(matrix[x, 0])
    if abs(abs(c) - 1.0) > _TOLERANCE:
        return None
    m = int(round(math.atan2(c.imag, c.real) / (math.pi / 2))) % 4
    if abs(c - 1j**m) > _TOLERANCE:
        return None
    z = 0
    for j in range(k):
        value = matrix[x ^ (1 << j), 1 << j] / c
        if abs(value + 1.0) < _TOLERANCE:
            z |= 1 << j
        elif abs(value - 1.0) > _TOLERANCE:
            return None
    if not np.allclose(matrix, c * _pauli_matrix(x, z, k), atol=_TOLERANCE):
        return None
    return x, z, m


@functools.lru_cache(maxsize=None)
def _pauli_matrix(x: int, z: int, k: int) -> np.ndarray:
    """``X^x Z^z`` on ``k`` qubits: column b holds (-1)^(z.b) at row b ^ x."""
    dim = 1 << k
    columns = np.arange(dim)
    signs = 1.0 - 2.0 * (_popcount(columns & z) & 1)
    matrix = np.zeros((dim, dim), dtype=complex)
    matrix[columns ^ x, columns] = signs
    return matrix


def _popcount(values: np.ndarray) -> np.ndarray:
    return np.bitwise_count(np.asarray(values, dtype=np.uint64)).astype(np.int64)


class _Table:
    """A k-qubit Clifford's images of the 4^k Pauli strings ``X^x Z^z``, indexed by ``x | z << k``."""

    __slots__ = ("k", "x", "z", "m", "_on", "_symplectic")

    def __init__(self, k: int, x: np.ndarray, z: np.ndarray, m: np.ndarray) -> None:
        self.k, self.x, self.z, self.m = k, x, z, m  # x, z: (k, 4^k) bits; m: (4^k,) powers of i
        self._on: dict = {}

    def symplectic(self) -> list:
        """For each output bit (x of qubit 0..k-1, then z), the input bits whose images hold it:
        the gate's action on Pauli strings with their signs dropped."""
        if not hasattr(self, "_symplectic"):
            k = self.k
            generators = [1 << j for j in range(2 * k)]  # X_j, then Z_j
            self._symplectic = [
                [j for j, g in enumerate(generators) if (self.x[out, g] if out < k else self.z[out - k, g])]
                for out in range(2 * k)
            ]
        return self._symplectic

    def on(self, xp: Any) -> tuple:
        """The table's arrays on ``xp``'s current device (copied there once per device)."""
        if xp is np:
            return self.x, self.z, self.m
        try:
            key = (id(xp), xp.cuda.runtime.getDevice())
        except Exception:  # an array module without CUDA's runtime (a stand-in)
            key = (id(xp), 0)
        arrays = self._on.get(key)
        if arrays is None:
            arrays = self._on[key] = (xp.asarray(self.x), xp.asarray(self.z), xp.asarray(self.m))
        return arrays


def _table(matrix: np.ndarray) -> Optional[_Table]:
    """The Clifford action of ``matrix`` (cached by its bytes), or None when it is not a Clifford
    (or acts on more than ``MAX_GATE_QUBITS`` qubits)."""
    if matrix.shape[0] > 1 << MAX_GATE_QUBITS:
        return None
    matrix = np.asarray(matrix, dtype=complex)
    return _cached_table(matrix.tobytes(), matrix.shape[0])


def _gate_table(qubits: Sequence[int], matrix: np.ndarray, controls: Sequence[int] = (), ctrl_state: int = 0) -> Optional[_Table]:
    """The table of a (controlled) gate, without building a matrix wider than ``MAX_GATE_QUBITS``."""
    if len(qubits) + len(controls) > MAX_GATE_QUBITS:
        return None
    if controls:
        matrix = _controlled(matrix, len(controls), ctrl_state)
    return _table(matrix)


def _diagonal_table(qubits: Sequence[int], diagonal: np.ndarray) -> Optional[_Table]:
    if len(qubits) > MAX_GATE_QUBITS:
        return None
    return _table(np.diag(np.asarray(diagonal, dtype=complex)))


@functools.lru_cache(maxsize=4096)
def _cached_table(data: bytes, dim: int) -> Optional[_Table]:
    k = dim.bit_length() - 1
    if k > MAX_GATE_QUBITS:
        return None
    u = np.frombuffer(data, dtype=complex).reshape(dim, dim)
    adjoint = u.conj().T
    # Images of the generators: X_j at index 1 << j, Z_j at index 1 << (k + j).
    generators = []
    for j in range(2 * k):
        pauli = _pauli_matrix(1 << j, 0, k) if j < k else _pauli_matrix(0, 1 << (j - k), k)
        image = _as_pauli(u @ pauli @ adjoint, k)
        if image is None:
            return None
        generators.append(image)
    size = 1 << (2 * k)
    xs = np.zeros(size, dtype=np.int64)
    zs = np.zeros(size, dtype=np.int64)
    ms = np.zeros(size, dtype=np.int64)
    # X^x Z^z = (lowest generator) * (the rest): X's commute among themselves, Z's too, and the
    # lowest set bit is an X bit unless there is none.
    for index in range(1, size):
        low = index & -index
        gx, gz, gm = generators[low.bit_length() - 1]
        rest = index ^ low
        rx, rz, rm = xs[rest], zs[rest], ms[rest]
        xs[index] = gx ^ rx
        zs[index] = gz ^ rz
        ms[index] = (gm + rm + 2 * (gz & int(rx)).bit_count()) & 3
    bits = np.arange(k)
    x_bits = ((xs[None, :] >> bits[:, None]) & 1).astype(np.uint8)
    z_bits = ((zs[None, :] >> bits[:, None]) & 1).astype(np.uint8)
    return _Table(k, x_bits, z_bits, ms.astype(np.uint8))


def _controlled(matrix: np.ndarray, num_controls: int, ctrl_state: int) -> np.ndarray:
    from .statevector import controlled_matrix

    return controlled_matrix(np.asarray(matrix, dtype=complex), num_controls, ctrl_state)


def _basis_index(vector: np.ndarray) -> Optional[int]:
    """b when ``vector`` is a computational basis state |b> times a phase, else None."""
    vector = np.asarray(vector)
    b = int(np.argmax(np.abs(vector)))
    if abs(abs(vector[b]) - 1.0) > _TOLERANCE:
        return None
    return b


def _evolution_steps(x_masks: Sequence[int], z_masks: Sequence[int], angles: Sequence[float]) -> Optional[list]:
    """exp(-i sum angle_j P_j) as Clifford steps ``(x, z, quarter_turns)``, when it is one: every angle a
    multiple of pi/4 and the terms commuting (then the exponential is their product in any order)."""
    steps = []
    for x, z, angle in zip(x_masks, z_masks, angles):
        turns = angle / (math.pi / 4)
        quarter = int(round(turns))
        if abs(turns - quarter) > _TOLERANCE:
            return None
        if quarter % 4:
            steps.append((int(x), int(z), quarter % 4))
    for i, (xi, zi, _) in enumerate(steps):
        for xj, zj, _ in steps[:i]:
            if (bin(xi & zj).count("1") + bin(zi & xj).count("1")) & 1:
                return None
    return steps


# -- which programs are Clifford --------------------------------------------------------


def why_not_clifford(program: Any) -> Optional[str]:
    """None when every op of ``program`` (control-flow bodies included) keeps a stabilizer state a
    stabilizer state; otherwise why not, naming the first op that does not."""
    return _why_not(program.ops)


def _why_not(ops) -> Optional[str]:
    for op in ops:
        kind = type(op)
        if kind is Unitary:
            if _gate_table(op.qubits, op.matrix, op.controls, op.ctrl_state) is None:
                return _not_clifford("gate", op, tuple(op.controls) + tuple(op.qubits))
        elif kind is Diagonal:
            if op.qubits and _diagonal_table(op.qubits, op.diagonal) is None:
                return _not_clifford("diagonal gate", op, tuple(op.qubits))
        elif kind is Initialize:
            if _basis_index(op.vector) is None:
                return f"it initializes qubits {tuple(op.qubits)} to a state that is not a computational basis state"
        elif kind is PauliEvolution:
            if _evolution_steps(op.x_masks, op.z_masks, op.angles) is None:
                return f"its Pauli evolution on qubits {tuple(op.qubits)} is not a Clifford (angles must be multiples of pi/4, terms commuting)"
        elif kind is IfElse:
            reason = _why_not(op.true_body) or _why_not(op.false_body)
            if reason:
                return reason
        elif kind is WhileLoop:
            reason = _why_not(op.body)
            if reason:
                return reason
        elif kind is ForLoop:
            for body in _distinct_bodies(op):
                reason = _why_not(body)
                if reason:
                    return reason
        elif kind is SwitchCase:
            for _, body in op.cases:
                reason = _why_not(body)
                if reason:
                    return reason
        elif kind not in (GlobalPhase, Measure, Reset, Store, BreakLoop, ContinueLoop):
            return f"it holds a {kind.__name__} op"
    return None


def require_clifford(program: Any, name: str, too_large: Optional[CircuitTooLargeError] = None) -> None:
    """Raise unless ``program`` (circuit ``name``) can run as a stabilizer state: the ``too_large``
    error of its state vector, with the reason it is not Clifford, when that is why a stabilizer
    state was tried ("automatic"); else an :class:`InvalidInputError` (method="stabilizer")."""
    reason = why_not_clifford(program)
    if reason is None:
        return
    if too_large is not None:
        raise CircuitTooLargeError(
            f"{too_large}. (A Clifford circuit this wide would run as a stabilizer state, but {name!r} is not: {reason}.)",
            num_qubits=too_large.num_qubits,
            bytes_needed=too_large.bytes_needed,
            bytes_free=too_large.bytes_free,
        ) from None
    raise InvalidInputError(
        f"method='stabilizer' simulates Clifford circuits only, and circuit {name!r} is not one: {reason}. "
        "Use method='statevector' (or 'automatic')"
    )


def _not_clifford(kind: str, op: Any, qubits: tuple) -> str:
    label = f" {op.label!r}" if getattr(op, "label", "") else ""
    if len(qubits) > MAX_GATE_QUBITS:
        return f"its {kind}{label} on {len(qubits)} qubits {qubits} is wider than the {MAX_GATE_QUBITS} qubits a Clifford gate is read on"
    return f"its {kind}{label} on qubits {qubits} is not a Clifford gate"


def _distinct_bodies(loop: Any):
    bodies = loop.iterations
    if isinstance(bodies, LoopBodies):
        # Built lazily; the iterations differ only in their parameter, so reading them all is the one
        # exact check (a wide loop's bodies are built once here and cached).
        return [bodies.first] if bodies.make is None else (bodies[i] for i in range(len(bodies)))
    return bodies


# -- the state ---------------------------------------------------------------------------


class StabilizerState:
    """An n-qubit stabilizer state on ``xp``'s device, starting in |0...0>.

    ``x[q, r]``, ``z[q, r]``: bits of qubit q in row r (rows 0..n-1 destabilizers,
    n..2n-1 stabilizers: qubit-major, so a gate touches whole contiguous rows);
    ``m[r]``: the row's power of i.
    """

    def __init__(self, xp: Any, num_qubits: int) -> None:
        self.xp = xp
        self.num_qubits = num_qubits
        self.x = xp.zeros((num_qubits, 2 * num_qubits), dtype=xp.uint8)
        self.z = xp.zeros((num_qubits, 2 * num_qubits), dtype=xp.uint8)
        self.m = xp.zeros(2 * num_qubits, dtype=xp.uint8)
        self.reset_to_zero()

    @property
    def nbytes(self) -> int:
        return tableau_bytes(self.num_qubits)

    def reset_to_zero(self) -> None:
        n = self.num_qubits
        self.x[...] = 0
        self.z[...] = 0
        self.m[...] = 0
        diagonal = self.xp.arange(n)
        self.x[diagonal, diagonal] = 1  # destabilizer q: X_q
        self.z[diagonal, diagonal + n] = 1  # stabilizer q: Z_q

    def preload(self, arrays) -> None:
        """Nothing to upload: gates reach the tableau as small tables of their Pauli images."""

    def snapshot(self) -> "StabilizerState":
        twin = StabilizerState.__new__(StabilizerState)
        twin.xp, twin.num_qubits = self.xp, self.num_qubits
        twin.x, twin.z, twin.m = self.x.copy(), self.z.copy(), self.m.copy()
        return twin

    def copy_from(self, other: "StabilizerState") -> None:
        self.x[...] = other.x
        self.z[...] = other.z
        self.m[...] = other.m

    # -- gates ---------------------------------------------------------------------

    def apply_unitary(self, qubits: Sequence[int], matrix: np.ndarray) -> None:
        self._apply(tuple(qubits), _gate_table(qubits, matrix))

    def apply_controlled(self, controls: Sequence[int], ctrl_state: int, qubits: Sequence[int], matrix: np.ndarray) -> None:
        # Controls are the low bits of the controlled matrix.
        self._apply(tuple(controls) + tuple(qubits), _gate_table(qubits, matrix, controls, ctrl_state))

    def apply_diagonal(self, qubits: Sequence[int], diagonal: np.ndarray) -> None:
        if qubits:
            self._apply(tuple(qubits), _diagonal_table(qubits, diagonal))

    def _apply(self, qubits: tuple, table: Optional[_Table]) -> None:
        if table is None:
            raise NotCliffordError(f"the gate on qubits {qubits} is not a Clifford gate; a stabilizer state cannot hold its result")
        self._apply_table(list(qubits), table)

    def apply_phase(self, phase: float) -> None:
        """A global phase does not change the stabilizers."""

    def _apply_table(self, qubits: list, table: _Table) -> None:
        xp = self.xp
        k = table.k
        tx, tz, tm = table.on(xp)
        xs = self.x[qubits].astype(xp.int64)
        zs = self.z[qubits].astype(xp.int64)
        weights = xp.asarray(np.left_shift(1, np.arange(k, dtype=np.int64)))[:, None]
        index = (xs * weights).sum(axis=0) + ((zs * weights).sum(axis=0) << k)
        self.m[...] = (self.m + tm[index]) & 3
        self.x[qubits] = tx[:, index]
        self.z[qubits] = tz[:, index]

    def initialize(self, qubits: Sequence[int], vector: np.ndarray) -> None:
        b = _basis_index(vector)
        if b is None:
            raise NotCliffordError(f"initializing qubits {tuple(qubits)} to a superposition that is not a basis state needs a state vector")
        for j, qubit in enumerate(qubits):
            if (b >> j) & 1:
                self._flip(qubit)

    def apply_pauli_evolution(self, qubits: Sequence[int], x_masks: Sequence[int], z_masks: Sequence[int], angles: Sequence[float]) -> None:
        steps = _evolution_steps(x_masks, z_masks, angles)
        if steps is None:
            raise NotCliffordError(f"the Pauli evolution on qubits {tuple(qubits)} is not a Clifford operation")
        xp = self.xp
        qubits = list(qubits)
        bits = np.arange(len(qubits))
        for x_mask, z_mask, quarter in steps:
            px = xp.asarray(((x_mask >> bits) & 1).astype(np.uint8))[:, None]
            pz = xp.asarray(((z_mask >> bits) & 1).astype(np.uint8))[:, None]
            xs, zs = self.x[qubits], self.z[qubits]
            anti = ((px & zs).sum(axis=0, dtype=xp.int64) + (pz & xs).sum(axis=0, dtype=xp.int64)) & 1  # rows that anticommute with P
            if quarter == 2:  # conjugation by P itself: those rows change sign
                self.m[...] = (self.m + 2 * anti) & 3  # uint8 wraps at 256: & 3 keeps it right
                continue
            # Q -> (-i)^(quarter) ... : quarter 1 gives -i P Q, quarter 3 gives i P Q (P = i^#Y X^x Z^z).
            pm = bin(x_mask & z_mask).count("1") + (3 if quarter == 1 else 1)
            product_m = (self.m.astype(xp.int64) + pm + 2 * (pz & xs).sum(axis=0, dtype=xp.int64)) & 3
            rows = anti.astype(bool)
            self.m[...] = xp.where(rows, product_m, self.m).astype(xp.uint8)
            self.x[qubits] = xp.where(rows[None, :], xs ^ px, xs)
            self.z[qubits] = xp.where(rows[None, :], zs ^ pz, zs)

    def _flip(self, qubit: int) -> None:
        """X on ``qubit``: rows with a Z there change sign."""
        self.m[...] = (self.m + 2 * self.z[qubit]) & 3

    # -- measurement ------------------------------------------------------------------

    def _anticommuting_stabilizer(self, qubit: int) -> Optional[int]:
        n = self.num_qubits
        row = self.x[qubit, n:]
        first = int(row.argmax())
        return n + first if int(row[first]) else None

    def _determined(self, qubit: int) -> int:
        """The outcome of Z on ``qubit`` when certain: Z_q (up to sign) is the product of the stabilizers
        whose destabilizers anticommute with it."""
        n = self.num_qubits
        return (self._product_phase(self.xp.flatnonzero(self.x[qubit, :n]) + n) & 3) >> 1

    def _product_phase(self, rows) -> int:
        """m of the ordered product of ``rows`` (``i^m X^x Z^z``): the sum of their m, plus
        2 z_a.x_b for every a before b."""
        xp = self.xp
        xs = self.x[:, rows].astype(xp.int64)
        zs = self.z[:, rows].astype(xp.int64)
        earlier = xp.cumsum(zs, axis=1) - zs
        return int(self.m[rows].astype(xp.int64).sum()) + 2 * int((xs * earlier).sum())

    def expectation_values(self, observables: Sequence[Any]) -> np.ndarray:
        """``<O>`` of each :class:`~gpu_provider.engine.expectation.PauliSum` (complex128 on the host).

        A term ``X^x Z^z`` that anticommutes with a stabilizer has expectation 0; one that commutes
        with all is, up to a power of i, the product of the stabilizers whose destabilizers it
        anticommutes with, which the state holds at +1."""
        from .expectation import mask_bits

        xp = self.xp
        n = self.num_qubits
        out = np.zeros(len(observables), dtype=np.complex128)
        for index, observable in enumerate(observables):
            if observable.num_qubits != n:
                raise InvalidInputError(f"observable {index} acts on {observable.num_qubits} qubits but the state has {n}")
            if not observable.num_terms:
                continue
            tx = xp.asarray(mask_bits(observable.x, n).astype(np.float32))
            tz = xp.asarray(mask_bits(observable.z, n).astype(np.float32))
            # Row r anticommutes with term t when x_t . z_r + z_t . x_r is odd.
            anti = ((tx @ self.z.astype(xp.float32) + tz @ self.x.astype(xp.float32)).astype(xp.int64) & 1).astype(bool)
            commuting = xp.flatnonzero(~anti[:, n:].any(axis=1))
            for term in getattr(xp, "asnumpy", np.asarray)(commuting).tolist():
                rows = xp.flatnonzero(anti[term, :n]) + n
                out[index] += observable.coeffs[term] * (-1j) ** (self._product_phase(rows) & 3)
        return out

    def probability_one(self, qubit: int) -> float:
        if self._anticommuting_stabilizer(qubit) is not None:
            return 0.5
        return float(self._determined(qubit))

    def collapse(self, qubit: int, outcome: int, probability: float, flip: bool = False) -> None:
        """Project ``qubit`` onto ``outcome`` (then, with ``flip``, set it to |0>)."""
        xp = self.xp
        n = self.num_qubits
        p = self._anticommuting_stabilizer(qubit)
        if p is not None:
            others = xp.flatnonzero(self.x[qubit])
            others = others[others != p]
            xp_row, zp_row = self.x[:, p], self.z[:, p]
            # Row r <- row r * row p for every other row anticommuting with Z_q.
            sign = (self.z[:, others].astype(xp.int64) * xp_row[:, None]).sum(axis=0)
            self.m[others] = ((self.m[others].astype(xp.int64) + int(self.m[p]) + 2 * sign) & 3).astype(xp.uint8)
            self.x[:, others] ^= xp_row[:, None]
            self.z[:, others] ^= zp_row[:, None]
            # The destabilizer paired with p becomes the old row p; row p becomes (-1)^outcome Z_q.
            self.x[:, p - n] = self.x[:, p]
            self.z[:, p - n] = self.z[:, p]
            self.m[p - n] = self.m[p]
            self.x[:, p] = 0
            self.z[:, p] = 0
            self.z[qubit, p] = 1
            self.m[p] = 2 * outcome
        if flip and outcome:
            self._flip(qubit)

    # -- sampling --------------------------------------------------------------------------

    def sampling_table(self) -> tuple:
        """(x0, basis): the state's support is x0 + span(basis rows), every outcome in it equally likely."""
        n = self.num_qubits
        to_host = getattr(self.xp, "asnumpy", np.asarray)
        x = to_host(self.x[:, n:]).T.copy()  # stabilizer rows, qubit columns
        z = to_host(self.z[:, n:]).T.copy()
        m = to_host(self.m[n:]).astype(np.int64)
        return _support(x, z, m)

    def sample_chunk_shots(self) -> int:
        return max(1, SAMPLE_CHUNK_BYTES // (16 * (self.num_qubits + 1)))

    def sample(self, qubits: Sequence[int], shots: int, rng: np.random.Generator, table=None) -> np.ndarray:
        """``shots`` outcomes of measuring ``qubits`` (bit j of an outcome for ``qubits[j]``).

        More than 62 qubits give an object array of Python integers."""
        x0, basis = table if table is not None else self.sampling_table()
        qubits = list(qubits)
        offset = x0[qubits]
        rank = basis.shape[0]
        if rank:
            draws = rng.integers(0, 2, size=(shots, rank), dtype=np.uint8).astype(np.float32)
            bits = (draws @ basis[:, qubits].astype(np.float32)).astype(np.int64) & 1
            bits = bits.astype(np.uint8) ^ offset[None, :]
        else:
            bits = np.broadcast_to(offset, (shots, len(qubits)))
        if len(qubits) <= 62:
            return bits.astype(np.int64) @ np.left_shift(np.int64(1), np.arange(len(qubits), dtype=np.int64))
        packed = np.packbits(bits, axis=1, bitorder="little")
        values = np.empty(shots, dtype=object)
        values[:] = [int.from_bytes(row.tobytes(), "little") for row in packed]
        return values

    def to_host(self) -> np.ndarray:
        raise NotCliffordError("a stabilizer state has no state vector to return; use method='statevector' for one")


# -- Pauli frames: every shot of a measuring program at once ---------------------------------

_FRAME_OPS = (Unitary, Diagonal, GlobalPhase, Measure, Reset)
# Clbits a conditional run on frames may read (its Pauli is tabulated over their 2^k values).
FRAME_CONDITION_BITS = 8
# Ops (loops unrolled) a program run on frames may hold: its reference run keeps a step per op.
FRAME_MAX_STEPS = 1 << 20


def frames_fit(program: Any) -> bool:
    """Whether ``program``'s shots can run as Pauli frames (:func:`sample_frames`): Clifford gates,
    measurements, resets and ``for`` loops of them, and feed-forward of Paulis only (``if``/``switch``
    on at most ``FRAME_CONDITION_BITS`` clbits whose bodies are Pauli gates, such as teleportation's
    corrections or an active reset), at most ``FRAME_MAX_STEPS`` ops with loops unrolled. No classical
    variables, ``while`` loops or other conditioned gates: those keep the per-shot trajectories."""
    return count_ops(program.ops) <= FRAME_MAX_STEPS and _frame_ops_fit(program.ops)


def _frame_ops_fit(ops) -> bool:
    for op in ops:
        kind = type(op)
        if kind in _FRAME_OPS:
            continue
        if kind is ForLoop:
            if not all(_frame_ops_fit(body) for body in _distinct_bodies(op)):
                return False
        elif kind is IfElse or kind is SwitchCase:
            if _feedback_clbits(op) is None:
                return False
        else:
            return False
    return True


def _feedback_clbits(op: Any) -> Optional[tuple]:
    """The clbits a conditional of Pauli gates reads (nested conditionals included), sorted; None when
    it is not one frames run: a body holds another op, a condition reads a classical variable, or it
    reads more than ``FRAME_CONDITION_BITS`` clbits."""
    clbits: set = set()
    if not _pauli_feedback_fits((op,), clbits) or len(clbits) > FRAME_CONDITION_BITS:
        return None
    return tuple(sorted(clbits))


def _pauli_feedback_fits(ops, clbits: set) -> bool:
    for op in ops:
        kind = type(op)
        if kind is GlobalPhase:
            continue
        if kind is Unitary or kind is Diagonal:
            if _op_pauli(op) is None:
                return False
        elif kind is IfElse:
            if not (_expr_clbits(op.condition, clbits) and _pauli_feedback_fits(op.true_body, clbits) and _pauli_feedback_fits(op.false_body, clbits)):
                return False
        elif kind is SwitchCase:
            if not (_expr_clbits(op.target, clbits) and all(_pauli_feedback_fits(body, clbits) for _, body in op.cases)):
                return False
        else:
            return False
    return True


def _expr_clbits(expr: Any, clbits: set) -> bool:
    """Add the clbits ``expr`` reads to ``clbits``; False when it reads a classical variable."""
    if isinstance(expr, Bits):
        clbits.update(expr.clbits)
        return True
    if isinstance(expr, Const):
        return True
    if isinstance(expr, (Unary, Cast)):
        return _expr_clbits(expr.operand, clbits)
    if isinstance(expr, Binary):
        return _expr_clbits(expr.left, clbits) and _expr_clbits(expr.right, clbits)
    if isinstance(expr, Index):
        return _expr_clbits(expr.target, clbits) and _expr_clbits(expr.index, clbits)
    return False


def _op_pauli(op: Any) -> Optional[tuple[int, int]]:
    """``(x, z)`` qubit masks of a gate that is the Pauli ``X^x Z^z`` up to a phase, else None."""
    if type(op) is Diagonal:
        d = np.asarray(op.diagonal, dtype=complex)
        if not op.qubits:
            return 0, 0
        c = d[0]
        z = sum(1 << j for j in range(len(op.qubits)) if abs(d[1 << j] + c) < _TOLERANCE)
        if abs(abs(c) - 1.0) > _TOLERANCE or not np.allclose(d, c * (1.0 - 2.0 * (_popcount(np.arange(d.size) & z) & 1)), atol=_TOLERANCE):
            return None
        return 0, sum(1 << q for j, q in enumerate(op.qubits) if (z >> j) & 1)
    if op.controls or len(op.qubits) > MAX_GATE_QUBITS:
        return None
    matrix = np.asarray(op.matrix, dtype=complex)
    first = matrix[int(np.argmax(np.abs(matrix[:, 0]))), 0]
    if abs(abs(first) - 1.0) > _TOLERANCE:
        return None
    pauli = _as_pauli(matrix * np.conj(first), len(op.qubits))  # any global phase: frames drop it
    if pauli is None:
        return None
    x, z, _ = pauli
    return (
        sum(1 << q for j, q in enumerate(op.qubits) if (x >> j) & 1),
        sum(1 << q for j, q in enumerate(op.qubits) if (z >> j) & 1),
    )


def _feedback_pauli(ops, clbits: dict) -> tuple[int, int]:
    """The Pauli (x, z masks, phase dropped) a conditional's ops apply for the clbit values ``clbits``."""
    x = z = 0
    for op in ops:
        kind = type(op)
        body = ()
        if kind is Unitary or kind is Diagonal:
            px, pz = _op_pauli(op)
            x, z = x ^ px, z ^ pz
        elif kind is IfElse:
            body = op.true_body if evaluate(op.condition, clbits, {}) else op.false_body
        elif kind is SwitchCase:
            value = evaluate(op.target, clbits, {})
            body = next((body for values, body in op.cases if values is None or value in values), ())
        if body:
            bx, bz = _feedback_pauli(body, clbits)
            x, z = x ^ bx, z ^ bz
    return x, z


# Shots whose frames are held at once (4096 words a qubit), fewer where their words would pass
# FRAME_BYTES: memory does not grow with the shots.
FRAME_CHUNK_SHOTS = 1 << 18
FRAME_BYTES = 64 << 20


def sample_frames(program: Any, shots: int, rng: np.random.Generator, execution: Any = None, xp: Any = np):
    """Each shot's clbit integer for a Clifford ``program`` that measures or resets mid-circuit
    (:func:`frames_fit`), yielded a chunk of at most ``FRAME_CHUNK_SHOTS`` shots at a time.

    Pauli-frame sampling (as Stim's): one reference run on a tableau, taking outcome 0 wherever
    an outcome is random; then every shot of a chunk at once as a Pauli frame (the Pauli that
    takes the reference state to that shot's), 64 shots to a word per qubit. A gate maps frames
    by its symplectic matrix; a measurement's outcome is the reference's, flipped where the frame
    has an X there; after a measurement or reset a random Z joins the frame (the state is a Z
    eigenstate there, so it changes nothing, but it randomizes the later outcomes exactly as the
    collapse would). A conditional Pauli ``P(c)`` (``c`` the clbits it reads) joins the frames as
    ``P(c) P(c_ref)``: the reference took ``P(c_ref)``, and Paulis commute up to a phase. ``P`` is
    tabulated over the clbits' values; each shot's is picked by word operations on its outcomes.
    Cost: one tableau run, plus a few word operations per op per 64 shots. More than 62 clbits
    give Python integers. The frames and the reference live on ``xp``'s device.
    """
    n = program.num_qubits
    reference = StabilizerState(xp, n)
    reference_bits: dict = {}  # clbit -> the reference's outcome
    # The reference run: ("gate", qubits, table), ("measure", qubit, clbit or None for a reset, outcome, randomize),
    # ("feedback", clbits read, {(0 for x or 1 for z, qubit): the assignments whose Pauli differs from the reference's there}).
    steps: list = []
    tables: dict = {}  # id(conditional) -> (the conditional, its clbits, its Pauli per assignment)

    def run(ops) -> None:
        for op in ops:
            kind = type(op)
            if kind is Unitary:
                qubits = tuple(op.controls) + tuple(op.qubits)
                table = _gate_table(op.qubits, op.matrix, op.controls, op.ctrl_state)
            elif kind is Diagonal and op.qubits:
                qubits, table = tuple(op.qubits), _diagonal_table(op.qubits, op.diagonal)
            elif kind is Measure or kind is Reset:
                p1 = reference.probability_one(op.qubit)
                outcome = 1 if p1 == 1.0 else 0
                reference.collapse(op.qubit, outcome, p1 if outcome else 1.0 - p1, flip=kind is Reset)
                if kind is Measure:
                    reference_bits[op.clbit] = outcome
                steps.append(("measure", op.qubit, op.clbit if kind is Measure else None, outcome, True))
                continue
            elif kind is ForLoop:
                for body in op.iterations:
                    run(body)
                continue
            elif kind is IfElse or kind is SwitchCase:
                feedback(op)
                continue
            else:
                continue
            reference._apply(qubits, table)
            steps.append(("gate", qubits, table))

    def feedback(op) -> None:
        known = tables.get(id(op))
        if known is None:
            clbits = _feedback_clbits(op)
            paulis = [_feedback_pauli((op,), {c: (a >> i) & 1 for i, c in enumerate(clbits)}) for a in range(1 << len(clbits))]
            known = tables[id(op)] = (op, clbits, paulis)
        _, clbits, paulis = known
        mine = sum(reference_bits.get(c, 0) << i for i, c in enumerate(clbits))
        x_ref, z_ref = paulis[mine]
        for q in _bits_of(x_ref):
            reference._apply((q,), _table(_pauli_matrix(1, 0, 1)))
        for q in _bits_of(z_ref):
            reference._apply((q,), _table(_pauli_matrix(0, 1, 1)))
        toggles: dict = {}
        for a, (x, z) in enumerate(paulis):
            for q in _bits_of(x ^ x_ref):
                toggles.setdefault((0, q), []).append(a)
            for q in _bits_of(z ^ z_ref):
                toggles.setdefault((1, q), []).append(a)
        if toggles:
            steps.append(("feedback", clbits, toggles))

    # The trailing measurements change nothing measured after them: the reference takes one outcome
    # of its support for all of them at once (an elimination) instead of collapsing them one by one,
    # and no random Z joins the frames there.
    ops = program.ops
    tail = len(ops)
    while tail and type(ops[tail - 1]) is Measure:
        tail -= 1
    run(ops[:tail])
    if tail < len(ops):
        x0 = reference.sampling_table()[0]
        steps.extend(("measure", op.qubit, op.clbit, int(x0[op.qubit]), False) for op in ops[tail:])
    to_host = getattr(xp, "asnumpy", np.asarray)
    chunk = min(FRAME_CHUNK_SHOTS, 64 * max(1, FRAME_BYTES // (8 * (2 * n + program.num_clbits + 8))))
    for first in range(0, shots, chunk):
        count = min(chunk, shots - first)
        words = -(-count // 64)
        frame_x = xp.zeros((n, words), dtype=xp.uint64)
        frame_z = xp.asarray(_random_words(rng, (n, words)))
        outcome_of: dict = {}  # clbit -> (reference outcome, flip words) of its last measurement
        for step in steps:
            if step[0] == "gate":
                _map_frames(frame_x, frame_z, step[1], step[2])
            elif step[0] == "feedback":
                _feed_frames(frame_x, frame_z, outcome_of, step[1], step[2])
            else:
                _, q, clbit, outcome, randomize = step
                if clbit is not None:
                    outcome_of[clbit] = (outcome, frame_x[q].copy())
                else:
                    frame_x[q] = 0
                if randomize:
                    frame_z[q] = xp.asarray(_random_words(rng, (words,)))
            if execution is not None:
                execution.checkpoint(count)
        values = np.zeros(count, dtype=np.int64) if program.num_clbits <= 62 else np.zeros(count, dtype=object)
        for clbit, (outcome, flips) in outcome_of.items():
            bits = np.unpackbits(to_host(flips).astype("<u8").view(np.uint8), bitorder="little")[:count].astype(np.int64) ^ outcome
            values = values | (bits << clbit) if values.dtype != object else values + np.array([b << clbit for b in bits.tolist()], dtype=object)
        yield values


def _bits_of(mask: int):
    while mask:
        low = mask & -mask
        yield low.bit_length() - 1
        mask ^= low


def _feed_frames(frame_x, frame_z, outcome_of: dict, clbits: tuple, toggles: dict) -> None:
    """A conditional Pauli on the frames: for each (x or z, qubit) in ``toggles``, flip the frame bit of
    the shots whose clbit values (read from ``outcome_of``) are one of the listed assignments."""
    zeros = frame_x[0] ^ frame_x[0]
    ones = ~zeros
    values = []  # each clbit's value per shot, as words
    for c in clbits:
        if c in outcome_of:
            outcome, flips = outcome_of[c]
            values.append(~flips if outcome else flips)
        else:
            values.append(zeros)
    minterms: dict = {}

    def minterm(a: int):
        words = minterms.get(a)
        if words is None:
            words = ones
            for i, value in enumerate(values):
                words = words & (value if (a >> i) & 1 else ~value)
            minterms[a] = words
        return words

    for (which, q), assignments in toggles.items():
        mask = zeros
        for a in assignments:
            mask = mask | minterm(a)
        if which == 0:
            frame_x[q] ^= mask
        else:
            frame_z[q] ^= mask


def _random_words(rng: np.random.Generator, shape: tuple) -> np.ndarray:
    return np.frombuffer(rng.bytes(8 * int(np.prod(shape))), dtype="<u8").reshape(shape).astype(np.uint64)


def _map_frames(frame_x: np.ndarray, frame_z: np.ndarray, qubits: tuple, table: "_Table") -> None:
    """Conjugate every frame's Pauli on ``qubits`` by the gate (signs dropped: a frame is a Pauli up to phase)."""
    k = table.k
    images = table.symplectic()
    old = [frame_x[q].copy() for q in qubits] + [frame_z[q].copy() for q in qubits]
    for out in range(2 * k):  # output bit: x of qubit out, then z of qubit out - k
        word = old[0] ^ old[0]  # zeros, on the frames' device
        for source in images[out]:
            word ^= old[source]
        if out < k:
            frame_x[qubits[out]] = word
        else:
            frame_z[qubits[out - k]] = word


def _support(x: np.ndarray, z: np.ndarray, m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The support of the stabilizer state with rows ``i^m X^x Z^z`` (x, z: rows x qubits bits):
    Gaussian elimination brings the X parts to a basis of ``rank`` rows; the other rows are then
    ``(-1)^s Z^z``, each a parity ``z . x0 = s`` every outcome satisfies. Rows are packed 64
    qubits to a word for the elimination."""
    n = x.shape[1]
    xw, zw = _pack(x), _pack(z)
    m = m.astype(np.int64)

    def multiply(targets: np.ndarray, row: int) -> None:  # rows ``targets`` times row ``row``: their phases
        sign = np.bitwise_count(zw[targets] & xw[row]).sum(axis=1, dtype=np.int64) & 1
        m[targets] = (m[targets] + m[row] + 2 * sign) & 3

    rank = len(_row_reduce(xw, [zw], [m], multiply))
    basis = np.unpackbits(xw[:rank].view(np.uint8), axis=1, count=n, bitorder="little")
    # Rows rank.. have no X part: (-1)^(m/2) Z^z. Solve z . x0 = m/2 (mod 2) for one x0 (free bits 0).
    parities = zw[rank:].copy()
    values = (m[rank:] >> 1).astype(np.uint8)
    x0 = np.zeros(n, dtype=np.uint8)
    for row, column in enumerate(_row_reduce(parities, [values])):
        x0[column] = values[row]
    return x0, basis


def _pack(bits: np.ndarray) -> np.ndarray:
    """Rows of 0/1 bytes as rows of uint64 words, column c at bit c % 64 of word c // 64."""
    packed = np.packbits(bits, axis=1, bitorder="little")
    width = -(-packed.shape[1] // 8) * 8
    padded = np.zeros((bits.shape[0], max(width, 8)), dtype=np.uint8)
    padded[:, : packed.shape[1]] = packed
    return padded.view("<u8")


def _row_reduce(words: np.ndarray, added: list, swapped: Sequence = (), before_adding=None) -> list[int]:
    """Bring ``words`` (rows of bits over GF(2), packed by :func:`_pack`) to reduced row echelon
    form in place; returns the pivot columns, row i's pivot first. Rows of each ``added`` array are
    swapped and added (XOR) with those of ``words``; rows of each ``swapped`` array only swapped;
    ``before_adding(targets, row)`` is called before rows ``targets`` have row ``row`` added."""
    rows = words.shape[0]
    pivots: list[int] = []
    for column in range(64 * words.shape[1]):
        row = len(pivots)
        if row == rows:
            break
        bit = (words[:, column >> 6] >> np.uint64(column & 63)) & np.uint64(1)
        candidates = np.flatnonzero(bit[row:])
        if not candidates.size:
            continue
        pivot = row + int(candidates[0])
        if pivot != row:
            for array in (words, *added, *swapped):
                array[[row, pivot]] = array[[pivot, row]]
            bit[[row, pivot]] = bit[[pivot, row]]
        targets = np.flatnonzero(bit)
        targets = targets[targets != row]
        if targets.size:
            if before_adding is not None:
                before_adding(targets, row)
            for array in (words, *added):
                array[targets] ^= array[row]
        pivots.append(column)
    return pivots
