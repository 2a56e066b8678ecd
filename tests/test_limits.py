"""Robustness, second round: admission control, bounded memory, cancellable phases, fork safety.

Each case of issue 13 is a test here: the error type and its key words, or the
numbers against an oracle, and a correct job right after. Tests that set a
memory limit do so in a child process (``run_child``) so they never endanger
the machine running the suite.
"""

from __future__ import annotations

import gc
import json
import math
import os
import pickle
import subprocess
import sys
import textwrap
import time
import tracemalloc

import numpy as np
import pytest
from qiskit import QuantumCircuit
from qiskit.circuit import CircuitInstruction, Gate, Parameter
from qiskit.circuit.library import CXGate, UnitaryGate
from qiskit.providers import JobStatus
from qiskit.quantum_info import Statevector

from gpu_provider import GPUSimulator
from gpu_provider.compiler import translate as translate_module
from gpu_provider.engine import devices, executor
from gpu_provider.engine.statevector import StateVector
from gpu_provider.errors import CircuitTooLargeError, InvalidInputError, UnsupportedInstructionError
from tests.helpers import bell

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def backend():
    return GPUSimulator(device="CPU")


def assert_backend_still_works(backend: GPUSimulator) -> None:
    counts = backend.run(bell(), shots=400, seed_simulator=9).result(timeout=60).get_counts()
    assert set(counts) == {"00", "11"} and sum(counts.values()) == 400
    assert 120 < counts["00"] < 280


def run_child(script: str, timeout: float = 120) -> dict:
    """Run ``script`` in a fresh Python; it prints one JSON object as its last line."""
    process = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env={**os.environ, "GPU_PROVIDER_DISABLE_GPU": "1"},
    )
    assert process.returncode == 0, process.stderr[-3000:]
    return json.loads(process.stdout.strip().splitlines()[-1])


# A child's preamble: the limit is set after the imports and a warm-up job, as
# room beyond what the process already maps.
LIMITED = """
import json, resource, time
from gpu_provider import GPUSimulator
from gpu_provider.engine import devices
from qiskit import QuantumCircuit

def ghz(n):
    qc = QuantumCircuit(n, n)
    qc.h(0)
    for q in range(n - 1):
        qc.cx(q, q + 1)
    qc.measure(range(n), range(n))
    return qc

backend = GPUSimulator(device="CPU")
# Two jobs at once start both worker threads (their stacks and malloc arenas count in VmSize).
for job in [backend.run(ghz(3), shots=10) for _ in range(2)]:
    job.result()

def limit_room(room):
    used = devices._proc_status_bytes(("VmSize",))["VmSize"]
    resource.setrlimit(resource.RLIMIT_AS, (used + room, resource.RLIM_INFINITY))
"""


# ---------------------------------------------------------------------------
# Hangs


def test_a_forked_child_runs_jobs():
    out = run_child(
        """
        import json, os
        from gpu_provider import GPUSimulator
        from tests.helpers import bell
        backend = GPUSimulator(device="CPU")
        parent = backend.run(bell(), shots=100, seed_simulator=1).result().get_counts()
        pid = os.fork()
        if pid == 0:
            try:
                counts = GPUSimulator(device="CPU").run(bell(), shots=300, seed_simulator=3).result(timeout=30).get_counts()
                os._exit(0 if set(counts) == {"00", "11"} and sum(counts.values()) == 300 else 1)
            except BaseException:
                os._exit(2)
        _, status = os.waitpid(pid, 0)
        after = backend.run(bell(), shots=100, seed_simulator=1).result(timeout=30).get_counts()
        print(json.dumps({"child": os.waitstatus_to_exitcode(status), "same": parent == after}))
        """
    )
    assert out == {"child": 0, "same": True}


def test_an_11_qubit_unitary_applies_through_its_matrix(backend):
    # A dense unitary that is cheap to build: the normalised DFT matrix times random phases.
    dim = 2**11
    phases = np.exp(2j * np.pi * np.random.default_rng(5).random(dim))
    unitary = np.exp(2j * np.pi * np.outer(np.arange(dim), np.arange(dim)) / dim) / math.sqrt(dim) * phases
    qc = QuantumCircuit(12)
    qc.h(11)
    qc.append(UnitaryGate(unitary), list(range(11)))
    start = time.perf_counter()
    job = backend.run(qc, shots=1, statevector=True)
    assert time.perf_counter() - start < 5  # was more than 10 minutes (Qiskit's synthesis)
    state = job.result(timeout=60).get_statevector()
    expected = Statevector(qc).data
    assert np.allclose(state, expected, atol=1e-10)
    assert_backend_still_works(backend)


def test_cancel_during_sampling_returns_quickly(backend):
    qc = QuantumCircuit(1, 1)
    qc.h(0)
    qc.measure(0, 0)
    job = backend.run(qc, shots=20_000_000, seed_simulator=1)
    deadline = time.monotonic() + 30
    while job.status() is not JobStatus.RUNNING and time.monotonic() < deadline:
        time.sleep(0.001)
    assert job.status() is JobStatus.RUNNING
    start = time.perf_counter()
    assert job.cancel() is True
    assert time.perf_counter() - start < 2  # was 9-15 s, then False and DONE
    assert job.status() is JobStatus.CANCELLED
    assert_backend_still_works(backend)


def _wide_loop(iterations: int, total_angle: float) -> QuantumCircuit:
    theta = Parameter("theta")
    qc = QuantumCircuit(2, 2)
    scale = total_angle / (iterations * (iterations - 1) / 2)
    with qc.for_loop(range(iterations), theta):
        qc.rx(theta * scale, 0)
        qc.cx(0, 1)
        qc.cx(0, 1)
    qc.measure([0, 1], [0, 1])
    return qc


