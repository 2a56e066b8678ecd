"""Bad input, memory limits, faults and load: typed errors, right final states, a usable backend."""

from __future__ import annotations

import gc
import random
import sys
import threading
import time
import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from qiskit import QuantumCircuit
from qiskit.circuit import Gate, Instruction, Parameter
from qiskit.circuit.classical import expr
from qiskit.circuit.library import UnitaryGate
from qiskit.providers import JobError, JobStatus
from qiskit.quantum_info import Statevector

from tests.helpers import bell
from gpu_provider import GPUSimulator
from gpu_provider.engine import devices
from gpu_provider.engine.statevector import StateVector
from gpu_provider.errors import (
    CircuitTooLargeError,
    DeviceUnavailableError,
    GPUProviderError,
    InvalidInputError,
    InvalidOptionError,
    IterationLimitError,
    SimulationError,
    UnboundParameterError,
    UnsupportedInstructionError,
)


def assert_backend_still_works(backend: GPUSimulator) -> None:
    counts = backend.run(bell(), shots=400, seed_simulator=9).result().get_counts()
    assert set(counts) == {"00", "11"} and sum(counts.values()) == 400
    assert 120 < counts["00"] < 280


@pytest.fixture
def backend():
    return GPUSimulator(device="CPU")


# ---------------------------------------------------------------------------
# bad input raises from run(), with the key words, and the backend goes on


class NotUnitary(Gate):
    def __init__(self):
        super().__init__("not_unitary", 1, [])

    def __array__(self, dtype=None, copy=None):
        return np.array([[1, 1], [0, 1]], dtype=dtype or complex)


def unbound():
    theta = Parameter("theta_x")
    qc = QuantumCircuit(1)
    qc.rx(theta, 0)
    return qc


def nan_param():
    qc = QuantumCircuit(1)
    qc.rx(float("nan"), 0)
    return qc


def inf_param():
    qc = QuantumCircuit(1)
    qc.rz(float("inf"), 0)
    return qc


def non_unitary_gate():
    qc = QuantumCircuit(1)
    qc.append(NotUnitary(), [0])
    return qc


def non_unitary_matrix():
    qc = QuantumCircuit(1)
    qc.append(UnitaryGate(np.array([[2, 0], [0, 1]]), check_input=False), [0])
    return qc


def unsupported():
    qc = QuantumCircuit(1)
    qc.append(Instruction("mystery_op", 1, 0, []), [0])
    return qc


def too_large():
    qc = QuantumCircuit(36)
    qc.h(range(36))  # every qubit used: idle ones are not simulated
    qc.t(0)  # not Clifford: method="automatic" cannot run it as a stabilizer state
    return qc


BAD_CIRCUITS = [
    (unbound, UnboundParameterError, ["theta_x", "bind"]),
    (nan_param, InvalidInputError, ["rx", "non-finite"]),
    (inf_param, InvalidInputError, ["rz", "non-finite"]),
    (non_unitary_gate, InvalidInputError, ["not_unitary", "not unitary"]),
    (non_unitary_matrix, InvalidInputError, ["unitary", "not unitary"]),
    (unsupported, UnsupportedInstructionError, ["mystery_op", "neither a matrix nor a definition"]),
    (too_large, CircuitTooLargeError, ["36-qubit", "bytes", "free"]),
]


@pytest.mark.parametrize("make, error, words", BAD_CIRCUITS, ids=[case[0].__name__ for case in BAD_CIRCUITS])
def test_bad_circuits_raise_typed_errors_from_run(backend, make, error, words):
    with pytest.raises(error) as info:
        backend.run(make())
    assert isinstance(info.value, GPUProviderError)
    for word in words:
        assert word in str(info.value)
    assert_backend_still_works(backend)


