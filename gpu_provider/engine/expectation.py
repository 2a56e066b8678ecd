"""Exact expectation values of Pauli sums on a statevector, on the state's own device.

An observable reaches the engine as a :class:`PauliSum`: integer X and Z masks
(bit q for qubit q) and complex coefficients, term t being
``coeffs[t] * X^x[t] Z^z[t]``. Because ``X^x Z^z |i> = (-1)^popcount(i & z) |i ^ x>``,

    <psi| X^x Z^z |psi> = sum_i (-1)^popcount(i & z) conj(psi[i ^ x]) psi[i],

so every term with the same X mask pairs the same amplitudes: the terms are
grouped by X mask and one pass over the state serves a whole group. A ``Y`` is
``i X Z``; the front end folds that ``i`` into the coefficient
(:func:`pauli_sum`).

Two ways to run a group, one math:

- GPU (``state.kernels``): the ``pauli_expectation`` kernel reads each pair once
  and weighs it by ``sum_t w_t (-1)^popcount(i & z_t)`` for one observable's
  weights; per-block partials in double, a fixed grid, so it is deterministic.
- ``xp`` (NumPy, or CuPy without kernels): one pass forms
  ``conj(psi[i ^ x]) psi[i]`` (a flip of the X axes) on the half of the pairs
  ``(i, i ^ x)`` where the highest X bit is 0, and the group's parity sums are one matrix product of the result, as a matrix of
  its high bits by its low bits, with the low bits' signs of every term, then
  the high bits' signs (:func:`_parity_sums`): one pass for the whole
  group, in BLAS or cuBLAS. A single state is read a chunk of at most
  ``IN_PLACE_CHUNK_BYTES`` at a time (:func:`_chunked_group_values`), so its
  reads need neither its scratch buffer nor any state-sized temporary: a
  state in place reads the same way; a batch of states uses its own scratch.

The state stays on the device; only per-block partials or one scalar per term
come back. Masks are in qubit order and mapped to the state's physical bit
positions (its lazily tracked axis order) here, so nothing is transposed.
Nothing in this module imports Qiskit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..errors import InvalidInputError

# Widest state whose masks fit the uint64 masks used here.
MAX_MASK_QUBITS = 63


@dataclass(frozen=True)
class PauliSum:
    """``sum_t coeffs[t] * X^x[t] Z^z[t]`` on ``num_qubits`` qubits (bit q of a mask is qubit q)."""

    num_qubits: int
    x: np.ndarray  # uint64, one mask per term
    z: np.ndarray  # uint64
    coeffs: np.ndarray  # complex128; a Y's factor i already folded in

    @property
    def num_terms(self) -> int:
        return int(self.coeffs.shape[0])


def pauli_sum(num_qubits: int, x, z, coeffs) -> PauliSum:
    """A :class:`PauliSum` of Hermitian Pauli strings: term t is ``coeffs[t]`` times the
    tensor product with X where only ``x`` is set, Z where only ``z`` is, Y where both are.

    The ``i`` of each ``Y = i X Z`` is folded into the coefficient here. Wider than
    ``MAX_MASK_QUBITS`` qubits (a stabilizer state's observables), the masks are Python
    integers (an object array) instead of uint64.
    """
    if num_qubits > MAX_MASK_QUBITS:
        return _wide_pauli_sum(num_qubits, x, z, coeffs)
    if not 0 <= num_qubits:
        raise InvalidInputError(f"a Pauli observable needs a non-negative number of qubits, not {num_qubits}")
    x = np.asarray(x, dtype=np.uint64).reshape(-1)
    z = np.asarray(z, dtype=np.uint64).reshape(-1)
    coeffs = np.asarray(coeffs, dtype=np.complex128).reshape(-1)
    if not x.shape == z.shape == coeffs.shape:
        raise InvalidInputError(f"x, z and coeffs must have one entry per term, got {x.shape}, {z.shape}, {coeffs.shape}")
    limit = np.uint64((1 << num_qubits) - 1) if num_qubits < 64 else np.uint64(-1)
    if np.any((x | z) & ~limit):
        raise InvalidInputError(f"a Pauli term acts on a qubit outside 0..{num_qubits - 1}")
    if not np.all(np.isfinite(coeffs)):
        raise InvalidInputError("a Pauli coefficient is NaN or infinite")
    num_y = _popcount(x & z)
    return PauliSum(num_qubits, x, z, coeffs * (1j ** (num_y % 4)))


def _wide_pauli_sum(num_qubits: int, x, z, coeffs) -> PauliSum:
    x = np.array([int(v) for v in np.asarray(x, dtype=object).reshape(-1)], dtype=object)
    z = np.array([int(v) for v in np.asarray(z, dtype=object).reshape(-1)], dtype=object)
    coeffs = np.asarray(coeffs, dtype=np.complex128).reshape(-1)
    if not x.shape == z.shape == coeffs.shape:
        raise InvalidInputError(f"x, z and coeffs must have one entry per term, got {x.shape}, {z.shape}, {coeffs.shape}")
    if any((a | b) >> num_qubits or a < 0 or b < 0 for a, b in zip(x, z)):
        raise InvalidInputError(f"a Pauli term acts on a qubit outside 0..{num_qubits - 1}")
    if not np.all(np.isfinite(coeffs)):
        raise InvalidInputError("a Pauli coefficient is NaN or infinite")
    num_y = np.array([(a & b).bit_count() for a, b in zip(x, z)], dtype=np.int64)
    return PauliSum(num_qubits, x, z, coeffs * (1j ** (num_y % 4)))


def mask_bits(masks: np.ndarray, num_qubits: int) -> np.ndarray:
    """(terms, num_qubits) 0/1 bytes of uint64 or Python-integer masks, column q for qubit q."""
    data = b"".join(int(v).to_bytes(-(-num_qubits // 8) or 1, "little") for v in masks)
    rows = np.frombuffer(data, dtype=np.uint8).reshape(len(masks), -1)
    return np.unpackbits(rows, axis=1, count=num_qubits, bitorder="little")


def _popcount(masks: np.ndarray) -> np.ndarray:
    masks = masks.astype(np.uint64)
    count = np.zeros(masks.shape, dtype=np.int64)
    for shift in range(64):
        count += ((masks >> np.uint64(shift)) & np.uint64(1)).astype(np.int64)
    return count


def _physical(masks: np.ndarray, bit_of_qubit: Sequence[int]) -> np.ndarray:
    """Masks over qubits re-labelled to physical bit positions."""
    out = np.zeros(masks.shape, dtype=np.uint64)
    for qubit, bit in enumerate(bit_of_qubit):
        out |= ((masks >> np.uint64(qubit)) & np.uint64(1)) << np.uint64(bit)
    return out


def _term_table(observables: Sequence[PauliSum], num_qubits: int):
    """Distinct (x, z) terms of all observables, and each observable's weight on each: (O, U)."""
    for index, observable in enumerate(observables):
        if observable.num_qubits != num_qubits:
            raise InvalidInputError(f"observable {index} acts on {observable.num_qubits} qubits but the state has {num_qubits}")
    x = np.concatenate([o.x for o in observables])
    z = np.concatenate([o.z for o in observables])
    coeffs = np.concatenate([o.coeffs for o in observables])
    owner = np.repeat(np.arange(len(observables)), [o.num_terms for o in observables])
    unique, inverse = np.unique(np.stack([x, z], axis=1), axis=0, return_inverse=True)
    weights = np.zeros((len(observables), unique.shape[0]), dtype=np.complex128)
    np.add.at(weights, (owner, inverse.reshape(-1)), coeffs)
    return unique[:, 0], unique[:, 1], weights


def expectation_values(state, observables: Sequence[PauliSum]) -> np.ndarray:
    """``<psi|O|psi>`` for each observable, as complex128 on the host.

    Terms shared by several observables are evaluated once (on the ``xp`` path)
    and every X-mask group costs one pass over the state. The state is not
    moved or copied to the host.
    """
    own = getattr(state, "expectation_values", None)
    if own is not None:  # a state split over MPI ranks (reduced over them), or a stabilizer state
        return own(observables)
    n = state.num_qubits
    for index, observable in enumerate(observables):
        if observable.num_qubits != n:
            raise InvalidInputError(f"observable {index} acts on {observable.num_qubits} qubits but the state has {n}")
    out = np.zeros(len(observables), dtype=np.complex128)
    if not observables or not any(o.num_terms for o in observables):
        return out
    x, z, weights = _term_table(observables, n)
    bits = [state.bit(q) for q in range(n)]
    x_phys = _physical(x, bits)
    z_phys = _physical(z, bits)
    kernels = getattr(state, "kernels", None)
    for x_mask in np.unique(x_phys):
        members = np.nonzero(x_phys == x_mask)[0]
        group_weights = weights[:, members]
        if kernels is not None:
            for o in np.nonzero(np.any(group_weights != 0, axis=1))[0]:
                out[o] += kernels.pauli_expectation(state, int(x_mask), z_phys[members], group_weights[o])
        else:  # a chunk at a time: no state-sized temporary, the scratch buffer unused
            out += group_weights @ _chunked_group_values(state, int(x_mask), [int(m) for m in z_phys[members]])
    return out


def batch_expectation_values(batch, observables: Sequence[Sequence[PauliSum]]) -> list[np.ndarray]:
    """``expectation_values`` for every row of a :class:`~gpu_provider.engine.batch.StateBatch`
    (canonical order), ``observables[row]`` being that row's list; each X-mask group is one
    pass over all rows at once on the ``xp`` path (per row through the kernel on a GPU)."""
    n = batch.num_qubits
    if getattr(batch, "kernels", None) is not None:
        return [expectation_values(batch.state(row), list(obs)) for row, obs in enumerate(observables)]
    flat = [o for obs in observables for o in obs]
    outs = [np.zeros(len(obs), dtype=np.complex128) for obs in observables]
    if not flat or not any(o.num_terms for o in flat):
        return outs
    x, z, weights = _term_table(flat, n)
    values = np.zeros((batch.batch, x.shape[0]), dtype=np.complex128)
    # Half the batch for q; with no qubits, room for its |psi|^2 as reals (one per row).
    scratch = batch.xp.empty(batch.data.size // 2 if n else batch.data.size, dtype=batch.dtype)
    for x_mask in np.unique(x):
        members = np.nonzero(x == x_mask)[0]
        values[:, members] = _group_values(batch.xp, batch.data, n, int(x_mask), [int(m) for m in z[members]], scratch)
    start = 0
    for row, obs in enumerate(observables):
        outs[row] = weights[start : start + len(obs)] @ values[row]
        start += len(obs)
    return outs


def _group_values(xp, data, n: int, x_mask: int, z_masks: list[int], scratch, tables=None) -> np.ndarray:
    """``<X^x Z^z_t>`` for each t (physical masks) and each row of ``data`` (B, 2^n): (B, T).

    With ``x != 0`` the pairs ``(i, i ^ x)`` are visited once, from the half
    where the highest bit ``h`` of ``x`` is 0: with ``q = conj(psi[i ^ x]) psi[i]``
    there and ``e = (-1)^popcount(x & z)``, the pair contributes
    ``s(i) (q + e conj(q))``, i.e. ``2 s(i) Re q`` or ``2i s(i) Im q``. So one
    pass forms ``q`` on half the state (in ``scratch``), and the parity sums run
    on real arrays.
    """
    rows = data.shape[0]
    tensor = data.reshape((rows,) + (2,) * n)  # axis 1 + a holds physical bit n - 1 - a
    values = np.zeros((rows, len(z_masks)), dtype=np.complex128)
    if not x_mask:
        # Z-only terms: parity sums of |psi[i]|^2, formed in the scratch (as reals: no temporary).
        product = scratch.reshape(-1).view(data.real.dtype)[: rows << n].reshape(tensor.shape)
        xp.abs(tensor, out=product)
        xp.square(product, out=product)
        values += _parity_sums(xp, product, [n - 1 - a for a in range(n)], z_masks, tables=tables)
        return values
    high = x_mask.bit_length() - 1
    high_axis = n - 1 - high
    lower = (slice(None),) * (1 + high_axis)
    a, b = tensor[lower + (0,)], tensor[lower + (1,)]
    flips = tuple(1 + n - 1 - bit - (1 if n - 1 - bit > high_axis else 0) for bit in range(high) if (x_mask >> bit) & 1)
    if flips:
        b = xp.flip(b, axis=flips)
    q = scratch.reshape(-1)[: rows << (n - 1)].reshape((rows,) + (2,) * (n - 1))
    xp.conjugate(b, out=q)
    xp.multiply(q, a, out=q)
    bits = [n - 1 - axis for axis in range(n) if axis != high_axis]
    odd = np.array([bin(x_mask & z).count("1") & 1 for z in z_masks], dtype=bool)
    sums = _parity_sums(xp, q, bits, z_masks, imag=odd, tables=tables)
    return np.where(odd, 2j, 2.0) * sums


def _paired_product(xp, partner, chunk, x_mask: int, scratch) -> None:
    """``scratch = conj(partner flipped on x_mask's inner bits) * chunk``: the chunks are rows of
    ``2^inner`` amplitudes and ``scratch`` is ``(1, 2, ..., 2)``, its axis ``1 + a`` bit ``inner - 1 - a``."""
    inner = scratch.ndim - 1
    flips = tuple(inner - bit for bit in range(inner) if (x_mask >> bit) & 1)
    partner = partner.reshape(scratch.shape)
    xp.conjugate(xp.flip(partner, axis=flips) if flips else partner, out=scratch)
    xp.multiply(scratch, chunk.reshape(scratch.shape), out=scratch)


def _lead_signs(j: int, lead_z: list[int]) -> np.ndarray:
    """``(-1)^popcount(j & z)`` for each z: the sign chunk ``j``'s leading bits give each term."""
    return np.array([-1.0 if bin(j & z).count("1") & 1 else 1.0 for z in lead_z])


def _chunked_group_values(state, x_mask: int, z_masks: list[int]) -> np.ndarray:
    """``<X^x Z^z_t>`` for each t (physical masks) of one state: (T,), complex128.

    No state-sized temporary: the state is cut into chunks of ``state.chunk_qubits()`` low bits
    (at most ``IN_PLACE_CHUNK_BYTES``), its leading bits fixed per chunk, and each pair
    ``(i, i ^ x)`` is visited once, as in :func:`_group_values`. Where X flips no leading bit, a
    chunk's pairs lie inside it: :func:`_group_values` on the chunk, with one chunk of scratch.
    Otherwise chunk ``j`` (the highest flipped bit 0) pairs with chunk ``j ^ (x >> inner)``:
    ``q = conj(partner flipped on the inner X bits) * chunk`` goes into the scratch and each
    term takes ``2 Re q`` or ``2i Im q`` (as ``x & z`` has even or odd parity) through
    :func:`_parity_sums`. Either way a chunk's sums are weighed by the parity of
    its own bits under each Z mask.
    """
    xp = state.xp
    n = state.num_qubits
    inner = state.chunk_qubits()
    lead = n - inner
    rows = state.data.reshape(1 << lead, 1 << inner)
    low = (1 << inner) - 1
    inner_z = [z & low for z in z_masks]
    lead_z = [z >> inner for z in z_masks]
    values = np.zeros(len(z_masks), dtype=np.complex128)
    lead_x = x_mask >> inner
    scratch = xp.empty((1,) + (2,) * inner, dtype=state.dtype)
    tables: dict = {}  # every chunk reads the same terms: their sign tables once
    if lead_x:
        high = 1 << (lead_x.bit_length() - 1)
        bits = [inner - 1 - axis for axis in range(inner)]
        odd = np.array([bin(x_mask & z).count("1") & 1 for z in z_masks], dtype=bool)
        factors = np.where(odd, 2j, 2.0)
    for j in range(1 << lead):
        signs = _lead_signs(j, lead_z)
        if not lead_x:
            values += signs * _group_values(xp, rows[j : j + 1], inner, x_mask, inner_z, scratch, tables)[0]
            continue
        if j & high:
            continue  # visited from its partner
        _paired_product(xp, rows[j ^ lead_x], rows[j], x_mask, scratch)
        values += signs * factors * _parity_sums(xp, scratch, bits, inner_z, imag=odd, tables=tables)[0]
    return values


# A parity-sum product takes terms in blocks whose sign tables and output (each 2^m or
# rows x 2^(k - m) by the block's terms) stay under this many bytes: its temporaries, a few of
# these, fit in the job's workspace.
PARITY_BLOCK_BYTES = 4 << 20
# Its low bits (the matrix's columns): all of a row up to this many, else at least this many.
PARITY_LOW_BITS = 10


def _sign_table(bits: int, masks: list[int]) -> np.ndarray:
    """``(2^bits, T)`` float64: ``(-1)^popcount(j & masks[t])`` at row j, column t."""
    index = np.arange(1 << bits, dtype=np.int64)[:, None] & np.asarray(masks, dtype=np.int64)[None, :]
    for shift in (32, 16, 8, 4, 2, 1):
        index ^= index >> shift
    return 1.0 - 2.0 * (index & 1)


def _parity_sums(xp, array, bits: list[int], z_masks: list[int], imag=None, tables=None) -> np.ndarray:
    """``sum_i (-1)^popcount(i & z) part[r, i]`` for each row r and each z: (B, T), float64.

    ``array`` is C-contiguous, ``(B, 2, ..., 2)``; ``bits[axis]`` is the physical bit of its
    axis ``1 + axis``. Real, ``part`` is ``array``; complex, ``part`` is its real part for the
    terms where ``imag`` is False and its imaginary part where True. The sign of i splits
    into the signs of its high and low halves of bits, so with ``A`` the array as a matrix of
    ``2^(k-m)`` rows by ``2^m`` columns (complex: ``2^(m+1)`` interleaved real columns), the
    sums are ``sum_rows(high signs * (A @ low signs))``: one matrix product over the array
    for every term at once (BLAS, or cuBLAS on a GPU), blocks of terms keeping its sign tables
    and output under ``PARITY_BLOCK_BYTES`` each. The product runs in the array's precision,
    the last sum in double. ``tables``: a dict kept by a caller that reads arrays of the same
    shape with the same terms (the chunks of a state): the sign tables of a single block are
    built once there, not per array.
    """
    rows = array.shape[0]
    k = array.ndim - 1
    complex_part = imag is not None
    real = array.real.dtype if complex_part else array.dtype
    flat = []  # each mask over the flat index within a row: axis a is bit k - 1 - a
    for z in z_masks:
        mask = 0
        for axis, bit in enumerate(bits):
            if (z >> bit) & 1:
                mask |= 1 << (k - 1 - axis)
        flat.append(mask)
    low = k if k <= PARITY_LOW_BITS else max(PARITY_LOW_BITS, k // 2)
    high = k - low
    columns = (2 if complex_part else 1) << low
    matrix = (array.reshape(-1).view(real) if complex_part else array).reshape(rows << high, columns)
    out = np.zeros((rows, len(z_masks)), dtype=np.float64)
    block = max(1, PARITY_BLOCK_BYTES // (8 * max(rows << high, columns)))
    for start in range(0, len(z_masks), block):
        masks = flat[start : start + block]
        if tables is not None and start in tables:
            low_signs, high_signs = tables[start]
        else:
            low_signs = _sign_table(low, [m & ((1 << low) - 1) for m in masks])
            if complex_part:  # interleaved (re, im) columns: each term reads one of the two
                parts = np.asarray(imag[start : start + block], dtype=bool)
                expanded = np.zeros((columns, len(masks)))
                expanded[0::2, ~parts] = low_signs[:, ~parts]
                expanded[1::2, parts] = low_signs[:, parts]
                low_signs = expanded
            low_signs = xp.asarray(low_signs.astype(real))
            high_signs = xp.asarray(_sign_table(high, [m >> low for m in masks]))[None]
            if tables is not None and block >= len(z_masks):  # one block: its tables stay small
                tables[start] = low_signs, high_signs
        partial = matrix @ low_signs
        partial = partial.reshape(rows, 1 << high, len(masks)).astype(np.float64)
        sums = (partial * high_signs).sum(axis=1)
        out[:, start : start + block] = sums.get() if xp is not np else sums
    return out


def transition_expectation(bra, ket, observable: PauliSum) -> complex:
    """``<bra|O|ket>`` for a Pauli sum ``O`` and two states of the same width, on their device.

    Per X-mask group, chunk by chunk as :func:`_chunked_group_values` (no state-sized
    temporary, no scratch buffer): chunk ``j`` of ``ket`` meets chunk ``j ^ (x >> inner)`` of
    ``bra``, its amplitudes flipped on the inner X bits; ``q = conj(that) * chunk`` goes into
    one chunk of scratch, and one matrix product (:func:`_parity_sums`) gives every term's
    signed sum of its real and imaginary parts, weighed by the parity of the chunk's leading
    bits. ``bra`` is moved to ``ket``'s axis order first if the two differ. Used by the adjoint
    sweep, where ``<lambda|G|psi>`` for a gate's Pauli generator ``G`` replaces a copy of the
    state and a derivative matrix applied to it.
    """
    n = ket.num_qubits
    if bra.num_qubits != n or observable.num_qubits != n:
        raise InvalidInputError(f"states of {bra.num_qubits} and {n} qubits and an observable on {observable.num_qubits} do not match")
    if bra.order != ket.order:
        bra._reorder(list(ket.order))
    if not observable.num_terms:
        return 0j
    xp = ket.xp
    bits = [ket.bit(q) for q in range(n)]
    x_phys = _physical(observable.x, bits)
    z_phys = _physical(observable.z, bits)
    inner = ket.chunk_qubits()
    lead = n - inner
    low = (1 << inner) - 1
    bra_rows = bra.data.reshape(1 << lead, 1 << inner)
    ket_rows = ket.data.reshape(1 << lead, 1 << inner)
    scratch = xp.empty((1,) + (2,) * inner, dtype=ket.dtype)
    axis_bits = [inner - 1 - axis for axis in range(inner)]
    total = 0j
    for x_mask in np.unique(x_phys):
        members = np.nonzero(x_phys == x_mask)[0]
        x = int(x_mask)
        z_masks = [int(z) for z in z_phys[members]]
        terms = len(z_masks)
        inner_z = [z & low for z in z_masks] * 2  # each term twice: its real part, then its imaginary part
        imag = np.repeat([False, True], terms)
        lead_z = [z >> inner for z in z_masks]
        tables: dict = {}
        sums = np.zeros(terms, dtype=np.complex128)
        for j in range(1 << lead):
            _paired_product(xp, bra_rows[j ^ (x >> inner)], ket_rows[j], x, scratch)
            parts = _parity_sums(xp, scratch, axis_bits, inner_z, imag=imag, tables=tables)[0]
            sums += _lead_signs(j, lead_z) * (parts[:terms] + 1j * parts[terms:])
        total += complex(np.sum(observable.coeffs[members] * sums))
    return total

