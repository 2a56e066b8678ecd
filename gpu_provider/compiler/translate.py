"""Translation: ``QuantumCircuit`` -> engine :class:`Program`.

Standard gates become matrices (cached by name and parameters; diagonal ones
become :class:`Diagonal`), control flow becomes nested op tuples with engine
expressions, and any other instruction is expanded through its definition.
Errors name what was wrong: the unbound parameter, the instruction without a
matrix or definition, the non-unitary matrix, the unnormalized state.
"""

from __future__ import annotations

import cmath
import logging
import math
from typing import Optional

import numpy as np
from qiskit.circuit import (
    Clbit,
    ClassicalRegister,
    ControlledGate,
    Gate,
    Instruction,
    ParameterExpression,
    QuantumCircuit,
)
from qiskit.circuit.classical import expr, types
from qiskit.circuit.library import PauliEvolutionGate, get_standard_gate_name_mapping

from ..engine import program as P
from . import pricing
from ..errors import InvalidInputError, UnboundParameterError, UnsupportedInstructionError

logger = logging.getLogger(__name__)

NO_OPS = frozenset({"barrier", "delay", "id", "i", "snapshot"})
_STANDARD_TYPES = {name: type(op) for name, op in get_standard_gate_name_mapping().items() if isinstance(op, Gate)}
STANDARD_GATES = frozenset(_STANDARD_TYPES)
# Standard gates the general path treats specially: no-ops and the global phase.
_FAST_EXCLUDED = NO_OPS | {"global_phase"}
# Gates wider than this are expanded through their definition rather than built as a dense matrix.
DENSE_MAX_QUBITS = 10
# Gates defined by a matrix they hold, whose definition is a synthesis of it (minutes from 8-10
# qubits on): always built as that matrix, whatever dense_max_qubits asks.
MATRIX_GATES = frozenset({"unitary", "hamiltonian", "isometry"})
UNITARY_TOLERANCE = 1e-7
# For loops with more iterations than this build each iteration's body when it runs.
EAGER_LOOP_ITERATIONS = 1024
# Definitions nested deeper than this are taken as a definition that contains itself.
MAX_DEFINITION_DEPTH = 200


def translate(circuit: QuantumCircuit, initial_state: Optional[np.ndarray] = None, dense_max_qubits: int = DENSE_MAX_QUBITS) -> P.Program:
    """Compile ``circuit`` into a :class:`Program`; raise a typed error if it cannot run.

    ``initial_state`` (2^n amplitudes, Qiskit order, normalized) replaces |0...0>.
    Gates wider than ``dense_max_qubits`` that have a definition (or one Qiskit's high-level
    synthesis gives: a permutation, a Clifford, a linear function) are expanded into it rather
    than built as one dense matrix; a stabilizer state, which reads a gate's Clifford action off
    a matrix of at most 6 qubits, asks for that width.
    """
    if not isinstance(circuit, QuantumCircuit):
        raise InvalidInputError(f"expected a qiskit QuantumCircuit, got {type(circuit).__name__}")
    if circuit.parameters:
        names = ", ".join(sorted(p.name for p in circuit.parameters))
        raise UnboundParameterError(
            f"circuit {circuit.name!r} has unbound parameters: {names}; bind them with "
            "circuit.assign_parameters({...}) before running"
        )
    if getattr(circuit, "num_input_vars", 0):
        raise InvalidInputError(
            f"circuit {circuit.name!r} declares input variables; give them values with stores instead"
        )
    translator = _Translator(circuit, dense_max_qubits=dense_max_qubits)
    return _translate_with(translator, circuit, initial_state)


def _translate_with(translator: "_Translator", circuit: QuantumCircuit, initial_state) -> P.Program:
    try:
        return _translate(circuit, translator, initial_state)
    except RecursionError:
        raise InvalidInputError(
            f"circuit {circuit.name!r} nests definitions or control flow too deeply to translate "
            "(a definition that contains itself?); flatten it, or decompose it with qiskit.transpile first"
        ) from None


def _translate(circuit: QuantumCircuit, translator: "_Translator", initial_state) -> P.Program:
    prelude = []
    if initial_state is not None:
        prelude.append(P.Initialize(tuple(range(circuit.num_qubits)), _check_initial_state(initial_state, circuit)))
        translator.fresh.clear()  # no qubit starts in |0>: resets must stay
    ops = prelude + translator.block(circuit, {bit: i for i, bit in enumerate(circuit.qubits)}, {bit: i for i, bit in enumerate(circuit.clbits)}, top=True)
    translator.global_phase(circuit.global_phase, circuit.name, ops)
    return P.Program(
        num_qubits=circuit.num_qubits,
        num_clbits=circuit.num_clbits,
        ops=tuple(ops),
        name=circuit.name,
    )


