"""Shot branching: shots of a dynamic circuit share trajectories until their outcomes differ.

Oracles: exact outcome distributions where they are known in closed form, and
Qiskit Aer (shot by shot, its own code) within sampling error otherwise; the
same circuits run with ``shot_branching_enable=False`` (every shot alone) and
with the copies that forks may keep capped at one and at none, so the
one-at-a-time fallback is checked against the same oracle.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from qiskit.providers import JobError
from qiskit import ClassicalRegister, QuantumCircuit, QuantumRegister, qasm3
from qiskit.quantum_info import Statevector

import gpu_provider
from gpu_provider.engine import devices, small_shots, statevector, trajectories
from gpu_provider.engine.executor import RunConfig, memory_needed, state_arrays
from benchmarks.dynamic import syndrome_circuit
from gpu_provider.errors import IterationLimitError
from tests.helpers import aer_counts, assert_counts_agree, assert_counts_match, make_backend

SHOTS = 4000


def teleport() -> QuantumCircuit:
    return qasm3.loads((Path(gpu_provider.__file__).parent / "examples" / "teleport.qasm").read_text())


def syndrome_rounds(n: int = 4, rounds: int = 3) -> QuantumCircuit:
    """Parity checks of neighbouring data qubits on reused ancillas (measure, reset), a conditional fix."""
    return syndrome_circuit(n, rounds)


def loops_and_switch() -> QuantumCircuit:
    """A while loop, a for loop with break and continue, a switch on a register."""
    qr, c, out = QuantumRegister(4), ClassicalRegister(2, "c"), ClassicalRegister(3, "o")
    circuit = QuantumCircuit(qr, c, out)
    circuit.h(2)
    circuit.measure(2, c[1])
    with circuit.while_loop((c[1], 1)):  # repeat until qubit 2 reads 0
        circuit.ry(1.3, 2)
        circuit.measure(2, c[1])
    with circuit.for_loop(range(4)):
        circuit.ry(1.2, 0)
        circuit.measure(0, c[0])
        circuit.reset(0)
        with circuit.if_test((c[0], 0)):
            circuit.continue_loop()
        circuit.h(1)
        circuit.measure(1, c[1])
        with circuit.if_test((c[1], 1)):
            circuit.break_loop()
    with circuit.switch(c) as case:
        with case(0):
            circuit.x(3)
        with case(1, 2):
            circuit.h(3)
        with case(case.DEFAULT):
            circuit.ry(0.3, 3)
    circuit.measure([1, 2, 3], out)
    return circuit


@pytest.fixture(params=["branching", "one copy", "no copy", "shot by shot", "batch"])
def mode(request, monkeypatch) -> dict:
    """How shots run: branching, branching with one or no copy allowed to wait, every shot alone
    (all in the interpreter: the batch of engine/small_shots.py kept out), and branching that hands
    over to that batch at its second path (on the CPU the NumPy batch; test_small_shots.py has the
    GPU's kernel)."""
    if request.param == "one copy":
        monkeypatch.setattr(trajectories, "saved_states", lambda *args, **kwargs: 1)
        monkeypatch.setattr("gpu_provider.engine.executor.saved_states", lambda *args, **kwargs: 1)
    elif request.param == "no copy":
        monkeypatch.setattr(trajectories, "BRANCH_BYTES", 0)
    elif request.param == "batch":
        monkeypatch.setattr(small_shots.ShotPlan, "budget", lambda self, shots: 1)
        return {"shot_branching_enable": True, "batched_shots_gpu": True}
    return {"shot_branching_enable": request.param != "shot by shot", "batched_shots_gpu": False}


def run(device, circuit, shots=SHOTS, seed=21, **options):
    return make_backend(device, **options).run(circuit, shots=shots, seed_simulator=seed).result()


def test_teleport_is_exact_in_every_mode(device, mode):
    result = run(device, teleport(), **mode)
    counts = result.get_counts()
    # m0, m1 uniform; the teleported ry(1.1)|0> reads 1 with probability sin^2(0.55).
    p1 = np.sin(0.55) ** 2
    exact = {f"{out}{m1}{m0}": 0.25 * (p1 if out == "1" else 1 - p1) for out in "01" for m1 in "01" for m0 in "01"}
    assert_counts_match(counts, exact, shots=SHOTS)
    metadata = result.results[0].metadata
    if mode.get("batched_shots_gpu") and metadata["device"] == "CPU":
        assert metadata["batched_shots"] is True  # its paths parted: past the budget of one
    if metadata.get("batched_shots"):
        assert mode.get("batched_shots_gpu", True) and "trajectories" not in metadata
    elif mode["shot_branching_enable"]:
        assert metadata["shot_branching"] is True
        assert metadata["trajectories"] <= SHOTS
    else:
        assert metadata["trajectories"] == SHOTS


@pytest.mark.parametrize("method", ["statevector", "stabilizer"])
def test_a_clbit_measured_twice_at_the_end_leaves_the_others_alone(device, mode, method):
    """The final measurements write clbit 0 twice, after a mid-circuit one wrote 1 into clbit 1: every
    shot reads '10' (Aer's answer). The clbits they write are a set: counted twice, clbit 0 had
    cleared clbit 1 (1 + 1 = 2)."""
    circuit = QuantumCircuit(2, 2)
    circuit.x(1)
    circuit.measure(1, 1)
    circuit.h(1)  # a gate after it: the measurements are not all terminal
    circuit.measure(0, 0)
    circuit.measure(0, 0)
    for shots in (1, 200):
        assert run(device, circuit, shots=shots, method=method, **mode).get_counts() == {"10": shots}


def test_branching_runs_each_path_once(device):
    """Two mid-circuit measurements of |+>: four paths, four trajectories for any number of shots."""
    result = run(device, teleport(), shots=100_000)
    assert result.results[0].metadata["trajectories"] == 4  # m0 and m1; the final read of out is drawn per path
    assert sum(result.get_counts().values()) == 100_000


@pytest.mark.parametrize("make", [syndrome_rounds, loops_and_switch], ids=["syndrome", "loops"])
def test_dynamic_circuits_agree_with_aer_in_every_mode(device, mode, make):
    circuit = make()
    counts = run(device, circuit, **mode).get_counts()
    assert sum(counts.values()) == SHOTS
    assert_counts_agree(counts, aer_counts(circuit, SHOTS))


def test_same_seed_same_samples_other_seed_other_samples(device):
    circuit = syndrome_rounds()
    first = run(device, circuit, seed=5, memory=True)
    again = run(device, circuit, seed=5, memory=True)
    other = run(device, circuit, seed=6, memory=True)
    assert first.get_memory() == again.get_memory()
    assert first.get_memory() != other.get_memory()


def test_memory_is_in_the_order_of_independent_shots(device):
    circuit = QuantumCircuit(2, 2)
    circuit.h(0)
    circuit.measure(0, 0)
    circuit.reset(0)
    circuit.h(1)
    circuit.measure(1, 1)
    result = run(device, circuit, shots=2000, memory=True)
    memory = result.get_memory()
    counts = result.get_counts()
    assert len(memory) == 2000
    assert {key: memory.count(key) for key in set(memory)} == counts
    assert result.results[0].metadata["trajectories"] == 2  # measure 0 forks; the final measure 1 is drawn per path
    # Grouped by trajectory, the list would change value 3 times; independent shots change
    # value with probability 3/4 at each of 1999 steps (mean 1499, sd about 19).
    changes = sum(a != b for a, b in zip(memory, memory[1:]))
    assert 1350 < changes < 1650, changes


def test_branching_applies_each_gate_once_per_trajectory(monkeypatch):
    applied = []
    apply_unitary = statevector.StateVector.apply_unitary
    monkeypatch.setattr(statevector.StateVector, "apply_unitary", lambda self, *args: applied.append(1) or apply_unitary(self, *args))
    circuit = QuantumCircuit(3, 3)
    circuit.h([0, 1])
    circuit.measure([0, 1], [0, 1])
    for _ in range(10):
        circuit.ry(0.3, 2)
        circuit.cx(2, 1)
    circuit.measure(2, 2)
    options = dict(fusion_enable=False, shots=2000, seed_simulator=3)
    branched = make_backend("CPU").run(circuit, **options).result()
    gates_branched = len(applied)
    applied.clear()
    alone = make_backend("CPU", shot_branching_enable=False).run(circuit, **options).result()
    trajectories_run = branched.results[0].metadata["trajectories"]
    assert trajectories_run <= 8
    assert gates_branched <= 2 + 20 * 4  # the two h gates once, the rest once per path of m0, m1
    assert len(applied) >= 20 * 2000
    assert_counts_agree(branched.get_counts(), alone.get_counts())


def test_statevector_of_a_circuit_with_resets(device):
    circuit = QuantumCircuit(2, 2)
    circuit.h(0)
    circuit.cx(0, 1)
    circuit.reset(0)  # forks: qubit 0 read 0 or 1 before the reset
    circuit.h(0)
    circuit.measure([0, 1], [0, 1])
    result = make_backend(device).run(circuit, shots=500, statevector=True, seed_simulator=2).result()
    state = np.asarray(result.get_statevector())
    # Either trajectory's state: |+> on qubit 0, qubit 1 in |0> or |1>.
    expected = [Statevector.from_label(label).data for label in ("0+", "1+")]
    assert max(abs(np.vdot(e, state)) for e in expected) == pytest.approx(1, abs=1e-10)
    assert_counts_match(result.get_counts(), {"00": 0.25, "01": 0.25, "10": 0.25, "11": 0.25}, shots=500)


def test_runaway_loop_is_a_typed_error_with_branching(device):
    circuit = QuantumCircuit(1, 1)
    circuit.h(0)
    circuit.measure(0, 0)
    with circuit.while_loop((circuit.clbits[0], 0)):
        circuit.reset(0)
        circuit.measure(0, 0)  # always 0 after the reset: never ends for half the shots
    job = make_backend(device, max_loop_iterations=50).run(circuit, shots=100, seed_simulator=1)
    with pytest.raises(JobError) as info:
        job.result(timeout=60)
    assert isinstance(info.value.__cause__, IterationLimitError)
    # The backend stays usable.
    assert sum(run(device, teleport(), shots=10).get_counts().values()) == 10


def test_the_option_is_validated():
    from gpu_provider.errors import InvalidOptionError

    with pytest.raises(InvalidOptionError, match="shot_branching_enable must be True or False"):
        make_backend("CPU", shot_branching_enable="yes")


def test_copies_waiting_are_log_shots_and_capped_in_bytes():
    assert trajectories.saved_states(10, 16, 1024) == 11
    assert trajectories.saved_states(10, 16, 1) == 0
    assert trajectories.saved_states(10, 16, 1024, branching=False) == 0
    assert trajectories.saved_states(10, 16, 10**6) == 20
    assert trajectories.saved_states(24, 16, 1024) == trajectories.BRANCH_BYTES // devices.state_bytes(24, 16) == 1
    assert trajectories.saved_states(30, 8, 1024) == 0


def test_memory_reserved_counts_the_waiting_copies():
    from gpu_provider.compiler.translate import translate

    circuit = syndrome_rounds(10, 1)  # 19 qubits: memory_needed counts arrays
    program = translate(circuit)
    config = RunConfig(shots=1024)
    waiting = trajectories.saved_states(program.num_qubits, 16, 1024)
    assert waiting == 11
    alone = RunConfig(shots=1024, shot_branching=False)
    assert state_arrays(program, config) == state_arrays(program, alone) + waiting
    size = devices.state_bytes(program.num_qubits, 16)
    assert memory_needed(program, config) - memory_needed(program, alone) == waiting * size


def test_branching_on_the_gpu_path_matches_the_cpu(monkeypatch):
    from tests.engine.test_gpu_plumbing import make_fake_cupy

    import sys

    from gpu_provider.engine import kernels

    monkeypatch.setitem(sys.modules, "cupy", make_fake_cupy())
    monkeypatch.setattr(kernels, "kernels_for", lambda dtype: None)
    devices.reset_probe()
    try:
        options = dict(shots=3000, seed_simulator=9, memory=True)
        gpu = make_backend("GPU").run(syndrome_rounds(), **options).result()
        cpu = make_backend("CPU").run(syndrome_rounds(), **options).result()
        assert gpu.results[0].metadata["device"] == "GPU:0"
        assert gpu.get_memory() == cpu.get_memory()
    finally:
        devices.reset_probe()


def test_huge_shot_counts_split_by_one_binomial_draw(monkeypatch):
    """Past UNIFORM_SHOTS a trajectory's measurement costs one binomial draw, not one uniform a shot."""
    monkeypatch.setattr(trajectories, "UNIFORM_SHOTS", 64)
    circuit = QuantumCircuit(2, 2)
    circuit.h(0)
    circuit.measure(0, 0)
    circuit.cx(0, 1)  # a gate after the measurement: trajectories
    circuit.measure(1, 1)
    counts = run("CPU", circuit, shots=5000).get_counts()
    assert set(counts) == {"00", "11"}
    assert_counts_match(counts, {"00": 0.5, "11": 0.5}, shots=5000)


def test_cancel_while_trajectories_run_then_the_backend_runs_the_next_job(device):
    from qiskit.providers import JobStatus

    from tests.helpers import wait_for

    # Every shot reads a fresh random bit 40 times: the shots soon run on trajectories of their own.
    circuit = QuantumCircuit(14, 1)
    for _ in range(40):
        circuit.h(range(14))
        circuit.measure(0, 0)
        circuit.reset(0)
    backend = make_backend(device, fusion_enable=False)
    job = backend.run(circuit, shots=20_000, seed_simulator=1)
    assert wait_for(lambda: job.status() == JobStatus.RUNNING)
    assert wait_for(lambda: job.progress()[0] > 0)
    assert job.cancel() is True
    assert job.status() == JobStatus.CANCELLED
    with pytest.raises(JobError, match="cancelled"):
        job.result()
    assert sum(run(device, teleport(), shots=100).get_counts().values()) == 100


@pytest.mark.parametrize("branching", [True, False])
def test_progress_counts_each_op_once_per_shot(branching):
    """Shared or not, an op counts once for each shot it is applied for: progress ends at ops x shots."""
    from gpu_provider.compiler.translate import translate
    from gpu_provider.engine import executor

    circuit = QuantumCircuit(2, 2)
    circuit.h(0)
    circuit.measure(0, 0)
    circuit.x(0)  # a gate on a measured qubit: trajectories
    circuit.h(1)
    circuit.measure(1, 1)
    program = translate(circuit)
    config = RunConfig(shots=1000, seed=1, shot_branching=branching)
    cpu, _ = devices.resolve_device("CPU", 0)
    total = executor.estimated_ops(program, config)
    execution = executor.Execution(cpu, total, lambda e: None)
    output = executor.run_program(program, cpu, config, execution)
    assert total == 5 * 1000
    assert execution._ops_enqueued == total
    assert output.metadata["trajectories"] == (2 if branching else 1000)  # measure 0 forks; measure 1 is drawn


# ---------------------------------------------------------------------------
# exact branching (no sampling): every path with its probability


def _exact_leaves(circuit: QuantumCircuit, limit: int):
    from gpu_provider.compiler.translate import translate
    from gpu_provider.engine.executor import new_state

    program = translate(circuit)
    device, _ = devices.resolve_device("CPU")
    state = new_state(device, program.num_qubits, np.complex128)
    leaves = []
    trajectories.run_exact(state, program, 1000, lambda t: leaves.append((t.weight, tuple(t.clbits), t.state.to_host())), limit)
    return program, leaves


def translate_ops(circuit):
    from gpu_provider.compiler.translate import translate

    return translate(circuit).ops


def test_exact_branching_visits_every_path_with_its_probability():
    circuit = QuantumCircuit(3, 3)
    circuit.ry(1.1, 0)
    circuit.measure(0, 0)
    with circuit.if_test((circuit.clbits[0], 1)):
        circuit.h(1)
    circuit.measure(1, 1)
    circuit.measure(2, 2)  # certain: no fork
    _, leaves = _exact_leaves(circuit, limit=trajectories.branch_points(translate_ops(circuit)))
    p1 = np.sin(0.55) ** 2
    expected = {(0, 0, 0): 1 - p1, (1, 0, 0): p1 / 2, (1, 1, 0): p1 / 2}
    assert {clbits: weight for weight, clbits, _ in leaves} == pytest.approx(expected, abs=1e-14)
    assert sum(weight for weight, _, _ in leaves) == pytest.approx(1.0, abs=1e-14)
    for weight, clbits, vector in leaves:  # each leaf's state is the collapsed, normalized one
        assert np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-12)
        index = clbits[0] | (clbits[1] << 1)
        assert abs(vector[index]) == pytest.approx(1.0, abs=1e-12)


def test_exact_branching_refuses_more_waiting_copies_than_its_limit():
    circuit = QuantumCircuit(3, 3)
    circuit.h([0, 1, 2])
    circuit.measure([0, 1, 2], [0, 1, 2])
    assert trajectories.branch_points(translate_ops(circuit)) == 3
    _, leaves = _exact_leaves(circuit, limit=3)
    assert len(leaves) == 8 and all(weight == pytest.approx(1 / 8) for weight, _, _ in leaves)
    with pytest.raises(gpu_provider.errors.SimulationError, match="more than 1 state copies"):
        _exact_leaves(circuit, limit=1)


def test_exact_branching_caps_its_paths(monkeypatch):
    monkeypatch.setattr(trajectories, "EXACT_MAX_PATHS", 5)
    circuit = QuantumCircuit(3, 3)
    circuit.h([0, 1, 2])
    circuit.measure([0, 1, 2], [0, 1, 2])
    with pytest.raises(gpu_provider.errors.SimulationError, match="more than 5 paths"):
        _exact_leaves(circuit, limit=3)