def test_a_billion_iteration_loop_returns_from_run_at_once_and_cancels(backend):
    start = time.perf_counter()
    job = backend.run(_wide_loop(10**9, math.pi), shots=1)
    assert time.perf_counter() - start < 1  # was 28-49 s, then a bare MemoryError
    done, total = job.progress()
    assert total >= 10**9  # at least one op an iteration (the body fuses into one two-qubit block)
    deadline = time.monotonic() + 30
    while job.progress()[0] < 10 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert job.status() is JobStatus.RUNNING
    assert job.cancel() is True and job.status() is JobStatus.CANCELLED
    assert_backend_still_works(backend)


@pytest.mark.parametrize("total_angle", [math.pi, math.pi / 3])
def test_wide_loops_run_lazily_and_match_the_oracle(backend, monkeypatch, total_angle):
    qc = _wide_loop(1500, total_angle)  # above EAGER_LOOP_ITERATIONS: built as it runs
    lazy = backend.run(qc, shots=100, seed_simulator=6, memory=True).result(timeout=120)
    oracle = QuantumCircuit(2)
    oracle.rx(total_angle, 0)
    p1 = Statevector(oracle).probabilities()[1]
    counts = lazy.get_counts()
    assert set(counts) <= {"00", "01"}
    assert abs(counts.get("01", 0) / 100 - p1) < 5 * math.sqrt(p1 * (1 - p1) / 100) + 1e-9
    # The same draws as the loop unrolled up front.
    monkeypatch.setattr(translate_module, "EAGER_LOOP_ITERATIONS", 10**6)
    eager = backend.run(qc, shots=100, seed_simulator=6, memory=True).result(timeout=120)
    assert eager.get_memory() == lazy.get_memory()


# ---------------------------------------------------------------------------
# Memory


def _peak_bytes(run) -> int:
    gc.collect()
    tracemalloc.start()
    try:
        run()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_sampling_memory_does_not_grow_with_shots(backend):
    qc = QuantumCircuit(1, 1)
    qc.h(0)
    qc.measure(0, 0)
    results = {}

    def run(shots):
        results[shots] = backend.run(qc, shots=shots, seed_simulator=3).result(timeout=120).get_counts()

    small = _peak_bytes(lambda: run(10_000))
    large = _peak_bytes(lambda: run(2_000_000))
    assert large < small + 48 * 2**20  # was ~95 MB per 10^6 shots (954 MB at 10^7)
    counts = results[2_000_000]
    assert sum(counts.values()) == 2_000_000 and abs(counts["0"] - 1_000_000) < 5 * math.sqrt(500_000)


def test_chunked_sampling_draws_the_same_as_one_call():
    rng = np.random.default_rng(11)
    vector = rng.standard_normal(2**13) + 1j * rng.standard_normal(2**13)
    vector /= np.linalg.norm(vector)
    state = StateVector(np, 13, np.complex128)
    state.data[:] = vector
    qubits = [0, 3, 12, 7]
    whole = state.sample(qubits, 5000, np.random.default_rng(2))
    table = state.sampling_table()
    draws = np.random.default_rng(2)
    chunks = np.concatenate([state.sample(qubits, size, draws, table) for size in (1, 999, 3000, 1000)])
    assert np.array_equal(whole, chunks)
    # And the draws follow the distribution: chi-square against the exact marginal.
    probs = np.abs(vector.reshape((2,) * 13)) ** 2
    marginal = np.zeros(16)
    for index, p in enumerate(np.abs(vector) ** 2):
        marginal[sum(((index >> q) & 1) << j for j, q in enumerate(qubits))] += p
    observed = np.bincount(whole, minlength=16)
    chi2 = np.sum((observed - 5000 * marginal) ** 2 / (5000 * marginal))
    assert chi2 < 50  # 15 degrees of freedom: p < 1e-5 of failing by chance
    assert probs.sum() == pytest.approx(1.0)


def test_sample_chunks_bound_the_scratch_for_wide_states():
    state = StateVector(np, 20, np.complex64)
    # 56 bytes per amplitude of each of up to `chunk` distinct rows of 2^10 amplitudes.
    assert state.sample_chunk_shots() * (56 * 1024 + 160) <= 32 << 20
    # A state of few rows (12 qubits: 4) is bound by its shots alone: a usual job's shots in one chunk.
    small = StateVector(np, 12, np.complex128).sample_chunk_shots()
    assert 100_000 < small and small * 160 + 4 * 56 * 1024 <= 32 << 20
    assert 100_000 < StateVector(np, 1, np.complex128).sample_chunk_shots() <= 1 << 17


def _retained_bytes(make_job) -> tuple[int, object]:
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        job = make_job()
        job.result(timeout=300)
        gc.collect()
        return tracemalloc.get_traced_memory()[0] - before, job
    finally:
        tracemalloc.stop()


def test_a_finished_job_holds_memory_independent_of_shots_and_ops(backend):
    qc = QuantumCircuit(2, 2)
    qc.h(0)
    qc.measure(0, 0)
    qc.reset(0)  # shot by shot: a progress record per op per shot before
    qc.h(0)
    qc.cx(0, 1)
    qc.measure([0, 1], [0, 1])
    few, job_few = _retained_bytes(lambda: backend.run(qc, shots=200, seed_simulator=1))
    many, job_many = _retained_bytes(lambda: backend.run(qc, shots=10_000, seed_simulator=1))
    assert sum(job_many.result().get_counts().values()) == 10_000
    assert many < few + 256 * 1024  # was 78 MiB for 2e5 shots
    looped = QuantumCircuit(1, 1)
    with looped.for_loop(range(50_001)):
        looped.x(0)
    looped.measure(0, 0)
    loop, job_loop = _retained_bytes(lambda: backend.run(looped, shots=2, seed_simulator=1))
    assert job_loop.result().get_counts() == {"1": 2}
    assert loop < few + 256 * 1024  # was 1.5 GB for 1e7 loop ops
    assert job_loop.progress() == (job_loop.progress()[1],) * 2


