"""qBraid: load_provider("gpu_provider"), its devices, and the job lifecycle.

Skipped where the ``qbraid`` extra is not installed; CI installs it.
"""

from __future__ import annotations

import time

import pytest

from tests.helpers import import_host  # noqa: E402

import_host("qbraid.runtime")

from qbraid.programs import ExperimentType  # noqa: E402
from qbraid.runtime import DeviceStatus, JobStatus, get_providers, load_provider  # noqa: E402
from qbraid.runtime.exceptions import JobStateError, ProgramValidationError, ResourceNotFoundError  # noqa: E402
from qiskit import QuantumCircuit  # noqa: E402
from qiskit.circuit import Parameter  # noqa: E402

from benchmarks.status_latency import long_circuit  # noqa: E402
from gpu_provider.engine.devices import probe_gpu  # noqa: E402
from gpu_provider.qbraid_provider import GPUQbraidDevice, GPUQbraidJob, GPUQbraidProvider  # noqa: E402
from tests.helpers import assert_counts_match, exact_distribution, wait_for  # noqa: E402

LONG_OPTIONS = {"fusion_enable": False, "shots": 10}

QASM3 = """
OPENQASM 3.0;
include "stdgates.inc";
qubit[3] q;
bit[3] c;
h q[0];
cx q[0], q[1];
ry(0.7) q[2];
c = measure q;
"""

QASM2 = """
OPENQASM 2.0;
include "qelib1.inc";
qreg q[3];
creg c[3];
h q[0];
cx q[0], q[1];
ry(0.7) q[2];
measure q -> c;
"""


def _reference() -> QuantumCircuit:
    qc = QuantumCircuit(3, 3)
    qc.h(0)
    qc.cx(0, 1)
    qc.ry(0.7, 2)
    qc.measure(range(3), range(3))
    return qc


@pytest.fixture(scope="module")
def cpu() -> GPUQbraidDevice:
    return load_provider("gpu_provider").get_device("gpu_provider_cpu")


def test_discovered_by_qbraid_lookup():
    assert "gpu_provider" in get_providers()
    provider = load_provider("gpu_provider")
    assert isinstance(provider, GPUQbraidProvider)
    assert [device.id for device in provider.get_devices()] == ["gpu_provider_gpu", "gpu_provider_cpu"]
    assert [device.id for device in provider.get_devices(status=DeviceStatus.ONLINE)] == (
        ["gpu_provider_gpu", "gpu_provider_cpu"] if probe_gpu().usable else ["gpu_provider_cpu"]
    )
    with pytest.raises(ResourceNotFoundError, match="gpu_provider_cpu"):
        provider.get_device("tpu")


def test_target_profiles(cpu):
    profile = cpu.profile
    assert profile.device_id == "gpu_provider_cpu" and profile.simulator
    assert profile.experiment_type == ExperimentType.GATE_MODEL
    assert profile.program_spec.alias == "qiskit" and profile.program_spec.program_type is QuantumCircuit
    assert profile.num_qubits >= 20
    assert cpu.status() == DeviceStatus.ONLINE
    assert {"qiskit", "qasm2", "qasm3"} <= set(cpu.supported_run_inputs())
    gpu = load_provider("gpu_provider").get_device("gpu_provider_gpu")
    assert gpu.status() == (DeviceStatus.ONLINE if probe_gpu().usable else DeviceStatus.UNAVAILABLE)
    assert cpu.metadata()["queue_depth"] == 0
    if not probe_gpu().usable:  # no queue: qBraid's metadata leaves the entry out
        with pytest.raises(ResourceNotFoundError, match="no queue"):
            gpu.queue_depth()
        assert "queue_depth" not in gpu.metadata()


