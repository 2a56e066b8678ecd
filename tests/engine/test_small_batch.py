"""Small circuits in bulk (engine/small_batch.py) end to end, without a GPU.

The GPU device is the NumPy-backed CuPy stand-in of test_gpu_plumbing.py, and
its kernels are the real ``.cu`` file compiled for the host (the emulation of
test_kernels_compile.py), so ``run_small_circuits`` really runs: the counts
of the bulk path are checked against the one-circuit-at-a-time path (on the
CPU, and on the same emulated GPU), launches are counted, cancel and
admission are exercised, and circuits the kernel does not take keep their
place in the job. The stand-in reports an H200's opt-in shared memory per
block (227 KiB) unless a test says otherwise, through the kernels' real probe.

The emulated kernels' barriers are process-global: everything here runs them
from one thread at a time.
"""

from __future__ import annotations

import sys
import threading
import time
import types

import numpy as np
import pytest
from qiskit import QuantumCircuit

from benchmarks.batch import random_circuit
from gpu_provider import GPUSimulator
from gpu_provider.engine import devices, executor, kernels, small_batch
from gpu_provider.engine.executor import Execution, RunConfig, run_program
from gpu_provider.engine.program import (
    Diagonal,
    GlobalPhase,
    Initialize,
    Measure,
    Program,
    Reset,
    Unitary,
)
from gpu_provider.errors import InvalidInputError, InvalidOptionError, JobCancelledError
from tests.engine import test_kernels_gpu as gpu_checks
from tests.engine.test_gpu_plumbing import SHARED_OPTIN_ATTRIBUTE, make_fake_cupy
from tests.engine.test_kernels_compile import EmulatedKernels, emulated_library  # noqa: F401  (a fixture)

SMALL_NAME = {"double": "run_small_circuits<double, 13>", "single": "run_small_circuits<float, 14>"}
REAL = {"double": "double", "single": "float"}


def random_u_cx(n: int, layers: int, seed: int) -> QuantumCircuit:
    """The workload of issue 11 (``benchmarks.batch``): layers of random ``u`` on every qubit and ``cx`` on neighbours, then measure_all."""
    qc = random_circuit(n, layers, np.random.default_rng(seed))
    qc.name = f"u_cx_{seed}"
    return qc


def _install_emulated_gpu(monkeypatch, library, **fake_options) -> dict:
    monkeypatch.setitem(sys.modules, "cupy", make_fake_cupy(**fake_options))
    # shared_optin=None: the kernels ask the real probe, which asks the stand-in.
    built = {
        np.dtype(np.complex128): EmulatedKernels(np.complex128, library, resident_blocks=4, shared_optin=None),
        np.dtype(np.complex64): EmulatedKernels(np.complex64, library, resident_blocks=4, shared_optin=None),
    }
    monkeypatch.setattr(kernels, "kernels_for", lambda dtype: built[np.dtype(dtype)])
    devices.reset_probe()
    return {"double": built[np.dtype(np.complex128)], "single": built[np.dtype(np.complex64)]}


@pytest.fixture
def emulated_gpu(monkeypatch, emulated_library):  # noqa: F811
    """A fake GPU (an H200's shared memory) whose kernels are the host-compiled .cu file; yields {precision: EmulatedKernels}."""
    yield _install_emulated_gpu(monkeypatch, emulated_library)
    devices.reset_probe()


@pytest.fixture
def default_shared_gpu(monkeypatch, emulated_library):  # noqa: F811
    """The same, on a device that gives a block only the default 48 KiB of shared memory."""
    yield _install_emulated_gpu(monkeypatch, emulated_library, shared_optin=48 << 10)
    devices.reset_probe()


def _gpu():
    device, _ = devices.resolve_device("GPU", 0)
    return device


def _small_launches(kernels_by_precision) -> int:
    return sum(name.startswith("run_small_circuits") for k in kernels_by_precision.values() for name in k.launched)


def _clear(kernels_by_precision) -> None:
    for k in kernels_by_precision.values():
        k.launched.clear()


# ---------------------------------------------------------------------------
# Eligibility and packing (no kernel runs)


def _program(ops, n=3, name="p") -> Program:
    return Program(n, n, tuple(ops), name=name)


H = np.array([[1, 1], [1, -1]], dtype=np.complex128) / np.sqrt(2)


