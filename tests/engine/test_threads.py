"""The CPU engine's BLAS threads per job (engine/threads.py), and the options that set them.

Oracles: a fake library that records every count set (the policy, the sharing
and the restoring, exactly); the real BLAS NumPy loaded, read through
threadpoolctl from inside a running job; exact distributions (Statevector) for the
counts of the jobs run under each limit.
"""

from __future__ import annotations

import concurrent.futures
import os
import threading
import warnings

import numpy as np
import pytest
from qiskit import QuantumCircuit

import gpu_provider.backend as backend_module
from gpu_provider.engine import threads as threads_module
from gpu_provider.engine.threads import DEFAULT_PARALLEL_THRESHOLD, BlasThreads, threads_for
from gpu_provider.errors import InvalidOptionError
from tests.helpers import assert_counts_match, exact_distribution, make_backend, report_from_forked_child


class FakeLibrary:
    """A BLAS whose count starts at ``count``; records every set."""

    def __init__(self, count: int, fail: bool = False) -> None:
        self.count = count
        self.sets: list[int] = []
        self.fail = fail

    def get(self) -> int:
        return self.count

    def set(self, count: int) -> None:
        if self.fail:
            raise OSError("this library refuses")
        self.sets.append(count)
        self.count = count


@pytest.fixture
def eight_cores(monkeypatch):
    monkeypatch.setattr(threads_module, "cores", lambda: 8)


def test_policy_one_thread_up_to_the_threshold(eight_cores):
    assert threads_for(DEFAULT_PARALLEL_THRESHOLD) == 1
    assert threads_for(1) == 1
    assert threads_for(DEFAULT_PARALLEL_THRESHOLD + 1) == 8
    assert threads_for(20, max_parallel_threads=3) == 3
    assert threads_for(20, max_parallel_threads=64) == 8  # never more than the cores
    assert threads_for(10, parallel_threshold=9) == 8
    assert threads_for(10, max_parallel_threads=2, parallel_threshold=0) == 2
    assert DEFAULT_PARALLEL_THRESHOLD == 14  # Aer's statevector_parallel_threshold


def test_a_hold_sets_and_restores(eight_cores):
    library = FakeLibrary(8)
    limit = BlasThreads(library)
    with limit.hold(1):
        assert library.count == 1
    assert library.count == 8
    assert library.sets == [1, 8]
    with limit.hold(8):  # what the library has already: nothing set
        assert library.count == 8
    assert library.sets == [1, 8]


def test_holds_share_the_cores_and_the_smallest_ask_wins(eight_cores):
    library = FakeLibrary(8)
    limit = BlasThreads(library)
    with limit.hold(8):
        assert library.count == 8
        with limit.hold(8):
            assert library.count == 4  # two jobs on 8 cores: 4 threads each
            with limit.hold(8):
                assert library.count == 2  # 8 // 3
                with limit.hold(1):
                    assert library.count == 1
                assert library.count == 2
            assert library.count == 4
        assert library.count == 8
    assert library.count == 8
    assert library.sets == [4, 2, 1, 2, 4, 8]


def test_never_above_the_count_found(eight_cores):
    library = FakeLibrary(2)  # the user's OPENBLAS_NUM_THREADS=2, say
    limit = BlasThreads(library)
    with limit.hold(8):
        assert library.count == 2
    assert library.sets == []
    # The user changes the count between jobs: the next job starts from the new one.
    library.count = 3
    with limit.hold(8):
        assert library.count == 3
    with limit.hold(1):
        assert library.count == 1
    assert library.count == 3


def test_a_ceiling_set_outside_and_during_jobs(eight_cores):
    library = FakeLibrary(8)
    limit = BlasThreads(library)
    limit.set_ceiling(4)
    assert library.count == 4
    with limit.hold(8):
        assert library.count == 4
        limit.set_ceiling(2)
        assert library.count == 2
    assert library.count == 2  # the ceiling is kept after the job


