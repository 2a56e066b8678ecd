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

import logging
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
from qiskit.circuit import Parameter, ParameterExpression, QuantumCircuit

from ..engine import program as P
from ..errors import InvalidInputError
from .fusion import DEFAULT_FUSION_THRESHOLD, fuse, merge_block
from .translate import GateSlot, NeedsBinding, PhaseSlot, translate, translate_template

logger = logging.getLogger(__name__)


@dataclass
class FusionOptions:
    enable: bool = True
    device_kind: str = "CPU"
    max_qubits: Optional[int] = None
    threshold: int = DEFAULT_FUSION_THRESHOLD


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
            return _fused(translate(bound), self.fusion, None)
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


def _is_slot(item) -> bool:
    return isinstance(item, (GateSlot, PhaseSlot))


def _fused(program: P.Program, fusion: FusionOptions, sources: Optional[dict]) -> P.Program:
    if not fusion.enable:
        return program
    return fuse(program, fusion.device_kind, fusion.max_qubits, fusion.threshold, sources)


def compile_circuit(circuit: QuantumCircuit, fusion: Optional[FusionOptions] = None) -> CompiledCircuit:
    """Translate and fuse ``circuit`` (parameters may be unbound) once."""
    fusion = fusion or FusionOptions()
    parameters = tuple(circuit.parameters)
    index = {p: i for i, p in enumerate(parameters)}
    generic = _Evaluator(index, np.linspace(0.37, 2.71, len(parameters)) if parameters else np.zeros(0))
    try:
        template, slots = translate_template(circuit, generic)
    except NeedsBinding as reason:
        logger.debug("circuit %r is translated per binding: %s", circuit.name, reason)
        compiled = CompiledCircuit(circuit, parameters, None, fusion=fusion)
        # Translate one binding now, so unsupported instructions raise before any job exists.
        compiled.ops_before = translate(circuit.assign_parameters(generic.values, inplace=False) if parameters else circuit).num_ops
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
    return CompiledCircuit(circuit, parameters, fused, tuple(plan), num_slots=len(slots), ops_before=ops_before, fusion=fusion)