def test_eligibility(emulated_gpu):
    gpu = _gpu()
    cpu, _ = devices.resolve_device("CPU")
    double, single = RunConfig(precision="double"), RunConfig(precision="single")
    good = _program([Unitary((0,), H), Unitary((1,), H, controls=(0, 2), ctrl_state=1), Diagonal((0, 2), np.ones(4)), GlobalPhase(0.2), Measure(0, 0)])
    assert small_batch.eligible(good, double, gpu) and small_batch.eligible(good, single, gpu)
    assert not small_batch.eligible(good, double, cpu)  # the CPU has no kernels: its path is unchanged
    mid_measure = _program([Measure(0, 0), Unitary((0,), H)])
    with_reset = _program([Unitary((0,), H), Reset(1)])
    initialize = _program([Initialize((0,), np.array([0, 1], dtype=complex))])
    wide_gate = _program([Unitary(tuple(range(6)), np.eye(64))], n=6)
    for program in (mid_measure, with_reset, initialize, wide_gate):
        assert not small_batch.eligible(program, double, gpu), program.ops
    # Width, on an H200's 227 KiB of shared memory per block: 14 qubits in single, 13 in double.
    thirteen = _program([Unitary((12,), H)], n=13)
    fourteen = _program([Unitary((13,), H)], n=14)
    assert small_batch.eligible(fourteen, single, gpu) and not small_batch.eligible(fourteen, double, gpu)
    assert small_batch.eligible(thirteen, double, gpu)
    assert not small_batch.eligible(_program([Unitary((14,), H)], n=15), single, gpu)


def test_plan_keeps_order_and_splits_at_ineligible_and_precision(emulated_gpu):
    gpu = _gpu()
    ok = _program([Unitary((0,), H), Measure(0, 0)])
    bad = _program([Measure(0, 0), Unitary((0,), H)])
    double, single = RunConfig(precision="double"), RunConfig(precision="single")
    items = [(ok, double), (ok, double), (bad, double), (ok, double), (ok, single), (bad, double), (bad, double)]
    runs = small_batch.plan(gpu, items)
    assert [(r.start, r.stop, r.batched) for r in runs] == [(0, 2, True), (2, 3, False), (3, 4, True), (4, 5, True), (5, 7, False)]
    size = small_batch.estimated_bytes(ok, 16)
    assert runs[0].chunks == (small_batch.Chunk((0, 1), 2 * size),) and runs[1].chunks == ()
    assert small_batch.reserve_bytes(runs) == 2 * size + executor.WORKSPACE_BYTES
    assert small_batch.reserve_bytes(small_batch.plan(gpu, [(bad, double)])) == 0


def test_pack_layout_and_shared_matrices():
    x = np.array([[0, 1], [1, 0]], dtype=np.complex128)
    ops = [Unitary((2,), x), Unitary((0, 2), np.kron(x, H)), Unitary((1,), x, controls=(0, 2), ctrl_state=2), Diagonal((1,), np.array([1, 1j])), GlobalPhase(0.5)]
    programs = [_program(ops + [Measure(0, 0)], name="a"), _program(ops, n=4, name="b")]
    packed = small_batch.pack(programs, np.complex64)
    headers = packed.headers.reshape(-1, kernels.SMALL_HEADER_WORDS)
    assert headers.tolist() == [[0, 5, 3, 0], [5, 5, 4, 8]]  # first op, op count, qubits, amplitude offset
    assert packed.amplitudes == 8 + 16 and packed.num_qubits == 4 and packed.offsets == [0, 8]
    words = packed.ops.reshape(-1, kernels.SMALL_OP_WORDS)
    assert words[1].tolist()[:3] == [kernels.SMALL_MATRIX | 2 << 8, kernels.pack_bits([0, 2]), kernels.pack_bits([0, 2])]
    assert words[2].tolist()[4:] == [0b101, 0b100]  # controls 0 and 2, ctrl_state bit 1 -> qubit 2 set
    assert words[3, 0] == kernels.SMALL_DIAGONAL | 1 << 8 and words[4, 0] == kernels.SMALL_PHASE
    # Both programs share the ops' arrays, and two ops share x: the pool holds each once (4 + 16 + 2 + 1 entries).
    assert packed.pool.size == 23 and packed.pool.dtype == np.complex64
    assert words[0, 3] == words[2, 3]
    assert (words[:5, 3] == words[5:, 3]).all()
    assert packed.device_bytes == (headers.size + words.size) * 8 + (23 + 24) * 8


