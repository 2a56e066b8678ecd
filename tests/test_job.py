"""GPUJob against the job contract of the seed pages (JobV1, BasicAerJob, BaseJob...)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from qiskit import QuantumCircuit
from qiskit.circuit.classical import expr
from qiskit.providers import JobError, JobStatus, JobTimeoutError
from qiskit.quantum_info import Statevector

from benchmarks.status_latency import long_circuit
from tests.helpers import bell, wait_for
from gpu_provider import GPUSimulator
from gpu_provider.job import GPUJob

FINAL = {JobStatus.DONE, JobStatus.ERROR, JobStatus.CANCELLED}


LONG_OPTIONS = {"fusion_enable": False, "shots": 10}


def assert_consistent(job: GPUJob) -> None:
    status = job.status()
    if status == JobStatus.CANCELLED:
        assert job.cancelled() and job.in_final_state() and not job.done() and not job.running()
    elif status == JobStatus.DONE:
        assert job.done() and job.in_final_state() and not job.cancelled() and not job.running()
    elif status == JobStatus.ERROR:
        assert job.in_final_state() and not job.done() and not job.cancelled() and not job.running()
    elif status == JobStatus.RUNNING:
        assert job.running() and not job.in_final_state()


@pytest.fixture
def backend():
    return GPUSimulator(device="CPU")


@pytest.fixture
def busy(backend):
    """Two long jobs that occupy both CPU workers; cancelled afterwards."""
    jobs = [backend.run(long_circuit(), **LONG_OPTIONS) for _ in range(2)]
    assert wait_for(lambda: all(job.status() == JobStatus.RUNNING for job in jobs))
    yield jobs
    for job in jobs:
        job.cancel()


def test_run_returns_submitted_job_with_identity(backend):
    job = backend.run(bell(), seed_simulator=3)
    assert isinstance(job, GPUJob)
    assert job.backend() is backend
    assert isinstance(job.job_id(), str) and job.job_id()
    assert job.status() in {JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.DONE}
    other = backend.run(bell())
    assert other.job_id() != job.job_id()
    result = job.result()
    assert result.job_id == job.job_id()
    assert sum(result.get_counts().values()) == 1024
    assert set(result.get_counts()) <= {"00", "11"}


def test_second_submit_raises_job_error(backend):
    job = backend.run(bell())
    with pytest.raises(JobError, match="already been submitted"):
        job.submit()
    assert job.result().success


def test_status_seen_queued_running_done_and_never_blocks(backend, busy):
    job = backend.run(long_circuit(18, 20), **LONG_OPTIONS)
    assert job.status() == JobStatus.QUEUED
    assert not job.running() and not job.in_final_state()
    seen = [job.status()]
    for blocker in busy:
        blocker.cancel()
    latencies = []
    while seen[-1] not in FINAL:
        t0 = time.perf_counter()
        status = job.status()
        latencies.append(time.perf_counter() - t0)
        if status != seen[-1]:
            seen.append(status)
        time.sleep(0.001)
    assert seen == [JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.DONE]
    assert float(np.median(latencies)) < 0.005
    assert max(latencies) < 0.2


def test_status_answers_fast_while_a_large_cpu_job_runs(backend):
    qc = long_circuit(22, 6)
    job = backend.run(qc, **LONG_OPTIONS)
    assert wait_for(lambda: job.status() == JobStatus.RUNNING)
    latencies = []
    while job.status() == JobStatus.RUNNING and len(latencies) < 200:
        t0 = time.perf_counter()
        job.status()
        latencies.append(time.perf_counter() - t0)
        time.sleep(0.005)
    job.cancel()
    assert latencies, "the job finished before status() could be sampled"
    assert float(np.median(latencies)) < 0.01


def test_result_timeout_raises_and_job_keeps_running(backend):
    job = backend.run(long_circuit(), **LONG_OPTIONS)
    with pytest.raises(JobTimeoutError):
        job.result(timeout=0.05)
    assert job.status() in {JobStatus.QUEUED, JobStatus.RUNNING}
    assert job.cancel() is True


def test_result_timeout_then_success(backend):
    job = backend.run(long_circuit(16, 10), **LONG_OPTIONS)
    with pytest.raises(JobTimeoutError):
        job.result(timeout=0.0)
    result = job.result(timeout=120)
    assert result.success and job.status() == JobStatus.DONE


def test_cancel_queued_job_never_runs(backend, busy):
    job = backend.run(bell())
    assert job.status() == JobStatus.QUEUED
    assert job.cancel() is True
    assert job.status() == JobStatus.CANCELLED
    assert_consistent(job)
    assert job._execution.started_at is None
    with pytest.raises(JobError, match="cancelled"):
        job.result()
    assert job.cancel() is False


def test_cancel_running_job_then_backend_runs_next_job(backend):
    job = backend.run(long_circuit(), **LONG_OPTIONS)
    assert wait_for(lambda: job.status() == JobStatus.RUNNING)
    assert wait_for(lambda: job.progress()[0] > 0)
    assert job.cancel() is True
    assert job.status() == JobStatus.CANCELLED
    assert_consistent(job)
    done, total = job.progress()
    assert done < total
    with pytest.raises(JobError, match="cancelled"):
        job.result()
    assert job.cancel() is False
    counts = backend.run(bell(), seed_simulator=1).result().get_counts()
    assert set(counts) == {"00", "11"} and sum(counts.values()) == 1024


def test_cancel_finished_job_returns_false(backend):
    job = backend.run(bell())
    job.result()
    assert job.cancel() is False
    assert job.status() == JobStatus.DONE
    assert_consistent(job)


def test_failed_job_reports_error_with_cause(backend):
    qc = QuantumCircuit(1, 1)
    qc.x(0)
    qc.measure(0, 0)
    with qc.while_loop(expr.lift(qc.clbits[0])):
        qc.x(0)
        qc.x(0)
        qc.measure(0, 0)
    job = backend.run(qc, shots=2, max_loop_iterations=50)
    with pytest.raises(JobError, match="max_loop_iterations") as info:
        job.result()
    from gpu_provider.errors import IterationLimitError

    assert isinstance(info.value.__cause__, IterationLimitError)
    assert job.status() == JobStatus.ERROR
    assert_consistent(job)
    assert "IterationLimitError" in job.error_message()
    assert backend.run(bell()).result().success


def test_wait_for_final_state_with_callback(backend):
    job = backend.run(long_circuit(16, 10), **LONG_OPTIONS)
    calls = []
    job.wait_for_final_state(timeout=120, wait=0.01, callback=lambda *args: calls.append(args))
    assert job.status() == JobStatus.DONE
    assert calls, "the callback was never called"
    for job_id, status, passed_job in calls:
        assert job_id == job.job_id() and passed_job is job and isinstance(status, JobStatus)
    # As Qiskit's JobV1: called only for statuses found before the final one, never again once final.
    assert all(status not in (JobStatus.DONE, JobStatus.ERROR, JobStatus.CANCELLED) for _, status, _ in calls)
    done = []
    job.wait_for_final_state(callback=lambda *args: done.append(args))
    assert done == []


def test_wait_for_final_state_timeout(backend):
    job = backend.run(long_circuit(), **LONG_OPTIONS)
    start = time.monotonic()
    with pytest.raises(JobTimeoutError):
        job.wait_for_final_state(timeout=0.2, wait=5)
    assert time.monotonic() - start < 2.0  # the wait is cut to the timeout
    job.cancel()


def test_progress_advances_to_total(backend):
    job = backend.run(long_circuit(16, 20), **LONG_OPTIONS)
    seen = []
    while not job.in_final_state():
        seen.append(job.progress())
        time.sleep(0.01)
    done, total = job.progress()
    assert done == total and total > 0
    values = [d for d, _ in seen]
    assert values == sorted(values)
    assert any(0 < d < total for d in values)


def _expected_probabilities(qc: QuantumCircuit) -> dict:
    return Statevector(qc.remove_final_measurements(inplace=False)).probabilities_dict()


def test_many_threads_many_jobs_all_correct():
    backend = GPUSimulator(device="CPU")
    errors: list = []

    def worker(thread_index: int) -> None:
        try:
            for job_index in range(25):
                n = 2 + (thread_index + job_index) % 5
                value = (thread_index * 31 + job_index * 7) % (1 << n)
                qc = QuantumCircuit(n, n)
                for q in range(n):
                    if value >> q & 1:
                        qc.x(q)
                qc.h(0)
                qc.h(0)
                qc.measure(range(n), range(n))
                counts = backend.run(qc, shots=64, seed_simulator=job_index).result().get_counts()
                expected = format(value, f"0{n}b")
                if counts != {expected: 64}:
                    errors.append((thread_index, job_index, counts, expected))
        except Exception as exc:  # recorded and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not any(thread.is_alive() for thread in threads)
    assert errors == []


def test_jobs_run_concurrently_on_the_cpu_pool(backend):
    jobs = [backend.run(long_circuit(18, 10), **LONG_OPTIONS) for _ in range(2)]
    assert wait_for(lambda: all(job.status() in (JobStatus.RUNNING, JobStatus.DONE) for job in jobs))
    for job in jobs:
        assert job.result().success
    first, second = (job._execution for job in jobs)
    assert first.started_at < second.finished_at and second.started_at < first.finished_at
