"""Adjoint differentiation of expectation values: one forward state, one backward sweep.

With ``psi_k = U_k ... U_1 |0>`` and ``lambda = O psi_N``, the derivative of
``<psi_N|O|psi_N>`` with respect to a parameter of ``U_k`` is
``2 Re <lambda_k| dU_k |psi_{k-1}>``, where ``lambda_k = U_{k+1}^dag ... U_N^dag lambda``.
So the sweep walks the gates backwards once, un-applying each gate from ``psi``
and from every ``lambda``; at a parametrized gate whose generator is a Pauli sum
(``U = exp(i theta G)``) the term is ``-2 Im <lambda_k|G|psi_k>``, one pass over
the two states; any other gate gets its derivative matrix applied to a copy of
``psi_{k-1}`` and one inner product per observable (Jones and Gacon, arXiv:2009.02823). No circuit is re-simulated per parameter;
memory is ``2 + len(observables)`` states.

Written once against ``xp`` through :class:`StateVector`, so it runs where the
state lives (NumPy or CuPy, with the GPU kernels when the state has them). The
front end supplies each step as engine gate ops with numeric matrices (the gate,
its inverse, and the derivative matrices of its differentiated parameters);
nothing here imports a host framework.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..errors import InvalidInputError
from .expectation import transition_expectation
from .observables import Observable, apply_observable, inner
from .program import Diagonal, GlobalPhase, Unitary
from .statevector import StateVector


@dataclass(frozen=True, eq=False)
class AdjointStep:
    """One gate of the sweep.

    ``gate`` is what the forward run applied and ``inverse`` undoes it (both
    :class:`Unitary`, :class:`Diagonal` or :class:`GlobalPhase`). A differentiated
    parameter is given one of two ways, each pairing a Jacobian column with:

    - ``generators``: a :class:`PauliSum` ``G`` with ``dU/dtheta = i G U``; then
      ``<lambda_k|dU|psi_{k-1}> = i <lambda_k|G|psi_k>``, one pass over the two
      states (:func:`transition_expectation`), no copy;
    - ``derivatives``: ``dU/dtheta`` as a :class:`Unitary` (any matrix) or
      :class:`Diagonal` on the gate's qubits, applied to a copy of ``psi_{k-1}``.
    """

    gate: object
    inverse: object
    derivatives: tuple = ()
    generators: tuple = ()


def apply_gate(state: StateVector, op) -> None:
    """Apply one engine gate op (``Unitary``, ``Diagonal`` or ``GlobalPhase``) to ``state``."""
    if isinstance(op, Diagonal):
        state.apply_diagonal(op.qubits, op.diagonal)
    elif isinstance(op, Unitary):
        if op.controls:
            state.apply_controlled(op.controls, op.ctrl_state, op.qubits, op.matrix)
        else:
            state.apply_unitary(op.qubits, op.matrix)
    elif isinstance(op, GlobalPhase):
        state.apply_phase(op.phase)
    else:
        raise InvalidInputError(f"adjoint differentiation takes gates only, not {op!r}")


def _check_column(column: int, num_columns: int) -> None:
    if not 0 <= column < num_columns:
        raise InvalidInputError(f"a derivative adds to column {column}, outside 0..{num_columns - 1}")


def adjoint_jacobian(state: StateVector, steps: Sequence[AdjointStep], observables: Sequence[Observable], num_columns: int) -> np.ndarray:
    """``d<O_i>/dtheta_j`` as a real ``(len(observables), num_columns)`` array.

    ``state`` holds the forward run's final state (the product of every step's
    ``gate`` applied to the initial state) and is consumed: the sweep un-applies
    the steps down to the first one with a derivative. Derivatives of several
    steps may add to one column (a parameter used by several gates).
    """
    jacobian = np.zeros((len(observables), num_columns), dtype=np.float64)
    if not observables or num_columns == 0:
        return jacobian
    for observable in observables:
        if observable.num_qubits != state.num_qubits:
            raise InvalidInputError(f"an observable acts on {observable.num_qubits} qubits but the state has {state.num_qubits}")
    bras = [apply_observable(state, observable) for observable in observables]
    for bra in bras:
        # Each bra takes the gates the state takes, in the same order: with a scratch buffer as
        # the state has one (a read's copy has none), its axes move as the state's do, so the
        # transition reads never reorder it, and a dense gate is one product, not chunked copies.
        bra.in_place = state.in_place
    # Only the steps up to the first differentiated one (from the start) need un-applying.
    first = next((k for k, step in enumerate(steps) if step.derivatives or step.generators), len(steps))
    scratch = None
    for step in reversed(steps[first:]):
        for column, generator in step.generators:
            _check_column(column, num_columns)
            for i, bra in enumerate(bras):
                # 2 Re(i <lambda|G|psi>) = -2 Im <lambda|G|psi>
                jacobian[i, column] -= 2.0 * transition_expectation(bra, state, generator).imag
        apply_gate(state, step.inverse)
        for column, derivative in step.derivatives:
            _check_column(column, num_columns)
            if scratch is None:
                scratch = state.snapshot()
            else:
                scratch.copy_from(state)
            apply_gate(scratch, derivative)
            for i, bra in enumerate(bras):
                jacobian[i, column] += 2.0 * inner(bra, scratch).real
        if step is not steps[first]:
            for bra in bras:
                apply_gate(bra, step.inverse)
    return jacobian
