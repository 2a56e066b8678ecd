"""What code written for Qiskit expects of a backend: option probing, run options
every simulator receives, errors caught as ``QiskitError``, a quiet log."""

from __future__ import annotations

import logging
import pickle
import warnings

import pytest
from qiskit import QuantumCircuit
from qiskit.circuit import Parameter
from qiskit.exceptions import QiskitError
from qiskit.providers.basic_provider import BasicSimulator
from qiskit.result.models import MeasLevel, MeasReturnType

from gpu_provider import GPUSimulator
from gpu_provider.engine import devices
from gpu_provider.errors import (
    CircuitTooLargeError,
    InvalidOptionError,
    UnboundParameterError,
    UnknownOptionError,
)
from gpu_provider.plugins import NekoBackendPlugin
from tests.helpers import bell


@pytest.fixture
def backend():
    return GPUSimulator(device="CPU")


def test_set_options_with_an_unknown_field_raises_attribute_error_like_basic_simulator(backend):
    with pytest.raises(AttributeError):
        BasicSimulator().set_options(noise_model=None)  # the contract, as Qiskit's own simulator keeps it
    with pytest.raises(AttributeError) as info:
        backend.set_options(noise_model=None)
    assert isinstance(info.value, UnknownOptionError) and isinstance(info.value, QiskitError)
    assert "'noise_model' is not an option" in str(info.value) and "'shots'" in str(info.value)
    # Probing an option the way host tools do leaves the backend as it was.
    try:
        backend.set_options(noise_model=None, shots=7)
    except AttributeError:
        pass
    assert backend.options.shots == 1024
    assert sorted(backend.run(bell(), shots=100, seed_simulator=1).result().get_counts()) == ["00", "11"]


IDEAL = [
    {"meas_level": 2},
    {"meas_level": MeasLevel.CLASSIFIED, "meas_return": MeasReturnType.AVERAGE},
    {"meas_return": "single", "init_qubits": True, "rep_delay": 2.5e-4, "rep_time": None},
]


@pytest.mark.parametrize("options", IDEAL)
def test_run_options_every_simulator_receives_are_accepted_quietly(backend, options):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = backend.run(bell(), shots=500, seed_simulator=3, memory=True, **options).result()
    plain = backend.run(bell(), shots=500, seed_simulator=3, memory=True).result()
    assert result.get_memory() == plain.get_memory()


@pytest.mark.parametrize(
    "options, words",
    [
        ({"meas_level": 1}, ["meas_level=1", "pulse-level", "meas_level=2"]),
        ({"meas_level": MeasLevel.RAW}, ["pulse-level"]),
        ({"meas_return": "sometimes"}, ["meas_return"]),
        ({"init_qubits": False}, ["init_qubits=False", "|0...0>"]),
        ({"rep_delay": -1}, ["rep_delay"]),
        ({"noise_model": object()}, ["noise_model", "noiseless", "AerSimulator"]),
        ({"method": "density_matrix"}, ["method='density_matrix'", "statevector"]),
    ],
)
def test_run_options_asking_for_what_a_simulator_cannot_give_are_errors(backend, options, words):
    with pytest.raises(InvalidOptionError) as info:
        backend.run(bell(), **options)
    assert isinstance(info.value, QiskitError)
    for word in words:
        assert word in str(info.value)


def test_other_unknown_run_options_still_warn(backend):
    with pytest.warns(UserWarning, match="Option max_parallel_experiments is not used by this backend"):
        assert backend.run(bell(), shots=10, max_parallel_experiments=4).result().success


def test_aer_options_that_keep_the_answer_are_accepted(backend):
    """Code written for AerSimulator: noise_model=None and the state vector method change nothing."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = backend.run(bell(), shots=500, seed_simulator=3, memory=True, noise_model=None, method="statevector").result()
    plain = backend.run(bell(), shots=500, seed_simulator=3, memory=True).result()
    assert result.get_memory() == plain.get_memory()
    backend.set_options(method="automatic")
    backend.set_options(method="stabilizer")  # Clifford circuits as tableaux (tests/test_stabilizer.py)
    with pytest.raises(InvalidOptionError, match="stabilizer"):
        backend.set_options(method="density_matrix")


def test_errors_are_qiskit_errors_and_keep_their_type_message_and_fields(backend):
    qc = QuantumCircuit(1)
    qc.rx(Parameter("theta_x"), 0)
    with pytest.raises(QiskitError) as info:
        backend.run(qc)
    error = info.value
    assert isinstance(error, UnboundParameterError) and isinstance(error, ValueError)
    assert type(error).__name__ == "UnboundParameterError"
    assert str(error).startswith("circuit") and "theta_x" in str(error) and error.message == str(error)

    with pytest.raises(QiskitError, match="precision"):
        backend.set_options(precision="quad")
    with pytest.raises(QiskitError, match="backend_selection"):
        NekoBackendPlugin().get_backend("tpu")

    wide = QuantumCircuit(36)
    wide.h(range(36))
    wide.t(0)  # not Clifford: no stabilizer state either
    with pytest.raises(QiskitError) as info:
        backend.run(wide)
    assert isinstance(info.value, CircuitTooLargeError) and isinstance(info.value, MemoryError)
    assert info.value.num_qubits == 36 and info.value.bytes_needed > info.value.bytes_free
    copy = pickle.loads(pickle.dumps(info.value))
    assert type(copy) is type(info.value) and copy.num_qubits == 36 and str(copy) == str(info.value)


def test_gpu_fallback_reason_is_logged_once_per_process(monkeypatch, caplog):
    monkeypatch.setenv("GPU_PROVIDER_DISABLE_GPU", "1")
    monkeypatch.setattr(devices, "_LOGGED_REASONS", set())
    devices.reset_probe()
    try:
        backend = GPUSimulator()
        with caplog.at_level(logging.INFO, logger="gpu_provider"):
            for _ in range(30):
                assert backend.target.num_qubits >= 1
            results = [backend.run(bell(), shots=10).result() for _ in range(3)]
        lines = [r for r in caplog.records if "runs on the CPU" in r.getMessage()]
        assert len(lines) == 1 and lines[0].levelno == logging.INFO
        assert "GPU_PROVIDER_DISABLE_GPU" in lines[0].getMessage()
        for result in results:
            assert "GPU_PROVIDER_DISABLE_GPU" in result.results[0].metadata["gpu_unavailable_reason"]
    finally:
        devices.reset_probe()
