"""Random circuits from hypothesis: static ones against Statevector, dynamic ones against Aer.

Dynamic circuits mix mid-circuit measure, reset and if_else (old-style and
expression conditions, with else branches). Counts are compared with Aer's by
a two-sample chi-square test at ALPHA = 1e-6 with 2000 shots each: chance
failures are negligible, while a wrong branch or bit order gives p ~ 0.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from qiskit import ClassicalRegister, QuantumCircuit, QuantumRegister
from qiskit.circuit.classical import expr
from qiskit.quantum_info import Statevector

from tests.helpers import (
    aer_counts,
    assert_counts_agree,
    assert_state_matches,
    make_backend,
    run_statevector,
    standard_gate,
    standard_gate_names,
)

SHOTS = 2000
HYPOTHESIS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
GATES_BY_WIDTH: dict[int, list[str]] = {}
for _name in standard_gate_names():
    _width = standard_gate(_name, np.random.default_rng(0)).num_qubits
    GATES_BY_WIDTH.setdefault(_width, []).append(_name)


@st.composite
def gate_ops(draw, num_qubits: int, min_width: int = 0):
    """(name, qubits, seed) for a standard gate that fits ``num_qubits`` (width 0: global_phase)."""
    widths = sorted(w for w in GATES_BY_WIDTH if min_width <= w <= num_qubits)
    width = draw(st.sampled_from(widths))
    name = draw(st.sampled_from(GATES_BY_WIDTH[width]))
    qubits = draw(st.permutations(range(num_qubits)))[:width]
    seed = draw(st.integers(0, 2**16))
    return ("gate", name, tuple(qubits), seed)


def append_gate(circuit: QuantumCircuit, op) -> None:
    _, name, qubits, seed = op
    circuit.append(standard_gate(name, np.random.default_rng(seed)), [circuit.qubits[q] for q in qubits])


# ---------------------------------------------------------------------------
# static circuits: exact


@st.composite
def static_circuits(draw):
    n = draw(st.integers(1, 7))
    ops = draw(st.lists(gate_ops(n), min_size=1, max_size=30))
    circuit = QuantumCircuit(n, global_phase=draw(st.floats(-np.pi, np.pi)))
    for op in ops:
        append_gate(circuit, op)
    return circuit


@pytest.mark.parametrize("precision", ["double", "single"])
@given(circuit=static_circuits(), fused=st.booleans(), width=st.integers(1, 8))
@HYPOTHESIS
def test_random_static_circuits_match_statevector(device, precision, circuit, fused, width):
    options = {"fusion_threshold": 1, "fusion_max_qubits": width} if fused else {}
    backend = make_backend(device, precision=precision, **options)
    assert_state_matches(run_statevector(backend, circuit), Statevector(circuit).data, precision)


# ---------------------------------------------------------------------------
# dynamic circuits: against Aer


@st.composite
def dynamic_circuits(draw):
    n = draw(st.integers(1, 4))
    num_mid = draw(st.integers(1, 3))

    def plain_op():
        return st.one_of(
            gate_ops(n, min_width=1),
            st.tuples(st.just("measure"), st.integers(0, n - 1), st.integers(0, num_mid - 1)),
            st.tuples(st.just("reset"), st.integers(0, n - 1)),
        )

    condition = st.one_of(
        st.tuples(st.just("clbit"), st.integers(0, num_mid - 1), st.booleans()),
        st.tuples(st.just("register"), st.integers(0, 2**num_mid - 1)),
        st.tuples(st.just("expr_and"), st.integers(0, num_mid - 1), st.integers(0, num_mid - 1)),
        st.tuples(st.just("expr_less"), st.integers(0, 2**num_mid - 1)),
    )
    if_op = st.tuples(
        st.just("if"),
        condition,
        st.lists(plain_op(), min_size=1, max_size=3),
        st.lists(plain_op(), max_size=2),
    )
    ops = draw(st.lists(st.one_of(plain_op(), if_op), min_size=2, max_size=10))
    # Start from a superposition so measurements are random.
    first = draw(st.lists(st.tuples(st.integers(0, n - 1), st.floats(0.2, 2.9)), min_size=1, max_size=n))

    mid = ClassicalRegister(num_mid, "mid")
    out = ClassicalRegister(n, "out")
    circuit = QuantumCircuit(QuantumRegister(n, "q"), mid, out)
    for qubit, angle in first:
        circuit.ry(angle, qubit)

    def emit(op):
        kind = op[0]
        if kind == "gate":
            append_gate(circuit, op)
        elif kind == "measure":
            circuit.measure(op[1], mid[op[2]])
        elif kind == "reset":
            circuit.reset(op[1])
        elif kind == "if":
            _, cond, true_body, false_body = op
            if cond[0] == "clbit":
                condition_value = (mid[cond[1]], cond[2])
            elif cond[0] == "register":
                condition_value = (mid, cond[1])
            elif cond[0] == "expr_and":
                condition_value = expr.logic_and(mid[cond[1]], expr.logic_not(mid[cond[2]]))
            else:
                condition_value = expr.less(mid, cond[1])
            with circuit.if_test(condition_value) as else_:
                for inner in true_body:
                    emit(inner)
            if false_body:
                with else_:
                    for inner in false_body:
                        emit(inner)

    for op in ops:
        emit(op)
    circuit.measure(range(n), out)
    return circuit


@given(circuit=dynamic_circuits(), fused=st.booleans())
@HYPOTHESIS
def test_random_dynamic_circuits_match_aer(device, circuit, fused):
    options = {"fusion_threshold": 1} if fused else {}
    counts = make_backend(device, **options).run(circuit, shots=SHOTS, seed_simulator=17).result().get_counts()
    assert sum(counts.values()) == SHOTS
    assert_counts_agree(counts, aer_counts(circuit, SHOTS, seed=29))
