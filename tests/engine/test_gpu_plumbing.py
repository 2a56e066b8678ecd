"""The GPU device's plumbing, run on the CPU through a NumPy-backed stand-in for CuPy.

No real GPU is needed: a fake ``cupy`` module (arrays are NumPy arrays with a
``get()``; streams, events, the memory pool and the runtime are small host
objects) stands in, and the compiled kernels are switched off so the engine
takes its array-module path. This proves what the GPU path shares with the
CPU path without CUDA: device resolution and the probe, per-job streams,
events feeding status and progress, memory checks against the device's free
memory and the pool's release, and that nothing in the engine assumes
``xp is numpy``. The CUDA kernels themselves are covered by
test_kernels_compile.py (PTX, emulation) and test_kernels_gpu.py (a real GPU).
"""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
from qiskit import QuantumCircuit
from qiskit.providers import JobStatus
from qiskit.quantum_info import Statevector, random_unitary

from gpu_provider import GPUSimulator
from gpu_provider.engine import devices, executor
from gpu_provider.errors import CircuitTooLargeError, InvalidOptionError
from tests.helpers import bell


class DeviceArray(np.ndarray):
    """A NumPy array posing as a CuPy array: ``get()`` copies it to the host."""

    def get(self):
        return np.array(self)


def _to_device(value):
    if isinstance(value, np.ndarray) and not isinstance(value, DeviceArray):
        return value.view(DeviceArray)
    if isinstance(value, tuple):
        return tuple(_to_device(v) for v in value)
    return value


class FakeEvent:
    recorded = 0
    created = 0
    timing_enabled = 0

    def __init__(self, block=False, disable_timing=False):
        self.done = False
        FakeEvent.created += 1
        FakeEvent.timing_enabled += not disable_timing

    def record(self, stream=None):
        FakeEvent.recorded += 1
        self.done = True

    def synchronize(self):
        pass


class FakeStream:
    created = 0
    current: list = []

    def __init__(self, non_blocking=False):
        FakeStream.created += 1

    def __enter__(self):
        FakeStream.current.append(self)
        return self

    def __exit__(self, *exc):
        FakeStream.current.pop()
        return False

    def synchronize(self):  # the stand-in computes as it is called: nothing to wait for
        pass


class FakeDevice:
    def __init__(self, index=0):
        self.id = index
        self.attributes = {"MultiProcessorCount": 132}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class FakePool:
    def __init__(self):
        self.released = 0
        self.cached = 0  # bytes the pool holds in freed blocks

    def free_bytes(self):
        return self.cached

    def free_all_blocks(self):
        self.released += 1
        self.cached = 0


# cudaDevAttrMaxSharedMemoryPerBlockOptin's number, and an H200's value of it (227 KiB).
SHARED_OPTIN_ATTRIBUTE = 97
H200_SHARED_OPTIN = 227 << 10


def make_fake_cupy(free_bytes: int = 8 << 30, total_bytes: int = 16 << 30, shared_optin: int = H200_SHARED_OPTIN) -> types.ModuleType:
    """The stand-in; ``module.cuda.runtime.attribute_queries`` lists each ``deviceGetAttribute(attribute, device)`` asked."""
    pool = FakePool()
    attribute_queries: list = []

    def device_get_attribute(attribute, device):
        attribute_queries.append((attribute, device))
        if attribute == SHARED_OPTIN_ATTRIBUTE:
            return shared_optin
        raise ValueError(f"the stand-in knows no device attribute {attribute}")

    runtime = types.SimpleNamespace(
        getDeviceCount=lambda: 1,
        getDeviceProperties=lambda index: {"name": b"Fake H200"},
        memGetInfo=lambda: (free_bytes, total_bytes),
        cudaDevAttrMaxSharedMemoryPerBlockOptin=SHARED_OPTIN_ATTRIBUTE,
        deviceGetAttribute=device_get_attribute,
        attribute_queries=attribute_queries,
    )
    cuda = types.SimpleNamespace(
        runtime=runtime,
        nvrtc=types.SimpleNamespace(getVersion=lambda: (12, 9)),
        Device=FakeDevice,
        Stream=FakeStream,
        Event=FakeEvent,
    )

    class FakeCupy(types.ModuleType):
        def __getattr__(self, name):
            function = getattr(np, name)
            if not callable(function) or isinstance(function, type):
                return function

            def on_device(*args, **kwargs):
                return _to_device(function(*args, **kwargs))

            return on_device

    module = FakeCupy("cupy")
    module.cuda = cuda
    module.pool = pool
    module.get_default_memory_pool = lambda: pool
    module.asnumpy = lambda array: np.array(array)
    module.asarray = lambda array, dtype=None: _to_device(np.array(array, dtype=dtype))
    module.ndarray = DeviceArray
    return module