def test_pack_refuses_what_the_kernel_cannot_run():
    with pytest.raises(InvalidInputError, match="cannot run"):
        small_batch.pack([_program([Unitary(tuple(range(6)), np.eye(64))], n=6)], np.complex128)
    with pytest.raises(InvalidInputError, match="1 to 13 qubits"):
        small_batch.pack([_program([Unitary((0,), H)], n=14)], np.complex128)
    with pytest.raises(InvalidInputError, match="1 to 14 qubits"):
        small_batch.pack([_program([Unitary((0,), H)], n=15)], np.complex64)
    with pytest.raises(InvalidInputError, match="shape"):
        small_batch.pack([_program([Unitary((0, 1), H)])], np.complex128)
    with pytest.raises(InvalidInputError, match="cannot run"):
        small_batch.pack([_program([Unitary((5,), H)])], np.complex128)  # a qubit outside the state


def test_chunks_stay_within_their_bytes(emulated_gpu):
    gpu = _gpu()
    program = _program([Unitary((0,), H)] * 3, n=10)
    items = [(program, RunConfig())] * 10
    each = small_batch.estimated_bytes(program, 16)
    assert each == (4 + 3 * 6) * 8 + (1024 + 3 * 4) * 16
    chunks = small_batch.plan(gpu, items, limit=3 * each)[0].chunks
    Chunk = small_batch.Chunk
    assert chunks == (Chunk((0, 1, 2), 3 * each), Chunk((3, 4, 5), 3 * each), Chunk((6, 7, 8), 3 * each), Chunk((9,), each))
    assert [c.indices for c in small_batch.plan(gpu, items, limit=1)[0].chunks] == [(i,) for i in range(10)]  # one at least
    assert small_batch.plan(gpu, items)[0].chunks == (Chunk(tuple(range(10)), 10 * each),)
    with pytest.raises(InvalidInputError, match="cannot run"):
        small_batch.estimated_bytes(_program([Reset(0)]), 16)


# ---------------------------------------------------------------------------
# End to end on the emulated GPU


@pytest.mark.parametrize("precision", ["double", "single"])
def test_bulk_counts_match_the_one_at_a_time_path(emulated_gpu, precision):
    circuits = [random_u_cx(n, 3, seed) for seed, n in enumerate([1, 2, 3, 5, 6, 4, 3, 2])]
    options = {"shots": 1024, "seed_simulator": 11, "precision": precision, "memory": True}
    _clear(emulated_gpu)
    bulk = GPUSimulator(device="GPU").run(circuits, **options).result()
    assert _small_launches(emulated_gpu) == 1
    cpu = GPUSimulator(device="CPU").run(circuits, **options).result()
    one_at_a_time = GPUSimulator(device="GPU").run(circuits[:3], batch_small_circuits=False, **options).result()
    same = sum(bulk.get_counts(i) == cpu.get_counts(i) for i in range(len(circuits)))
    # The same seed, sampling code and random stream: equal counts up to rounding of the probabilities.
    assert same >= len(circuits) - (0 if precision == "double" else 1)
    for i in range(3):
        assert bulk.get_counts(i) == one_at_a_time.get_counts(i)
        assert bulk.get_memory(i) == one_at_a_time.get_memory(i)
        assert sorted(bulk.results[i].metadata) == sorted(one_at_a_time.results[i].metadata)
    assert bulk.results[0].metadata["device"] == "GPU:0" and bulk.results[0].metadata["measure_sampling"]


def test_circuits_for_the_bulk_kernel_are_not_fused(emulated_gpu):
    # The bulk kernel applies gates in shared memory; fusing them would only cost host time.
    circuits = [random_u_cx(5, 6, seed) for seed in range(4)]
    wide = random_u_cx(15, 2, 9)  # wider than the kernel holds: fused, one at a time
    options = {"shots": 256, "seed_simulator": 4, "precision": "double"}
    bulk = GPUSimulator(device="GPU").run(circuits + [wide], **options).result()
    one_at_a_time = GPUSimulator(device="GPU").run(circuits + [wide], batch_small_circuits=False, **options).result()
    cpu = GPUSimulator(device="CPU").run(circuits + [wide], **options).result()
    for i in range(len(circuits)):
        meta, other = bulk.results[i].metadata, one_at_a_time.results[i].metadata
        assert meta["fusion_ops_after"] == meta["fusion_ops_before"] == other["fusion_ops_before"]
        assert other["fusion_ops_after"] < other["fusion_ops_before"]
        assert bulk.get_counts(i) == one_at_a_time.get_counts(i) == cpu.get_counts(i)
    assert bulk.results[4].metadata["fusion_ops_after"] < bulk.results[4].metadata["fusion_ops_before"]
    assert bulk.get_counts(4) == cpu.get_counts(4)


