"""The ``executor=`` run option: a job's circuits in chunks on a concurrent.futures pool or a Dask cluster.

Oracles: a local run with the same seed (counts, memory and statevectors must be
identical, since each experiment keeps its own seed), ``qiskit.quantum_info``
for the statevectors, and the cluster's own view of its workers for cancel.
"""

from __future__ import annotations

import os
import pickle
import time
from concurrent.futures import BrokenExecutor, ProcessPoolExecutor, ThreadPoolExecutor

import numpy as np
import pytest
from qiskit import QuantumCircuit
from qiskit.circuit.random import random_circuit
from qiskit.exceptions import QiskitError
from qiskit.providers import JobError, JobStatus, JobTimeoutError

from gpu_provider import GPUSimulator
from gpu_provider import executors as executors_module
from gpu_provider.errors import ExecutorError, InvalidInputError, InvalidOptionError, IterationLimitError
from gpu_provider.executors import split_chunks
from tests.helpers import assert_state_matches, import_host, wait_for

SEED = 7


def batch() -> list[QuantumCircuit]:
    """Ten random measured circuits of 3 to 7 qubits."""
    return [random_circuit(3 + i % 5, 6, measure=True, seed=100 + i) for i in range(10)]


def slow_circuit(num_qubits: int, layers: int, seed: int) -> QuantumCircuit:
    """Layers of u and cx without fusion: each op is a pass over the whole state (about 5 ms at 18 qubits here)."""
    rng = np.random.default_rng(seed)
    circuit = QuantumCircuit(num_qubits)
    for _ in range(layers):
        for q in range(num_qubits):
            circuit.u(*rng.uniform(-np.pi, np.pi, 3), q)
        for q in range(0, num_qubits - 1, 2):
            circuit.cx(q, q + 1)
    circuit.measure_all()
    return circuit


@pytest.fixture(scope="module")
def dask_client():
    distributed = import_host("distributed")
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0")
    client = distributed.Client(cluster)
    try:
        yield client
    finally:
        client.close()
        cluster.close()


@pytest.fixture(params=["thread", "process", "dask"])
def executor(request):
    if request.param == "dask":
        yield request.getfixturevalue("dask_client")
        return
    pool = ThreadPoolExecutor(2) if request.param == "thread" else ProcessPoolExecutor(2)
    try:
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def workers_busy(client) -> dict:
    """Per worker: tasks the scheduler has it processing, and tasks its thread pool is executing."""
    executing = client.run(lambda dask_worker: dask_worker.state.executing_count)
    processing = client.processing()
    return {address: (len(processing.get(address, ())), executing[address]) for address in executing}


# ---------------------------------------------------------------------------
# results


def test_batch_on_executor_matches_local_run(executor):
    circuits = batch()
    backend = GPUSimulator(device="CPU")
    options = dict(shots=200, seed_simulator=SEED, memory=True, statevector=True)
    local_job = backend.run(circuits, **options)
    local = local_job.result()
    job = backend.run(circuits, executor=executor, **options)
    result = job.result(timeout=60)
    assert job.status() == JobStatus.DONE
    assert job.progress() == local_job.progress()
    assert job.progress()[0] == job.progress()[1] > len(circuits)
    assert result.success and len(result.results) == len(circuits)
    for index, circuit in enumerate(circuits):
        assert result.results[index].header["name"] == circuit.name
        assert result.results[index].seed_simulator == SEED + index
        assert result.get_counts(index) == local.get_counts(index)
        assert result.get_memory(index) == local.get_memory(index)
        state = np.asarray(result.get_statevector(index))
        np.testing.assert_array_equal(state, np.asarray(local.get_statevector(index)))
        assert_state_matches(state, circuit)
        metadata = result.results[index].metadata
        assert metadata["device"] == "CPU"
        assert metadata["fusion_ops_after"] == local.results[index].metadata["fusion_ops_after"]
    workers = {result.results[i].metadata["worker"] for i in range(len(circuits))}
    pids = {int(worker.rsplit(":", 1)[1]) for worker in workers}
    if isinstance(executor, ThreadPoolExecutor):
        assert pids == {os.getpid()}
    else:
        assert os.getpid() not in pids  # every chunk ran in a worker process
    assert result.metadata["executor"] == type(executor).__name__
    if not isinstance(executor, (ThreadPoolExecutor, ProcessPoolExecutor)):
        # Only engine data crossed the wire: the Dask workers never imported Qiskit.
        loaded = executor.run(lambda: sorted(name for name in __import__("sys").modules if name.split(".")[0] == "qiskit"))
        assert len(loaded) == 2 and all(names == [] for names in loaded.values()), loaded