@pytest.fixture
def fake_gpu(monkeypatch):
    fake = make_fake_cupy()
    monkeypatch.setitem(sys.modules, "cupy", fake)
    from gpu_provider.engine import kernels

    monkeypatch.setattr(kernels, "kernels_for", lambda dtype: None)  # the array-module path
    devices.reset_probe()
    yield fake
    devices.reset_probe()


def random_circuit(n: int, seed: int) -> QuantumCircuit:
    rng = np.random.default_rng(seed)
    qc = QuantumCircuit(n)
    for layer in range(4):
        for q in range(n):
            qc.u(*rng.uniform(-np.pi, np.pi, 3), q)
        for q in range(layer % 2, n - 1, 2):
            qc.cx(q, q + 1)
        if n > 2:
            qc.cp(float(rng.uniform(0, 3)), n - 1, 0)  # non-adjacent, reversed order
    return qc


def test_probe_sees_the_device_and_auto_chooses_it(fake_gpu):
    probe = devices.probe_gpu()
    assert probe.usable and probe.names == ("Fake H200",)
    device, reason = devices.resolve_device("auto", 0)
    assert device.kind == "GPU" and device.name == "GPU:0" and reason == ""
    with pytest.raises(InvalidOptionError, match="device_id=1 does not exist"):
        devices.resolve_device("GPU", 1)


@pytest.mark.parametrize("precision, tolerance", [("double", 1e-12), ("single", 1e-5)])
@pytest.mark.parametrize("fusion", [False, True])
def test_gpu_device_path_matches_statevector(fake_gpu, precision, tolerance, fusion):
    backend = GPUSimulator(device="GPU", precision=precision, fusion_enable=fusion, fusion_threshold=1)
    for seed, n in enumerate((1, 3, 7, 11)):
        qc = random_circuit(n, seed)
        result = backend.run(qc, shots=1, statevector=True).result()
        state = result.get_statevector()
        assert isinstance(state, np.ndarray) and not isinstance(state, DeviceArray)
        assert abs(np.vdot(Statevector(qc).data, state)) ** 2 >= 1 - tolerance
        assert result.results[0].metadata["device"] == "GPU:0"
        assert result.results[0].metadata["precision"] == precision


def test_sampling_and_shot_by_shot_on_the_gpu_path(fake_gpu):
    backend = GPUSimulator(device="GPU")
    counts = backend.run(bell(), shots=2000, seed_simulator=4).result().get_counts()
    assert set(counts) == {"00", "11"} and 850 < counts["00"] < 1150
    qc = QuantumCircuit(2, 2)
    qc.h(0)
    qc.measure(0, 0)
    with qc.if_test((qc.clbits[0], 1)):
        qc.x(1)
    qc.measure(1, 1)
    counts = backend.run(qc, shots=500, seed_simulator=2).result().get_counts()
    assert set(counts) == {"00", "11"}
    # The same seed gives the same samples on both devices.
    cpu = GPUSimulator(device="CPU").run(bell(), shots=300, seed_simulator=8, memory=True).result().get_memory()
    gpu = backend.run(bell(), shots=300, seed_simulator=8, memory=True).result().get_memory()
    assert cpu == gpu