def test_run_checks_each_circuit_for_the_bulk_kernel_once(emulated_gpu, monkeypatch):
    # run() finds each circuit's bulk bytes while it decides on fusion and hands them to plan().
    circuits = [random_u_cx(3, 2, seed) for seed in range(6)]
    calls = []
    real = small_batch.eligible_bytes

    def counted(program, config, device):
        calls.append(program.name)
        return real(program, config, device)

    monkeypatch.setattr(small_batch, "eligible_bytes", counted)
    result = GPUSimulator(device="GPU", precision="double").run(circuits, shots=32, seed_simulator=2).result()
    assert sorted(calls) == sorted(c.name for c in circuits)
    assert all(result.results[i].metadata["fusion_ops_after"] == result.results[i].metadata["fusion_ops_before"] for i in range(6))
    # Given the sizes, plan() cuts the same runs as without them.
    from gpu_provider.compiler.translate import translate

    gpu = _gpu()
    items = [(translate(c), RunConfig(precision="double")) for c in circuits]
    sizes = [real(program, config, gpu) for program, config in items]
    assert small_batch.plan(gpu, items, sizes=sizes) == small_batch.plan(gpu, items)
    assert small_batch.plan(gpu, items, sizes=[None] * len(items)) == small_batch.plan(gpu, items)


def test_two_hundred_circuits_take_a_handful_of_launches(emulated_gpu):
    circuits = [random_u_cx(4, 4, seed) for seed in range(200)]
    _clear(emulated_gpu)
    result = GPUSimulator(device="GPU", precision="single").run(circuits, shots=64, seed_simulator=3).result()
    launched = emulated_gpu["single"].launched
    assert launched == [SMALL_NAME["single"]]  # one launch for all 200 (one chunk), no per-gate kernel
    assert all(sum(result.get_counts(i).values()) == 64 for i in range(200))
    cpu = GPUSimulator(device="CPU", precision="single").run(circuits[:20], shots=64, seed_simulator=3).result()
    assert sum(result.get_counts(i) == cpu.get_counts(i) for i in range(20)) >= 19


def test_executor_workers_on_a_gpu_run_small_circuits_in_bulk(emulated_gpu):
    from concurrent.futures import ThreadPoolExecutor

    circuits = [random_u_cx(4, 4, seed) for seed in range(40)]
    mid = QuantumCircuit(2, 2)  # mid-circuit measurement: one at a time, in its place
    mid.h(0)
    mid.measure(0, 0)
    mid.cx(0, 1)
    mid.measure(1, 1)
    circuits.insert(7, mid)
    backend = GPUSimulator(device="GPU", precision="single", shots=64)
    local = backend.run(circuits, seed_simulator=5).result()
    _clear(emulated_gpu)
    with ThreadPoolExecutor(1) as pool:  # one worker thread: the emulated kernels share one set of barriers
        remote = backend.run(circuits, seed_simulator=5, executor=pool, max_job_size=10).result()
        launched = list(emulated_gpu["single"].launched)
        _clear(emulated_gpu)
        one_by_one = backend.run(circuits, seed_simulator=5, executor=pool, max_job_size=10, batch_small_circuits=False).result()
        assert not any(name.startswith("run_small_circuits") for name in emulated_gpu["single"].launched)
    # Five chunks of 8-9 circuits: one bulk launch each, and one more where the mid-circuit one splits its chunk.
    assert 5 <= launched.count(SMALL_NAME["single"]) <= 6
    for i in range(len(circuits)):
        assert remote.get_counts(i) == local.get_counts(i) == one_by_one.get_counts(i)
        assert remote.results[i].metadata["device"] == "GPU:0" and "worker" in remote.results[i].metadata


def test_chunks_are_launches_and_progress(emulated_gpu, monkeypatch):
    circuits = [random_u_cx(3, 2, seed) for seed in range(12)]
    monkeypatch.setattr(small_batch, "CHUNK_BYTES", 1)  # one circuit per chunk
    _clear(emulated_gpu)
    job = GPUSimulator(device="GPU").run(circuits, shots=16, seed_simulator=1)
    result = job.result()
    assert _small_launches(emulated_gpu) == 12
    assert job._execution._ops_enqueued == job._execution.ops_total  # every chunk advanced the progress
    assert len(result.results) == 12