def test_max_job_size_sets_the_chunks_and_keeps_the_results(dask_client):
    circuits = batch()
    backend = GPUSimulator(device="CPU", shots=100, seed_simulator=SEED)
    local = backend.run(circuits).result()
    seen = []
    original = dask_client.submit

    def counting_submit(*args, **kwargs):
        seen.append(len(args[1]))
        return original(*args, **kwargs)

    dask_client.submit = counting_submit
    try:
        result = backend.run(circuits, executor=dask_client, max_job_size=3).result(timeout=60)
    finally:
        del dask_client.submit
    assert sorted(seen) == [2, 2, 3, 3]  # ceil(10 / 3) = 4 chunks, dealt round robin
    assert [result.get_counts(i) for i in range(10)] == [local.get_counts(i) for i in range(10)]


def test_split_chunks_deals_every_index_once():
    assert split_chunks(10, 2, None) == [[0, 4, 8], [1, 5, 9], [2, 6], [3, 7]]
    assert split_chunks(10, 2, 3) == [[0, 4, 8], [1, 5, 9], [2, 6], [3, 7]]
    assert split_chunks(3, 8, None) == [[0], [1], [2]]
    assert split_chunks(5, 1, 10) == [[0, 1, 2, 3, 4]]
    assert split_chunks(4, 1, np.int64(2)) == [[0, 2], [1, 3]]
    GPUSimulator(device="CPU").set_options(max_job_size=np.int64(2))  # NumPy integers are integers


# ---------------------------------------------------------------------------
# the job contract over a distributed batch


def test_status_progress_and_timeout_on_a_dask_batch(dask_client):
    circuits = [slow_circuit(16, 20, seed) for seed in range(6)]
    backend = GPUSimulator(device="CPU", fusion_enable=False, shots=10, seed_simulator=SEED)
    job = backend.run(circuits, executor=dask_client, max_job_size=1)
    statuses, progress = [job.status()], [job.progress()]
    with pytest.raises(JobTimeoutError):
        job.result(timeout=0.01)
    while job.status() not in (JobStatus.DONE, JobStatus.ERROR, JobStatus.CANCELLED):
        statuses.append(job.status())
        progress.append(job.progress())
        time.sleep(0.005)
    statuses.append(job.status())
    progress.append(job.progress())
    total = progress[0][1]
    assert total == sum(len(c.data) - 1 for c in circuits)  # one op per instruction but measure_all's barrier
    assert statuses[0] in (JobStatus.QUEUED, JobStatus.RUNNING)
    assert JobStatus.RUNNING in statuses and statuses[-1] == JobStatus.DONE
    done = [p[0] for p in progress]
    assert done == sorted(done) and done[-1] == total
    per_circuit = len(circuits[0].data) - 1
    assert all(value % per_circuit == 0 for value in done)  # a chunk's ops count when it is done
    assert any(0 < value < total for value in done)
    local = backend.run(circuits[:2]).result()
    result = job.result()
    assert [result.get_counts(i) for i in range(2)] == [local.get_counts(i) for i in range(2)]