def test_too_large_names_qubits_and_bytes(backend):
    with pytest.raises(CircuitTooLargeError) as info:
        backend.run(too_large())
    assert info.value.num_qubits == 36
    assert info.value.bytes_needed > info.value.bytes_free > 0
    assert isinstance(info.value, MemoryError)


BAD_OPTIONS = [
    ({"shots": 0}, ["shots"]),
    ({"shots": -5}, ["shots"]),
    ({"shots": 2.5}, ["shots"]),
    ({"shots": "100"}, ["shots"]),
    ({"shots": True}, ["shots"]),
    ({"device": "TPU"}, ["device", "TPU"]),
    ({"device": 3}, ["device"]),
    ({"precision": "half"}, ["precision", "half"]),
    ({"seed_simulator": "abc"}, ["seed_simulator"]),
    ({"seed_simulator": 1.5}, ["seed_simulator"]),
    ({"seed_simulator": -1}, ["seed_simulator"]),
    ({"fusion_max_qubits": 0}, ["fusion_max_qubits", "1 to 8"]),
    ({"fusion_max_qubits": 30}, ["fusion_max_qubits"]),
    ({"fusion_threshold": -1}, ["fusion_threshold"]),
    ({"memory": "yes"}, ["memory"]),
    ({"statevector": 1}, ["statevector"]),
    ({"device_id": -1}, ["device_id"]),
    ({"max_loop_iterations": 0}, ["max_loop_iterations"]),
]


@pytest.mark.parametrize("options, words", BAD_OPTIONS)
def test_bad_option_values_raise(backend, options, words):
    with pytest.raises(InvalidOptionError) as info:
        backend.run(bell(), **options)
    for word in words:
        assert word in str(info.value)
    assert_backend_still_works(backend)


def test_bad_option_in_set_options_leaves_backend_unchanged(backend):
    with pytest.raises(InvalidOptionError, match="precision"):
        backend.set_options(precision="quad")
    assert backend.options.precision == "double"
    with pytest.raises(AttributeError, match="not an option"):
        backend.set_options(colour="blue")
    assert_backend_still_works(backend)


def test_unknown_run_option_warns(backend):
    with pytest.warns(UserWarning, match="Option colour is not used by this backend"):
        job = backend.run(bell(), colour="blue")
    assert job.result().success


def test_too_many_shots_for_memory(backend):
    with pytest.raises(InvalidOptionError, match="memory=True"):
        backend.run(bell(), shots=10**9, memory=True)
    assert_backend_still_works(backend)


@pytest.mark.parametrize(
    "run_input, words",
    [
        ("OPENQASM 2.0;", ["str", "QuantumCircuit"]),
        (42, ["int", "QuantumCircuit"]),
        ([], ["empty list"]),
        ([bell(), "x"], ["input 1", "str"]),
        (None, ["NoneType"]),
    ],
)
def test_non_circuits_are_refused(backend, run_input, words):
    with pytest.raises(InvalidInputError) as info:
        backend.run(run_input)
    for word in words:
        assert word in str(info.value)
    assert_backend_still_works(backend)


@pytest.mark.parametrize(
    "vector, words",
    [
        ([1, 0, 0], ["3 amplitudes", "needs 2^2 = 4"]),
        ([1, 1, 0, 0], ["not normalized", "1.414"]),
        ([np.nan, 0, 0, 0], ["NaN"]),
    ],
)
def test_bad_initial_state(backend, vector, words):
    with pytest.raises(InvalidInputError) as info:
        backend.run(bell(), initial_statevector=vector)
    for word in words:
        assert word in str(info.value)
    assert_backend_still_works(backend)


def test_initial_state_is_used(backend):
    vector = np.array([0, 0, 0, 1], dtype=complex)
    counts = backend.run(bell(), initial_statevector=vector, shots=100).result().get_counts()
    expected = Statevector(vector).evolve(bell().remove_final_measurements(inplace=False)).probabilities_dict()
    assert set(counts) <= {key for key, p in expected.items() if p > 1e-12}