def test_pending_checkpoints_are_bounded():
    class NeverDone:
        done = False

        def record(self, stream=None):
            pass

    class SlowDevice(devices.CPUDevice):
        def new_event(self):
            return NeverDone()

    execution = executor.Execution(SlowDevice(), 100_000, lambda e: None)
    for _ in range(100_000):
        execution.checkpoint()
    assert len(execution._checkpoints) <= executor.CHECKPOINT_RING
    assert execution.progress() == (0, 100_000)
    for _, event in execution._checkpoints:  # a stream reaches its events in order
        event.done = True
    done, total = execution.progress()
    assert total == 100_000 and 100_000 - executor.CHECKPOINT_OPS < done <= 100_000


def test_admission_runs_jobs_that_do_not_fit_together_one_after_the_other(backend, monkeypatch):
    n = 16
    need = 2 * (2**n * 16) + executor.WORKSPACE_BYTES
    # Room for one such job at a time, not two.
    monkeypatch.setattr(devices.CPUDevice, "memory_capacity", lambda self: int(need * 1.5))
    qc = QuantumCircuit(n, n)
    qc.h(0)
    for q in range(n - 1):
        qc.cx(q, q + 1)
    for q in range(n):  # some work, so the two would overlap without admission control
        qc.rx(0.0, q)
    qc.measure(range(n), range(n))
    jobs = [backend.run(qc, shots=1000, seed_simulator=s) for s in range(3)]
    for job in jobs:
        counts = job.result(timeout=120).get_counts()
        assert set(counts) == {"0" * n, "1" * n} and sum(counts.values()) == 1000
    spans = sorted((job._execution.started_at, job._execution.finished_at) for job in jobs)
    for (_, first_end), (second_start, _) in zip(spans, spans[1:]):
        assert second_start >= first_end
    # Small jobs still run side by side.
    assert_backend_still_works(backend)


def test_a_job_that_could_never_fit_is_refused_from_run(backend, monkeypatch):
    monkeypatch.setattr(devices.CPUDevice, "memory_capacity", lambda self: 80 << 20)
    qc = QuantumCircuit(20, 1)
    qc.h(range(20))  # every qubit used: idle ones would not be simulated
    qc.t(0)  # not Clifford: "automatic" cannot run it as a stabilizer state either
    qc.measure(19, 0)
    with pytest.raises(CircuitTooLargeError) as info:
        backend.run(qc)
    message = str(info.value)
    assert "20-qubit" in message and "bytes" in message and "free" in message
    assert info.value.bytes_needed > info.value.bytes_free == 80 << 20
    monkeypatch.undo()
    assert_backend_still_works(backend)


def test_the_cgroup_limit_caps_the_capacity(tmp_path, monkeypatch):
    limit, usage = tmp_path / "memory.max", tmp_path / "memory.current"
    limit.write_text("536870912\n")
    usage.write_text("268435456\n")
    monkeypatch.setattr(devices, "_CGROUP_FILES", ((str(tmp_path / "absent"), str(usage)), (str(limit), str(usage))))
    assert devices.cgroup_room_bytes() == 256 << 20
    assert devices.process_limit_bytes() <= 256 << 20
    assert devices.CPUDevice().memory_capacity() <= 256 << 20
    limit.write_text("max\n")
    assert devices.cgroup_room_bytes() is None


def test_process_rlimit_refuses_from_run_and_two_jobs_never_overrun_it():
    out = run_child(
        LIMITED
        + """
from gpu_provider.errors import CircuitTooLargeError
from gpu_provider.engine.executor import WORKSPACE_BYTES
n = 22
need = 2 * (16 << n) + WORKSPACE_BYTES
# One job fits, two (each touching its 128 MiB and sampling scratch) do not. The slack is
# for what a finished job leaves mapped (malloc's heaps): admission measures it too.
limit_room(need + (96 << 20))
room = devices.process_limit_bytes()
try:
    backend.run(ghz(28), shots=10, method="statevector")  # 8 GiB: far past the room, whatever the process maps or unmaps meanwhile
    refused = ""
except CircuitTooLargeError as exc:
    refused = str(exc)
jobs = [backend.run(ghz(n), shots=2000, seed_simulator=s) for s in range(3)]
results = []
for job in jobs:
    try:
        counts = job.result(timeout=120).get_counts()
        results.append(sorted(counts) == ["0" * n, "1" * n] and sum(counts.values()) == 2000)
    except Exception as exc:
        results.append(repr(exc))
spans = sorted((job._execution.started_at, job._execution.finished_at) for job in jobs)
serial = all(b[0] >= a[1] for a, b in zip(spans, spans[1:]))
print(json.dumps({"room": room, "need": need, "refused": refused, "results": results, "serial": serial}))
"""
    )
    assert out["need"] <= out["room"] < 2 * out["need"]
    assert "28-qubit" in out["refused"] and "free" in out["refused"]
    assert out["results"] == [True, True, True]
    assert out["serial"]