def test_cancel_during_a_dask_batch_leaves_no_worker_busy(dask_client):
    # Each circuit takes seconds (4000 ops on 18 qubits); the stop flag ends the running ones at once.
    circuits = [slow_circuit(18, 150, seed) for seed in range(4)]
    backend = GPUSimulator(device="CPU", fusion_enable=False, shots=10)
    job = backend.run(circuits, executor=dask_client, max_job_size=1)
    assert wait_for(lambda: any(busy[1] for busy in workers_busy(dask_client).values()), timeout=30)
    assert job.status() == JobStatus.RUNNING
    start = time.monotonic()
    assert job.cancel() is True
    assert time.monotonic() - start < 2.0
    assert job.status() == JobStatus.CANCELLED
    assert job.progress()[0] < job.progress()[1]
    with pytest.raises(JobError, match="cancelled"):
        job.result()
    idle = lambda: all(busy == (0, 0) for busy in workers_busy(dask_client).values())  # noqa: E731
    assert wait_for(idle, timeout=2.0), workers_busy(dask_client)
    assert time.monotonic() - start < 2.0
    assert job.cancel() is False  # already final


def test_cancel_on_a_thread_pool_stops_its_running_chunks():
    circuits = [slow_circuit(18, 150, seed) for seed in range(4)]  # seconds each
    backend = GPUSimulator(device="CPU", fusion_enable=False, shots=10)
    with ThreadPoolExecutor(2) as pool:
        job = backend.run(circuits, executor=pool, max_job_size=1)
        assert wait_for(lambda: job.status() == JobStatus.RUNNING and job.progress()[0] == 0, timeout=30)
        time.sleep(0.2)
        assert job.cancel() is True and job.status() == JobStatus.CANCELLED
        start = time.monotonic()
        # Both threads are free again at once (a chunk takes seconds): a new task runs within 1.5 s.
        probes = [pool.submit(time.monotonic) for _ in range(2)]
        assert all(probe.result(timeout=5) - start < 1.5 for probe in probes)


# ---------------------------------------------------------------------------
# failures


def _exit_worker(*args, **kwargs):
    os._exit(1)


def test_a_dying_process_pool_worker_fails_the_job(monkeypatch):
    monkeypatch.setattr(executors_module, "CHUNK_FUNCTION", _exit_worker)
    with ProcessPoolExecutor(2) as pool:
        job = GPUSimulator(device="CPU").run(batch(), executor=pool)
        start = time.monotonic()
        with pytest.raises(JobError) as info:
            job.result(timeout=30)
        assert time.monotonic() - start < 30
    assert job.status() == JobStatus.ERROR
    error = info.value.__cause__
    assert isinstance(error, ExecutorError) and "worker died" in str(error)
    assert isinstance(error.__cause__, BrokenExecutor)
    assert "ExecutorError" in job.error_message()


def test_a_killed_dask_worker_fails_the_job(monkeypatch):
    distributed = import_host("distributed")
    import dask

    # A lambda pickles by value (cloudpickle), so the spawned workers need not import this test module.
    monkeypatch.setattr(executors_module, "CHUNK_FUNCTION", lambda *args, **kwargs: os._exit(1))
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
        with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster:
            with distributed.Client(cluster) as client:
                job = GPUSimulator(device="CPU").run(batch()[:2], executor=client)
                with pytest.raises(JobError) as info:
                    job.result(timeout=30)
    assert job.status() == JobStatus.ERROR
    error = info.value.__cause__
    assert isinstance(error, ExecutorError)
    assert type(error.__cause__).__name__ == "KilledWorker"


def test_a_closed_dask_client_fails_the_job_instead_of_hanging():
    distributed = import_host("distributed")
    cluster = distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0")
    client = distributed.Client(cluster)
    try:
        circuits = [slow_circuit(16, 12, seed) for seed in range(4)]
        job = GPUSimulator(device="CPU", fusion_enable=False, shots=10).run(circuits, executor=client, max_job_size=1)
        assert wait_for(lambda: job.status() == JobStatus.RUNNING, timeout=30)
        client.close()
        with pytest.raises(JobError) as info:
            job.result(timeout=20)
    finally:
        client.close()
        cluster.close()
    assert job.status() == JobStatus.ERROR
    assert isinstance(info.value.__cause__, ExecutorError)