def _real(value, what: str, where: str) -> float:
    if isinstance(value, ParameterExpression):
        try:
            value = complex(value)
        except TypeError as exc:
            raise UnboundParameterError(f"{what} of {where!r} is unbound: {value}; bind it before running") from exc
    number = complex(value)
    if abs(number.imag) > 1e-12 or not math.isfinite(number.real):
        raise InvalidInputError(f"{what} of {where!r} must be a finite real number, got {value!r}")
    return number.real


def _check_params(op: Instruction) -> None:
    for param in getattr(op, "params", ()):  # bare Operations (Clifford, ...) have no params
        if isinstance(param, ParameterExpression):
            if param.parameters:
                names = ", ".join(sorted(p.name for p in param.parameters))
                raise UnboundParameterError(f"instruction {op.name!r} has unbound parameters: {names}; bind them before running")
            param = complex(param)
        if isinstance(param, (int, float, complex, np.number)) and not isinstance(param, bool):
            if not cmath.isfinite(complex(param)):
                raise InvalidInputError(f"instruction {op.name!r} has a non-finite parameter {param!r}; use finite numbers")


def _param_key(op: Instruction) -> Optional[tuple]:
    key = []
    for param in op.params:
        if isinstance(param, ParameterExpression):
            param = complex(param)
        if isinstance(param, (int, float, complex, np.number)):
            key.append(complex(param))
        else:
            return None
    return tuple(key)


def _definition_key(op: Instruction) -> tuple:
    """What tells one expansion of ``op`` from another: its parameters (unbound ones by name)."""
    key = []
    for param in getattr(op, "params", ()):
        if isinstance(param, ParameterExpression) and param.parameters:
            key.append(str(param))
        elif isinstance(param, (ParameterExpression, int, float, complex, np.number)):
            key.append(complex(param))
        else:
            key.append(id(param))
    return tuple(key)


_STANDARD_CACHE: dict = {}
# (name, *float parameters) of natively stored standard gates -> their cached (is_diagonal, numbers).
_SEEN_STANDARD: dict = {}


def _standard_op(op: Gate, key: tuple) -> tuple[bool, np.ndarray]:
    """(is_diagonal, diagonal or matrix) of a standard gate, cached by name, parameters, ctrl_state."""
    cached = _STANDARD_CACHE.get(key)
    if cached is None:
        cached = _classify(np.asarray(op.to_matrix(), dtype=np.complex128))
        if len(_STANDARD_CACHE) > 65536:
            _STANDARD_CACHE.clear()
        _STANDARD_CACHE[key] = cached
    return cached