def test_a_state_whose_two_copies_do_not_fit_runs_in_place():
    """Under a limit with room for one 22-qubit state (64 MiB) and the workspace but not two, a
    non-Clifford circuit runs in place (no scratch buffer) instead of being refused: a random
    circuit, wide controlled gates and a Pauli evolution, then their inverse and H on three qubits,
    so exactly the 8 outcomes of those three qubits come out, and the estimator's values are those
    of |+++>|0...0>. A 20-qubit circuit keeps its buffer."""
    out = run_child(
        LIMITED
        + """
import numpy as np
from qiskit.circuit.library import PauliEvolutionGate, UnitaryGate
from qiskit.quantum_info import SparsePauliOp, random_unitary
from gpu_provider.engine.executor import WORKSPACE_BYTES

def circuit(n):
    rng = np.random.default_rng(n)
    u = QuantumCircuit(n)
    for layer in range(3):
        for q in range(n):
            u.u(*rng.uniform(0, 3, 3), q)
        for q in range(layer % 2, n - 1, 2):
            u.cx(q, q + 1)
    u.append(UnitaryGate(random_unitary(8, seed=n)), [n - 1, 3, 10])
    u.mcx(list(range(1, 8)), n - 2)
    u.append(PauliEvolutionGate(SparsePauliOp(["XYZ", "ZZX"], [0.3, 0.7]), time=1.0), [0, n - 3, 7])
    qc = u.compose(u.inverse())
    qc.h([0, 1, 2])
    qc.measure_all()
    return qc

n = 22
circuits = circuit(n), circuit(20)  # built first: their imports map memory too
from gpu_provider import EstimatorV2, SamplerV2
sampler = SamplerV2(backend_options={"device": "CPU"}, seed=3)
estimator = EstimatorV2(backend_options={"device": "CPU"})
sampler.run([circuits[1]], shots=10).result()
estimator.run([(circuits[1].remove_final_measurements(inplace=False), "Z" * 20)]).result()
limit_room((16 << n) + WORKSPACE_BYTES + (48 << 20))  # one state, not two
wide = backend.run(circuits[0], shots=4000, seed_simulator=1, method="statevector").result(timeout=300)
narrow = backend.run(circuits[1], shots=100, seed_simulator=1).result(timeout=300)
sampled = sampler.run([circuits[0]], shots=2000).result(timeout=300)[0]
observables = ["Z" * (n - 3) + "XXX", "Z" * n, "I" * (n - 6) + "Z" + "I" * 5, "I" * (n - 2) + "XY"]
estimated = estimator.run([(circuits[0].remove_final_measurements(inplace=False), observables)]).result(timeout=300)[0]
estimated = {"evs": estimated.data.evs.tolist(), "in_place": estimated.metadata["simulator_metadata"].get("in_place")}
print(json.dumps({"counts": wide.get_counts(), "in_place": wide.results[0].metadata.get("in_place"),
                  "narrow": narrow.results[0].metadata.get("in_place"), "narrow_keys": sorted(narrow.get_counts()),
                  "sampler": sampled.data.meas.get_counts(), "sampler_in_place": sampled.metadata["simulator_metadata"].get("in_place"),
                  "estimator": estimated}))
"""
    )
    assert out["in_place"] is True and out["narrow"] is None
    assert out["sampler_in_place"] is True and set(out["sampler"]) == {"0" * 19 + format(b, "03b") for b in range(8)}
    assert all(150 < c < 350 for c in out["sampler"].values())
    # The estimator reads its Pauli sums a chunk at a time: no second array either.
    assert out["estimator"]["in_place"] is True
    assert np.allclose(out["estimator"]["evs"], [1.0, 0.0, 1.0, 0.0], atol=1e-9)
    expected = {"0" * 19 + format(b, "03b") for b in range(8)}
    assert set(out["counts"]) == expected and all(350 < c < 650 for c in out["counts"].values())
    assert set(out["narrow_keys"]) <= {"0" * 17 + format(b, "03b") for b in range(8)}


def test_primitives_count_a_pauli_evolution_s_arrays_under_a_limit():
    """A Pauli evolution of non-commuting terms on 11 or more qubits runs as a Chebyshev recurrence
    holding four more state-sized arrays (six in all; five in place, where it is no dense
    exponential). The primitives count them as ``run()`` does: with room for seven 22-qubit
    states the estimator's values are the exact state's; with room for three, both primitives
    refuse the circuit at ``run()``, naming five arrays, instead of a job failing on its memory."""
    out = run_child(
        LIMITED
        + """
import numpy as np
from qiskit.circuit.library import PauliEvolutionGate
from qiskit.quantum_info import SparsePauliOp, Statevector
from gpu_provider.engine.executor import WORKSPACE_BYTES

def circuit(n):
    qc = QuantumCircuit(n)
    qc.h(range(n))
    qc.ry(0.3, range(n))
    qc.append(PauliEvolutionGate(SparsePauliOp(["X" * 11, "Z" * 10 + "Y"], [0.4, 0.9]), time=1.0), list(range(11)))
    return qc

n = 22
wide, small = circuit(n), circuit(11)
observables = ["I" * 9 + "YX", "I" * 10 + "X", "ZZZZZZZZZZX"]
exact = [Statevector(small).expectation_value(SparsePauliOp(o)).real for o in observables]
observables = ["I" * (n - 11) + o for o in observables]
from gpu_provider import EstimatorV2, SamplerV2
estimator = EstimatorV2(backend_options={"device": "CPU"})
sampler = SamplerV2(backend_options={"device": "CPU"}, seed=5)
estimator.run([(small, "Z" * 11)]).result()
limit_room(7 * (16 << n) + WORKSPACE_BYTES + (48 << 20))
result = estimator.run([(wide, observables)]).result(timeout=300)[0]
limit_room(3 * (16 << n) + WORKSPACE_BYTES + (48 << 20))
refused = {}
for name, run in (("estimator", lambda: estimator.run([(wide, observables)])), ("sampler", lambda: sampler.run([wide.measure_all(inplace=False)], shots=10))):
    try:
        run().result(timeout=300)
        refused[name] = "ran"
    except Exception as exc:
        refused[name] = type(exc).__name__ + ": " + str(exc)
print(json.dumps({"evs": result.data.evs.tolist(), "exact": exact, "in_place": result.metadata["simulator_metadata"].get("in_place"), "refused": refused}))
"""
    )
    assert out["in_place"] is None
    assert np.allclose(out["evs"], out["exact"], atol=1e-9) and min(abs(v) for v in out["exact"]) > 0.01
    for name in ("estimator", "sampler"):
        assert out["refused"][name].startswith("CircuitTooLargeError"), out["refused"]
        assert "5 arrays" in out["refused"][name]