def test_ineligible_circuits_in_the_middle_keep_their_place(emulated_gpu):
    mid = QuantumCircuit(2, 2, name="mid_measure")
    mid.h(0)
    mid.measure(0, 0)
    mid.cx(0, 1)
    mid.measure(1, 1)
    wide = QuantumCircuit(14, name="fourteen")
    wide.h(0)
    for q in range(13):
        wide.cx(q, q + 1)
    wide.measure_all()
    circuits = [random_u_cx(3, 2, 1), random_u_cx(4, 2, 2), mid, wide, random_u_cx(2, 2, 3)]
    # The mid-circuit one runs through the interpreter, as on the CPU (its shots in bulk: test_small_shots.py).
    options = {"shots": 64, "seed_simulator": 21, "precision": "double", "batched_shots_gpu": False}
    _clear(emulated_gpu)
    bulk = GPUSimulator(device="GPU").run(circuits, **options).result()
    launched = emulated_gpu["double"].launched
    assert launched.count(SMALL_NAME["double"]) == 2  # before and after the two that run one at a time
    assert len(launched) > 2  # those two went through the per-gate kernels
    cpu = GPUSimulator(device="CPU").run(circuits, **options).result()
    assert [r.header["name"] for r in bulk.results] == [c.name for c in circuits]
    for i in range(len(circuits)):
        assert bulk.get_counts(i) == cpu.get_counts(i), i
    assert set(bulk.get_counts(2)) <= {"00", "11"} and set(bulk.get_counts(3)) <= {"0" * 14, "1" * 14}


def test_statevector_and_no_clbits_through_the_bulk_path(emulated_gpu):
    qc = random_u_cx(3, 3, 7)
    bare = qc.remove_final_measurements(inplace=False)
    bare.name = "bare"
    _clear(emulated_gpu)
    bulk = GPUSimulator(device="GPU").run([qc, bare], statevector=True, shots=32, seed_simulator=2).result()
    assert _small_launches(emulated_gpu) == 1
    cpu = GPUSimulator(device="CPU").run([qc, bare], statevector=True, shots=32, seed_simulator=2).result()
    for i in range(2):
        np.testing.assert_allclose(np.asarray(bulk.data(i)["statevector"]), np.asarray(cpu.data(i)["statevector"]), atol=1e-12)
    assert bulk.get_counts(0) == cpu.get_counts(0)
    assert bulk.data(1)["counts"] == {}  # no classical bits: nothing recorded, as BasicSimulator


def test_cancel_between_chunks(emulated_gpu, monkeypatch):
    circuits = [random_u_cx(3, 2, seed) for seed in range(6)]
    monkeypatch.setattr(small_batch, "CHUNK_BYTES", 1)  # one circuit per chunk
    started, cancelled = threading.Event(), threading.Event()
    launch = small_batch.final_amplitudes

    def first_waits(*args, **kwargs):
        started.set()
        assert cancelled.wait(10)
        return launch(*args, **kwargs)

    monkeypatch.setattr(small_batch, "final_amplitudes", first_waits)
    _clear(emulated_gpu)
    job = GPUSimulator(device="GPU").run(circuits, shots=16)
    assert started.wait(10)
    canceller = threading.Thread(target=job.cancel)  # cancel() waits for the running job to stop
    canceller.start()
    while not job._execution.cancel_requested:
        time.sleep(0.001)
    cancelled.set()  # the first chunk goes on; the next chunk's checkpoint sees the cancel
    canceller.join(10)
    job.wait_for_final_state(timeout=10)
    assert job.status().name == "CANCELLED"
    assert _small_launches(emulated_gpu) == 1  # the chunk under way finished, no other started


def test_engine_cancel_and_typed_errors(emulated_gpu, monkeypatch):
    gpu = _gpu()
    ok = _program([Unitary((0,), H), Measure(0, 0)])
    config = RunConfig(shots=8)
    execution = Execution(gpu, 10, lambda e: None)
    execution.request_cancel()
    with pytest.raises(JobCancelledError):
        small_batch.run_small_batch([(ok, config)] * 3, gpu, execution)
    with pytest.raises(InvalidInputError, match="cannot run through the bulk kernel"):
        small_batch.run_small_batch([(_program([Measure(0, 0), Unitary((0,), H)]), config)], gpu)
    with pytest.raises(InvalidInputError, match="one precision"):
        small_batch.run_small_batch([(ok, config), (ok, RunConfig(precision="single"))], gpu)
    cpu, _ = devices.resolve_device("CPU")
    with pytest.raises(InvalidInputError, match="needs a GPU"):
        small_batch.final_amplitudes([ok], cpu, np.complex128)
    assert small_batch.run_small_batch([], gpu) == []
    # Without a dispatcher's reservation a chunk is checked against free memory.
    monkeypatch.setattr(type(gpu), "memory_capacity", lambda self: 1024)
    with pytest.raises(Exception, match="bulk launch"):
        small_batch.run_small_batch([(ok, config)], gpu)


