"""One statevector split over MPI ranks: the same answers on 1, 2 and 4 ranks, errors on every rank.

Each test starts ``mpiexec -n N`` on ``mpi_worker.py`` with a timeout (a
deadlock fails the test instead of hanging CI) and reads what every rank wrote.
Oracles: ``qiskit.quantum_info.Statevector`` for states and expectation
values, and the same backend without MPI for counts (same seed, same draws).
"""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest
from qiskit.quantum_info import SparsePauliOp, Statevector

from gpu_provider import GPUSimulator
from tests.helpers import import_host

WORKER = os.path.join(os.path.dirname(__file__), "mpi_worker.py")
RUN_TIMEOUT = 240


def _mpiexec() -> str:
    import_host("mpi4py")
    here = shutil.which("mpiexec", path=os.path.dirname(sys.executable))
    found = here or shutil.which("mpiexec")
    if found is None:
        if os.environ.get("GPU_PROVIDER_REQUIRE_HOSTS") == "1":
            pytest.fail("mpiexec not found: the mpi extra installs it (the mpich wheel)")
        pytest.skip("mpiexec not found")
    return found


def run_ranks(ranks: int, scenario: str, tmp_path) -> list[dict]:
    outdir = tmp_path / f"{scenario}-{ranks}"
    outdir.mkdir()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([os.getcwd(), env.get("PYTHONPATH", "")])
    command = [_mpiexec(), "-n", str(ranks), sys.executable, WORKER, scenario, str(outdir)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=RUN_TIMEOUT, env=env)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{ranks} ranks of {scenario!r} did not finish in {RUN_TIMEOUT} s (a deadlock?): {exc.stdout} {exc.stderr}")
    assert done.returncode == 0, f"mpiexec failed ({done.returncode}): {done.stdout[-3000:]} {done.stderr[-3000:]}"
    results = []
    for rank in range(ranks):
        with open(outdir / f"rank{rank}.pkl", "rb") as handle:
            result = pickle.load(handle)
        assert "__error__" not in result, f"rank {rank} of {scenario!r} raised {result['__error__']}"
        results.append(result)
    return results


@pytest.fixture(scope="module")
def circuits_by_ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mpi")
    return {ranks: run_ranks(ranks, "circuits", tmp) for ranks in (1, 2, 4)}


def _worker_module():
    sys.path.insert(0, os.path.dirname(__file__))
    try:
        import mpi_worker  # noqa: F401  (imports mpi4py: only after the mpi4py check)
    finally:
        sys.path.pop(0)
    return mpi_worker


def test_every_rank_returns_the_same_results(circuits_by_ranks):
    for ranks, results in circuits_by_ranks.items():
        first = results[0]
        for rank, other in enumerate(results[1:], start=1):
            assert other.keys() == first.keys()
            for key, value in first.items():
                if key == "target_qubits":
                    continue
                if key.endswith("/statevector"):
                    np.testing.assert_array_equal(other[key], value, err_msg=f"{ranks} ranks, rank {rank}: {key}")
                elif not key.endswith("/mpi"):
                    assert other[key] == value, f"{ranks} ranks, rank {rank}: {key}"


def test_statevectors_match_the_exact_state_on_1_2_and_4_ranks(circuits_by_ranks):
    worker = _worker_module()
    for qc in worker.circuits_with_global_gates():
        exact = Statevector(qc).data
        for ranks, results in circuits_by_ranks.items():
            got = results[0][f"{qc.name}/statevector"]
            assert np.max(np.abs(got - exact)) < 1e-12, f"{qc.name} on {ranks} ranks"
            meta = results[0][f"{qc.name}/mpi"]
            if ranks > 1:
                # The state really was split, and gates on the ranks' qubits moved data between them.
                assert meta["ranks"] == ranks and meta["local_qubits"] == qc.num_qubits - (ranks.bit_length() - 1)
                assert meta["swaps"] > 0 and meta["exchanged_bytes"] > 0
            else:
                assert meta is None


def test_target_grows_with_the_ranks(circuits_by_ranks):
    single = GPUSimulator(device="CPU").target.num_qubits
    for ranks, results in circuits_by_ranks.items():
        assert results[0]["target_qubits"] == single + ranks.bit_length() - 1


def test_counts_are_identical_for_a_seed_across_rank_counts_and_without_mpi(circuits_by_ranks):
    worker = _worker_module()
    local = worker.scenario_results(GPUSimulator(device="CPU"))
    for key in local:
        if key.endswith("/counts") or key.endswith("/memory"):
            for ranks, results in circuits_by_ranks.items():
                assert results[0][key] == local[key], f"{key} on {ranks} ranks differs from the run without MPI"