def test_estimator_branching_counts_its_path_copies_under_a_limit():
    """The estimator branches exactly on a mid-circuit measurement: the state, its buffer and one
    copy waiting per uncertain measurement on a path (3 arrays here), no restart copy. With room
    for three 22-qubit states it runs, with values that average both outcomes; with room for two
    it is refused at run(), naming the 3 arrays."""
    out = run_child(
        LIMITED
        + """
from qiskit.quantum_info import SparsePauliOp
from gpu_provider.engine.executor import WORKSPACE_BYTES
from gpu_provider import EstimatorV2

n = 22
qc = QuantumCircuit(n, 1)
qc.h(range(n))
qc.t(range(n))
qc.measure(0, 0)
qc.h(0)
estimator = EstimatorV2(backend_options={"device": "CPU"})
estimator.run([(QuantumCircuit(1), "Z")]).result()
observables = ["I" * (n - 1) + "Z", "I" * (n - 2) + "XI", "I" * (n - 2) + "YI"]
limit_room(3 * (16 << n) + WORKSPACE_BYTES + (48 << 20))
values = estimator.run([(qc, observables)]).result(timeout=300)[0].data.evs.tolist()
limit_room(2 * (16 << n) + WORKSPACE_BYTES + (48 << 20))
try:
    estimator.run([(qc, observables)])
    refused = "ran"
except Exception as exc:
    refused = type(exc).__name__ + ": " + str(exc)
print(json.dumps({"values": values, "refused": refused}))
"""
    )
    # Qubit 0 measured then H: <Z> = 0; qubit 1 is T|+>: <X> = <Y> = 1/sqrt(2).
    assert np.allclose(out["values"], [0.0, 2**-0.5, 2**-0.5], atol=1e-9)
    assert out["refused"].startswith("CircuitTooLargeError") and "3 arrays" in out["refused"], out["refused"]


def test_pennylane_reads_a_state_whose_two_copies_do_not_fit_in_place():
    """The PennyLane device under a limit with room for one 22-qubit state: a tape of exact
    expectation values (a Pauli sum, a Hermitian matrix), variances (a Pauli word, a Hermitian
    matrix) and probabilities runs in place, with default.qubit's values (computed before the
    limit); one asking for the state is refused, naming the three arrays it needs (the state, its
    buffer, the host copy it is read from); with shots, the samples of an unrotated measurement
    come from the same state."""
    pytest.importorskip("pennylane")
    out = run_child(
        LIMITED
        + """
import numpy as np
import pennylane as qml
from gpu_provider.engine.executor import WORKSPACE_BYTES

n = 22
rng = np.random.default_rng(4)
weights = rng.uniform(0, 2, (3, n, 3))
hermitian = qml.Hermitian(np.array([[1.0, 0.5 - 0.2j, 0, 0], [0.5 + 0.2j, -0.3, 0.1, 0], [0, 0.1, 0.7, 0.4j], [0, 0, -0.4j, 0.2]]), wires=[3, 17])
sum_ = 0.7 * qml.PauliZ(0) @ qml.PauliX(20) - 0.4 * qml.PauliY(5) @ qml.PauliY(21) + 0.2 * qml.PauliX(11)

def body():
    qml.StronglyEntanglingLayers(weights, wires=range(n))
    return [qml.expval(sum_), qml.expval(hermitian), qml.var(qml.PauliZ(4) @ qml.PauliX(9)), qml.var(hermitian), qml.probs(wires=[0, 13, 21])]

def flat(values):
    return np.concatenate([np.ravel(v) for v in values]).tolist()

exact = flat(qml.QNode(body, qml.device("default.qubit", wires=n))())
ours = qml.device("gpu_provider.qubit", wires=n, device="CPU")
sampled = qml.device("gpu_provider.qubit", wires=n, device="CPU", shots=20000, seed=3)

def sample_body():
    qml.StronglyEntanglingLayers(weights, wires=range(n))
    return qml.expval(qml.PauliZ(0) @ qml.PauliZ(13)), qml.probs(wires=[0, 13])

def state_body():
    qml.StronglyEntanglingLayers(weights, wires=range(n))
    return qml.state()

small = QuantumCircuit(1)
limit_room((16 << n) + WORKSPACE_BYTES + (48 << 20))  # one state, not two
got = flat(qml.QNode(body, ours)())
shots = flat(qml.QNode(sample_body, sampled)())
def density_body():
    qml.StronglyEntanglingLayers(weights, wires=range(n))
    return qml.density_matrix(wires=[0, 1])

refusals = []
for measured in (state_body, density_body):
    try:
        qml.QNode(measured, ours)()
        refusals.append("ran")
    except Exception as exc:
        refusals.append(type(exc).__name__ + ": " + str(exc))
refused, density = refusals
print(json.dumps({"exact": exact, "got": got, "shots": shots, "refused": refused, "density": density}))
""",
        timeout=300,
    )
    assert np.allclose(out["got"], out["exact"], atol=1e-9)
    exact = np.array(out["exact"])
    marginal = exact[-8:].reshape(2, 2, 2).sum(axis=1).reshape(-1)  # wires 0 and 21 -> wires 0, 13 below
    probs_0_13 = exact[-8:].reshape(2, 2, 2).sum(axis=2).reshape(-1)
    assert np.allclose(out["shots"][1:], probs_0_13, atol=0.02) and marginal.sum() == pytest.approx(1.0)
    assert out["shots"][0] == pytest.approx(probs_0_13 @ np.array([1, -1, -1, 1]), abs=0.03)
    # The state, its buffer and the host copy qml.state() is read from; a density matrix adds
    # what PennyLane's processing of that copy allocates.
    assert out["refused"].startswith("CircuitTooLargeError") and "3 arrays" in out["refused"], out["refused"]
    assert out["density"].startswith("CircuitTooLargeError") and "6 arrays" in out["density"], out["density"]