def test_engine_output_is_run_programs(emulated_gpu):
    """run_small_batch gives what run_program gives for the same program and seed on the same device."""
    gpu = _gpu()
    rng = np.random.default_rng(4)
    for n in (1, 4, 7):
        program, _ = gpu_checks.random_small_program(rng, n, 10)
        config = RunConfig(shots=500, seed=9, memory=True)
        bulk = small_batch.run_small_batch([(program, config)], gpu)[0]
        single = run_program(program, gpu, config)
        assert bulk.counts == single.counts and bulk.memory == single.memory
        assert set(bulk.metadata) == set(single.metadata)


def test_admission_reserves_the_bulk_buffers(emulated_gpu):
    circuits = [random_u_cx(10, 2, seed) for seed in range(40)]
    gpu = _gpu()
    backend = GPUSimulator(device="GPU", precision="single", shots=8, seed_simulator=1)
    job = backend.run(circuits)
    job.result()
    items = [(program, config) for _, program, config, _ in backend._prepare(circuits, dict(backend.options.__dict__)).experiments]
    reserved = small_batch.reserve_bytes(small_batch.plan(gpu, items))
    assert reserved >= 40 * (1 << 10) * 8 + executor.WORKSPACE_BYTES  # 40 states of 2^10 complex64 at least
    assert job._execution.reserve_bytes >= reserved
    # More than any one circuit's own run would reserve: the batch's buffers are what admission must count.
    assert max(executor.memory_needed(program, config, gpu) for program, config in items) < reserved


def test_the_option_is_validated_and_turns_the_path_off(emulated_gpu):
    with pytest.raises(InvalidOptionError, match="batch_small_circuits"):
        GPUSimulator(device="GPU", batch_small_circuits="yes")
    _clear(emulated_gpu)
    GPUSimulator(device="GPU").run(random_u_cx(2, 1, 0), batch_small_circuits=False, shots=8).result()
    assert _small_launches(emulated_gpu) == 0


# ---------------------------------------------------------------------------
# Wider circuits: dynamic shared memory past 48 KiB, width classes, the device's limit


def test_plan_groups_each_run_by_width_class(emulated_gpu):
    """Widths that fit the default 48 KiB share chunks; each wider one gets its own, so a 14-qubit
    circuit never sets the shared memory of a launch of narrow ones. Chunks go by first circuit."""
    gpu = _gpu()
    single, double = RunConfig(precision="single"), RunConfig(precision="double")
    widths = [3, 13, 5, 14, 12, 2, 13, 14]
    items = [(_program([Unitary((n - 1,), H)], n=n, name=f"w{n}"), single) for n in widths]
    assert [small_batch.width_class(p, c) for p, c in items] == [12, 13, 12, 14, 12, 12, 13, 14]
    (run,) = small_batch.plan(gpu, items)
    assert run.batched and [chunk.indices for chunk in run.chunks] == [(0, 2, 4, 5), (1, 6), (3, 7)]
    sizes = [small_batch.estimated_bytes(p, 8) for p, _ in items]
    assert [chunk.bytes for chunk in run.chunks] == [sum(sizes[i] for i in chunk.indices) for chunk in run.chunks]
    # A byte limit cuts within a class, in order.
    (run,) = small_batch.plan(gpu, items, limit=max(sizes))
    assert [chunk.indices for chunk in run.chunks] == [(0, 2, 4, 5), (1,), (3,), (6,), (7,)]
    assert small_batch.reserve_bytes([run]) == max(chunk.bytes for chunk in run.chunks) + executor.WORKSPACE_BYTES
    doubles = [(_program([Unitary((0,), H)], n=n), double) for n in (11, 12, 4, 13)]
    (run,) = small_batch.plan(gpu, doubles)
    assert [chunk.indices for chunk in run.chunks] == [(0, 2), (1,), (3,)]