def test_jobs_use_streams_and_events_and_release_memory(fake_gpu):
    streams, events, released = FakeStream.created, FakeEvent.recorded, fake_gpu.pool.released
    backend = GPUSimulator(device="GPU")
    jobs = [backend.run(random_circuit(6, seed), shots=10) for seed in range(6)]
    for job in jobs:
        assert job.result().success
        assert job.status() == JobStatus.DONE and job.progress()[0] == job.progress()[1]
    assert FakeStream.created > streams  # each worker takes its stream from the device's pool
    assert FakeStream.created - streams <= 4  # ...and gives it back for the next job
    assert FakeEvent.recorded - events >= 6 * 2  # start and end events at least, per job
    assert fake_gpu.pool.released == released  # a small cache is kept for the next job


def test_checkpoint_events_are_few_reused_and_untimed(fake_gpu):
    created, timed = FakeEvent.created, FakeEvent.timing_enabled
    qc = QuantumCircuit(3)
    for i in range(3000):
        qc.rx(0.001 * (i + 1), i % 3)
    backend = GPUSimulator(device="GPU", fusion_enable=False)
    job = backend.run(qc, shots=1)
    assert job.result().success and job.progress() == (3000, 3000)
    # One start event and a ring of checkpoint events, not one event per op.
    assert FakeEvent.created - created <= executor.CHECKPOINT_RING + 1
    assert FakeEvent.timing_enabled == timed