def test_device_gpu_without_gpu_raises_with_reason(backend):
    if devices.probe_gpu().usable:
        pytest.skip("a GPU is usable here")
    with pytest.raises(DeviceUnavailableError) as info:
        backend.run(bell(), device="GPU")
    assert info.value.reason and info.value.reason in str(info.value)
    assert_backend_still_works(backend)


def test_device_id_that_does_not_exist(monkeypatch):
    monkeypatch.setattr(devices, "probe_gpu", lambda: devices.GPUProbe(True, "", 1, ("Fake GPU",)))
    backend = GPUSimulator()
    with pytest.raises(InvalidOptionError, match=r"device_id=3 does not exist.*1 GPU"):
        backend.run(bell(), device="GPU", device_id=3)
    assert_backend_still_works(GPUSimulator(device="CPU"))


def test_endless_loop_fails_the_job_not_the_process(backend):
    qc = QuantumCircuit(1, 1)
    with qc.while_loop(expr.logic_not(qc.clbits[0])):
        qc.id(0)
    job = backend.run(qc, shots=3, max_loop_iterations=1000)
    with pytest.raises(JobError, match="max_loop_iterations=1000"):
        job.result(timeout=60)
    assert job.status() == JobStatus.ERROR
    assert isinstance(job._execution.error, IterationLimitError)
    assert_backend_still_works(backend)


def test_statevector_option_refuses_mid_circuit_measurement(backend):
    qc = QuantumCircuit(1, 1)
    qc.measure(0, 0)
    qc.x(0)
    with pytest.raises(InvalidInputError, match="statevector=True"):
        backend.run(qc, statevector=True)
    assert_backend_still_works(backend)


# ---------------------------------------------------------------------------
# edge cases that are not errors


def test_circuit_without_classical_bits(backend):
    qc = QuantumCircuit(3)
    qc.h(0)
    qc.cx(0, 2)
    result = backend.run(qc, statevector=True, memory=True).result()
    assert result.get_counts() == {}
    assert result.get_memory() == []
    assert Statevector(result.get_statevector()).equiv(Statevector(qc))


def test_circuit_without_qubits(backend):
    qc = QuantumCircuit()
    qc.global_phase = 0.7
    result = backend.run(qc, statevector=True).result()
    assert result.get_counts() == {}
    np.testing.assert_allclose(result.get_statevector(), [np.exp(0.7j)], atol=1e-14)


# ---------------------------------------------------------------------------
# memory: nothing left behind


def test_refused_and_failed_jobs_leave_no_memory_behind(backend, monkeypatch):
    def run_batch():
        for _ in range(100):
            with pytest.raises(CircuitTooLargeError):
                backend.run(too_large())
        original = StateVector.apply_unitary

        def failing(self, qubits, matrix):
            raise MemoryError("injected: out of memory in a kernel")

        monkeypatch.setattr(StateVector, "apply_unitary", failing)
        qc = QuantumCircuit(16)
        qc.h(range(16))
        jobs = [backend.run(qc, shots=1) for _ in range(100)]
        for job in jobs:
            with pytest.raises(JobError, match="injected"):
                job.result(timeout=60)
        monkeypatch.setattr(StateVector, "apply_unitary", original)

    run_batch()  # warm caches (translation, dispatcher threads)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        run_batch()
        gc.collect()
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    state_bytes = (1 << 16) * 16
    assert after - before < state_bytes, f"{after - before} bytes were left behind"
    assert_backend_still_works(backend)


# ---------------------------------------------------------------------------
# faults


