"""Shots of small dynamic circuits, one per block: ``run_small_shots`` and engine/small_shots.py.

The kernel is the real ``.cu`` file compiled for the host (the emulation of
test_kernels_compile.py); the GPU is the NumPy-backed CuPy stand-in. Oracles:
NumPy's own Philox bit generator for the kernel's draws, shot by shot; exact
outcome distributions where they are known; Qiskit Aer otherwise. The
emulated kernel runs a block's threads as host threads, so shot counts here
are a few hundred.
"""

from __future__ import annotations

import numpy as np
import pytest
from qiskit import ClassicalRegister, QuantumCircuit, QuantumRegister
from qiskit.circuit.classical import expr

from gpu_provider import GPUSimulator
from gpu_provider.engine import kernels as K
from gpu_provider.engine import small_shots
from gpu_provider.engine.program import (
    Binary,
    Bits,
    Const,
    ExprOp,
    IfElse,
    Measure,
    Program,
    Store,
    Unitary,
    Var,
    WhileLoop,
)
from gpu_provider.errors import IterationLimitError
from tests.engine.test_kernels_compile import EmulatedKernels, emulated_library  # noqa: F401  (a fixture)
from tests.engine.test_small_batch import emulated_gpu  # noqa: F401  (a fixture)
from tests.helpers import aer_counts, assert_counts_agree, assert_counts_match
from tests.test_shot_branching import loops_and_switch, syndrome_rounds, teleport

H = np.array([[1, 1], [1, -1]], dtype=complex) / np.sqrt(2)
SHOTS_NAME = {"double": "run_small_shots<double, 13>", "single": "run_small_shots<float, 14>"}


def philox_first(key: tuple[int, int], draw: int, shot: int) -> int:
    """Philox4x64-10's first word for counter (draw, shot, 0, 0): NumPy's bit generator steps
    its counter before each block, so it starts one below."""
    counter = (draw | shot << 64) - 1
    words = [(counter >> (64 * i)) & ((1 << 64) - 1) for i in range(4)]
    generator = np.random.Philox(counter=np.array(words, dtype=np.uint64), key=np.array(key, dtype=np.uint64))
    return int(generator.random_raw(1)[0])


def uniform(key, draw, shot) -> float:
    return (philox_first(key, draw, shot) >> 11) * 2.0**-53


def _program(ops, n=1, clbits=2, name="p") -> Program:
    return Program(num_qubits=n, num_clbits=clbits, ops=tuple(ops), name=name)


def _run_flat(xp, kernels, program, shots, key, first=0, max_iterations=1000):
    flat = small_shots.flatten(program, kernels.dtype)
    assert flat is not None
    out = xp.zeros((flat.clbit_words + 1) * shots, dtype=np.uint64)
    ops, pool, words = xp.asarray(flat.ops), xp.asarray(flat.pool), xp.asarray(flat.words)
    kernels.run_small_shots(out, ops, pool, words, flat.num_qubits, flat.clbit_words, first, shots, key, max_iterations)
    host = out.get() if hasattr(out, "get") else out
    return host.reshape(shots, flat.clbit_words + 1)