@pytest.mark.parametrize("precision", ["double", "single"])
def test_wide_circuits_run_in_bulk_with_the_one_at_a_time_counts(emulated_gpu, precision):
    """12- and 13-qubit complex128, 13- and 14-qubit complex64 circuits: one bulk launch per width
    class, no per-gate kernel, and for a seed the counts and memory of batch_small_circuits=False."""
    real = REAL[precision]
    wide = list(range(kernels.SMALL_DEFAULT_QUBITS[real] + 1, kernels.SMALL_MAX_QUBITS[real] + 1))
    circuits = [random_u_cx(n, 2, seed) for seed, n in enumerate(wide + wide[:1])]
    options = {"shots": 256, "seed_simulator": 17, "precision": precision, "memory": True}
    _clear(emulated_gpu)
    bulk = GPUSimulator(device="GPU").run(circuits, **options).result()
    assert emulated_gpu[precision].launched == [SMALL_NAME[precision]] * len(wide)
    function = emulated_gpu[precision]._functions[SMALL_NAME[precision]]
    assert function.attribute_sets == [kernels.small_shared_bytes(real, kernels.SMALL_MAX_QUBITS[real])]  # raised once
    one_at_a_time = GPUSimulator(device="GPU").run(circuits, batch_small_circuits=False, **options).result()
    assert SMALL_NAME[precision] not in emulated_gpu[precision].launched[len(wide) :]
    for i in range(len(circuits)):
        assert bulk.get_counts(i) == one_at_a_time.get_counts(i), i
        assert bulk.get_memory(i) == one_at_a_time.get_memory(i), i
        assert bulk.results[i].header["name"] == circuits[i].name


def test_mixed_widths_keep_the_jobs_order(emulated_gpu):
    """Narrow and wide circuits interleaved, with one that runs one at a time in the middle: three
    launches (one per width class on each side of it... here classes 12 and 13, then 12 and 14), and
    every result in the job's order with the counts batch_small_circuits=False gives."""
    mid = QuantumCircuit(2, 2, name="mid_measure")
    mid.h(0)
    mid.measure(0, 0)
    mid.cx(0, 1)
    mid.measure(1, 1)
    circuits = [random_u_cx(n, 1, seed) for seed, n in enumerate([3, 13, 5, 12])] + [mid]
    circuits += [random_u_cx(n, 1, 10 + seed) for seed, n in enumerate([14, 2, 4])]
    options = {"shots": 128, "seed_simulator": 23, "precision": "single"}
    gpu = _gpu()
    backend = GPUSimulator(device="GPU")
    items = [(program, config) for _, program, config, _ in backend._prepare(circuits, dict(backend.options.__dict__, **options)).experiments]
    runs = small_batch.plan(gpu, items)
    assert [(r.start, r.stop, r.batched) for r in runs] == [(0, 4, True), (4, 5, False), (5, 8, True)]
    assert [c.indices for c in runs[0].chunks] == [(0, 2, 3), (1,)] and [c.indices for c in runs[2].chunks] == [(0,), (1, 2)]
    _clear(emulated_gpu)
    bulk = backend.run(circuits, **options).result()
    assert emulated_gpu["single"].launched.count(SMALL_NAME["single"]) == 4
    one_at_a_time = backend.run(circuits, batch_small_circuits=False, **options).result()
    assert [r.header["name"] for r in bulk.results] == [c.name for c in circuits]
    for i, circuit in enumerate(circuits):
        assert bulk.get_counts(i) == one_at_a_time.get_counts(i), i
        assert sum(bulk.get_counts(i).values()) == 128 and len(next(iter(bulk.get_counts(i)))) == circuit.num_clbits


def test_the_device_limit_is_probed_lazily_once_per_device(emulated_gpu):
    queries = sys.modules["cupy"].cuda.runtime.attribute_queries
    assert queries == []  # nothing asks before a job plans
    gpu = _gpu()
    assert queries == []
    for precision in ("single", "double"):
        GPUSimulator(device="GPU", precision=precision).run([random_u_cx(12, 1, 0), random_u_cx(4, 1, 1)], shots=8).result()
    assert emulated_gpu["double"].small_max_qubits(0) == 13 and emulated_gpu["single"].small_max_qubits(0) == 14
    assert small_batch.eligible(_program([Unitary((0,), H)], n=13), RunConfig(precision="double"), gpu)
    assert queries == [(SHARED_OPTIN_ATTRIBUTE, 0)]  # one question for the device, both precisions, every job
    devices.reset_probe()  # forgets it with the rest of the probe
    assert emulated_gpu["single"].small_max_qubits(0) == 14
    assert queries == [(SHARED_OPTIN_ATTRIBUTE, 0)] * 2