def test_pennylane_copies_for_reads_keep_no_buffer_of_their_own():
    """A read's scratch copy (O|psi> and its work copy for a non-Pauli variance, a rotated copy for
    probabilities in another basis) applies its gates a chunk at a time, so it costs the one array
    counted for it, not two. With room for the four arrays counted (state, buffer, two copies) and
    22 qubits, these run with default.qubit's values instead of dying with a MemoryError."""
    pytest.importorskip("pennylane")
    out = run_child(
        LIMITED
        + """
import numpy as np
import pennylane as qml
from gpu_provider.engine.executor import WORKSPACE_BYTES

n = 22
A = np.array([[1.0, 0.5 - 0.2j, 0, 0], [0.5 + 0.2j, -0.3, 0.1, 0], [0, 0.1, 0.7, 0.4j], [0, 0, -0.4j, 0.2]])
measurements = {
    "var_hermitian": lambda: qml.var(qml.Hermitian(A, wires=[3, 17])),
    "var_sum": lambda: qml.var(0.5 * qml.Hermitian(A[:2, :2], wires=[0]) + qml.PauliZ(3)),
    "probs_x": lambda: qml.probs(op=qml.PauliX(5) @ qml.PauliY(20)),
}

def node(device, measure):
    def body():
        for q in range(n):
            qml.RY(0.1 * q + 0.2, wires=q)
        for q in range(0, n - 1, 2):
            qml.CNOT(wires=[q, q + 1])
        return measure()
    return qml.QNode(body, device)

oracle = {k: np.ravel(node(qml.device("default.qubit", wires=n), m)()).tolist() for k, m in measurements.items()}
ours = qml.device("gpu_provider.qubit", wires=n, device="CPU")
got = {}
for key, measure in measurements.items():
    limit_room(4 * (16 << n) + WORKSPACE_BYTES + (48 << 20))
    try:
        got[key] = np.ravel(node(ours, measure)()).tolist()
    except Exception as exc:
        got[key] = type(exc).__name__ + ": " + str(exc)[:200]
print(json.dumps({"oracle": oracle, "got": got}))
""",
        timeout=300,
    )
    for key, expected in out["oracle"].items():
        assert not isinstance(out["got"][key], str), out["got"][key]
        assert np.allclose(out["got"][key], expected, atol=1e-9), key


def test_a_wide_density_matrix_counts_its_entries_and_rotated_terms_take_turns():
    """A density matrix of 12 of 22 qubits has 4^12 complex128 entries (256 MiB, four 22-qubit
    states): Braket counts them and refuses before running (7 arrays) with room for six states.
    A PennyLane shots estimate of a sum of rotated terms keeps one rotated copy at a time, so it
    runs in the three arrays it counts (state, buffer, one copy)."""
    pytest.importorskip("pennylane")
    pytest.importorskip("braket.devices")
    out = run_child(
        LIMITED
        + """
import numpy as np
import pennylane as qml
from braket.circuits import Circuit
from braket.devices import LocalSimulator
from gpu_provider.engine.executor import WORKSPACE_BYTES

n = 22
circuit = Circuit()
for q in range(n):
    circuit.ry(q, 0.1 * q + 0.2)
circuit.density_matrix(target=list(range(12)))
braket = LocalSimulator("gpu_provider")
braket.run(Circuit().h(0).probability(), shots=0, device="CPU").result()

def body():
    for q in range(n):
        qml.RY(0.1 * q + 0.2, wires=q)
    return qml.expval(qml.PauliX(0) + qml.PauliY(3))

device = qml.device("gpu_provider.qubit", wires=n, device="CPU", seed=1)
node = qml.set_shots(qml.QNode(body, device), shots=4000) if hasattr(qml, "set_shots") else qml.QNode(body, device, shots=4000)
limit_room(6 * (16 << n) + WORKSPACE_BYTES + (48 << 20))
try:
    braket.run(circuit, shots=0, device="CPU").result()
    refused = "ran"
except Exception as exc:
    refused = type(exc).__name__ + ": " + str(exc)
limit_room(3 * (16 << n) + WORKSPACE_BYTES + (24 << 20))
try:
    value = float(node())
except Exception as exc:
    value = type(exc).__name__ + ": " + str(exc)[:200]
print(json.dumps({"refused": refused, "value": value, "exact": float(np.sin(0.2))}))
""",
        timeout=300,
    )
    assert out["refused"].startswith("CircuitTooLargeError") and "7 arrays" in out["refused"], out["refused"]
    assert not isinstance(out["value"], str), out["value"]
    assert abs(out["value"] - out["exact"]) < 0.06  # <X0> = sin(0.2), <Y3> = 0; 4000 shots per term


