"""Parametrized circuits compiled once, bound many times.

:func:`compile_circuit` translates and fuses a circuit that may hold unbound
parameters once. Every gate whose matrix depends on parameters is a slot (see
``translate.translate_template``), and fusion records which of its blocks
contain slots. :meth:`CompiledCircuit.bind` then builds the engine
:class:`~gpu_provider.engine.program.Program` for one set of values by
recomputing only those slots and the fused blocks that hold them: no
re-translation, no re-fusion, no transpilation.

A parametrized instruction that a template cannot hold (inside control flow,
or neither a standard gate nor defined through one) makes the circuit fall back
to binding with ``assign_parameters`` and translating per binding: slower, but
the same results.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
from qiskit.circuit import Parameter, ParameterExpression, QuantumCircuit

from ..engine import program as P
from ..engine.batch import Column, dense_matrix, gate_span, column_of
from ..engine.program import is_sampling_friendly
from ..errors import InvalidInputError
from .fusion import DEFAULT_FUSION_THRESHOLD, fuse, merge_block
from .translate import DENSE_MAX_QUBITS, GateSlot, NeedsBinding, PhaseSlot, translate, translate_template

logger = logging.getLogger(__name__)


@dataclass
class FusionOptions:
    enable: bool = True
    device_kind: str = "CPU"
    max_qubits: Optional[int] = None
    threshold: int = DEFAULT_FUSION_THRESHOLD
    precision: str = "double"


class _Evaluator:
    """Parameter expressions evaluated for one row of values (circuit.parameters order)."""

    __slots__ = ("index", "values")

    def __init__(self, index: dict, values) -> None:
        self.index = index
        self.values = values

    def __call__(self, value):
        if isinstance(value, Parameter):
            return float(self.values[self.index[value]])
        if isinstance(value, ParameterExpression) and value.parameters:
            return value.bind({p: float(self.values[self.index[p]]) for p in value.parameters}).numeric()
        return value


@dataclass
class CompiledCircuit:
    """A circuit translated and fused once; :meth:`bind` gives the Program for one set of values."""

    circuit: QuantumCircuit
    parameters: tuple
    template: Optional[P.Program]  # None: bound and translated per binding
    plan: tuple = ()  # ("op", op) | ("slot", slot) | ("block", members), members ops or slots
    num_slots: int = 0
    ops_before: int = 0
    fusion: FusionOptions = field(default_factory=FusionOptions)
    dense_max_qubits: int = DENSE_MAX_QUBITS  # translation's widest dense gate (see translate)

    @property
    def num_parameters(self) -> int:
        return len(self.parameters)

    @property
    def per_binding_translation(self) -> bool:
        return self.template is None

    def bind(self, values) -> P.Program:
        """The Program for ``values`` (one per parameter, in ``circuit.parameters`` order)."""
        values = np.asarray(values, dtype=float).reshape(-1)
        if values.shape[0] != len(self.parameters):
            raise InvalidInputError(
                f"circuit {self.circuit.name!r} has {len(self.parameters)} parameters but {values.shape[0]} values were given"
            )
        if not np.all(np.isfinite(values)):
            raise InvalidInputError(f"parameter values for circuit {self.circuit.name!r} must be finite numbers")
        if self.template is None:
            bound = self.circuit.assign_parameters(values, inplace=False) if self.parameters else self.circuit
            return _fused(translate(bound, dense_max_qubits=self.dense_max_qubits), self.fusion, None)
        if not self.num_slots:
            return self.template
        evaluate = _Evaluator({p: i for i, p in enumerate(self.parameters)}, values)
        ops = []
        for kind, item in self.plan:
            if kind == "op":
                ops.append(item)
            elif kind == "slot":
                ops.append(item.bind(evaluate))
            else:
                ops.append(merge_block([m.bind(evaluate) if _is_slot(m) else m for m in item]))
        return self.template.replace(ops=tuple(ops))


    # -- many parameter sets at once -----------------------------------------

    @property
    def can_batch(self) -> bool:
        """Whether bindings can run as a batch of states (:meth:`bind_columns`)."""
        if self.template is None or not is_sampling_friendly(self.template):
            return False
        for kind, item in self.plan:
            if kind == "op" and not isinstance(item, P.Measure) and not isinstance(item, P.GlobalPhase) and gate_span(item) is None:
                return False
        return True

    def bind_columns(self, values) -> list:
        """The engine's batch :class:`~gpu_provider.engine.batch.Column` list for rows of ``values``
        (shape ``(B, num_parameters)``): constant ops once, parametrized ones stacked, with
        the common gates' matrices computed for all rows at once."""
        values = np.asarray(values, dtype=float).reshape(-1, len(self.parameters))
        if not np.all(np.isfinite(values)):
            raise InvalidInputError(f"parameter values for circuit {self.circuit.name!r} must be finite numbers")
        size = values.shape[0]
        index = {p: i for i, p in enumerate(self.parameters)}
        evaluate = _BatchEvaluator(index, values, self._affine)
        columns = []
        for kind, item in self.plan:
            if kind == "op":
                if not isinstance(item, P.Measure):
                    columns.append(column_of(item))
            elif kind == "slot" and isinstance(item, PhaseSlot):
                phases = np.broadcast_to(np.real(np.asarray(evaluate(item.expression), dtype=complex)), (size,))
                columns.append(Column("phase", (), np.ascontiguousarray(phases), True))
            elif kind == "slot":
                matrices = _slot_matrices(item, evaluate, size)
                if not np.all(np.isfinite(matrices)):
                    raise InvalidInputError(f"instruction {item.label!r} has a non-finite matrix for these parameter values")
                if item.diagonal:
                    columns.append(Column("diagonal", item.qubits, np.ascontiguousarray(np.diagonal(matrices, axis1=1, axis2=2)), True))
                else:
                    columns.append(Column("unitary", item.qubits, matrices, True))
            else:
                rows = []
                for row in range(size):
                    at = _Evaluator(index, values[row])
                    rows.append(merge_block([m.bind(at) if _is_slot(m) else m for m in item]))
                if all(isinstance(op, P.Diagonal) for op in rows):
                    columns.append(Column("diagonal", rows[0].qubits, np.stack([op.diagonal for op in rows]), True))
                else:
                    columns.append(Column("unitary", gate_span(rows[0]), np.stack([dense_matrix(op) for op in rows]), True))
        return columns

    @functools.cached_property
    def _affine(self) -> dict:
        return {}