def test_exception_injected_in_a_running_job(backend, monkeypatch):
    calls = {"n": 0}
    original = StateVector.apply_unitary

    def flaky(self, qubits, matrix):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("injected fault")
        return original(self, qubits, matrix)

    monkeypatch.setattr(StateVector, "apply_unitary", flaky)
    qc = QuantumCircuit(10)
    for q in range(10):
        qc.h(q)
    job = backend.run(qc, shots=1)
    with pytest.raises(JobError, match="injected fault") as info:
        job.result(timeout=60)
    assert isinstance(info.value.__cause__, RuntimeError)
    assert job.status() == JobStatus.ERROR and job.in_final_state()
    monkeypatch.setattr(StateVector, "apply_unitary", original)
    assert_backend_still_works(backend)


def _long_circuit() -> QuantumCircuit:
    qc = QuantumCircuit(14, 14)
    for layer in range(30):
        for q in range(14):
            qc.ry(0.1 * (layer + q), q)
        for q in range(13):
            qc.cx(q, q + 1)
    qc.measure(range(14), range(14))
    return qc


def test_cancel_at_random_moments(backend):
    rng = random.Random(1234)
    qc = _long_circuit()
    expected = Statevector(qc.remove_final_measurements(inplace=False)).probabilities_dict()
    outcomes = {"cancelled": 0, "done": 0}
    for _ in range(40):
        job = backend.run(qc, shots=50, fusion_enable=False)
        time.sleep(rng.uniform(0, 0.03))
        took = job.cancel()
        status = job.status()
        assert status in (JobStatus.CANCELLED, JobStatus.DONE)
        assert took == (status == JobStatus.CANCELLED)
        assert job.in_final_state() and not job.running()
        if status == JobStatus.CANCELLED:
            outcomes["cancelled"] += 1
            with pytest.raises(JobError, match="cancelled"):
                job.result()
        else:
            outcomes["done"] += 1
            counts = job.result().get_counts()
            assert all(expected.get(key, 0) > 0 for key in counts)
    assert outcomes["cancelled"] > 0
    assert_backend_still_works(backend)


@pytest.fixture
def fresh_probe():
    devices.reset_probe()
    yield
    devices.reset_probe()


def _fallback_checks(reason_words: list[str]) -> None:
    probe = devices.probe_gpu()
    assert not probe.usable
    for word in reason_words:
        assert word in probe.reason
    auto = GPUSimulator()
    result = auto.run(bell(), shots=100).result()
    metadata = result.results[0].metadata
    assert metadata["device"] == "CPU"
    assert metadata["gpu_unavailable_reason"] == probe.reason
    with pytest.raises(DeviceUnavailableError) as info:
        GPUSimulator(device="GPU").run(bell())
    assert info.value.reason == probe.reason