def test_checkpoints_report_progress_in_steps(monkeypatch):
    monkeypatch.setattr(executor, "CHECKPOINT_SECONDS", 1e12)  # by op count alone
    cpu, _ = devices.resolve_device("CPU", 0)
    execution = executor.Execution(cpu, 1000, lambda e: None)
    for _ in range(40):
        execution.checkpoint()
    assert execution.progress() == (2 * executor.CHECKPOINT_OPS, 1000)
    for _ in range(500):
        execution.checkpoint()
    assert len(execution._checkpoints) <= executor.CHECKPOINT_RING
    assert execution.progress() == (540 // executor.CHECKPOINT_OPS * executor.CHECKPOINT_OPS, 1000)


def test_pool_cache_is_emptied_only_when_large_and_idle(fake_gpu):
    gpu, _ = devices.resolve_device("GPU", 0)
    total = gpu.total_bytes()
    pool = fake_gpu.pool
    released = pool.released
    pool.cached = int(total * devices.POOL_CACHE_FRACTION) - 1
    gpu.release_memory()
    assert pool.released == released  # small: kept for the next job
    pool.cached = int(total * devices.POOL_CACHE_FRACTION) + 1
    gpu.job_started()
    try:
        gpu.release_memory()
        assert pool.released == released  # another job runs: freeing would stall its stream
    finally:
        gpu.job_ended()
    gpu.release_memory()
    assert pool.released == released + 1 and pool.cached == 0
    # Through a job: the job that ends last on an idle device gives the large cache back.
    pool.cached = total
    assert GPUSimulator(device="GPU").run(random_circuit(4, 0), shots=5).result().success
    assert pool.released == released + 2


def test_too_large_for_the_gpu_names_its_memory(monkeypatch):
    fake = make_fake_cupy(free_bytes=1 << 20, total_bytes=1 << 30)
    monkeypatch.setitem(sys.modules, "cupy", fake)
    devices.reset_probe()
    try:
        with pytest.raises(CircuitTooLargeError) as info:
            GPUSimulator(device="GPU").run(random_circuit(20, 1))
        assert "GPU" in str(info.value) and info.value.bytes_free == 1 << 20
        assert info.value.num_qubits == 20
    finally:
        devices.reset_probe()


def test_dispatcher_per_device(fake_gpu):
    gpu, _ = devices.resolve_device("GPU", 0)
    cpu, _ = devices.resolve_device("CPU", 0)
    assert executor.dispatcher_for(gpu) is executor.dispatcher_for(gpu)
    assert executor.dispatcher_for(gpu) is not executor.dispatcher_for(cpu)


def test_gate_matrices_go_to_the_device_in_one_copy(fake_gpu, monkeypatch):
    copies = []
    to_device = fake_gpu.asarray
    monkeypatch.setattr(fake_gpu, "asarray", lambda array, dtype=None: copies.append(np.shape(array)) or to_device(array, dtype))
    qc = QuantumCircuit(4)
    for i in range(60):  # 60 distinct matrices and diagonals
        qc.u(0.1 * i, 0.2, 0.3, i % 4)
        qc.rz(0.05 * i, (i + 1) % 4)
    backend = GPUSimulator(device="GPU", fusion_enable=False)
    state = backend.run(qc, shots=1, statevector=True).result().get_statevector()
    assert abs(np.vdot(Statevector(qc).data, state)) ** 2 == pytest.approx(1, abs=1e-12)
    # One copy holds all the gates' entries (60 matrices of 4, 59 diagonals of 2: rz(0) is dropped)...
    assert copies.count((60 * 4 + 59 * 2,)) == 1, copies
    # ...and no gate is copied on its own (the (16,) copies are this array-module
    # path's broadcast factors for diagonals; the GPU kernels take the diagonal itself).
    assert not [shape for shape in copies if shape in ((2, 2), (2,))], copies


def test_primitives_on_the_gpu_path(fake_gpu):
    from qiskit.circuit.library import efficient_su2
    from qiskit.primitives import StatevectorEstimator

    from gpu_provider import EstimatorV2, SamplerV2

    qc = efficient_su2(5, reps=1)
    values = np.random.default_rng(4).uniform(-1, 1, size=(3, qc.num_parameters))
    observables = [["XYZII"], ["ZZZZZ"]]
    result = EstimatorV2(backend_options={"device": "GPU"}).run([(qc, observables, values)]).result()[0]
    reference = StatevectorEstimator().run([(qc, observables, values)]).result()[0]
    np.testing.assert_allclose(result.data.evs, reference.data.evs, atol=1e-12)
    assert result.metadata["simulator_metadata"]["device"] == "GPU:0"
    measured = qc.measure_all(inplace=False)
    gpu = SamplerV2(seed=3, backend_options={"device": "GPU"}).run([(measured, values[0])], shots=200).result()[0]
    cpu = SamplerV2(seed=3, backend_options={"device": "CPU"}).run([(measured, values[0])], shots=200).result()[0]
    assert gpu.data.meas.get_bitstrings() == cpu.data.meas.get_bitstrings()  # the same seed, the same samples


def test_chunked_sampling_is_the_same_on_both_devices(fake_gpu):
    # 300,000 shots of 2 qubits are drawn in several chunks (sample_chunk_shots is 2^17 here).
    options = dict(shots=300_000, seed_simulator=12, memory=True)
    gpu = GPUSimulator(device="GPU").run(bell(), **options).result()
    cpu = GPUSimulator(device="CPU").run(bell(), **options).result()
    assert gpu.get_memory() == cpu.get_memory()
    counts = gpu.get_counts()
    assert set(counts) == {"00", "11"} and abs(counts["00"] - 150_000) < 5 * 274


class _SizedGPU(devices.Device):
    """Only what the capacity arithmetic reads: a GPU of a given memory size."""

    kind = "GPU"

    def __init__(self, total: int) -> None:
        super().__init__()
        self._total = total

    def total_bytes(self) -> int:
        return self._total


@pytest.mark.parametrize(
    "mib, single, double",
    [(143771, 34, 33), (81559, 33, 32)],  # an H200 and an H100, as nvidia-smi reports them
)
def test_target_width_counts_one_state_on_a_gpu(mib, single, double):
    from gpu_provider.engine.executor import max_qubits_for

    gpu = _SizedGPU(mib << 20)
    assert max_qubits_for(gpu, 8) == single and max_qubits_for(gpu, 16) == double


def test_kernel_programs_reserve_one_state_others_two():
    from gpu_provider.compiler.translate import translate
    from gpu_provider.engine.executor import RunConfig, kernels_cover, memory_needed, state_arrays

    from gpu_provider.engine.executor import MAX_STATE_ARRAYS, WORKSPACE_BYTES, sampling_table_bytes
    from gpu_provider.engine.trajectories import saved_states

    gpu = _SizedGPU(1 << 40)
    cpu, _ = devices.resolve_device("CPU", 0)
    qc = random_circuit(20, 3)  # large enough that memory_needed counts arrays (see below for small states)
    qc.measure_all()
    program = translate(qc)
    config = RunConfig(precision="single")
    assert kernels_cover(program, gpu, config.dtype) and not kernels_cover(program, cpu, config.dtype)
    state = devices.state_bytes(20, 8)
    assert memory_needed(program, config, gpu) - memory_needed(program, config, cpu) == -state
    assert state_arrays(program, config, in_place=True) == 1
    # A small state gets the bound of every array any program may hold, without reading its ops.
    small = translate(random_circuit(12, 3))
    waiting = saved_states(12, 8, config.shots)  # the copies a circuit's forked trajectories may keep
    bound = (MAX_STATE_ARRAYS + waiting) * devices.state_bytes(12, 8) + sampling_table_bytes(12) + WORKSPACE_BYTES
    assert memory_needed(small, config, gpu) == memory_needed(small, config, cpu) == bound
    assert bound >= state_arrays(small, config) * devices.state_bytes(12, 8) + sampling_table_bytes(12) + WORKSPACE_BYTES
    # Initialize and a 7-qubit dense gate need the scratch buffer: counted as before.
    wide = QuantumCircuit(12)
    wide.initialize(np.ones(4) / 2, [0, 1])
    assert not kernels_cover(translate(wide), gpu, config.dtype)
    seven = QuantumCircuit(12)
    seven.unitary(random_unitary(1 << 7, seed=1).data, range(7))
    assert not kernels_cover(translate(seven), gpu, config.dtype)
    # Mid-circuit measurement: the state, the copy its shots restart from one by one, and the
    # copies forked trajectories may keep (log2(shots) of them; none without shot branching).
    mid = QuantumCircuit(3, 1)
    mid.h(0)
    mid.measure(0, 0)
    mid.x(0)  # a gate on a measured qubit: trajectories
    assert state_arrays(translate(mid), config, in_place=True) == 2 + 11
    assert state_arrays(translate(mid), RunConfig(precision="single", shot_branching=False), in_place=True) == 2


def test_a_gpu_state_the_kernels_do_not_cover_runs_in_place_where_two_do_not_fit(monkeypatch):
    """On a (stand-in) GPU whose free memory holds one 21-qubit state and the workspace but not two,
    a program with ``initialize`` and a 7-qubit gate (which the kernels do not apply) runs in place
    instead of being refused: a random circuit and its inverse on 20 qubits, H on two of them, one
    more qubit initialized to 0.6|0> + 0.8|1>. A 23-qubit state is still refused."""
    from gpu_provider.engine import kernels

    n = 20
    free = devices.state_bytes(n + 1, 16) + (72 << 20)
    monkeypatch.setitem(sys.modules, "cupy", make_fake_cupy(free_bytes=free, total_bytes=2 * free))
    monkeypatch.setattr(kernels, "kernels_for", lambda dtype: None)
    devices.reset_probe()
    try:
        u = random_circuit(n, 5)
        u.unitary(random_unitary(1 << 7, seed=2).data, [0, 4, 7, 9, 12, 15, 19])
        u.mcx(list(range(1, 8)), 18)
        qc = QuantumCircuit(n + 1)
        qc.initialize([0.6, 0.8], [n])  # a fresh qubit: an Initialize op
        qc.compose(u, range(n), inplace=True)
        qc.compose(u.inverse(), range(n), inplace=True)
        qc.h([0, 1])
        qc.measure_all()
        result = GPUSimulator(device="GPU", method="statevector").run(qc, shots=4000, seed_simulator=3).result()
        metadata = result.results[0].metadata
        assert metadata["device"].startswith("GPU") and metadata["in_place"] is True
        counts = result.get_counts()
        zeros = "0" * (n - 2)
        assert set(counts) <= {top + zeros + low for top in "01" for low in ("00", "01", "10", "11")}
        high = sum(c for key, c in counts.items() if key[0] == "1")
        assert abs(high / 4000 - 0.64) < 0.04  # the initialized qubit: |0.8|^2
        with pytest.raises(CircuitTooLargeError):
            GPUSimulator(device="GPU", method="statevector").run(random_circuit(n + 3, 1), shots=10)
    finally:
        devices.reset_probe()