class _BatchEvaluator:
    """Parameter expressions evaluated for every row of ``values`` at once: arrays of shape (B,).

    Affine expressions (``a * theta + b``, the usual kind) are one vector
    operation; others are bound row by row.
    """

    def __init__(self, index: dict, values: np.ndarray, affine: dict) -> None:
        self.index = index
        self.values = values
        self.affine = affine  # expression -> (constant, ((column, slope), ...)) or None, shared per circuit

    def __call__(self, value):
        if isinstance(value, Parameter):
            return self.values[:, self.index[value]]
        if not (isinstance(value, ParameterExpression) and value.parameters):
            return value
        form = self.affine.get(value, False)
        if form is False:
            form = self.affine[value] = _affine_form(value, self.index)
        if form is not None:
            constant, terms = form
            out = np.full(self.values.shape[0], constant)
            for column, slope in terms:
                out = out + slope * self.values[:, column]
            return out
        return np.array([_Evaluator(self.index, row)(value) for row in self.values])


def _affine_form(expression, index: dict):
    """``(constant, ((column, slope), ...))`` if ``expression`` is affine and real in its parameters."""
    try:
        terms = []
        for parameter in expression.parameters:
            slope = expression.gradient(parameter)
            if isinstance(slope, ParameterExpression) and slope.parameters:
                return None
            slope = complex(slope)
            if slope.imag:
                return None
            terms.append((index[parameter], slope.real))
        constant = complex(expression.bind({p: 0.0 for p in expression.parameters}).numeric())
        if constant.imag:
            return None
        return constant.real, tuple(terms)
    except Exception:  # anything unusual: bind row by row
        return None


def _rotation(axis: str, theta: np.ndarray) -> np.ndarray:
    c, s = np.cos(theta / 2), np.sin(theta / 2)
    out = np.zeros(theta.shape + (2, 2), dtype=np.complex128)
    if axis == "x":
        out[:, 0, 0] = out[:, 1, 1] = c
        out[:, 0, 1] = out[:, 1, 0] = -1j * s
    elif axis == "y":
        out[:, 0, 0] = out[:, 1, 1] = c
        out[:, 0, 1], out[:, 1, 0] = -s, s
    else:
        out[:, 0, 0], out[:, 1, 1] = np.exp(-0.5j * theta), np.exp(0.5j * theta)
    return out


def _u(theta, phi, lam) -> np.ndarray:
    c, s = np.cos(theta / 2), np.sin(theta / 2)
    out = np.empty(np.shape(theta) + (2, 2), dtype=np.complex128)
    out[:, 0, 0] = c
    out[:, 0, 1] = -np.exp(1j * lam) * s
    out[:, 1, 0] = np.exp(1j * phi) * s
    out[:, 1, 1] = np.exp(1j * (phi + lam)) * c
    return out


def _phase(lam) -> np.ndarray:
    out = np.zeros(np.shape(lam) + (2, 2), dtype=np.complex128)
    out[:, 0, 0] = 1
    out[:, 1, 1] = np.exp(1j * lam)
    return out