def check_philox_draws(xp, kernels, shots: int = 24) -> None:
    """Each shot's outcomes are its Philox uniforms (draw, shot) against p1, whatever the launch's shots."""
    h = Unitary((0,), H.astype(kernels.dtype))
    program = _program([h, Measure(0, 0), h, Measure(0, 1)])
    key = (0x0123456789ABCDEF, 0xFEDCBA9876543210)
    rows = _run_flat(xp, kernels, program, shots, key)
    later = _run_flat(xp, kernels, program, shots - shots // 3, key, first=shots // 3)  # a shot's draws do not depend on the launch
    assert (rows[shots // 3 :] == later).all()
    assert not rows[:, 1].any()  # status
    checked = 0
    for shot in range(shots):
        expected = 0
        for draw in range(2):
            u = uniform(key, draw, shot)
            if abs(u - 0.5) < 1e-6:  # p1 is 0.5 up to rounding
                break
            expected |= (u < 0.5) << draw
        else:
            assert int(rows[shot, 0]) == expected, shot
            checked += 1
    assert checked >= shots * 0.8


@pytest.mark.parametrize("precision", ["double", "single"])
def test_each_shot_draws_numpys_philox_by_draw_and_shot(emulated_library, precision):  # noqa: F811
    dtype = np.complex128 if precision == "double" else np.complex64
    check_philox_draws(np, EmulatedKernels(dtype, emulated_library, resident_blocks=3))


def test_flatten_refuses_what_the_kernel_cannot_hold():
    x = Unitary((0,), np.array([[0, 1], [1, 0]], dtype=complex))
    assert small_shots.flatten(_program([x, Measure(0, 0)]), np.complex128) is not None
    # A stored variable, a condition on a variable, an ordering comparison: the interpreter's.
    assert small_shots.flatten(_program([Store(Var("v", 1), Const(1))]), np.complex128) is None
    assert small_shots.flatten(_program([IfElse(Var("b"), (x,))]), np.complex128) is None
    less = Binary(ExprOp.LESS, Bits((0, 1)), Const(2))
    assert small_shots.flatten(_program([IfElse(less, (x,))]), np.complex128) is None
    # Too many clbits for shared memory.
    assert small_shots.flatten(_program([x], clbits=64 * K.SMALL_CLBIT_WORDS + 1), np.complex128) is None
    # While loops nested deeper than the kernel's counters.
    body: tuple = (x,)
    for _ in range(K.SMALL_LOOP_SLOTS + 1):
        body = (WhileLoop(Bits((0,), boolean=True), body),)
    assert small_shots.flatten(_program(body), np.complex128) is None


def test_constant_and_out_of_range_conditions_fold():
    x = Unitary((0,), np.array([[0, 1], [1, 0]], dtype=complex))
    never = Binary(ExprOp.EQUAL, Bits((0,)), Const(2))  # one bit never reads 2
    flat = small_shots.flatten(_program([IfElse(never, (x,), (x, x))]), np.complex128)
    assert flat.count == 2 and not (flat.ops.reshape(-1, K.SMALL_OP_WORDS)[:, 0] == K.SMALL_JUMP_IF).any()


def _backend(**options) -> GPUSimulator:
    return GPUSimulator(device="GPU", **options)


def _shot_launches(emulated) -> int:
    return sum(name.startswith("run_small_shots") for k in emulated.values() for name in k.launched)


def _clear(emulated) -> None:
    for k in emulated.values():
        k.launched.clear()


@pytest.mark.parametrize("precision", ["double", "single"])
def test_teleport_in_one_launch_is_exact(emulated_gpu, precision):  # noqa: F811
    shots = 600
    _clear(emulated_gpu)
    result = _backend(precision=precision).run(teleport(), shots=shots, seed_simulator=3).result()
    assert _shot_launches(emulated_gpu) == 1
    metadata = result.results[0].metadata
    assert metadata["batched_shots"] is True and metadata["shot_branching"] is True
    p1 = np.sin(0.55) ** 2
    exact = {f"{out}{m1}{m0}": 0.25 * (p1 if out == "1" else 1 - p1) for out in "01" for m1 in "01" for m0 in "01"}
    assert_counts_match(result.get_counts(), exact, shots=shots)


@pytest.mark.parametrize("make", [lambda: syndrome_rounds(3, 2), loops_and_switch], ids=["syndrome", "loops"])
def test_dynamic_circuits_agree_with_aer(emulated_gpu, make):  # noqa: F811
    circuit = make()
    shots = 400
    _clear(emulated_gpu)
    result = _backend(shot_branching_enable=False).run(circuit, shots=shots, seed_simulator=11).result()
    assert _shot_launches(emulated_gpu) == 1
    assert result.results[0].metadata["batched_shots"] is True
    counts = result.get_counts()
    assert sum(counts.values()) == shots
    assert_counts_agree(counts, aer_counts(circuit, 4000))


def expressions_and_wide_clbits() -> QuantumCircuit:
    """``expr`` conditions (not, ==, !=), an if/else on a register, and clbits past the first 64-bit word."""
    qr = QuantumRegister(3)
    low, pad, high = ClassicalRegister(2, "low"), ClassicalRegister(70, "pad"), ClassicalRegister(2, "high")
    circuit = QuantumCircuit(qr, low, pad, high)
    circuit.h(0)
    circuit.ry(0.8, 1)
    circuit.measure(0, high[0])
    circuit.measure(1, high[1])
    with circuit.if_test(expr.logic_not(high[0])) as otherwise:
        circuit.x(2)
    with otherwise:
        circuit.ry(0.4, 2)
    with circuit.if_test(expr.not_equal(high, 3)):
        circuit.h(1)
    with circuit.if_test(expr.equal(high, 2)):
        circuit.z(1)
        circuit.h(1)
    circuit.measure([1, 2], low)
    return circuit


def test_expression_conditions_and_wide_clbits_agree_with_aer(emulated_gpu):  # noqa: F811
    circuit = expressions_and_wide_clbits()
    shots = 500
    _clear(emulated_gpu)
    result = _backend(shot_branching_enable=False).run(circuit, shots=shots, seed_simulator=5).result()
    assert _shot_launches(emulated_gpu) == 1
    counts = {key.replace(" ", "")[:2] + key.replace(" ", "")[-2:]: value for key, value in result.get_counts().items()}
    reference = {key.replace(" ", "")[:2] + key.replace(" ", "")[-2:]: value for key, value in aer_counts(circuit, 4000).items()}
    assert_counts_agree(counts, reference)


def test_small_launches_go_first_one_path_stays_with_branching(emulated_gpu, monkeypatch):  # noqa: F811
    # Three qubits, 200 shots: the launch costs less than one path's launches, so it runs at once.
    _clear(emulated_gpu)
    result = _backend().run(teleport(), shots=200, seed_simulator=1).result()
    assert result.results[0].metadata["batched_shots"] is True and _shot_launches(emulated_gpu) == 1
    assert sum(len(k.launched) for k in emulated_gpu.values()) == 1  # nothing but that launch
    # Where the launch costs more (its cost raised here), branching goes first: one path stays there.
    monkeypatch.setitem(small_shots.BATCHED_SHOTS_COST["GPU"], "amplitude_seconds", 1e-6)
    deterministic = QuantumCircuit(2, 2)
    deterministic.x(0)
    deterministic.measure(0, 0)
    with deterministic.if_test((deterministic.clbits[0], 1)):
        deterministic.x(1)
    deterministic.measure(1, 1)
    _clear(emulated_gpu)
    result = _backend().run(deterministic, shots=300, seed_simulator=1).result()
    assert result.get_counts() == {"11": 300}
    assert result.results[0].metadata["batched_shots"] is False and result.results[0].metadata["trajectories"] == 1
    assert _shot_launches(emulated_gpu) == 0
    # The option off: the interpreter, as on the CPU, with the CPU's samples.
    circuit = syndrome_rounds(3, 2)
    off = _backend(batched_shots_gpu=False).run(circuit, shots=200, seed_simulator=4).result()
    cpu = GPUSimulator(device="CPU").run(circuit, shots=200, seed_simulator=4).result()
    assert off.get_counts() == cpu.get_counts() and "batched_shots" not in off.results[0].metadata
    assert _shot_launches(emulated_gpu) == 0


def test_same_seed_same_memory_in_shot_order(emulated_gpu):  # noqa: F811
    circuit = syndrome_rounds(3, 2)
    backend = _backend(shot_branching_enable=False)
    first = backend.run(circuit, shots=120, seed_simulator=8, memory=True).result()
    again = backend.run(circuit, shots=120, seed_simulator=8, memory=True).result()
    other = backend.run(circuit, shots=120, seed_simulator=9, memory=True).result()
    assert first.get_memory() == again.get_memory() != other.get_memory()
    assert len(first.get_memory()) == 120
    from collections import Counter

    assert Counter(first.get_memory()) == Counter(first.get_counts())


def test_runaway_loop_is_a_typed_error_and_the_next_job_runs(emulated_gpu):  # noqa: F811
    circuit = QuantumCircuit(1, 1)
    circuit.x(0)
    circuit.measure(0, 0)
    with circuit.while_loop((circuit.clbits[0], 1)):
        circuit.x(0)
        circuit.x(0)
        circuit.measure(0, 0)
    backend = _backend(shot_branching_enable=False, max_loop_iterations=20)
    job = backend.run(circuit, shots=4, seed_simulator=1)
    with pytest.raises(Exception) as raised:
        job.result()
    assert isinstance(raised.value.__cause__, IterationLimitError)
    assert "max_loop_iterations=20" in str(raised.value)
    assert backend.run(teleport(), shots=50, seed_simulator=2).result().success


def test_progress_ends_at_ops_times_shots(emulated_gpu):  # noqa: F811
    job = _backend(shot_branching_enable=False).run(teleport(), shots=64, seed_simulator=2)
    job.result()
    done, total = job._execution.progress()
    assert done == total and total > 64



def test_chunks_of_shots_draw_what_one_launch_draws(emulated_gpu):  # noqa: F811
    from gpu_provider.compiler.translate import translate
    from gpu_provider.engine import devices
    from gpu_provider.engine.executor import RunConfig

    device, _ = devices.resolve_device("GPU", 0)
    config = RunConfig(shots=35, seed=12, shot_branching=False)
    planned = small_shots.plan(translate(teleport()), config, device)
    assert planned is not None and planned.kernels is not None
    flat, kernels = planned.flat, planned.kernels
    _clear(emulated_gpu)
    whole = small_shots.run_shots(flat, kernels, device, config, 1)
    chunked = small_shots.run_shots(flat, kernels, device, config, 1, budget_bytes=10 * 8 * (flat.clbit_words + 1))
    assert _shot_launches(emulated_gpu) == 1 + 4  # 35 shots, 10 a launch
    assert np.concatenate(chunked).tolist() == np.concatenate(whole).tolist()


# ---------------------------------------------------------------------------
# The same op stream on the CPU: the rows of one NumPy batch


def test_philox_uniforms_are_numpys_philox():
    key = (0x0123456789ABCDEF, 0xFEDCBA9876543210)
    draws = np.array([0, 1, 5, 0, 7, (1 << 64) - 1], dtype=np.uint64)
    shots = np.array([0, 0, 3, 1 << 40, 123456789, 2], dtype=np.uint64)
    expected = [uniform(key, int(d), int(s)) for d, s in zip(draws, shots)]
    assert small_shots.philox_uniforms(key, draws, shots).tolist() == expected


@pytest.mark.parametrize("precision", ["double", "single"])
def test_the_host_batch_draws_the_kernels_samples(emulated_library, precision):  # noqa: F811
    """The NumPy batch and the (host-emulated) CUDA kernel run the same flat stream with the same
    Philox draws: the same outcomes shot by shot, loops, switches and resets included."""
    from gpu_provider.compiler.translate import translate
    from gpu_provider.engine.executor import RunConfig

    dtype = np.complex128 if precision == "double" else np.complex64
    kernels = EmulatedKernels(dtype, emulated_library, resident_blocks=4)
    for circuit in (loops_and_switch(), syndrome_rounds(3, 2), teleport(), expressions_and_wide_clbits()):
        program = translate(circuit)
        config = RunConfig(shots=60, seed=17, precision=precision, max_loop_iterations=1000)
        flat = small_shots.flatten(program, dtype)
        key = small_shots.philox_key(config.seed)
        gpu = _run_flat(np, kernels, program, config.shots, key)
        chunks = small_shots.run_shots_host(flat, np, config, 1, budget_bytes=20 * (3 * np.dtype(dtype).itemsize << flat.num_qubits))
        host = [int(value) for chunk in chunks for value in chunk]
        words = [int.from_bytes(row[:-1].tobytes(), "little") for row in gpu]  # each shot's clbit words as one integer
        assert host == words, circuit.name


@pytest.mark.parametrize("make", [teleport, loops_and_switch, lambda: syndrome_rounds(3, 2)], ids=["teleport", "loops", "syndrome"])
def test_the_host_batch_agrees_with_aer_through_the_backend(make, monkeypatch):
    """On the CPU, branching hands over to the batch past its budget (forced to one path here)."""
    from gpu_provider.engine.small_shots import ShotPlan

    monkeypatch.setattr(ShotPlan, "budget", lambda self, shots: 1)
    circuit = make()
    result = GPUSimulator(device="CPU").run(circuit, shots=4000, seed_simulator=2, memory=True).result()
    metadata = result.results[0].metadata
    assert metadata["batched_shots"] is True and "trajectories" not in metadata
    counts = result.get_counts()
    assert sum(counts.values()) == 4000 and len(result.get_memory()) == 4000
    assert_counts_agree(counts, aer_counts(circuit, 8000))


def test_the_cpu_keeps_branching_for_few_paths_and_shot_by_shot_when_asked():
    circuit = syndrome_rounds(3, 2)
    branching = GPUSimulator(device="CPU").run(teleport(), shots=2000, seed_simulator=2).result()
    assert branching.results[0].metadata["batched_shots"] is False  # 8 paths: under the budget
    alone = GPUSimulator(device="CPU", shot_branching_enable=False).run(circuit, shots=50, seed_simulator=2).result()
    assert "batched_shots" not in alone.results[0].metadata and alone.results[0].metadata["trajectories"] == 50


def test_the_widest_batched_circuit_is_an_option(emulated_gpu):  # noqa: F811
    circuit = teleport()  # 3 qubits
    _clear(emulated_gpu)
    capped = _backend(batched_shots_gpu_max_qubits=2).run(circuit, shots=200, seed_simulator=1).result()
    assert "trajectories" in capped.results[0].metadata and _shot_launches(emulated_gpu) == 0
    allowed = _backend(batched_shots_gpu_max_qubits=3).run(circuit, shots=200, seed_simulator=1).result()
    assert allowed.results[0].metadata["batched_shots"] is True and _shot_launches(emulated_gpu) == 1
    from gpu_provider.errors import InvalidOptionError

    for bad in (0, -3, 2.5, "16", True):
        with pytest.raises(InvalidOptionError, match="batched_shots_gpu_max_qubits"):
            _backend(batched_shots_gpu_max_qubits=bad)


def test_chunks_are_cut_by_time_and_a_cancel_stops_between_them(monkeypatch):
    """A chunk of shots takes about CHUNK_SECONDS by the costs (never fewer than MIN_CHUNK_SHOTS),
    and a cancel stops the batch at the next chunk."""
    from gpu_provider.compiler.translate import translate
    from gpu_provider.engine import devices
    from gpu_provider.engine.executor import Execution, RunConfig
    from gpu_provider.errors import JobCancelledError

    device, _ = devices.resolve_device("CPU", 0)
    config = RunConfig(shots=1000, seed=1)
    planned = small_shots.plan(translate(teleport()), config, device)
    assert planned.chunk_shots() >= config.shots  # a tiny circuit: one chunk
    monkeypatch.setattr(small_shots, "CHUNK_SECONDS", 0.0)
    monkeypatch.setitem(small_shots.MIN_CHUNK_SHOTS, "CPU", 100)
    assert planned.chunk_shots() == 100
    execution = Execution(device, 10_000, run=lambda _: None)
    calls = []
    original = small_shots._host_chunk

    def chunk(*args):
        calls.append(args[4])  # the chunk's first shot
        if len(calls) == 2:
            execution.request_cancel()
        return original(*args)

    monkeypatch.setattr(small_shots, "_host_chunk", chunk)
    with pytest.raises(JobCancelledError):
        planned.run(config, 1, execution)
    assert calls == [0, 100]
    # Cut by time or not, a seed gives the same shots.
    monkeypatch.setattr(small_shots, "_host_chunk", original)
    cut = np.concatenate(planned.run(config, 1))
    monkeypatch.setattr(small_shots, "CHUNK_SECONDS", 1e9)
    assert np.concatenate(planned.run(config, 1)).tolist() == cut.tolist()