@pytest.mark.parametrize("program", [pytest.param(_reference(), id="qiskit"), pytest.param(QASM3, id="qasm3"), pytest.param(QASM2, id="qasm2")])
def test_programs_through_the_transpiler_give_exact_distribution(cpu, program):
    job = cpu.run(program, shots=4000, seed_simulator=7)
    assert isinstance(job, GPUQbraidJob)
    result = job.result()
    assert result.success and result.device_id == "gpu_provider_cpu" and result.job_id == job.id
    assert_counts_match(result.data.get_counts(), exact_distribution(_reference()), shots=4000)
    assert job.status() == JobStatus.COMPLETED


def test_batch_gives_one_job_per_circuit_and_memory(cpu):
    jobs = cpu.run([_reference(), QASM3], shots=20, memory=True, seed_simulator=1)
    assert len(jobs) == 2
    for job in jobs:
        result = job.result()
        assert result.data.measurements.shape == (20, 3)
        assert sum(result.data.get_counts().values()) == 20


def test_provider_options_reach_the_backend():
    device = load_provider("gpu_provider", precision="single").get_device("gpu_provider_cpu")
    result = device.run(_reference(), shots=10).result()
    assert result.details["metadata"]["precision"] == "single"


# ---------------------------------------------------------------------------
# job lifecycle: submit, status (never blocking), cancel, result


def test_status_never_blocks_and_follows_the_engine_events(cpu):
    job = cpu.run(long_circuit(18, 20), **LONG_OPTIONS)
    seen = set()
    slowest = 0.0
    while True:
        start = time.perf_counter()
        status = job.status()
        slowest = max(slowest, time.perf_counter() - start)
        seen.add(status)
        if status in JobStatus.terminal_states():
            break
        time.sleep(0.005)
    assert status == JobStatus.COMPLETED
    assert JobStatus.RUNNING in seen
    assert slowest < 0.05, f"status() took {slowest:.3f} s"
    assert job.is_terminal_state() and job.metadata()["status"] == JobStatus.COMPLETED
    done, total = job.progress()
    assert done == total


def test_cancel_running_job_then_device_runs_the_next(cpu):
    job = cpu.run(long_circuit(), **LONG_OPTIONS)
    assert wait_for(lambda: job.status() == JobStatus.RUNNING)
    job.cancel()
    assert job.status() == JobStatus.CANCELLED
    result = job.result()
    assert not result.success and "cancelled" in result.details["error"]
    with pytest.raises(JobStateError, match="CANCELLED"):
        job.cancel()
    counts = cpu.run(_reference(), shots=1000, seed_simulator=2).result().data.get_counts()
    assert_counts_match(counts, exact_distribution(_reference()), shots=1000)


def test_cancel_queued_job_never_runs(cpu):
    busy = [cpu.run(long_circuit(), **LONG_OPTIONS) for _ in range(2)]
    try:
        assert wait_for(lambda: all(job.status() == JobStatus.RUNNING for job in busy))
        assert cpu.queue_depth() == 0  # the running jobs are not queued
        queued = cpu.run(_reference(), shots=10)
        assert queued.status() == JobStatus.QUEUED
        assert cpu.queue_depth() == 1 and cpu.metadata()["queue_depth"] == 1
        queued.cancel()
        assert queued.status() == JobStatus.CANCELLED
        assert cpu.queue_depth() == 0
        assert queued._job._execution.started_at is None
    finally:
        for job in busy:
            job.cancel()


def test_cancel_completed_job_is_a_state_error(cpu):
    job = cpu.run(_reference(), shots=10)
    job.result()
    with pytest.raises(JobStateError, match="COMPLETED"):
        job.cancel()


def test_result_timeout(cpu):
    job = cpu.run(long_circuit(), **LONG_OPTIONS)
    try:
        with pytest.raises(TimeoutError, match="did not finish"):
            job.result(timeout=0.01)
        assert job.status() in (JobStatus.QUEUED, JobStatus.RUNNING)
    finally:
        job.cancel()


