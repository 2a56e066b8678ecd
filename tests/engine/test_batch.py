"""Batches of states (engine/batch.py) against one state at a time."""

from __future__ import annotations

import numpy as np
import pytest

from gpu_provider.engine import batch as B
from gpu_provider.engine.devices import resolve_device
from gpu_provider.engine.executor import RunConfig, evolve, new_state, sample_memory
from gpu_provider.engine.program import Diagonal, GlobalPhase, Measure, Program, Reset, Unitary
from tests.engine.test_kernels_gpu import random_phases, random_unitary


def programs_with_shared_structure(n: int, count: int, seed: int) -> list[Program]:
    """Programs that share constant ops (the same objects) and differ in the others."""
    rng = np.random.default_rng(seed)
    shared = [
        Unitary((0, n - 1), random_unitary(rng, 4)),
        Unitary((1,), random_unitary(rng, 2), controls=(0, 2), ctrl_state=2),
        Diagonal((2, 0, 1), random_phases(rng, 8)),
    ]
    programs = []
    for _ in range(count):
        varying = [
            Unitary((n - 2,), random_unitary(rng, 2)),
            Diagonal((1, 3), random_phases(rng, 4)),
            GlobalPhase(float(rng.uniform(0, 6))),
            Unitary((3, 0, 2), random_unitary(rng, 8)),
        ]
        ops = [shared[0], varying[0], shared[1], varying[1], varying[2], shared[2], varying[3], Measure(0, 0), Measure(n - 1, 1)]
        programs.append(Program(n, 2, tuple(ops)))
    # A column mixing a Diagonal and a Unitary on the same qubits is still batchable.
    mixed = list(programs[-1].ops)
    mixed[3] = Unitary((1, 3), random_unitary(rng, 4))
    programs[-1] = programs[-1].replace(ops=tuple(mixed))
    return programs


@pytest.mark.parametrize("dtype, tolerance", [(np.complex128, 1e-12), (np.complex64, 1e-5)])
def test_batch_matches_one_state_at_a_time(dtype, tolerance):
    n = 5
    programs = programs_with_shared_structure(n, 6, seed=1)
    assert B.batchable(programs)
    batch = B.evolve_batch(programs, np, dtype)
    device, _ = resolve_device("CPU", 0)
    single = new_state(device, n, dtype)
    for row, program in enumerate(programs):
        expected = evolve(program, single, RunConfig(precision="double" if dtype == np.complex128 else "single")).to_host()
        view = batch.state(row)
        assert np.max(np.abs(view.to_host() - expected)) <= tolerance
        # Sampling from a row gives the same shots as from the single state in the same (canonical)
        # axis order, for the same generator.
        single.to_canonical()
        assert sample_memory(program, view, 50, np.random.default_rng(row)) == sample_memory(program, single, 50, np.random.default_rng(row))


def test_what_is_not_batchable():
    programs = programs_with_shared_structure(4, 3, seed=2)
    assert not B.batchable(programs[:1])  # one program: nothing to batch
    other_qubits = programs[1].replace(ops=(Unitary((2,), np.eye(2)),) + programs[1].ops[1:])
    assert not B.batchable([programs[0], other_qubits])
    with_reset = programs[1].replace(ops=programs[1].ops + (Reset(0),))
    assert not B.batchable([programs[0], with_reset])
    wide = [Program(B.BATCH_MAX_QUBITS + 1, 0, ()) for _ in range(2)]
    assert not B.batchable(wide)
    assert B.batch_size(B.BATCH_MAX_QUBITS + 1, "GPU") == 1 and B.batch_size(10, "GPU") == B.BATCH_MAX_AMPLITUDES >> 10
    # The CPU batches fewer qubits: past BATCH_MAX_QUBITS_CPU one state at a time is faster there.
    assert B.batch_size(B.BATCH_MAX_QUBITS_CPU, "CPU") > 1 and B.batch_size(B.BATCH_MAX_QUBITS_CPU + 1, "CPU") == 1
    assert B.batch_size(B.BATCH_MAX_QUBITS_CPU + 1, "GPU") > 1


def test_batch_expectation_values_match_each_row():
    from gpu_provider.engine.expectation import PauliSum, batch_expectation_values, expectation_values
    from tests.engine.test_kernels_gpu import random_pauli_terms

    n = 6
    programs = programs_with_shared_structure(n, 4, seed=3)
    batch = B.evolve_batch(programs, np, np.complex128)
    rng = np.random.default_rng(9)
    observables = []
    for row in range(4):  # a different list per row, some terms shared between rows
        x, z, coeffs = random_pauli_terms(rng, n, 12)
        observables.append([PauliSum(n, x, z, coeffs), PauliSum(n, x[:3], z[:3], np.ones(3))][: 1 + row % 2])
    batched = batch_expectation_values(batch, observables)
    for row, obs in enumerate(observables):
        np.testing.assert_allclose(batched[row], expectation_values(batch.state(row), obs), atol=1e-12)