def test_expectation_values_reduce_over_ranks(tmp_path):
    exact = Statevector(_worker_module().expectation_circuit())
    for ranks in (2, 4):
        results = run_ranks(ranks, "expectation", tmp_path)
        first = results[0]
        labels, coeffs = first["labels"], first["coeffs"]
        expected = [
            exact.expectation_value(SparsePauliOp(labels[:3], coeffs[:3])),
            exact.expectation_value(SparsePauliOp(labels[3:], coeffs[3:])),
        ]
        for rank, result in enumerate(results):
            np.testing.assert_allclose(result["values"], expected, atol=1e-12, err_msg=f"rank {rank} of {ranks}")
            # The state, read back after the swaps the X terms on global qubits needed.
            assert np.max(np.abs(result["state"] - exact.data)) < 1e-12
        assert first["swaps"] > 0


def test_primitives_on_split_states(tmp_path):
    """EstimatorV2 against Statevector; SamplerV2's counts as without MPI for the seed."""
    from gpu_provider.primitives import SamplerV2

    worker = _worker_module()
    qc, observables, values = worker.estimator_pubs()
    expected = np.array(
        [[Statevector(qc.assign_parameters(row)).expectation_value(o).real for row in values] for o in observables]
    )
    local = SamplerV2(backend=GPUSimulator(device="CPU"), seed=17).run([(qc.measure_all(inplace=False), values)], shots=500).result()
    local_counts = [local[0].data.meas.get_counts(i) for i in range(len(values))]
    dynamic, dynamic_observables = worker.dynamic_estimator_pub()
    from gpu_provider.primitives import EstimatorV2

    expected_dynamic = EstimatorV2(backend=GPUSimulator(device="CPU")).run([(dynamic, dynamic_observables)]).result()[0].data.evs
    for ranks in (2, 4):
        for rank, result in enumerate(run_ranks(ranks, "primitives", tmp_path)):
            np.testing.assert_allclose(result["evs"], expected, atol=1e-12, err_msg=f"rank {rank} of {ranks}")
            np.testing.assert_allclose(result["dynamic_evs"], expected_dynamic, atol=1e-12, err_msg=f"rank {rank} of {ranks}")
            assert result["counts"] == local_counts, f"rank {rank} of {ranks}"


def test_pennylane_device_splits_states_over_ranks(tmp_path):
    """gpu_provider.qubit with mpi=True against default.qubit; samples as without MPI for the seed."""
    qml = import_host("pennylane")
    worker = _worker_module()
    reference = qml.device("default.qubit", wires=10)
    energy, exact, params = worker.pennylane_circuits(reference)
    expected_energy = float(energy(params))
    expected_gradient = np.asarray(qml.grad(energy)(params))
    variance, probs, state = exact(params)
    counts = worker.pennylane_counts(qml.device("gpu_provider.qubit", wires=10, device="CPU", seed=5, shots=500))
    expected_counts = dict(counts(params))
    expected_tree = worker.pennylane_tree(reference)(params)
    for ranks in (2, 4):
        for rank, result in enumerate(run_ranks(ranks, "pennylane", tmp_path)):
            where = f"rank {rank} of {ranks}"
            assert abs(result["energy"] - expected_energy) < 1e-10, where
            np.testing.assert_allclose(result["gradient"], expected_gradient, atol=1e-10, err_msg=where)
            assert abs(result["variance"] - float(variance)) < 1e-10, where
            np.testing.assert_allclose(result["probs"], probs, atol=1e-12, err_msg=where)
            np.testing.assert_allclose(result["state"], state, atol=1e-12, err_msg=where)
            assert result["counts"] == expected_counts, where
            kind, message = result["refused"]  # a dense observable needs the whole state
            assert kind == "InvalidInputError" and "Pauli" in message, (where, kind, message)
            assert abs(result["after"] - expected_energy) < 1e-10, where
            for mine, theirs in zip(result["tree"], expected_tree):
                np.testing.assert_allclose(mine, theirs, atol=1e-10, err_msg=where)


def test_gpu_path_plumbing_on_a_cupy_stand_in(tmp_path):
    """Exchanges through pinned host buffers and straight from device buffers (CUDA-aware MPI)."""
    worker = _worker_module()
    results = run_ranks(2, "fake_gpu", tmp_path)
    local = GPUSimulator(device="CPU")
    for qc in worker.circuits_with_global_gates()[:2]:
        exact = Statevector(qc).data
        counts = local.run(qc.measure_all(inplace=False), shots=2000, seed_simulator=11).result().get_counts()
        for result in results:
            for aware in (False, True):
                assert result[f"{aware}/{qc.name}/device"] == "GPU:0"
                assert result[f"{aware}/{qc.name}/mpi"]["swaps"] > 0
                assert np.max(np.abs(result[f"{aware}/{qc.name}/statevector"] - exact)) < 1e-12
                assert result[f"{aware}/{qc.name}/counts"] == counts