def test_failed_job_reports_failure():
    qc = QuantumCircuit(1, 1)
    with qc.while_loop((qc.clbits[0], False)):
        qc.x(0)
    device = load_provider("gpu_provider", max_loop_iterations=5).get_device("gpu_provider_cpu")
    job = device.submit(qc, shots=1)
    assert wait_for(lambda: job.status() == JobStatus.FAILED)
    result = job.result()
    assert not result.success and "IterationLimitError" in result.details["error"]


# ---------------------------------------------------------------------------
# bad input: qBraid's conventional errors, and the device stays usable


def test_unbound_parameter_is_a_program_validation_error(cpu):
    qc = QuantumCircuit(1, 1)
    qc.rx(Parameter("theta"), 0)
    qc.measure(0, 0)
    with pytest.raises(ProgramValidationError, match="theta"):
        cpu.submit(qc, shots=10)
    assert cpu.run(_reference(), shots=10).result().success


def test_unsupported_instruction_is_a_program_validation_error(cpu):
    from qiskit.circuit import Instruction

    qc = QuantumCircuit(1, 1)
    qc.append(Instruction("mystery", 1, 0, []), [0])
    with pytest.raises(ProgramValidationError, match="mystery"):
        cpu.submit(qc, shots=10)
    assert cpu.run(_reference(), shots=10).result().success


def test_unparsable_program_raises_and_device_stays_usable(cpu):
    from qbraid.exceptions import QbraidError

    with pytest.raises(QbraidError):
        cpu.run("OPENQASM 3.0; qubit[2] q; h q[0]; cx q[0]", shots=10)
    assert cpu.run(_reference(), shots=10).result().success


@pytest.mark.parametrize("shots", [0, -5, 10**10])
def test_shots_out_of_range(cpu, shots):
    with pytest.raises(ValueError, match="shots must be an integer"):
        cpu.run(_reference(), shots=shots)
    assert cpu.run(_reference(), shots=10).result().success


def test_provider_rejects_device_option():
    with pytest.raises(ValueError, match="chosen by the device"):
        load_provider("gpu_provider", device="CPU")


def test_programs_without_measurements_measure_every_qubit(cpu):
    """As Braket's and qBraid's own simulators: a Braket circuit (its final measurement implicit), an
    OpenQASM 3 program with an unused bit register, a Qiskit circuit with no clbits."""
    unmeasured = QuantumCircuit(3)
    unmeasured.x(0), unmeasured.h(1), unmeasured.cx(1, 2)
    expected = exact_distribution(_measured(unmeasured))
    qasm = 'OPENQASM 3.0; include "stdgates.inc"; qubit[3] q; bit[3] b; x q[0]; h q[1]; cx q[1], q[2];'
    programs = [unmeasured, qasm]
    try:
        from braket.circuits import Circuit
    except ImportError:  # the braket extra is not installed
        pass
    else:
        programs.append(Circuit().x(0).h(1).cnot(1, 2))
    for program in programs:
        result = cpu.run(program, shots=2000, seed_simulator=3).result()
        assert result.success
        assert_counts_match(result.data.get_counts(), expected, shots=2000)  # qubit 0 rightmost, as Qiskit's
    # A circuit whose bits a condition reads is left as written.
    conditioned = QuantumCircuit(1, 1)
    with conditioned.if_test((conditioned.clbits[0], 0)):
        conditioned.x(0)
    assert cpu.run(conditioned, shots=10).result().data.get_counts() == {"0": 10}


def _measured(circuit: QuantumCircuit) -> QuantumCircuit:
    out = circuit.copy()
    out.measure_all()
    return out


def test_parameter_binds_give_one_result_per_experiment(cpu):
    import numpy as np

    theta = Parameter("t")
    qc = QuantumCircuit(1, 1)
    qc.rx(theta, 0)
    qc.measure(0, 0)
    result = cpu.run(qc, shots=100, memory=True, parameter_binds=[{theta: [0.0, np.pi]}]).result()
    assert result.data.get_counts() == [{"0": 100}, {"1": 100}]
    assert [m.tolist() for m in result.data.measurements] == [[[0]] * 100, [[1]] * 100]