def test_a_simulation_error_in_a_chunk_fails_the_job_as_a_local_run(executor):
    circuit = QuantumCircuit(2, 1)
    circuit.x(0)
    circuit.measure(0, 0)
    with circuit.while_loop((circuit.clbits[0], 1)):
        circuit.x(1)  # the condition never changes: the loop hits the cap
    backend = GPUSimulator(device="CPU", max_loop_iterations=5, shots=4)
    local = backend.run(circuit)
    with pytest.raises(JobError) as local_info:
        local.result(timeout=30)
    job = backend.run([circuit, bell_circuit()], executor=executor)
    with pytest.raises(JobError) as info:
        job.result(timeout=30)
    assert job.status() == JobStatus.ERROR == local.status()
    assert type(info.value.__cause__) is type(local_info.value.__cause__) is IterationLimitError
    assert str(info.value.__cause__) == str(local_info.value.__cause__)


def bell_circuit() -> QuantumCircuit:
    circuit = QuantumCircuit(2, 2)
    circuit.h(0)
    circuit.cx(0, 1)
    circuit.measure([0, 1], [0, 1])
    return circuit


# ---------------------------------------------------------------------------
# options


class _SubmitOnly:
    """Not a concurrent.futures.Executor, but has submit() returning futures: accepted, as a Dask client is."""

    def __init__(self):
        self.pool = ThreadPoolExecutor(1)
        self.calls = 0

    def submit(self, fn, *args, **kwargs):
        self.calls += 1
        return self.pool.submit(fn, *args, **kwargs)


@pytest.mark.parametrize("value", [42, "dask", object(), ThreadPoolExecutor])
def test_bad_executor_values_raise(value):
    backend = GPUSimulator(device="CPU")
    with pytest.raises(InvalidOptionError, match="executor must be None, a concurrent.futures.Executor"):
        backend.set_options(executor=value)
    with pytest.raises(QiskitError, match="executor must be"):
        backend.run(bell_circuit(), executor=value)
    assert backend.options.executor is None


@pytest.mark.parametrize("value", [0, -1, 1.5, True, "3"])
def test_bad_max_job_size_values_raise(value):
    backend = GPUSimulator(device="CPU")
    with pytest.raises(InvalidOptionError, match="max_job_size must be a positive integer"):
        backend.set_options(max_job_size=value)
    assert backend.options.max_job_size is None


def test_default_options_and_an_object_with_submit():
    backend = GPUSimulator(device="CPU", shots=50, seed_simulator=SEED)
    assert backend.options.executor is None and backend.options.max_job_size is None
    custom = _SubmitOnly()
    backend.set_options(executor=custom, max_job_size=2)
    circuits = batch()[:4]
    result = backend.run(circuits).result(timeout=30)
    custom.pool.shutdown()
    assert custom.calls == 2
    reference = GPUSimulator(device="CPU", shots=50, seed_simulator=SEED).run(circuits).result()
    assert [result.get_counts(i) for i in range(4)] == [reference.get_counts(i) for i in range(4)]


def test_a_loop_built_on_demand_is_refused_at_run_with_an_executor():
    circuit = QuantumCircuit(1, 1)
    with circuit.for_loop(range(2000)) as value:
        circuit.rx(value * np.pi / 1000, 0)  # a body per value: built on demand, from the circuit
    circuit.measure(0, 0)
    backend = GPUSimulator(device="CPU")
    with ThreadPoolExecutor(1) as pool:
        with pytest.raises(InvalidInputError, match="for_loop over 2000 values"):
            backend.run(circuit, executor=pool)
        # A wide loop whose iterations are all the same body pickles and runs there.
        same = QuantumCircuit(1, 1)
        with same.for_loop(range(2001)):
            same.x(0)
        same.measure(0, 0)
        assert backend.run(same, shots=10, executor=pool).result(timeout=30).get_counts() == {"1": 10}