def test_cupy_missing_falls_back_with_reason(fresh_probe, monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # makes `import cupy` raise ImportError
    _fallback_checks(["CuPy is not importable"])


def test_cupy_without_gpu_falls_back_with_reason(fresh_probe):
    cupy = pytest.importorskip("cupy")
    try:
        cupy.cuda.runtime.getDeviceCount()
        pytest.skip("a CUDA device is visible here")
    except Exception:
        pass
    _fallback_checks(["no CUDA device is visible"])


def test_nvrtc_missing_falls_back_with_reason(fresh_probe, monkeypatch):
    cupy = pytest.importorskip("cupy")

    def no_nvrtc():
        raise OSError("libnvrtc.so: cannot open shared object file")

    monkeypatch.setattr(cupy.cuda.runtime, "getDeviceCount", lambda: 1)
    monkeypatch.setattr(cupy.cuda.nvrtc, "getVersion", no_nvrtc)
    _fallback_checks(["NVRTC cannot be loaded", "libnvrtc"])


def test_probe_is_lazy_and_cached(fresh_probe, monkeypatch):
    calls = {"n": 0}
    cupy = pytest.importorskip("cupy")
    original = cupy.cuda.runtime.getDeviceCount

    def counting():
        calls["n"] += 1
        return original()

    monkeypatch.setattr(cupy.cuda.runtime, "getDeviceCount", counting)
    for _ in range(3):
        GPUSimulator().run(bell(), shots=10).result()
    assert calls["n"] <= 1


# ---------------------------------------------------------------------------
# load


def test_load_200_jobs_from_8_threads_mixed_sizes_and_devices():
    backends = [GPUSimulator(device="CPU"), GPUSimulator(device="auto", precision="single")]
    failures: list = []
    gc.collect()
    tracemalloc.start()
    baseline = tracemalloc.get_traced_memory()[0]

    def worker(index: int) -> None:
        rng = np.random.default_rng(index)
        for j in range(25):
            backend = backends[(index + j) % 2]
            n = int(rng.integers(1, 13))
            qc = QuantumCircuit(n)
            for q in range(n):
                qc.ry(float(rng.uniform(0, np.pi)), q)
            for q in range(n - 1):
                qc.cx(q, q + 1)
            try:
                result = backend.run(qc, shots=1, statevector=True).result(timeout=120)
                fidelity = abs(np.vdot(Statevector(qc).data, result.get_statevector())) ** 2
                tolerance = 1e-5 if backend.options.precision == "single" else 1e-12
                if fidelity < 1 - tolerance:
                    failures.append((index, j, n, fidelity))
            except Exception as exc:  # recorded, asserted below
                failures.append((index, j, repr(exc)))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    gc.collect()
    leftover = tracemalloc.get_traced_memory()[0] - baseline
    tracemalloc.stop()
    assert not any(thread.is_alive() for thread in threads), "deadlock: a worker thread never finished"
    assert failures == []
    assert leftover < 4 * (1 << 12) * 16 + 2_000_000, f"{leftover} bytes still held after the load"


# ---------------------------------------------------------------------------
# property: random circuits against qiskit.quantum_info.Statevector

GATES_1Q = ["h", "x", "y", "z", "s", "sdg", "t", "tdg", "sx"]
GATES_1Q_PARAM = ["rx", "ry", "rz", "p"]
GATES_2Q = ["cx", "cz", "swap", "iswap", "ecr", "cy", "ch"]
GATES_2Q_PARAM = ["crx", "cry", "crz", "cp", "rxx", "ryy", "rzz", "rzx"]


@st.composite
def random_circuits(draw):
    n = draw(st.integers(min_value=1, max_value=7))
    qc = QuantumCircuit(n)
    for _ in range(draw(st.integers(min_value=0, max_value=25))):
        kind = draw(st.sampled_from(["1q", "1qp", "2q", "2qp", "ccx"] if n >= 3 else ["1q", "1qp", "2q", "2qp"] if n >= 2 else ["1q", "1qp"]))
        angle = draw(st.floats(min_value=-7, max_value=7, allow_nan=False))
        qubits = draw(st.permutations(range(n)))
        if kind == "1q":
            getattr(qc, draw(st.sampled_from(GATES_1Q)))(qubits[0])
        elif kind == "1qp":
            getattr(qc, draw(st.sampled_from(GATES_1Q_PARAM)))(angle, qubits[0])
        elif kind == "2q":
            getattr(qc, draw(st.sampled_from(GATES_2Q)))(qubits[0], qubits[1])
        elif kind == "2qp":
            getattr(qc, draw(st.sampled_from(GATES_2Q_PARAM)))(angle, qubits[0], qubits[1])
        else:
            qc.ccx(qubits[0], qubits[1], qubits[2])
    return qc


@settings(max_examples=60, deadline=None)
@given(qc=random_circuits(), fusion=st.booleans(), width=st.integers(min_value=1, max_value=6))
def test_random_circuits_match_statevector(qc, fusion, width):
    backend = GPUSimulator(device="CPU", fusion_enable=fusion, fusion_threshold=1, fusion_max_qubits=width)
    result = backend.run(qc, shots=1, statevector=True).result()
    fidelity = abs(np.vdot(Statevector(qc).data, result.get_statevector())) ** 2
    assert fidelity >= 1 - 1e-12