def test_a_library_that_refuses_never_fails_a_job(eight_cores):
    library = FakeLibrary(8, fail=True)
    limit = BlasThreads(library)
    with limit.hold(1):
        pass
    with limit.hold(1):
        pass
    assert library.count == 8


def test_holds_from_many_threads_leave_the_count_as_found(eight_cores):
    library = FakeLibrary(8)
    limit = BlasThreads(library)
    seen = []
    barrier = threading.Barrier(6)

    def job(ask):
        with limit.hold(ask):
            barrier.wait()
            seen.append(library.count)
            barrier.wait()

    workers = [threading.Thread(target=job, args=(ask,)) for ask in (8, 8, 8, 8, 2, 8)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert seen == [1] * 6  # six jobs on 8 cores: one thread each while all run
    assert library.count == 8


def _library_threads():
    from threadpoolctl import threadpool_info

    blas = [info for info in threadpool_info() if info["user_api"] == "blas"]
    numpy_own = [info for info in blas if threads_module._in_numpy(info["filepath"])]
    return (numpy_own or blas)[0]["num_threads"] if blas else None


def _real_library_or_skip():
    pytest.importorskip("threadpoolctl")
    from threadpoolctl import threadpool_limits

    if threads_module._find_setter() is None:
        pytest.skip("no BLAS library that threadpoolctl recognises")
    before = _library_threads()
    if before is None or before < 2:
        pytest.skip(f"BLAS runs {before} thread(s) here: a limit of one cannot be observed")
    return threadpool_limits, before


def test_the_real_library_is_limited_from_a_worker_thread():
    """threadpoolctl lets only its first controlling thread set OpenBLAS's count; our jobs run in
    worker threads, so the engine sets it through the library's own entry point."""
    threadpool_limits, before = _real_library_or_skip()
    with threadpool_limits(limits=before):  # the main thread becomes threadpoolctl's controlling thread
        seen = []

        def job():
            with threads_module.BLAS_THREADS.hold(1):
                seen.append(_library_threads())
            seen.append(_library_threads())

        worker = threading.Thread(target=job)
        worker.start()
        worker.join()
        assert seen == [1, before]
    assert _library_threads() == before


def _ghz(n):
    qc = QuantumCircuit(n)
    qc.h(0)
    for q in range(n - 1):
        qc.cx(q, q + 1)
    qc.rx(0.3, range(n))
    qc.measure_all()
    return qc


def _threads_seen_by_jobs(monkeypatch, module=backend_module):
    """Record the real library's thread count each time ``module`` (the backend, or an
    executor's chunk runner) runs a program."""
    seen = []
    original = module.run_program

    def recording(*args, **kwargs):
        seen.append(_library_threads())
        return original(*args, **kwargs)

    monkeypatch.setattr(module, "run_program", recording)
    return seen


@pytest.mark.parametrize("n, options, expected", [
    (10, {}, 1),
    (DEFAULT_PARALLEL_THRESHOLD, {}, 1),
    (DEFAULT_PARALLEL_THRESHOLD + 1, {}, "all"),
    (DEFAULT_PARALLEL_THRESHOLD + 1, {"max_parallel_threads": 1}, 1),
    (10, {"statevector_parallel_threshold": 9}, "all"),
    (10, {"statevector_parallel_threshold": 0, "max_parallel_threads": 1}, 1),
])
def test_backend_jobs_run_with_the_threads_their_options_ask(monkeypatch, n, options, expected):
    _, before = _real_library_or_skip()
    seen = _threads_seen_by_jobs(monkeypatch)
    backend = make_backend("CPU")
    qc = _ghz(n)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the options are known: no "not used" warning
        counts = backend.run(qc, shots=2000, seed_simulator=11, **options).result().get_counts()
    assert seen == [before if expected == "all" else expected]
    assert _library_threads() == before
    assert_counts_match(counts, exact_distribution(qc), 2000)


def test_set_options_and_validation():
    backend = make_backend("CPU")
    assert backend.options.max_parallel_threads == 0
    assert backend.options.statevector_parallel_threshold == DEFAULT_PARALLEL_THRESHOLD
    backend.set_options(max_parallel_threads=np.int64(2), statevector_parallel_threshold=20)
    assert backend.options.max_parallel_threads == 2 and type(backend.options.max_parallel_threads) is int
    for key, bad in (("max_parallel_threads", -1), ("max_parallel_threads", 1.5), ("max_parallel_threads", "2"),
                     ("statevector_parallel_threshold", -3), ("statevector_parallel_threshold", True)):
        with pytest.raises(InvalidOptionError, match=key):
            backend.set_options(**{key: bad})
        with pytest.raises(InvalidOptionError, match=key):
            backend.run(_ghz(2), **{key: bad})
    assert backend.options.max_parallel_threads == 2  # a refused value leaves the option as it was
    counts = backend.run(_ghz(3), shots=1000, seed_simulator=1).result().get_counts()
    assert_counts_match(counts, exact_distribution(_ghz(3)), 1000)


def test_concurrent_jobs_share_the_cores_and_restore(monkeypatch):
    _, before = _real_library_or_skip()
    seen = []
    original = backend_module.run_program
    both = threading.Barrier(2, timeout=60)

    def recording(*args, **kwargs):
        both.wait()  # both jobs (the CPU runs two at once) hold their threads before either reads
        seen.append(_library_threads())
        both.wait()  # and neither lets go before the other has read
        return original(*args, **kwargs)

    monkeypatch.setattr(backend_module, "run_program", recording)
    backend = make_backend("CPU")
    qc = _ghz(DEFAULT_PARALLEL_THRESHOLD + 1)
    jobs = [backend.run(qc, shots=100, seed_simulator=seed) for seed in (1, 2)]
    for job in jobs:
        assert_counts_match(job.result(timeout=120).get_counts(), exact_distribution(qc), 100)
    expected = max(1, min(before, threads_module.cores() // 2))
    assert seen == [expected, expected]
    assert _library_threads() == before


def test_executor_chunks_hold_their_own_threads(monkeypatch):
    _, before = _real_library_or_skip()
    import gpu_provider.engine.remote as remote_module

    seen = _threads_seen_by_jobs(monkeypatch, remote_module)
    backend = make_backend("CPU")
    circuits = [_ghz(6), _ghz(7)]
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        result = backend.run(circuits, shots=500, seed_simulator=3, executor=pool, max_job_size=2).result()
    assert seen == [1, 1]
    assert _library_threads() == before
    for index, qc in enumerate(circuits):
        assert_counts_match(result.get_counts(index), exact_distribution(qc), 500)


@pytest.fixture
def asks(monkeypatch):
    """The thread counts jobs ask of BLAS_THREADS (still applied: the hold is the real one)."""
    recorded = []
    original = threads_module.BLAS_THREADS.hold

    def recording(threads):
        recorded.append(threads)
        return original(threads)

    monkeypatch.setattr(threads_module.BLAS_THREADS, "hold", recording)
    return recorded


def test_primitives_ask_by_width_and_the_backend_options(asks, eight_cores):
    from qiskit.quantum_info import SparsePauliOp, Statevector

    from gpu_provider.primitives import EstimatorV2

    qc = _ghz(DEFAULT_PARALLEL_THRESHOLD + 1).remove_final_measurements(inplace=False)
    observable = SparsePauliOp("Z" * qc.num_qubits)
    exact = Statevector(qc).expectation_value(observable).real
    value = EstimatorV2(options={"backend_options": {"device": "CPU"}}).run([(qc, observable)]).result()[0].data.evs
    assert asks == [8]
    narrow = EstimatorV2(options={"backend_options": {"device": "CPU", "max_parallel_threads": 3}})
    assert np.isclose(narrow.run([(qc, observable)]).result()[0].data.evs, exact, atol=1e-10)
    assert np.isclose(value, exact, atol=1e-10)
    assert asks == [8, 3]


def test_pennylane_device_asks_by_width(asks, eight_cores):
    qml = pytest.importorskip("pennylane")
    from gpu_provider.pennylane_device import GPUQubitDevice

    for wires, expected in ((4, 1), (DEFAULT_PARALLEL_THRESHOLD + 1, 8)):
        dev = GPUQubitDevice(wires=wires, device="CPU")
        reference = qml.device("default.qubit", wires=wires)

        def circuit(x):
            qml.RX(x, 0)
            qml.CNOT([0, wires - 1])
            return qml.expval(qml.PauliZ(wires - 1))

        ours = qml.QNode(circuit, dev, diff_method="adjoint")
        theirs = qml.QNode(circuit, reference)
        x = qml.numpy.array(0.4, requires_grad=True)
        assert np.isclose(ours(x), theirs(x), atol=1e-12)
        assert np.isclose(qml.grad(ours)(x), qml.grad(theirs)(x), atol=1e-10)
        assert asks and set(asks) == {expected}
        asks.clear()


def test_numpys_own_library_is_the_one_set():
    """SciPy's wheels load an OpenBLAS of their own; the engine's products run in NumPy's."""
    assert threads_module._in_numpy("/venv/site-packages/numpy.libs/libscipy_openblas64_-32a4b2a6.so")
    assert threads_module._in_numpy("/venv/site-packages/numpy/.dylibs/libscipy_openblas64_.dylib")
    assert threads_module._in_numpy("C:\\venv\\Lib\\site-packages\\numpy.libs\\libscipy_openblas64_.dll")
    assert not threads_module._in_numpy("/venv/site-packages/scipy.libs/libscipy_openblas-6cdc3b4a.so")
    assert not threads_module._in_numpy("/home/numpy-user/lib/libopenblas.so")
    pytest.importorskip("scipy.linalg")  # loads SciPy's library beside NumPy's, where its wheel has one
    setter = threads_module._find_setter()
    if setter is not None and any(threads_module._in_numpy(info["filepath"]) for info in _blas_infos()):
        assert threads_module._in_numpy(setter._controller.filepath)


def _blas_infos():
    from threadpoolctl import threadpool_info

    return [info for info in threadpool_info() if info["user_api"] == "blas"]


def test_a_child_forked_during_a_job_starts_its_first_job_from_the_parents_count(eight_cores):
    library = FakeLibrary(8)
    limit = BlasThreads(library)
    parent_job = limit.hold(1)  # the parent's job, running when it forks (kept: it never ends here)
    parent_job.__enter__()
    assert library.count == 1
    limit.after_fork()  # in the child: the job's count, no job of its own
    assert library.sets == [1]  # the fork handler does not call the library
    with limit.hold(8):
        assert library.count == 8
    assert library.count == 8
    with limit.hold(1):
        assert library.count == 1
    assert library.count == 8
    # A child that set its own count before its first job keeps it.
    library = FakeLibrary(8)
    limit = BlasThreads(library)
    parent_job = limit.hold(1)
    parent_job.__enter__()
    limit.after_fork()
    library.count = 3
    with limit.hold(8):
        assert library.count == 3
    assert library.count == 3


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_real_forked_child_runs_and_restores():
    """A job in a child process forked while the parent's job held one thread."""
    _, before = _real_library_or_skip()

    def child_job() -> bytes:  # one job as wide as takes every core
        with threads_module.BLAS_THREADS.hold(threads_for(DEFAULT_PARALLEL_THRESHOLD + 1)):
            inside = _library_threads()
        return bytes([inside, _library_threads()])

    with threads_module.BLAS_THREADS.hold(1):
        reported = report_from_forked_child(child_job, 2)
        assert _library_threads() == 1
    assert tuple(reported) == (before, before)
    assert _library_threads() == before