def test_programs_pickle_and_run_the_same():
    from gpu_provider.compiler.translate import translate
    from gpu_provider.engine.devices import resolve_device
    from gpu_provider.engine.executor import RunConfig, run_program
    from gpu_provider.engine.program import compact

    circuit = QuantumCircuit(3, 3)
    circuit.h(0)
    circuit.measure(0, 0)
    with circuit.if_test((circuit.clbits[0], 1)):
        circuit.x(1)
    with circuit.for_loop(range(3)) as value:
        circuit.ry(value * 0.4, 2)
    circuit.measure([1, 2], [1, 2])
    program = compact(translate(circuit))
    copy = pickle.loads(pickle.dumps(program))
    assert repr(copy) == repr(program)
    device, _ = resolve_device("CPU")
    config = RunConfig(shots=300, seed=11, memory=True)
    assert run_program(copy, device, config).memory == run_program(program, device, config).memory
    stop = executors_module.DaskStop("gpu_provider-stop-x")
    clone = pickle.loads(pickle.dumps(stop))
    assert clone.name == stop.name and clone.interval == executors_module.DASK_STOP_POLL_SECONDS


def test_typed_errors_pickle_with_their_attributes():
    from gpu_provider.errors import CircuitTooLargeError, DeviceUnavailableError

    error = pickle.loads(pickle.dumps(CircuitTooLargeError("too wide", num_qubits=40, bytes_needed=2, bytes_free=1)))
    assert type(error) is CircuitTooLargeError and str(error) == "too wide"
    assert (error.num_qubits, error.bytes_needed, error.bytes_free) == (40, 2, 1)
    error = pickle.loads(pickle.dumps(DeviceUnavailableError("no GPU", reason="none")))
    assert type(error) is DeviceUnavailableError and error.reason == "none" and str(error) == "no GPU"


def test_device_gpu_is_resolved_on_the_workers():
    from gpu_provider.engine.devices import probe_gpu
    from gpu_provider.errors import DeviceUnavailableError

    if probe_gpu().usable:
        pytest.skip("this machine has a usable GPU: device='GPU' resolves here too")
    backend = GPUSimulator(device="GPU")
    with pytest.raises(DeviceUnavailableError):
        backend.run(bell_circuit())  # without an executor: refused at run(), as before
    with ThreadPoolExecutor(1) as pool:
        job = backend.run(bell_circuit(), executor=pool)  # the workers may have a GPU: they decide
        with pytest.raises(JobError) as info:
            job.result(timeout=30)
    error = info.value.__cause__
    assert type(error) is DeviceUnavailableError and error.reason == probe_gpu().reason
    with ThreadPoolExecutor(1) as pool:
        counts = GPUSimulator(device="auto").run(bell_circuit(), executor=pool, shots=100).result().get_counts()
    assert set(counts) <= {"00", "11"} and sum(counts.values()) == 100


def test_a_cancelled_dask_batch_leaves_no_stop_flag_on_the_scheduler(dask_client, monkeypatch):
    from gpu_provider import executors

    monkeypatch.setattr(executors, "STOP_LINGER_SECONDS", 1.0)

    circuits = [slow_circuit(18, 150, seed) for seed in range(4)]
    backend = GPUSimulator(device="CPU", fusion_enable=False, shots=10)
    job = backend.run(circuits, executor=dask_client, max_job_size=1)
    prefix = f"gpu_provider-stop-{job.job_id()}-"  # this job's flag (an earlier test's may still linger)

    def stop_flags(dask_scheduler):
        return [name for name in dask_scheduler.extensions["events"]._events if str(name).startswith(prefix)]

    assert wait_for(lambda: any(busy[1] for busy in workers_busy(dask_client).values()), timeout=30)
    assert job.cancel() is True
    assert job.status() == JobStatus.CANCELLED
    # The flag stops the running chunks, then is cleared (and so deleted) after STOP_LINGER_SECONDS.
    assert dask_client.run_on_scheduler(stop_flags)
    assert wait_for(lambda: all(busy == (0, 0) for busy in workers_busy(dask_client).values()), timeout=2.0)
    assert wait_for(lambda: not dask_client.run_on_scheduler(stop_flags), timeout=10), dask_client.run_on_scheduler(stop_flags)
    # The client still runs jobs.
    quick = [slow_circuit(4, 2, seed) for seed in range(2)]
    local = backend.run(quick, seed_simulator=3).result()
    remote = backend.run(quick, executor=dask_client, seed_simulator=3).result()
    assert [remote.get_counts(i) for i in range(2)] == [local.get_counts(i) for i in range(2)]