def test_a_device_with_only_the_default_shared_memory_keeps_12_and_11(default_shared_gpu):
    """48 KiB per block: 12 qubits in complex64 and 11 in complex128 stay in bulk, one qubit more runs
    one at a time, and the kernel's shared-memory limit is never raised."""
    gpu = _gpu()
    for precision, default in (("single", 12), ("double", 11)):
        config = RunConfig(precision=precision)
        assert default_shared_gpu[precision].small_max_qubits(0) == default
        assert small_batch.eligible(_program([Unitary((0,), H)], n=default), config, gpu)
        assert not small_batch.eligible(_program([Unitary((0,), H)], n=default + 1), config, gpu)
        circuits = [random_u_cx(default, 1, 3), random_u_cx(default + 1, 1, 4)]
        _clear(default_shared_gpu)
        bulk = GPUSimulator(device="GPU", precision=precision).run(circuits, shots=64, seed_simulator=2).result()
        launched = default_shared_gpu[precision].launched
        assert launched.count(SMALL_NAME[precision]) == 1 and len(launched) > 1  # the wider one took the per-gate kernels
        assert default_shared_gpu[precision]._functions[SMALL_NAME[precision]].attribute_sets == []
        cpu = GPUSimulator(device="CPU", precision="double").run(circuits, shots=64, seed_simulator=2).result()
        assert sum(bulk.get_counts(i) == cpu.get_counts(i) for i in range(2)) >= (2 if precision == "double" else 1)
    with pytest.raises(InvalidInputError, match="at most 12 qubits"):
        small_batch.final_amplitudes([_program([Unitary((0,), H)], n=13)], gpu, np.complex64)


class _RecordedRawKernel:
    """What Kernels uses of a cupy.RawKernel: launches, ``max_dynamic_shared_size_bytes`` and ``kernel.ptr``."""

    def __init__(self) -> None:
        self.kernel = types.SimpleNamespace(ptr=42)
        self.limits: list[int] = []
        self.launches: list[tuple] = []

    @property
    def max_dynamic_shared_size_bytes(self) -> int:
        return self.limits[-1] if self.limits else 48 << 10

    @max_dynamic_shared_size_bytes.setter
    def max_dynamic_shared_size_bytes(self, value: int) -> None:
        self.limits.append(value)

    def __call__(self, grid, block, args, shared_mem=0) -> None:
        self.launches.append((grid, block, args, shared_mem))


@pytest.mark.parametrize("optin, widest", [(227 << 10, 14), (96 << 10, 13)])
def test_the_launch_raises_the_limit_once_and_sizes_the_grid_for_its_shared_memory(monkeypatch, optin, widest):
    """The real Kernels plumbing against the CuPy stand-in: the attribute is set once per device to what
    its widest circuit takes, before the occupancy query, which gets each launch's dynamic shared memory."""
    fake = make_fake_cupy(shared_optin=optin)
    occupancy: list[tuple] = []

    def blocks_per_sm(ptr, block, shared):
        occupancy.append((ptr, block, shared))
        return 1 if shared > 64 << 10 else 3

    fake.cuda.driver = types.SimpleNamespace(occupancyMaxActiveBlocksPerMultiprocessor=blocks_per_sm)
    monkeypatch.setitem(sys.modules, "cupy", fake)
    devices.reset_probe()
    function = _RecordedRawKernel()

    class Recorded(kernels.Kernels):
        def _function(self, name):
            assert name == "run_small_circuits<float, 14>"
            return function

        def _device_id(self, state) -> int:
            return 0

    planned = Recorded(np.complex64)
    assert planned.small_max_qubits(0) == widest

    def launch(n: int, circuits: int) -> tuple:
        headers = np.array([0, 0, n, 0] * circuits, dtype=np.uint64)
        out = np.zeros(1 << n, dtype=np.complex64)
        planned.run_small_circuits(out, headers, np.zeros(0, dtype=np.uint64), np.zeros(1, dtype=np.complex64), n)
        return function.launches[-1]

    grid, block, args, shared = launch(13, 500)
    assert function.limits == [(1 << widest) * 8]  # raised to the device's widest, once
    assert (block, shared, args[-1]) == ((256,), 64 << 10, np.int32(13)) and type(args[-1]) is np.int32
    assert grid == (min(500, 3 * 132),) and occupancy[-1] == (42, 256, 64 << 10)
    if widest == 14:
        grid, block, args, shared = launch(14, 500)
        assert (grid, block, shared) == ((132,), (512,), 128 << 10) and occupancy[-1] == (42, 512, 128 << 10)
    else:
        with pytest.raises(InvalidInputError, match="at most 13 qubits"):
            launch(14, 1)
    grid, block, args, shared = launch(4, 2)
    assert (grid, block, shared) == ((2,), (32,), 16 * 8) and occupancy[-1] == (42, 32, 128)
    launch(13, 500)
    assert function.limits == [(1 << widest) * 8] and len(occupancy) == (3 if widest == 14 else 2)  # both cached
    devices.reset_probe()