def test_bad_input_and_faults_raise_on_every_rank(tmp_path):
    results = run_ranks(4, "errors", tmp_path)
    for rank, result in enumerate(results):
        kind, message = result["disagree"]
        assert kind == "DistributedError" and "disagree" in message and "[1]" in message, (rank, message)
        kind, message = result["one_rank_fails"]
        if rank == 3:
            assert kind == "UnboundParameterError", (rank, kind, message)
        else:
            assert kind == "DistributedError" and "rank 3 refused" in message, (rank, message)
        kind, message = result["too_many_ranks"]
        assert kind == "InvalidInputError" and "use at most 2 ranks" in message, (rank, message)
        kind, message = result["mpi_and_executor"]
        assert kind == "InvalidOptionError" and "cannot be combined" in message, (rank, kind, message)
        kind, message = result["fails_midway"]
        assert result["fails_midway/status"] == "ERROR"
        assert kind == "JobError", (rank, kind, message)
        if rank == 1:
            assert "injected failure on rank 1" in message
        else:
            assert "rank 1 of the job failed" in message and "injected failure" in message, (rank, message)
    # The next job ran, and gave every rank the counts one process gives.
    from qiskit.circuit.random import random_circuit

    good = random_circuit(10, 4, max_operands=2, seed=2)
    good.measure_all()
    local = GPUSimulator(device="CPU", seed_simulator=3).run(good, shots=500).result().get_counts()
    assert all(result["after"] == local for result in results)
    # Both jobs that ran (one failed midway, one good) freed their communicators; the others were refused first.
    assert all(result["jobs"] == 2 and result["unfreed_communicators"] == 0 for result in results), results


def test_cancel_on_one_rank_cancels_every_rank(tmp_path):
    results = run_ranks(2, "cancel", tmp_path)
    assert results[0]["cancel_returned"] is True
    for rank, result in enumerate(results):
        assert result["status"] == "CANCELLED", (rank, result)
        assert result["status_running"] == "RUNNING"
        done, total = result["progress_running"]  # every rank's progress moved while it ran
        assert 0 < done < total, (rank, result["progress_running"])
    expected = GPUSimulator(device="CPU", seed_simulator=1, fusion_enable=False)
    from qiskit import QuantumCircuit

    good = QuantumCircuit(10)
    good.h(range(10))
    good.cx(9, 0)
    good.measure_all()
    counts = expected.run(good, shots=500).result().get_counts()
    assert all(result["after"] == counts for result in results)
    assert all(result["unfreed_communicators"] == 0 for result in results), results


def test_cancel_while_queued_on_one_rank_cancels_the_others(tmp_path):
    results = run_ranks(2, "queued_cancel", tmp_path)
    assert results[1]["queued_status"] == "QUEUED" and results[1]["cancel_returned"] is True
    for rank, result in enumerate(results):
        assert result["status"] == "CANCELLED", (rank, result["status"], result["error"])
        assert result["unfreed_communicators"] == 0, (rank, result)


def test_a_rank_that_never_joins_is_a_clear_error_after_the_timeout(tmp_path):
    results = run_ranks(2, "missing_rank", tmp_path)
    kind, message = results[0]["outcome"]
    assert kind == "DistributedError" and "within 3 s" in message, (kind, message)
    assert 3 <= results[0]["seconds"] < 30
    assert results[1]["outcome"] == ("counts", 10)  # the rank without mpi ran alone


def test_three_ranks_is_refused_on_every_rank(tmp_path):
    outdir = tmp_path / "three"
    outdir.mkdir()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([os.getcwd(), env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [_mpiexec(), "-n", "3", sys.executable, WORKER, "circuits", str(outdir)], capture_output=True, text=True, timeout=RUN_TIMEOUT, env=env
    )
    assert done.returncode == 0, done.stderr[-2000:]
    for rank in range(3):
        with open(outdir / f"rank{rank}.pkl", "rb") as handle:
            kind, message = pickle.load(handle)["__error__"]
        assert kind == "InvalidInputError" and "power-of-two" in message and "not 3" in message


def test_missing_mpi_library_is_a_typed_error(monkeypatch):
    from gpu_provider.errors import DeviceUnavailableError

    monkeypatch.setitem(sys.modules, "mpi4py", None)
    from qiskit import QuantumCircuit

    qc = QuantumCircuit(2)
    qc.h(0)
    with pytest.raises(DeviceUnavailableError, match="mpi4py"):
        GPUSimulator(device="CPU").run(qc, mpi=True)
    # The backend still runs without it.
    qc.measure_all()
    assert sum(GPUSimulator(device="CPU").run(qc, shots=10).result().get_counts().values()) == 10


def test_bad_mpi_option_value():
    from gpu_provider.errors import InvalidOptionError

    with pytest.raises(InvalidOptionError, match="mpi must be"):
        GPUSimulator(device="CPU", mpi="yes")