def _controlled(block: np.ndarray) -> np.ndarray:
    """Control on qubit 0 (the low bit), in state 1: the block acts on indices 1 and 3."""
    out = np.zeros(block.shape[:1] + (4, 4), dtype=np.complex128)
    out[:, 0, 0] = out[:, 2, 2] = 1
    out[:, 1, 1], out[:, 1, 3], out[:, 3, 1], out[:, 3, 3] = block[:, 0, 0], block[:, 0, 1], block[:, 1, 0], block[:, 1, 1]
    return out


def _rzz(theta) -> np.ndarray:
    out = np.zeros(np.shape(theta) + (4, 4), dtype=np.complex128)
    minus, plus = np.exp(-0.5j * theta), np.exp(0.5j * theta)
    out[:, 0, 0], out[:, 1, 1], out[:, 2, 2], out[:, 3, 3] = minus, plus, plus, minus
    return out


# Standard gates whose matrices are computed for all parameter sets at once (Qiskit's
# conventions; each is checked against Gate.to_matrix in the tests). Controlled ones only
# for their default control state.
_VECTORIZED = {
    "rx": lambda t: _rotation("x", t),
    "ry": lambda t: _rotation("y", t),
    "rz": lambda t: _rotation("z", t),
    "p": _phase,
    "u1": _phase,
    "u": _u,
    "u3": _u,
    "crx": lambda t: _controlled(_rotation("x", t)),
    "cry": lambda t: _controlled(_rotation("y", t)),
    "crz": lambda t: _controlled(_rotation("z", t)),
    "cp": lambda t: _controlled(_phase(t)),
    "cu1": lambda t: _controlled(_phase(t)),
    "rzz": _rzz,
}


def _slot_matrices(slot: GateSlot, evaluate: _BatchEvaluator, size: int) -> np.ndarray:
    """The slot's matrix for every row: (B, 2^k, 2^k)."""
    formula = _VECTORIZED.get(slot.label)
    default_control = slot.ctrl_state is None or slot.ctrl_state == (1 << (len(slot.qubits) - 1)) - 1
    if formula is not None and default_control:
        params = [np.broadcast_to(np.asarray(evaluate(p), dtype=complex), (size,)) for p in slot.params]
        if all(not np.any(p.imag) for p in params):
            return formula(*[np.ascontiguousarray(p.real) for p in params])
    index, values = evaluate.index, evaluate.values
    return np.stack([slot.matrix(_Evaluator(index, values[row])) for row in range(size)])


def _is_slot(item) -> bool:
    return isinstance(item, (GateSlot, PhaseSlot))


def _fused(program: P.Program, fusion: FusionOptions, sources: Optional[dict]) -> P.Program:
    if not fusion.enable:
        return program
    return fuse(program, fusion.device_kind, fusion.max_qubits, fusion.threshold, sources, precision=fusion.precision)


def compile_circuit(circuit: QuantumCircuit, fusion: Optional[FusionOptions] = None, dense_max_qubits: int = DENSE_MAX_QUBITS) -> CompiledCircuit:
    """Translate and fuse ``circuit`` (parameters may be unbound) once; gates wider than
    ``dense_max_qubits`` are expanded (a stabilizer state asks for its gate width)."""
    fusion = fusion or FusionOptions()
    parameters = tuple(circuit.parameters)
    index = {p: i for i, p in enumerate(parameters)}
    generic = _Evaluator(index, np.linspace(0.37, 2.71, len(parameters)) if parameters else np.zeros(0))
    try:
        template, slots = translate_template(circuit, generic, dense_max_qubits)
    except NeedsBinding as reason:
        logger.debug("circuit %r is translated per binding: %s", circuit.name, reason)
        compiled = CompiledCircuit(circuit, parameters, None, fusion=fusion, dense_max_qubits=dense_max_qubits)
        # Translate one binding now, so unsupported instructions raise before any job exists.
        bound = circuit.assign_parameters(generic.values, inplace=False) if parameters else circuit
        compiled.ops_before = translate(bound, dense_max_qubits=dense_max_qubits).num_ops
        return compiled
    ops_before = template.num_ops
    sources: dict = {}
    fused = _fused(template, fusion, sources)
    plan = []
    for op in fused.ops:
        if id(op) in slots:
            plan.append(("slot", slots[id(op)][1]))
        elif id(op) in sources and any(id(g) in slots for g in sources[id(op)][1]):
            plan.append(("block", tuple(slots[id(g)][1] if id(g) in slots else g for g in sources[id(op)][1])))
        else:
            plan.append(("op", op))
    return CompiledCircuit(
        circuit, parameters, fused, tuple(plan), num_slots=len(slots), ops_before=ops_before, fusion=fusion, dense_max_qubits=dense_max_qubits
    )