def test_pennylane_adjoint_counts_its_sweep_s_states_under_a_limit():
    """Adjoint differentiation keeps, beside the state and its buffer, a bra per observable (each
    with its buffer) and the work copy that makes them: 7 arrays for two observables. With room
    for eight 22-qubit states its Jacobian is default.qubit's; with room for five it is refused
    before running (CircuitTooLargeError naming 7 arrays), not a MemoryError halfway."""
    pytest.importorskip("pennylane")
    out = run_child(
        LIMITED
        + """
import numpy as np
import pennylane as qml
from pennylane import numpy as pnp
from gpu_provider.engine.executor import WORKSPACE_BYTES

n = 22
def body(a, b, c):
    for q in range(n):
        qml.Hadamard(q)
    qml.RX(a, wires=0)
    qml.CNOT(wires=[0, 11])
    qml.RY(b, wires=11)
    qml.CNOT(wires=[11, 21])
    qml.RZ(c, wires=21)
    qml.RX(0.4, wires=21)
    return qml.expval(qml.PauliZ(0) @ qml.PauliY(21)), qml.expval(qml.PauliX(11) + 0.5 * qml.PauliZ(21))

args = [pnp.array(0.3, requires_grad=True), pnp.array(-0.8, requires_grad=True), pnp.array(1.1, requires_grad=True)]
def jacobian(device):
    node = qml.QNode(body, device, diff_method="adjoint")
    return np.array(qml.jacobian(lambda *x: qml.math.stack(node(*x)))(*args)).tolist()

exact = jacobian(qml.device("default.qubit", wires=n))
ours = qml.device("gpu_provider.qubit", wires=n, device="CPU")
limit_room(8 * (16 << n) + WORKSPACE_BYTES + (48 << 20))
got = jacobian(ours)
limit_room(5 * (16 << n) + WORKSPACE_BYTES + (48 << 20))
try:
    jacobian(ours)
    refused = "ran"
except Exception as exc:
    refused = type(exc).__name__ + ": " + str(exc)
print(json.dumps({"exact": exact, "got": got, "refused": refused}))
""",
        timeout=300,
    )
    assert np.allclose(out["got"], out["exact"], atol=1e-9) and np.max(np.abs(out["exact"])) > 0.1
    assert out["refused"].startswith("CircuitTooLargeError") and "7 arrays" in out["refused"], out["refused"]


def test_braket_reads_a_state_whose_two_copies_do_not_fit_in_place():
    """LocalSimulator("gpu_provider") under a limit with room for one 22-qubit state: exact
    expectation values, variances, probabilities and amplitudes, and shots, run in place with
    braket_sv's values on a 12-qubit copy of the circuit (the other qubits stay |0>, computed
    before the limit); a state vector (the state and its host copy) is refused, naming 2 arrays."""
    pytest.importorskip("braket.devices")
    out = run_child(
        LIMITED
        + """
import numpy as np
from braket.circuits import Circuit, Observable
from braket.devices import LocalSimulator
from gpu_provider.engine.executor import WORKSPACE_BYTES

def body(n):
    rng = np.random.default_rng(2)
    circuit = Circuit()
    for layer in range(4):
        for q in range(12):
            circuit.rx(q, rng.uniform(0, 3)).rz(q, rng.uniform(0, 3))
        for q in range(layer % 2, 11, 2):
            circuit.cnot(q, q + 1)
    for q in range(12, n):
        circuit.i(q)
    return circuit

def exact(n):
    circuit = body(n)
    circuit.expectation(Observable.Z() @ Observable.X(), target=[0, 7])
    circuit.expectation(Observable.Hermitian(np.array([[0.5, 0.3j], [-0.3j, -1.0]])), target=[4])
    circuit.variance(Observable.Y(), target=[11])
    circuit.probability(target=[1, 10, 3])
    circuit.amplitude(state=["0" * n, "1" + "0" * (n - 1)])
    return circuit

def flat(values):
    out = []
    for value in values:
        if isinstance(value, dict):
            out += [abs(v) for v in value.values()]
        else:
            out += np.ravel(value).real.tolist()
    return out

oracle = flat(LocalSimulator("braket_sv").run(exact(12), shots=0).result().values)
ours = LocalSimulator("gpu_provider")
ours.run(exact(12), shots=0, device="CPU").result()
n = 22
limit_room((16 << n) + WORKSPACE_BYTES + (48 << 20))  # one state, not two
got = flat(ours.run(exact(n), shots=0, device="CPU").result().values)
counts = ours.run(body(n), shots=2000, device="CPU", seed=4).result().measurement_counts
try:
    ours.run(body(n).state_vector(), shots=0, device="CPU").result()
    refused = "ran"
except Exception as exc:
    refused = type(exc).__name__ + ": " + str(exc)
print(json.dumps({"oracle": oracle, "got": got, "counts": dict(counts), "refused": refused}))
""",
        timeout=300,
    )
    assert np.allclose(out["got"], out["oracle"], atol=1e-9)
    assert sum(out["counts"].values()) == 2000 and all(key.endswith("0" * 10) for key in out["counts"])
    assert out["refused"].startswith("CircuitTooLargeError") and "2 arrays" in out["refused"], out["refused"]


def test_a_statevector_too_large_to_return_says_the_copy_is_the_returned_one():
    """34 qubits in double (256 GiB a copy): even in place the run needs the state and the copy
    statevector=True returns; the error says so, and that leaving it off needs one less."""
    qc = QuantumCircuit(34)
    qc.h(range(34))
    qc.t(0)  # not Clifford: no stabilizer state
    with pytest.raises(CircuitTooLargeError, match=r"\(2 arrays of 2\^34 x 16 bytes, .*copy statevector=True returns: leave it off"):
        GPUSimulator(device="CPU").run(qc, shots=1, statevector=True)


def test_memory_output_for_too_many_shots_is_refused_under_a_limit():
    out = run_child(
        LIMITED
        + """
from gpu_provider.errors import InvalidOptionError
limit_room(200 << 20)
try:
    backend.run(ghz(1), shots=2 * 10**6, memory=True)  # 240 MB of output: fits the host, not the limit
    message = ""
except InvalidOptionError as exc:
    message = str(exc)
counts = backend.run(ghz(2), shots=10**6, seed_simulator=1).result(timeout=60).get_counts()
print(json.dumps({"message": message, "total": sum(counts.values()), "keys": sorted(counts)}))
"""
    )
    assert "memory=True" in out["message"] and "bytes" in out["message"]
    assert out["total"] == 10**6 and out["keys"] == ["00", "11"]