# Flat positions of the off-diagonal entries of 2x2 and 4x4 matrices.
_OFF_DIAGONAL = {dim: tuple(i for i in range(dim * dim) if i // dim != i % dim) for dim in (2, 4)}


def _classify(matrix: np.ndarray) -> tuple[bool, np.ndarray]:
    dim = matrix.shape[0]
    if dim in _OFF_DIAGONAL:  # most gates: a check on Python numbers beats array calls here
        flat = matrix.reshape(-1).tolist()
        diagonal = not any(flat[i] for i in _OFF_DIAGONAL[dim])
    else:
        # The flat matrix after its first entry, as rows of dim + 1: each row's first dim entries are off-diagonal.
        diagonal = not np.ascontiguousarray(matrix).reshape(-1)[1:].reshape(dim - 1, dim + 1)[:, :dim].any()
    if diagonal:
        out = np.ascontiguousarray(np.diagonal(matrix))
    else:
        out = np.ascontiguousarray(matrix)
    out.setflags(write=False)
    return out.ndim == 1, out


def _check_unitary(matrix: np.ndarray, name: str) -> None:
    if not np.all(np.isfinite(matrix)):
        raise InvalidInputError(f"instruction {name!r} has a matrix with NaN or infinite entries")
    dim = matrix.shape[0]
    if matrix.shape != (dim, dim) or dim & (dim - 1):
        raise InvalidInputError(f"instruction {name!r} has a matrix of shape {matrix.shape}; a unitary must be 2^k x 2^k")
    if dim > 1 << DENSE_MAX_QUBITS:
        # U^dag U = I costs dim^3; on a few random vectors it costs dim^2 and a
        # non-unitary matrix fails it with probability 1.
        probe = np.random.default_rng(0).standard_normal((dim, 4)) + 0j
        error = np.max(np.abs(matrix.conj().T @ (matrix @ probe) - probe)) / np.max(np.abs(probe))
    else:
        error = np.max(np.abs(matrix.conj().T @ matrix - np.eye(dim)))
    if error > UNITARY_TOLERANCE:
        raise InvalidInputError(f"instruction {name!r} has a matrix that is not unitary (|U^dag U - I| = {error:.2e}); pass a unitary matrix")


def _state_vector(op: Instruction) -> np.ndarray:
    """The target vector of an ``initialize`` / ``state_preparation``, in Qiskit order."""
    from qiskit.quantum_info import Statevector

    params = op.params
    k = op.num_qubits
    if params and all(isinstance(p, str) for p in params):
        vector = Statevector.from_label("".join(params)).data
    elif len(params) == 1 and k >= 1 and 2**k != 1:
        vector = Statevector.from_int(int(np.real(params[0])), (2,) * k).data
    else:
        vector = np.asarray([complex(p) for p in params], dtype=np.complex128)
    return _checked_state(vector, k, f"{op.name} on {k} qubits")


def _check_initial_state(vector, circuit: QuantumCircuit) -> np.ndarray:
    try:
        vector = np.asarray(vector, dtype=np.complex128).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"initial_statevector must be an array of complex amplitudes: {exc}") from exc
    return _checked_state(vector, circuit.num_qubits, f"initial_statevector of circuit {circuit.name!r}")


def _checked_state(vector: np.ndarray, num_qubits: int, what: str) -> np.ndarray:
    """``vector`` if it holds 2^num_qubits finite amplitudes of norm 1; else a clear error."""
    expected = 2**num_qubits
    if vector.shape != (expected,):
        raise InvalidInputError(f"{what} has {vector.size} amplitudes, but a {num_qubits}-qubit state needs 2^{num_qubits} = {expected}")
    if not np.all(np.isfinite(vector)):
        raise InvalidInputError(f"{what} has NaN or infinite amplitudes")
    norm = float(np.linalg.norm(vector))
    if abs(norm - 1) > 1e-8:
        raise InvalidInputError(f"{what} is not normalized: its norm is {norm:.12g}; divide it by its norm")
    return vector


def _width(type_) -> Optional[int]:
    if isinstance(type_, types.Bool):
        return 0
    if isinstance(type_, types.Uint):
        return type_.width
    if isinstance(type_, types.Float):
        return None
    raise UnsupportedInstructionError(f"classical type {type_} is not supported by this simulator")


class NeedsBinding(UnboundParameterError):
    """A parametrized instruction a template cannot hold (inside control flow, or without a
    standard matrix or definition): the circuit is translated per binding instead."""


class GateSlot:
    """A standard gate whose parameters are expressions: its matrix is rebuilt per binding."""

    __slots__ = ("gate_type", "params", "ctrl_state", "qubits", "diagonal", "label")

    def __init__(self, op: Gate, qubits: tuple, diagonal: bool) -> None:
        self.gate_type = type(op)
        self.params = tuple(op.params)
        self.ctrl_state = getattr(op, "ctrl_state", None) if isinstance(op, ControlledGate) else None
        self.qubits = qubits
        self.diagonal = diagonal
        self.label = op.name

    def matrix(self, evaluate) -> np.ndarray:
        params = [evaluate(p) for p in self.params]
        gate = self.gate_type(*params) if self.ctrl_state is None else self.gate_type(*params, ctrl_state=self.ctrl_state)
        return np.asarray(gate.to_matrix(), dtype=np.complex128)

    def bind(self, evaluate):
        matrix = self.matrix(evaluate)
        if not np.all(np.isfinite(matrix)):
            raise InvalidInputError(f"instruction {self.label!r} has a non-finite matrix for these parameter values; use finite numbers")
        if self.diagonal:
            return P.Diagonal(self.qubits, np.ascontiguousarray(np.diagonal(matrix)), self.label)
        return P.Unitary(self.qubits, matrix, label=self.label)


class PhaseSlot:
    """A global phase that is an expression of parameters."""

    __slots__ = ("expression", "where")

    def __init__(self, expression, where: str) -> None:
        self.expression = expression
        self.where = where

    def bind(self, evaluate):
        return P.GlobalPhase(_real(evaluate(self.expression), "global_phase", self.where))


class _Translator:
    def __init__(self, circuit: QuantumCircuit, evaluate=None, dense_max_qubits: int = DENSE_MAX_QUBITS) -> None:
        self.circuit = circuit
        self.dense_max_qubits = dense_max_qubits
        self.fresh = set(range(circuit.num_qubits))  # qubits still in |0>, top level only
        # Template mode (evaluate given): parametrized gates become slots, keyed by id(op).
        self.evaluate = evaluate
        self.slots: dict = {}
        self.depth = 0  # control-flow nesting
        self.expanding: list = []  # (name, width, parameters, id of the definition) of those being expanded

    def global_phase(self, value, where: str, ops: list) -> None:
        if self.evaluate is not None and isinstance(value, ParameterExpression) and value.parameters:
            if self.depth:
                raise NeedsBinding(f"a parametrized global phase inside control flow ({where!r})")
            slot = PhaseSlot(value, where)
            op = slot.bind(self.evaluate)
            self.slots[id(op)] = (op, slot)
            ops.append(op)
            return
        phase = _real(value, "global_phase", where)
        if phase:
            ops.append(P.GlobalPhase(phase))

    def parametric_gate(self, op: Instruction, qargs: tuple, cargs: tuple, qubits, clbits, ops: list, top: bool) -> None:
        """A gate with unbound parameters, in template mode: a slot, or its definition expanded."""
        if self.depth:
            raise NeedsBinding(f"instruction {op.name!r} inside control flow depends on parameters")
        self._touch(qargs, top)
        if op.name in STANDARD_GATES and type(op) is _STANDARD_TYPES[op.name]:
            probe = GateSlot(op, qargs, diagonal=False)
            # Diagonal at two generic points: diagonal for every value (rz, p, crz, rzz, ...).
            diagonal = all(_is_diagonal(probe.matrix(_generic_values(seed))) for seed in (1, 2))
            slot = GateSlot(op, qargs, diagonal)
            emitted = slot.bind(self.evaluate)
            self.slots[id(emitted)] = (emitted, slot)
            ops.append(emitted)
            return
        if op.name in MATRIX_GATES:
            # Defined by a matrix (a HamiltonianGate's exp(-i t H)): built once its parameters are bound.
            raise NeedsBinding(f"instruction {op.name!r} depends on parameters and is a matrix once bound")
        try:
            definition = op.definition
        except Exception:  # a definition that cannot be built with unbound parameters
            definition = None
        if definition is None:
            raise NeedsBinding(f"instruction {op.name!r} depends on parameters and has no definition")
        if isinstance(op, PauliEvolutionGate):
            # Its definition is a product formula (approximate for non-commuting terms);
            # bound, compiler/pricing.py synthesizes it exactly, so bind per parameter set.
            raise NeedsBinding(f"instruction {op.name!r} depends on parameters and is synthesized exactly once bound")
        self.expand(op, qargs, cargs, qubits, clbits, ops, top)

    # -- classical ----------------------------------------------------------

    def _clbit(self, bit, clbits: dict) -> int:
        try:
            return clbits[bit]
        except KeyError:
            raise InvalidInputError(f"classical bit {bit} is not in circuit {self.circuit.name!r}") from None

    def _bits(self, target, clbits: dict) -> P.Bits:
        if isinstance(target, Clbit):
            return P.Bits((self._clbit(target, clbits),), boolean=True)
        if isinstance(target, ClassicalRegister):
            return P.Bits(tuple(self._clbit(bit, clbits) for bit in target))
        raise UnsupportedInstructionError(f"cannot read classical target {target!r}")

    def condition(self, condition, clbits: dict):
        if isinstance(condition, tuple):
            target, value = condition
            bits = self._bits(target, clbits)
            if bits.boolean:
                return P.Binary(P.ExprOp.EQUAL, P.Cast(bits, 1), P.Const(int(value)))
            return P.Binary(P.ExprOp.EQUAL, bits, P.Const(int(value)))
        return self.expression(condition, clbits)

    def expression(self, node, clbits: dict):
        if isinstance(node, expr.Var):
            if isinstance(node.var, (Clbit, ClassicalRegister)):
                return self._bits(node.var, clbits)
            return P.Var(str(node.var), _width(node.type))
        if isinstance(node, expr.Value):
            if isinstance(node.type, (types.Bool, types.Uint, types.Float)):
                return P.Const(node.value)
            raise UnsupportedInstructionError(f"classical value of type {node.type} is not supported")
        if isinstance(node, expr.Unary):
            return P.Unary(P.ExprOp[node.op.name], self.expression(node.operand, clbits), _width(node.type))
        if isinstance(node, expr.Binary):
            return P.Binary(
                P.ExprOp[node.op.name],
                self.expression(node.left, clbits),
                self.expression(node.right, clbits),
                _width(node.left.type) if node.op.name.startswith("BIT_") else _width(node.type),
            )
        if isinstance(node, expr.Cast):
            return P.Cast(self.expression(node.operand, clbits), _width(node.type))
        if isinstance(node, expr.Index):
            return P.Index(self.expression(node.target, clbits), self.expression(node.index, clbits))
        raise UnsupportedInstructionError(f"classical expression {node!r} is not supported by this simulator")

    def lvalue(self, node, clbits: dict):
        if isinstance(node, expr.Var):
            if isinstance(node.var, (Clbit, ClassicalRegister)):
                return self._bits(node.var, clbits)
            return P.Var(str(node.var), _width(node.type))
        if isinstance(node, expr.Index) and isinstance(node.target, expr.Var) and isinstance(node.index, expr.Value):
            if isinstance(node.target.var, ClassicalRegister):
                return P.Bits((self._clbit(node.target.var[int(node.index.value)], clbits),))
        raise UnsupportedInstructionError(f"cannot store to {node!r}")

    def store(self, lvalue, rvalue, clbits: dict) -> P.Store:
        value = self.expression(rvalue, clbits)
        if isinstance(lvalue, expr.Index):
            constant_register_bit = (
                isinstance(lvalue.target, expr.Var)
                and isinstance(lvalue.target.var, ClassicalRegister)
                and isinstance(lvalue.index, expr.Value)
            )
            if not constant_register_bit:
                # A bit of a uint variable, or a register bit at a computed index: store the whole
                # target as (old & ~(1 << i)) | (bit << i), so the engine only writes whole targets.
                width = _width(lvalue.target.type)
                index = self.expression(lvalue.index, clbits)
                one_hot = P.Binary(P.ExprOp.SHIFT_LEFT, P.Const(1), index, width)
                kept = P.Binary(P.ExprOp.BIT_AND, self.expression(lvalue.target, clbits), P.Unary(P.ExprOp.BIT_NOT, one_hot, width), width)
                bit = P.Binary(P.ExprOp.SHIFT_LEFT, P.Cast(value, width), index, width)
                return P.Store(self.lvalue(lvalue.target, clbits), P.Binary(P.ExprOp.BIT_OR, kept, bit, width))
        return P.Store(self.lvalue(lvalue, clbits), value)

    # -- quantum ------------------------------------------------------------

    def block(self, circuit: QuantumCircuit, qubits: dict, clbits: dict, top: bool = False) -> list:
        ops: list = []
        append, fresh, seen = ops.append, self.fresh, _SEEN_STANDARD
        for instruction in circuit.data:
            qargs = tuple(map(qubits.__getitem__, instruction.qubits))
            if instruction.is_standard_gate() and not instruction.is_parameterized():
                # A standard gate seen before with these very parameters: its cached op data, directly.
                name = instruction.name
                try:
                    hit = seen.get((name, *instruction.params))
                except TypeError:  # an unhashable parameter: the checks below decide
                    hit = None
                if hit is not None and (len(qargs) == 1 or len(set(qargs)) == len(qargs)):
                    if fresh:
                        fresh.difference_update(qargs)
                    append(P.gate_op(qargs, hit[1], name, hit[0]))
                    continue
                if self._standard_fast(instruction, qargs, ops, top):
                    continue
            cargs = tuple(clbits[c] for c in instruction.clbits)
            self.instruction(instruction.operation, qargs, cargs, qubits, clbits, ops, top)
        return ops

    def _standard_fast(self, instruction, qargs: tuple, ops: list, top: bool) -> bool:
        """A standard gate with numeric parameters, read without building its Python gate object.

        Qiskit stores such gates natively and gives their matrix directly; this is
        most of a transpiled circuit, and the general path spends most of its time
        making gate objects. Anything else (parameters still symbolic, a
        non-finite value, a gate the general path treats specially) returns False
        and goes through :meth:`instruction`, which also reports the errors.
        """
        if not instruction.is_standard_gate() or instruction.is_parameterized():
            return False
        name = instruction.name
        raw = instruction.params
        if name in _FAST_EXCLUDED or (len(qargs) > 1 and len(set(qargs)) != len(qargs)):
            return False
        try:
            params = tuple(map(float, raw))
        except (TypeError, ValueError):
            return False
        if not math.isfinite(sum(params)):  # a NaN or infinity (or finite values summing past the range: the general path then)
            return False
        key = (name, params, "standard")
        cached = _STANDARD_CACHE.get(key)
        if cached is None:
            matrix = instruction.matrix
            if matrix is None:
                return False
            cached = _classify(np.asarray(matrix, dtype=np.complex128))
            if len(_STANDARD_CACHE) > 65536:
                _STANDARD_CACHE.clear()
            _STANDARD_CACHE[key] = cached
        if all(type(p) is float for p in raw):  # plain floats: :meth:`block` finds the gate by them next time
            if len(_SEEN_STANDARD) > 65536:
                _SEEN_STANDARD.clear()
            _SEEN_STANDARD[(name, *raw)] = cached
        self._touch(qargs, top)
        is_diag, data = cached
        ops.append(P.gate_op(qargs, data, name, is_diag))
        return True

    def _touch(self, qargs, top: bool) -> None:
        self.fresh.difference_update(qargs)

    def _sub_block(self, body: QuantumCircuit, qargs, cargs, outer_clbits: dict) -> tuple:
        qmap = {bit: qargs[i] for i, bit in enumerate(body.qubits)}
        cmap = dict(outer_clbits)  # bodies share bits with the outer circuit; positional wins
        cmap.update({bit: cargs[i] for i, bit in enumerate(body.clbits)})
        self.depth += 1
        try:
            return tuple(self.block(body, qmap, cmap))
        finally:
            self.depth -= 1

    def instruction(self, op: Instruction, qargs: tuple, cargs: tuple, qubits: dict, clbits: dict, ops: list, top: bool) -> None:
        name = op.name
        if name in NO_OPS:
            return
        if len(set(qargs)) != len(qargs):
            raise InvalidInputError(
                f"instruction {name!r} acts on qubits {list(qargs)}, which repeat a qubit; "
                "each qubit may appear once in one instruction"
            )
        if len(set(cargs)) != len(cargs) and name != "measure":
            raise InvalidInputError(f"instruction {name!r} acts on clbits {list(cargs)}, which repeat a clbit")
        if name == "measure":
            ops.append(P.Measure(qargs[0], cargs[0]))
            self._touch(qargs, top)
            return
        if name == "reset":
            if not (top and qargs[0] in self.fresh):  # a reset of a qubit still in |0> does nothing
                ops.append(P.Reset(qargs[0]))
            return
        if name == "global_phase":
            if not (self.evaluate is not None and _has_unbound(op)):
                _check_params(op)
            self.global_phase(op.params[0], name, ops)
            return
        if name == "store":
            ops.append(self.store(op.lvalue, op.rvalue, clbits))
            return
        if name in ("if_else", "while_loop", "for_loop", "switch_case", "break_loop", "continue_loop", "box"):
            self.control_flow(op, qargs, cargs, clbits, ops)
            self._touch(qargs, top)
            return
        if name in ("initialize", "state_preparation"):
            if self.evaluate is not None and _has_unbound(op):
                raise NeedsBinding(f"instruction {name!r} depends on parameters")
            self.state_preparation(op, qargs, ops, top)
            return
        if self.evaluate is not None and _has_unbound(op):
            self.parametric_gate(op, qargs, cargs, qubits, clbits, ops, top)
            return
        _check_params(op)
        self._touch(qargs, top)
        if name in STANDARD_GATES and type(op) is _STANDARD_TYPES[name]:
            params = _param_key(op)
            if params is not None:
                is_diag, data = _standard_op(op, (name, params, getattr(op, "ctrl_state", None)))
                ops.append(P.Diagonal(qargs, data, name) if is_diag else P.Unitary(qargs, data, label=name))
                return
        if (
            isinstance(op, ControlledGate)
            and op.base_gate is not None
            and op.base_gate.num_qubits == op.num_qubits - op.num_ctrl_qubits
            # A narrow gate with its own matrix (e.g. cu with ctrl_state, whose phase is not in its base) uses it below.
            and not (op.num_qubits <= 5 and hasattr(op, "__array__"))
        ):
            base = self._matrix(op.base_gate)
            if base is not None:
                n_ctrl = op.num_ctrl_qubits
                ops.append(P.Unitary(qargs[n_ctrl:], base, controls=qargs[:n_ctrl], ctrl_state=int(op.ctrl_state), label=name))
                return
        if name == "unitary" and op.num_qubits > DENSE_MAX_QUBITS and isinstance(getattr(op, "params", [None])[0], np.ndarray):
            # A wide unitary applies through the matrix it holds; its definition would be a
            # synthesis into gates, which takes minutes from 11 qubits on.
            matrix = np.asarray(op.params[0], dtype=np.complex128)
            if matrix.shape != (2**op.num_qubits, 2**op.num_qubits):
                raise InvalidInputError(f"instruction {name!r} acts on {op.num_qubits} qubits but its matrix is {matrix.shape}")
            _check_unitary(matrix, name)
            ops.append(P.Unitary(qargs, matrix, label=name))
            return
        priced = pricing.price(op, qargs)
        if priced == pricing.EXPAND:
            self.expand(op, qargs, cargs, qubits, clbits, ops, top)
            return
        if priced is not None:
            ops.extend(priced)
            return
        if op.num_qubits <= self.dense_max_qubits or name in MATRIX_GATES or _definition(op) is None:
            matrix = self._matrix(op)
            if matrix is not None:
                is_diag, data = _classify(matrix)
                ops.append(P.Diagonal(qargs, data, name) if is_diag else P.Unitary(qargs, data, label=name))
                return
        self.expand(op, qargs, cargs, qubits, clbits, ops, top)

    def _matrix(self, op: Instruction) -> Optional[np.ndarray]:
        try:
            if isinstance(op, Gate):
                matrix = np.asarray(op.to_matrix(), dtype=np.complex128)
            elif not isinstance(op, Instruction) and op.num_qubits <= DENSE_MAX_QUBITS:
                # A bare Operation (Clifford, AnnotatedOperation, ...) has no definition: use its operator.
                from qiskit.quantum_info import Operator

                matrix = np.asarray(Operator(op).data, dtype=np.complex128)
            else:
                return None
        except Exception:  # no __array__ / operator: fall back to the definition
            return None
        _check_unitary(matrix, op.name)
        if matrix.shape[0] != 2**op.num_qubits:
            raise InvalidInputError(f"instruction {op.name!r} acts on {op.num_qubits} qubits but its matrix is {matrix.shape}")
        return matrix

    def expand(self, op: Instruction, qargs, cargs, qubits, clbits, ops: list, top: bool) -> None:
        definition = _definition(op)
        if definition is None:
            raise UnsupportedInstructionError(
                f"instruction {op.name!r} has neither a matrix nor a definition; "
                "transpile the circuit for this backend or replace the instruction"
            )
        if not isinstance(definition, QuantumCircuit):
            raise UnsupportedInstructionError(f"instruction {op.name!r} has a definition of type {type(definition).__name__}")
        # The definition circuit itself tells a gate that contains itself from nested gates that
        # share a name (Qiskit's Gate.power and grover_operator build "Q" inside "Q"); it stays
        # alive while expanded, so its id is not reused meanwhile. A definition built anew on
        # each call meets the depth limit instead.
        key = (op.name, op.num_qubits, _definition_key(op), id(definition))
        if key in self.expanding or len(self.expanding) >= MAX_DEFINITION_DEPTH:
            chain = " -> ".join(entry[0] for entry in self.expanding[-5:] + [key])
            raise UnsupportedInstructionError(
                f"the definition of instruction {op.name!r} contains itself ({chain}), so it can never be expanded; "
                "give it a matrix or a definition in other gates"
            )
        qmap = {bit: qargs[i] for i, bit in enumerate(definition.qubits)}
        cmap = {bit: cargs[i] for i, bit in enumerate(definition.clbits)}
        self.expanding.append(key)
        try:
            for instruction in definition.data:
                self.instruction(
                    instruction.operation,
                    tuple(qmap[q] for q in instruction.qubits),
                    tuple(cmap[c] for c in instruction.clbits),
                    qmap,
                    cmap,
                    ops,
                    top,
                )
        finally:
            self.expanding.pop()
        self.global_phase(definition.global_phase, op.name, ops)

    def state_preparation(self, op: Instruction, qargs: tuple, ops: list, top: bool) -> None:
        inverse = bool(getattr(op, "_inverse", False))
        if not inverse:
            vector = _state_vector(op)
            all_fresh = top and self.fresh.issuperset(qargs)
            if op.name == "initialize" and not all_fresh:
                ops.extend(P.Reset(q) for q in qargs if not (top and q in self.fresh))
                all_fresh = True
            if all_fresh:
                ops.append(P.Initialize(qargs, vector))
                self._touch(qargs, top)
                return
        # state_preparation on a state that may not be |0>: its unitary action is its definition.
        self._touch(qargs, top)
        if op.num_qubits <= DENSE_MAX_QUBITS:
            from qiskit.quantum_info import Operator

            matrix = Operator(op.definition).data
            is_diag, data = _classify(matrix)
            ops.append(P.Diagonal(qargs, data, op.name) if is_diag else P.Unitary(qargs, data, label=op.name))
        else:
            self.expand(op, qargs, (), None, {}, ops, top=False)

    def control_flow(self, op: Instruction, qargs, cargs, clbits: dict, ops: list) -> None:
        name = op.name
        if name == "break_loop":
            ops.append(P.BreakLoop())
        elif name == "continue_loop":
            ops.append(P.ContinueLoop())
        elif name == "box":
            ops.extend(self._sub_block(op.blocks[0], qargs, cargs, clbits))
        elif name == "if_else":
            true_body = self._sub_block(op.blocks[0], qargs, cargs, clbits)
            false_body = self._sub_block(op.blocks[1], qargs, cargs, clbits) if len(op.blocks) > 1 and op.blocks[1] is not None else ()
            ops.append(P.IfElse(self.condition(op.condition, clbits), true_body, false_body))
        elif name == "while_loop":
            ops.append(P.WhileLoop(self.condition(op.condition, clbits), self._sub_block(op.blocks[0], qargs, cargs, clbits)))
        elif name == "for_loop":
            indexset, parameter, body = op.params
            if len(indexset) > EAGER_LOOP_ITERATIONS:
                # A wide loop: its bodies are built as the loop runs, inside the job.
                values = indexset if isinstance(indexset, (range, tuple)) else tuple(indexset)
                if parameter is None or not values:
                    make = None
                    first = self._sub_block(body, qargs, cargs, clbits)
                else:

                    def make(value, body=body, parameter=parameter):
                        return self._sub_block(body.assign_parameters({parameter: value}, inplace=False), qargs, cargs, clbits)

                    first = make(values[0])
                ops.append(P.ForLoop(P.LoopBodies(values, make, first)))
                return
            if parameter is None:
                once = self._sub_block(body, qargs, cargs, clbits)
                iterations = tuple(once for _ in indexset)
            else:
                iterations = tuple(
                    self._sub_block(body.assign_parameters({parameter: value}, inplace=False), qargs, cargs, clbits)
                    for value in indexset
                )
            ops.append(P.ForLoop(iterations))
        elif name == "switch_case":
            target = op.target
            if isinstance(target, (Clbit, ClassicalRegister)):
                target_expr = self._bits(target, clbits)
                if isinstance(target_expr, P.Bits) and target_expr.boolean:
                    target_expr = P.Bits(target_expr.clbits)
            else:
                target_expr = self.expression(target, clbits)
            cases = []
            for values, body in op.cases_specifier():
                translated = self._sub_block(body, qargs, cargs, clbits)
                labels = tuple(values)
                if any(_is_default(v) for v in labels):
                    cases.append((None, translated))
                else:
                    cases.append((tuple(int(v) for v in labels), translated))
            ops.append(P.SwitchCase(target_expr, tuple(cases)))


def _definition(op) -> Optional[QuantumCircuit]:
    """``op``'s definition, or for a high-level object without one (a ``PermutationGate``, a
    ``Clifford``, an ``AnnotatedOperation``) the circuit Qiskit's ``HighLevelSynthesis`` makes of it
    (cached per op object, which the cache keeps alive); None when neither exists."""
    definition = getattr(op, "definition", None)
    if definition is not None or not hasattr(op, "num_qubits"):
        return definition
    cached = _SYNTHESIZED.get(id(op))
    if cached is not None and cached[0] is op:
        return cached[1]
    try:
        from qiskit.transpiler.passes import HighLevelSynthesis

        wrapper = QuantumCircuit(op.num_qubits, getattr(op, "num_clbits", 0))
        wrapper.append(op, wrapper.qubits, wrapper.clbits)
        synthesized = HighLevelSynthesis()(wrapper)
    except Exception:  # nothing Qiskit can synthesize either
        synthesized = None
    if synthesized is not None and any(instruction.operation.name == op.name for instruction in synthesized.data):
        synthesized = None  # left as it was
    if len(_SYNTHESIZED) >= 256:
        _SYNTHESIZED.clear()
    _SYNTHESIZED[id(op)] = (op, synthesized)
    return synthesized


# id(op) -> (op, the circuit HighLevelSynthesis made of it, or None).
_SYNTHESIZED: dict = {}


def _is_default(value) -> bool:
    from qiskit.circuit.controlflow import CASE_DEFAULT

    return value is CASE_DEFAULT


def _has_unbound(op) -> bool:
    return any(isinstance(p, ParameterExpression) and p.parameters for p in getattr(op, "params", ()))


def _is_diagonal(matrix: np.ndarray) -> bool:
    return np.count_nonzero(np.abs(matrix - np.diag(np.diagonal(matrix))) > 1e-12) == 0


def _generic_values(seed: int):
    """An evaluator giving every parameter expression its own generic value."""
    rng = np.random.default_rng(seed)
    cache: dict = {}

    def evaluate(value):
        if not isinstance(value, ParameterExpression) or not value.parameters:
            return value
        bound = {}
        for parameter in value.parameters:
            if parameter not in cache:
                cache[parameter] = float(rng.uniform(0.3, 2.8))
            bound[parameter] = cache[parameter]
        return value.bind(bound).numeric()

    return evaluate


def translate_template(circuit: QuantumCircuit, evaluate, dense_max_qubits: int = DENSE_MAX_QUBITS) -> tuple[P.Program, dict]:
    """Translate a circuit whose gates may hold unbound parameters, once.

    Each parametrized standard gate (and parametrized global phase) becomes an
    op whose data is computed with ``evaluate`` (a function from a parameter
    expression to a number), recorded in the returned ``slots``:
    ``id(op) -> (op, slot)``, with ``slot.bind(evaluate)`` rebuilding it for
    other values. Raises :class:`NeedsBinding` when a parametrized instruction
    cannot be held in a template (inside control flow, or neither standard nor
    defined): translate each bound circuit then.
    """
    if not isinstance(circuit, QuantumCircuit):
        raise InvalidInputError(f"expected a qiskit QuantumCircuit, got {type(circuit).__name__}")
    if getattr(circuit, "num_input_vars", 0):
        raise InvalidInputError(
            f"circuit {circuit.name!r} declares input variables; give them values with stores instead"
        )
    translator = _Translator(circuit, evaluate, dense_max_qubits)
    program = _translate_with(translator, circuit, None)
    return program, translator.slots