# ---------------------------------------------------------------------------
# Errors


class Ouroboros(Gate):
    def __init__(self):
        super().__init__("ouroboros", 1, [])

    def _define(self):
        qc = QuantumCircuit(1)
        qc.h(0)
        qc.append(Ouroboros(), [0])
        self.definition = qc


def test_a_definition_that_contains_itself_is_a_typed_error(backend):
    qc = QuantumCircuit(1)
    qc.append(Ouroboros(), [0])
    with pytest.raises(UnsupportedInstructionError, match="ouroboros.*contains itself"):
        backend.run(qc)
    assert_backend_still_works(backend)


def test_a_gate_in_its_own_definition_is_a_typed_error_and_same_named_nested_gates_run(backend):
    looped = Gate("loop", 1, [])
    body = QuantumCircuit(1)
    body.x(0)
    body.append(looped, [0])
    looped.definition = body  # the very gate inside its own definition
    qc = QuantumCircuit(1)
    qc.append(looped, [0])
    with pytest.raises(UnsupportedInstructionError, match=r"'loop' contains itself \(loop -> loop\)"):
        backend.run(qc)
    # Distinct gates that share a name, one inside the other (as Gate.power and grover_operator
    # build): they expand. "Q" = sx inside "Q" = ry inside "Q" = h.
    innermost = QuantumCircuit(1, name="Q")
    innermost.h(0)
    middle = QuantumCircuit(1, name="Q")
    middle.ry(0.4, 0)
    middle.append(innermost.to_gate(), [0])
    outer = QuantumCircuit(1, name="Q")
    outer.append(middle.to_gate(), [0])
    outer.sx(0)
    nested = QuantumCircuit(1)
    nested.append(outer.to_gate(), [0])
    state = backend.run(nested, statevector=True, shots=1).result().get_statevector()
    assert abs(abs(np.vdot(Statevector(nested).data, state)) - 1) < 1e-9
    assert_backend_still_works(backend)


def test_duplicated_qubits_are_refused_from_run(backend):
    qc = QuantumCircuit(2, 2)
    qc._append(CircuitInstruction(CXGate(), (qc.qubits[0], qc.qubits[0]), ()))
    with pytest.raises(InvalidInputError, match=r"'cx' acts on qubits \[0, 0\].*repeat"):
        backend.run(qc)
    assert_backend_still_works(backend)


def test_too_large_in_single_precision_does_not_advise_single(backend):
    qc = QuantumCircuit(40)
    qc.ry(0.3, range(40))  # every qubit used: idle ones would not be simulated (and not Clifford)
    with pytest.raises(CircuitTooLargeError) as info:
        backend.run(qc, precision="single")
    assert "single" not in str(info.value) and "40-qubit" in str(info.value)
    with pytest.raises(CircuitTooLargeError, match="precision='single'"):
        backend.run(qc, precision="double")
    assert_backend_still_works(backend)


def test_refusals_of_states_of_thousands_of_qubits_are_readable(backend):
    """2^20000 bytes has more digits than Python turns into text by default: the refusal names a
    power of two instead of failing to format (a ValueError before); a Clifford circuit that wide
    goes on to a stabilizer state, and one too wide for a tableau is refused in a tableau's terms."""
    n = 20000
    qc = QuantumCircuit(n)
    qc.h(0)
    qc.t(0)
    qc.measure_all()
    with pytest.raises(CircuitTooLargeError, match=rf"a {n}-qubit state needs about 2\^{n + 4} bytes .*1 array of 2\^{n} x 16 bytes, about 2\^\d+ bytes of sampling table"):
        backend.run(qc, shots=10)
    wide = QuantumCircuit(200_000)
    wide.h(0)
    wide.cx(0, 199_999)
    wide.measure_all()
    with pytest.raises(CircuitTooLargeError, match=r"a 200000-qubit stabilizer state needs [0-9,]+ bytes .*its tableau of 160,000,400,000 bytes"):
        backend.run(wide, shots=10)
    assert_backend_still_works(backend)


def test_a_refusal_names_the_sampling_table(backend):
    qc = QuantumCircuit(36)
    qc.ry(0.3, range(36))
    with pytest.raises(CircuitTooLargeError) as info:
        backend.run(qc)
    # The parts named add up to the total.
    message = str(info.value)
    needed = info.value.bytes_needed
    table = executor.sampling_table_bytes(36)
    assert f"{table:,} bytes of sampling table" in message
    arrays = int(message.split("(")[1].split(" array")[0])
    assert needed == arrays * (1 << 36) * 16 + table + executor.WORKSPACE_BYTES


def test_pickling_a_job_says_what_can_be_pickled(backend):
    job = backend.run(bell(), shots=100, seed_simulator=2)
    with pytest.raises(TypeError, match=r"GPUJob cannot be pickled.*job\.result\(\).*job\.backend\(\)"):
        pickle.dumps(job)
    result = pickle.loads(pickle.dumps(job.result()))
    assert result.get_counts() == job.result().get_counts()
    again = pickle.loads(pickle.dumps(backend))
    assert again.run(bell(), shots=100, seed_simulator=2).result().get_counts() == job.result().get_counts()


# ---------------------------------------------------------------------------
# Soak (CI size; `python -m benchmarks.soak` runs the 200-job version)


def test_soak_near_the_memory_limit_ci_size():
    from benchmarks.soak import soak

    # Jobs of 10-21 qubits need 64-192 MiB each against 200 MiB of address space.
    report = soak(jobs=16, threads=4, budget_mib=200, min_qubits=10, max_qubits=21, seed=3, timeout=600)
    assert report["ok"], report
    assert report["done_correct"] >= 8  # most sizes fit; the few above the budget are refused from run()
    assert report["failed"] == report["wrong"] == report["hung_threads"] == 0
