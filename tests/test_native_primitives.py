"""gpu_provider's own EstimatorV2 and SamplerV2 against Qiskit's reference primitives and Aer.

Estimator values are exact: they must equal StatevectorEstimator's (and Aer's
exact EstimatorV2's) to rounding, with the same result shapes and metadata
keys; with precision > 0 the noise is seeded. Sampler counts pass a chi-square
test against exact probabilities, with one BitArray per register.
"""

from __future__ import annotations

import threading
import time
import warnings

import numpy as np
import pytest
from qiskit import ClassicalRegister, QuantumCircuit, QuantumRegister
from qiskit.circuit import Parameter, ParameterVector
from qiskit.circuit.library import efficient_su2
from qiskit.primitives import BaseEstimatorV2, BaseSamplerV2, StatevectorEstimator, StatevectorSampler
from qiskit.primitives.base.base_primitive_job import BasePrimitiveJob
from qiskit.primitives.containers import BitArray, ObservablesArray
from qiskit.providers import JobError, JobStatus, JobTimeoutError
from qiskit.quantum_info import SparseObservable, SparsePauliOp, Statevector

import gpu_provider
from gpu_provider import EstimatorV2, GPUSimulator, SamplerV2
from gpu_provider.compiler import parameters as compiler_parameters
from gpu_provider.errors import InvalidOptionError, UnknownOptionError
from tests.helpers import assert_counts_match, bell, exact_distribution, wait_for

TOLERANCE = {"double": 1e-10, "single": 1e-4}


def estimator(device: str, precision: str = "double", **kwargs) -> EstimatorV2:
    return EstimatorV2(backend_options={"device": device, "precision": precision}, **kwargs)


def sampler(device: str, **kwargs) -> SamplerV2:
    return SamplerV2(backend_options={"device": device}, **kwargs)


def ansatz(n: int = 4) -> QuantumCircuit:
    qc = efficient_su2(n, reps=2, entanglement="circular")
    qc.global_phase = Parameter("g")  # parametrized phases must not change expectation values
    return qc


def random_observable(rng, n: int, terms: int) -> SparsePauliOp:
    labels = ["".join(rng.choice(list("IXYZ"), size=n)) for _ in range(terms)]
    return SparsePauliOp(labels, rng.normal(size=terms)).simplify()


# ---------------------------------------------------------------------------
# Estimator


def test_importable_from_the_package_and_subclasses_qiskit_bases():
    assert gpu_provider.EstimatorV2 is EstimatorV2 and gpu_provider.SamplerV2 is SamplerV2
    assert issubclass(EstimatorV2, BaseEstimatorV2) and issubclass(SamplerV2, BaseSamplerV2)


@pytest.mark.parametrize("precision", ["double", "single"])
def test_estimator_matches_statevector_estimator_with_broadcasting(device, precision):
    rng = np.random.default_rng(3)
    qc = ansatz(4)
    observables = [[random_observable(rng, 4, 12)], [SparsePauliOp("XXYY")], ["ZIIZ"], [SparseObservable("+-0Z")]]
    values = rng.uniform(-np.pi, np.pi, size=(1, 5, qc.num_parameters))  # (1, 5) x (4, 1) -> (4, 5)
    pubs = [(qc, observables, values), (qc, "ZZZZ", values[0, 0]), (qc.assign_parameters(values[0, 1]), ["XXXX", "IIYY"])]
    ours = estimator(device, precision).run(pubs).result()
    # The reference takes no projectors: give it the same observable as Paulis.
    observables[3] = [SparseObservable("+-0Z").as_paulis()]
    reference = StatevectorEstimator().run(pubs).result()
    assert len(ours) == len(reference) == 3
    for mine, theirs in zip(ours, reference):
        assert mine.data.evs.shape == theirs.data.evs.shape == mine.data.stds.shape
        assert mine.data.evs.dtype == np.float64
        np.testing.assert_allclose(mine.data.evs, theirs.data.evs, atol=TOLERANCE[precision] * 10)
        assert np.all(mine.data.stds == 0)
        assert mine.metadata["target_precision"] == 0.0
        assert mine.metadata["circuit_metadata"] == theirs.metadata["circuit_metadata"]
        simulator = mine.metadata["simulator_metadata"]
        assert simulator["precision"] == precision and simulator["compiled_once"]
    assert ours[0].data.evs.shape == (4, 5) and ours[0].metadata["simulator_metadata"]["num_bindings"] == 5
    assert np.ptp(ours[0].data.evs) > 0.1  # not all zeros
    assert ours.metadata == {"version": 2}


def test_estimator_matches_aer_estimator():
    aer_primitives = pytest.importorskip("qiskit_aer.primitives")
    rng = np.random.default_rng(5)
    qc = efficient_su2(6, reps=2)
    obs = random_observable(rng, 6, 20)
    values = rng.uniform(-1, 1, size=(3, qc.num_parameters))
    ours = EstimatorV2(backend_options={"device": "CPU"}).run([(qc, obs, values)]).result()[0].data.evs
    aer = aer_primitives.EstimatorV2().run([(qc, obs, values)]).result()[0].data.evs
    np.testing.assert_allclose(ours, aer, atol=1e-10)


def test_estimator_wide_circuit_with_fusion_and_terminal_measurements():
    rng = np.random.default_rng(8)
    qc = efficient_su2(15, reps=1)
    values = rng.uniform(-np.pi, np.pi, qc.num_parameters)
    measured = qc.copy()
    measured.add_register(ClassicalRegister(2))
    measured.measure([0, 7], [0, 1])  # two qubits, at the end
    obs = random_observable(rng, 15, 25)
    result = EstimatorV2(backend_options={"device": "CPU"}).run([(measured, obs, values)]).result()[0]
    # A final measurement collapses the state (Aer's estimator averages its shots over the collapsed
    # states): terms with X or Y on a measured qubit average to zero, the others are unchanged.
    kept = [(label, coeff) for label, coeff in obs.to_list() if not any(label[14 - q] in "XY" for q in (0, 7))]
    dephased = SparsePauliOp.from_list(kept) if kept else SparsePauliOp("I" * 15, 0.0)
    expected = Statevector(qc.assign_parameters(values)).expectation_value(dephased).real
    assert 0 < len(kept) < len(obs)
    assert abs(result.data.evs - expected) < 1e-10
    simulator = result.metadata["simulator_metadata"]
    assert simulator["fusion_ops_after"] < simulator["fusion_ops_before"]


def test_estimator_precision_adds_seeded_noise():
    qc = ansatz(3)
    values = np.random.default_rng(1).uniform(size=(50, qc.num_parameters))
    pub = (qc, "ZXY", values, 0.05)
    first = EstimatorV2(seed=42).run([pub]).result()[0]
    again = EstimatorV2(seed=42).run([pub]).result()[0]
    reference = StatevectorEstimator(seed=42).run([pub]).result()[0]
    exact = EstimatorV2().run([(qc, "ZXY", values)]).result()[0].data.evs
    np.testing.assert_array_equal(first.data.evs, again.data.evs)
    np.testing.assert_allclose(first.data.evs, reference.data.evs, atol=1e-10)  # the same draws as Qiskit's
    assert np.all(first.data.stds == 0.05) and first.metadata["target_precision"] == 0.05
    noise = first.data.evs - exact
    assert 0.03 < np.std(noise) < 0.07 and np.all(noise != 0)
    # run-level precision and default_precision
    assert EstimatorV2(default_precision=0.1, seed=1).run([(qc, "ZZZ", values[0])]).result()[0].data.stds == 0.1
    assert EstimatorV2(seed=1).run([(qc, "ZZZ", values[0])], precision=0.2).result()[0].metadata["target_precision"] == 0.2


def test_estimator_accepts_aer_style_options():
    est = EstimatorV2(options={"default_precision": 0.01, "backend_options": {"device": "CPU"}, "run_options": {"seed_simulator": 3}})
    assert est.default_precision == 0.01 and est.seed == 3 and est.backend.options.device == "CPU"
    with pytest.raises(InvalidOptionError, match="unknown primitive options"):
        EstimatorV2(options={"shots": 10})
    with pytest.raises(UnknownOptionError, match="not an option"):  # an AttributeError, as set_options raises
        EstimatorV2(backend_options={"devise": "CPU"})


def test_estimator_compiles_each_circuit_once(monkeypatch):
    calls = []
    original = compiler_parameters.translate_template

    def counting(circuit, evaluate, *args):
        calls.append(circuit.name)
        return original(circuit, evaluate, *args)

    monkeypatch.setattr(compiler_parameters, "translate_template", counting)
    qc = ansatz(3)
    values = np.random.default_rng(2).uniform(size=(20, qc.num_parameters))
    result = EstimatorV2().run([(qc, ["XYZ", "ZZI"], values[:, None, :]), (qc, "III", values)]).result()
    assert calls == [qc.name]  # one translation for 2 PUBs x 20 bindings
    assert result[0].data.evs.shape == (20, 2)
    np.testing.assert_allclose(result[1].data.evs, 1.0)


def test_estimator_bad_input_then_a_good_run():
    qc = ansatz(3)
    est = EstimatorV2()
    with pytest.raises(ValueError, match="PUB 0 is not valid.*inconsistent"):
        est.run([(qc, "ZZZ", np.zeros(qc.num_parameters + 1))])
    with pytest.raises(ValueError, match="PUB 1 is not valid.*number of values"):
        est.run([(qc, "ZZZ", np.zeros(qc.num_parameters)), (qc, "ZZZ")])
    with pytest.raises(ValueError, match="number of qubits"):
        est.run([(qc, "ZZ", np.zeros(qc.num_parameters))])
    with pytest.raises(ValueError, match="precision"):
        est.run([(qc, "ZZZ", np.zeros(qc.num_parameters))], precision=-0.1)
    with pytest.raises(ValueError, match="precision"):
        EstimatorV2(default_precision=-1)
    with pytest.raises(TypeError, match="precision must be a real number"):  # as StatevectorEstimator
        est.run([(qc, "ZZZ", np.zeros(qc.num_parameters))], precision="0.1")
    with pytest.raises(ValueError, match="precision"):
        est.run([(qc, "ZZZ", np.zeros(qc.num_parameters))], precision=float("nan"))
    with pytest.raises(ValueError, match="An invalid Estimator pub-like was given.*list of PUBs"):
        est.run(qc)
    good = est.run([(qc, "ZZZ", np.zeros(qc.num_parameters))]).result()[0].data.evs
    assert abs(good - Statevector(qc.assign_parameters(np.zeros(qc.num_parameters))).expectation_value(SparsePauliOp("ZZZ")).real) < 1e-12


def _dynamic_and_deferred():
    """A circuit that measures mid-circuit, branches on the outcome and resets, and its
    deferred-measurement twin (the outcome copied to ancilla 3, the branch controlled on it)."""
    theta = Parameter("theta")
    dynamic = QuantumCircuit(3, 2)
    dynamic.ry(theta, 0)
    dynamic.cx(0, 1)
    dynamic.measure(0, 0)
    with dynamic.if_test((dynamic.clbits[0], 1)) as otherwise:
        dynamic.ry(0.4, 2)
        dynamic.x(1)
    with otherwise:
        dynamic.h(2)
    dynamic.reset(0)
    dynamic.h(0)
    dynamic.cx(2, 0)
    deferred = QuantumCircuit(4)
    deferred.ry(theta, 0)
    deferred.cx(0, 1)
    deferred.cx(0, 3)  # the measurement, deferred to ancilla 3
    deferred.cry(0.4, 3, 2)
    deferred.cx(3, 1)
    deferred.x(3)
    deferred.ch(3, 2)
    deferred.x(3)
    deferred.cx(3, 0)  # the reset of qubit 0, whose value ancilla 3 holds
    deferred.h(0)
    deferred.cx(2, 0)
    return dynamic, deferred


@pytest.mark.parametrize("precision", ["double", "single"])
def test_estimator_averages_circuits_that_measure_and_reset_mid_circuit_over_their_outcomes(precision):
    """No single final state: each expectation value is exact over every path of outcomes (Tr(rho O))."""
    dynamic, deferred = _dynamic_and_deferred()
    observables = ["ZZI", "XIZ", "IYX", "ZIZ"]
    values = [[0.3], [1.2], [2.9]]
    result = EstimatorV2(backend_options={"device": "CPU", "precision": precision}).run(
        [(dynamic, [[o] for o in observables], values)]
    ).result()[0]
    assert result.data.evs.shape == (4, 3)
    for i, label in enumerate(observables):
        for j, (value,) in enumerate(values):
            state = Statevector(deferred.assign_parameters([value]))
            expected = state.expectation_value(SparsePauliOp("I" + label)).real  # ancilla 3 traced out
            assert abs(result.data.evs[i, j] - expected) < (1e-10 if precision == "double" else 1e-5)
    # Qiskit's reference samples one path per value instead; ours is its exact mean.
    reset_only = QuantumCircuit(2)
    reset_only.h(0)
    reset_only.cx(0, 1)
    reset_only.reset(0)
    evs = EstimatorV2(backend_options={"device": "CPU"}).run([(reset_only, ["IZ", "ZI"])]).result()[0].data.evs
    np.testing.assert_allclose(evs, [1.0, 0.0], atol=1e-12)


def test_estimator_exact_branching_stops_a_repeat_until_success_loop():
    """A loop that repeats until an outcome: paths lighter than 2^-64 are not visited."""
    qc = QuantumCircuit(2, 1)
    qc.h(0)
    qc.measure(0, 0)
    with qc.while_loop((qc.clbits[0], 1)):
        qc.reset(0)
        qc.ry(1.0, 0)  # P(1) = sin^2(0.5) per try
        qc.measure(0, 0)
    qc.cx(0, 1)
    evs = EstimatorV2(backend_options={"device": "CPU"}).run([(qc, ["ZI", "IZ"])]).result()[0].data.evs
    np.testing.assert_allclose(evs, [1.0, 1.0], atol=1e-12)  # the loop ends with qubit 0 in |0>


def test_estimator_parameters_in_control_flow_are_bound_per_binding():
    theta = Parameter("theta")
    qc = QuantumCircuit(2)
    qc.ry(theta, 0)
    with qc.box():
        qc.rx(theta * 2, 1)
    result = EstimatorV2().run([(qc, ["ZI", "IZ"], [[0.4], [1.1]])]).result()[0]
    assert result.data.evs.shape == (2,)
    assert not result.metadata["simulator_metadata"]["compiled_once"]
    flat = QuantumCircuit(2)
    flat.ry(theta, 0)
    flat.rx(theta * 2, 1)
    for i, value in enumerate([0.4, 1.1]):
        state = Statevector(flat.assign_parameters([value]))
        assert abs(result.data.evs[i] - state.expectation_value(SparsePauliOp(["ZI", "IZ"][i])).real) < 1e-12


# ---------------------------------------------------------------------------
# Sampler


def test_sampler_registers_shapes_and_counts(device):
    theta = ParameterVector("t", 2)
    qr = QuantumRegister(3)
    a, b = ClassicalRegister(1, "a"), ClassicalRegister(2, "b")
    qc = QuantumCircuit(qr, a, b)
    qc.ry(theta[0], 0)
    qc.h(1)
    qc.cry(theta[1], 1, 2)
    qc.measure(0, a[0])
    qc.measure([1, 2], b)
    values = np.array([[[0.3, 1.0]], [[2.0, -0.5]]])  # shape (2, 1)
    shots = 3000
    result = sampler(device, seed=7).run([(qc, values, shots)]).result()
    reference = StatevectorSampler(seed=7).run([(qc, values, shots)]).result()
    data, ref = result[0].data, reference[0].data
    assert list(data.keys()) == list(ref.keys()) == ["a", "b"]
    for name in ("a", "b"):
        mine, theirs = data[name], ref[name]
        assert isinstance(mine, BitArray)
        assert mine.shape == theirs.shape == (2, 1)
        assert mine.num_shots == theirs.num_shots == shots and mine.num_bits == theirs.num_bits
    for i in range(2):
        bound = qc.assign_parameters(values[i, 0])
        probabilities = exact_distribution(bound)
        marginal_b: dict = {}
        marginal_a: dict = {}
        for key, p in probabilities.items():
            high, low = key.split(" ") if " " in key else (key[:2], key[2:])
            marginal_b[high] = marginal_b.get(high, 0) + p
            marginal_a[low] = marginal_a.get(low, 0) + p
        assert_counts_match(data.b[i, 0].get_counts(), marginal_b, shots=shots)
        assert_counts_match(data.a[i, 0].get_counts(), marginal_a, shots=shots)
    assert result[0].metadata["shots"] == shots and result.metadata == {"version": 2}


def test_sampler_seeded_default_shots_and_dynamic_circuits():
    qc = QuantumCircuit(2, 2)
    qc.h(0)
    qc.measure(0, 0)
    with qc.if_test((qc.clbits[0], 1)):
        qc.x(1)
    qc.measure(1, 1)
    first = SamplerV2(default_shots=500, seed=11).run([qc]).result()[0].data.c
    again = SamplerV2(default_shots=500, seed=11).run([qc]).result()[0].data.c
    assert first.num_shots == 500 and first.num_bits == 2
    assert first.get_bitstrings() == again.get_bitstrings()
    assert set(first.get_counts()) == {"00", "11"}
    assert_counts_match(first.get_counts(), {"00": 0.5, "11": 0.5}, shots=500)
    assert SamplerV2().run([qc], shots=7).result()[0].data.c.num_shots == 7


def test_sampler_wide_registers_and_no_registers():
    small, wide = ClassicalRegister(2, "small"), ClassicalRegister(70, "wide")
    qc = QuantumCircuit(QuantumRegister(3), small, wide)
    qc.x(0)
    qc.x(2)
    qc.measure(0, wide[69])
    qc.measure(1, wide[3])
    qc.measure(2, small[1])
    data = SamplerV2(seed=1).run([qc], shots=5).result()[0].data
    assert data.wide.num_bits == 70 and set(data.wide.get_bitstrings()) == {"1" + "0" * 69}
    assert data.small.num_bits == 2 and set(data.small.get_bitstrings()) == {"10"}
    # A register of no bits: an empty BitArray, as StatevectorSampler gives (a job failure before).
    empty = QuantumCircuit(QuantumRegister(2), ClassicalRegister(0, "empty"), ClassicalRegister(2, "c"))
    empty.x(0)
    empty.measure([0, 1], empty.cregs[1])
    ours = SamplerV2(seed=1).run([empty], shots=6).result()[0].data
    reference = StatevectorSampler(seed=1).run([empty], shots=6).result()[0].data
    assert (ours.empty.num_bits, ours.empty.array.shape) == (reference.empty.num_bits, reference.empty.array.shape) == (0, (6, 0))
    assert ours.c.get_counts() == reference.c.get_counts() == {"01": 6}
    plain = QuantumCircuit(1)
    plain.h(0)
    # As StatevectorSampler: a circuit without classical registers warns that its result is empty.
    with pytest.warns(UserWarning, match="no output classical registers") as ours:
        assert list(SamplerV2().run([plain], shots=3).result()[0].data.keys()) == []
    with pytest.warns(UserWarning) as reference:
        StatevectorSampler().run([plain], shots=3).result()
    assert [str(w.message) for w in ours] == [str(w.message) for w in reference]
    assert ours[0].filename == __file__  # attributed to the caller's run()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SamplerV2().run([qc], shots=3).result()  # registers: no warning


def test_sampler_bad_input_then_a_good_run():
    theta, phi = Parameter("theta"), Parameter("phi")
    qc = QuantumCircuit(1)
    qc.ry(theta, 0)
    qc.rz(phi, 0)
    qc.measure_all()
    smp = SamplerV2(seed=3)
    with pytest.raises(ValueError, match="An invalid Sampler pub-like was given.*list of PUBs"):
        smp.run(qc)
    with pytest.raises(ValueError, match="PUB 0 is not valid"):
        smp.run([(qc, [0.1, 0.2, 0.3])])
    # A NaN or infinite value is refused at run() (it failed the job before), by both primitives.
    with pytest.raises(ValueError, match="must be finite"):
        smp.run([(qc, [[0.1, 0.2], [np.nan, 0.2]])])
    with pytest.raises(ValueError, match="must be finite"):
        EstimatorV2().run([(qc.remove_final_measurements(inplace=False), "Z", [0.1, np.inf])])
    with pytest.raises(ValueError, match="shots"):
        smp.run([(qc, [0.1, 0.2])], shots=-5)
    with pytest.raises(ValueError, match="shots"):
        smp.run([(qc, [0.1, 0.2], 0)])
    with pytest.raises(ValueError, match="shots"):
        SamplerV2(default_shots=0)
    counts = smp.run([(qc, [0.3, np.pi])], shots=100).result()[0].data.meas.get_counts()
    assert counts == {"1": 100}


# ---------------------------------------------------------------------------
# The job contract (AlgorithmJob = PrimitiveJob, plus GPUJob's own methods)


def test_job_contract_methods():
    qc = ansatz(3)
    job = EstimatorV2().run([(qc, "XYZ", np.zeros(qc.num_parameters))])
    assert isinstance(job, BasePrimitiveJob)
    assert isinstance(job.job_id(), str) and job.job_id()
    assert isinstance(job.backend(), GPUSimulator)
    assert job.status() in (JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.DONE)
    seen = []
    job.wait_for_final_state(timeout=60, wait=0.01, callback=lambda job_id, status, j: seen.append((job_id, status)))
    # As JobV1's: the callback sees the statuses found before the final one, never the final one.
    assert all(job_id == job.job_id() and status in (JobStatus.QUEUED, JobStatus.RUNNING) for job_id, status in seen)
    assert job.done() and not job.running() and not job.cancelled() and job.in_final_state()
    assert job.status() is JobStatus.DONE
    result = job.result()
    assert result is job.result(timeout=1)  # the same result every time
    assert job.cancel() is False  # already done
    with pytest.raises(JobError, match="already been submitted"):
        job.submit()
    assert job.progress()[0] == job.progress()[1]


def test_job_status_never_blocks_and_cancel_and_timeout():
    qc = efficient_su2(16, reps=2)
    values = np.random.default_rng(0).uniform(size=(40, qc.num_parameters))
    est = EstimatorV2(backend_options={"device": "CPU"})
    # Fill the CPU workers, so the next job waits in the queue.
    blockers = [est.run([(qc, "Z" * 16, values)]) for _ in range(2)]
    queued = est.run([(qc, "Z" * 16, values)])
    start = time.perf_counter()
    for _ in range(100):
        queued.status()
    assert time.perf_counter() - start < 0.5
    with pytest.raises(JobTimeoutError):
        queued.result(timeout=0.01)
    assert queued.cancel() is True
    assert queued.status() is JobStatus.CANCELLED and queued.cancelled() and queued.in_final_state()
    with pytest.raises(JobError, match="cancelled"):
        queued.result()
    running = blockers[0]
    assert running.cancel() is True or running.done()
    assert running.in_final_state()
    blockers[1].cancel()
    blockers[1].wait_for_final_state(timeout=60, wait=0.01)


def test_failed_job_reports_error():
    qc = QuantumCircuit(2, 1)
    qc.x(0)
    qc.measure(0, 0)
    with qc.while_loop((qc.clbits[0], 1)):  # never ends
        qc.x(1)
    job = SamplerV2(backend_options={"max_loop_iterations": 5}).run([qc], shots=2)
    job.wait_for_final_state(timeout=30, wait=0.01)
    assert job.status() is JobStatus.ERROR and job.in_final_state() and not job.done()
    with pytest.raises(JobError, match="max_loop_iterations"):
        job.result()
    assert "max_loop_iterations" in job.error_message()
    with pytest.raises(ValueError, match="Hermitian"):  # refused at run(), by Qiskit's validation
        EstimatorV2().run([(qc, ObservablesArray.coerce(SparseObservable.from_list([("XX", 1j)])))])


def test_jobs_run_from_several_threads():
    qc = ansatz(3)
    est = EstimatorV2()
    out = {}

    def work(i):
        out[i] = est.run([(qc, "ZZZ", np.full(qc.num_parameters, i / 10))]).result()[0].data.evs

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for i in range(4):
        expected = Statevector(qc.assign_parameters(np.full(qc.num_parameters, i / 10))).expectation_value(SparsePauliOp("ZZZ")).real
        assert abs(out[i] - expected) < 1e-12


def test_parameter_sets_run_as_batches_with_the_same_results(monkeypatch):
    from gpu_provider import primitives

    qc = ansatz(5)
    qc.crx(Parameter("c"), 0, 3)  # a controlled parametrized gate in the batch
    values = np.random.default_rng(6).uniform(-np.pi, np.pi, size=(7, qc.num_parameters))
    pub = (qc, [["XXYZI"], ["ZZZZZ"]], values)
    measured = qc.measure_all(inplace=False)
    batched = EstimatorV2().run([pub]).result()[0]
    sampled = SamplerV2(seed=4).run([(measured, values)], shots=300).result()[0]
    assert batched.metadata["simulator_metadata"]["batched_bindings"] == 7
    assert sampled.metadata["simulator_metadata"]["batched_bindings"] == 7
    monkeypatch.setattr(primitives, "batch_size", lambda num_qubits, device_kind: 1)  # one parameter set at a time
    single = EstimatorV2().run([pub]).result()[0]
    single_sampled = SamplerV2(seed=4).run([(measured, values)], shots=300).result()[0]
    again = SamplerV2(seed=4).run([(measured, values)], shots=300).result()[0]
    assert single.metadata["simulator_metadata"]["batched_bindings"] == 0
    np.testing.assert_allclose(batched.data.evs, single.data.evs, atol=1e-12)
    reference = StatevectorEstimator().run([pub]).result()[0].data.evs
    np.testing.assert_allclose(batched.data.evs, reference, atol=1e-10)
    # The same seed gives the same shots for the same batching; batched shots are equally distributed
    # but not the same draws as one at a time (those read the state in its lazy axis order).
    for i in range(7):
        assert again.data.meas[i].get_bitstrings() == single_sampled.data.meas[i].get_bitstrings()
        probabilities = exact_distribution(measured.assign_parameters(values[i]))
        assert_counts_match(sampled.data.meas[i].get_counts(), probabilities, shots=300)


def test_parametrized_pauli_evolution_is_exact():
    from qiskit.circuit import Parameter
    from qiskit.circuit.library import PauliEvolutionGate

    t = Parameter("t")
    hamiltonian = SparsePauliOp.from_list([("XX", 1.0), ("ZI", 0.7), ("IY", 0.4)])  # terms that do not commute
    qc = QuantumCircuit(2)
    qc.append(PauliEvolutionGate(hamiltonian, time=t), [0, 1])
    values = np.array([[0.4], [1.3]])
    evs = EstimatorV2().run([(qc, SparsePauliOp("ZZ"), values)]).result()[0].data.evs
    exact = [Statevector(qc.assign_parameters(v)).expectation_value(SparsePauliOp("ZZ")).real for v in values]
    np.testing.assert_allclose(evs, exact, atol=1e-10)


def test_backend_runs_while_a_primitive_job_holds_the_device():
    import threading

    from gpu_provider.engine import devices, executor

    cpu, _ = devices.resolve_device("CPU", 0)
    release = threading.Event()
    blocker = executor.Execution(cpu, 1, lambda e: release.wait(30))  # reserves nothing, as a primitive job
    executor.dispatcher_for(cpu).submit(blocker)
    try:
        assert wait_for(lambda: blocker.started)
        assert executor.dispatcher_for(cpu).capacity() > 0
        counts = GPUSimulator(device="CPU").run(bell(), shots=100, seed_simulator=1).result().get_counts()
        assert set(counts) == {"00", "11"}
    finally:
        release.set()
    assert blocker.wait(30)


from tests.engine.test_gpu_plumbing import fake_gpu  # noqa: E402,F401  (a fixture)


def test_estimator_exact_branching_on_the_gpu_path_of_a_cupy_stand_in(fake_gpu):  # noqa: F811
    dynamic, deferred = _dynamic_and_deferred()
    result = EstimatorV2(backend_options={"device": "GPU"}).run([(dynamic, ["ZZI", "XIZ"], [0.8])]).result()[0]
    state = Statevector(deferred.assign_parameters([0.8]))
    expected = [state.expectation_value(SparsePauliOp("I" + label)).real for label in ("ZZI", "XIZ")]
    np.testing.assert_allclose(result.data.evs, expected, atol=1e-10)
    assert result.metadata["simulator_metadata"]["device"] == "GPU:0"


def test_estimator_final_measurements_collapse_like_mid_circuit_ones():
    """One semantics, wherever the measurement is: a measured qubit's X and Y terms average to zero."""
    estimator = EstimatorV2(backend_options={"device": "CPU"})
    final = QuantumCircuit(2, 2)
    final.h(0), final.cx(0, 1), final.measure([0, 1], [0, 1])
    followed = final.copy()
    followed.x(0), followed.x(0)  # the measurement is no longer final: exact branching
    for circuit in (final, followed):
        evs = estimator.run([(circuit, ["XX", "ZZ", "ZI", "YY"])]).result()[0].data.evs
        np.testing.assert_allclose(evs, [0.0, 1.0, 0.0, 0.0], atol=1e-12)


def test_estimator_repeat_until_success_loop_ends_whichever_outcome_is_likelier():
    """A while loop that repeats with probability 1/2 or 0.7: the exact average of its geometric tail."""
    estimator = EstimatorV2(backend_options={"device": "CPU"})
    for p_repeat in (0.5, 0.7):
        angle = 2 * np.arcsin(np.sqrt(p_repeat))
        qc = QuantumCircuit(2, 1)
        qc.ry(angle, 0), qc.measure(0, 0)
        with qc.while_loop((qc.clbits[0], 1)):
            qc.reset(0), qc.ry(angle, 0), qc.measure(0, 0), qc.x(1)
        evs = estimator.run([(qc, ["IZ", "ZI"])]).result()[0].data.evs
        # Qubit 1 flips once per repeat: <Z_1> = sum_k (1 - p) p^k (-1)^k = (1 - p) / (1 + p).
        np.testing.assert_allclose(evs, [1.0, (1 - p_repeat) / (1 + p_repeat)], atol=1e-12)


def test_primitives_edge_cases_behave_as_qiskits_reference():
    backend_options = {"device": "CPU"}
    assert len(EstimatorV2(backend_options=backend_options).run([]).result()) == 0
    assert len(SamplerV2(backend_options=backend_options).run([]).result()) == 0
    qc = QuantumCircuit(1)
    qc.h(0)
    evs = EstimatorV2(backend_options=backend_options, seed=1).run([(qc, "Z")], precision=0.1).result()[0].data.evs
    reference = StatevectorEstimator(seed=1).run([(qc, "Z")], precision=0.1).result()[0].data.evs
    assert isinstance(evs, np.ndarray) and evs.shape == () and evs == pytest.approx(float(reference), abs=1e-12)
    measured = bell()
    sampler = SamplerV2(backend_options=backend_options, seed=np.random.default_rng(0))
    first, second = (sampler.run([measured], shots=32).result()[0].data for _ in range(2))
    assert first.c.get_bitstrings() != second.c.get_bitstrings()  # a Generator advances between runs
    again = SamplerV2(backend_options=backend_options, seed=np.random.default_rng(0)).run([measured], shots=32).result()[0].data
    assert again.c.get_bitstrings() == first.c.get_bitstrings()
    for shots in (10.0, True, "10"):
        with pytest.raises(TypeError, match="shots must be an integer"):
            SamplerV2(backend_options=backend_options).run([measured], shots=shots)


def test_aer_style_options_and_from_backend():
    backend = GPUSimulator(device="CPU", precision="single")
    estimator = EstimatorV2.from_backend(backend, options={"default_precision": 0.01, "run_options": {"seed_simulator": 3}})
    sampler = SamplerV2.from_backend(backend, default_shots=77)
    assert estimator.backend is backend and sampler.backend is backend
    assert estimator.options.default_precision == 0.01 and estimator.options.run_options == {"seed_simulator": 3}
    assert estimator.options.backend_options["precision"] == "single"
    assert sampler.options.default_shots == 77 and sampler.options.run_options == {}
    assert sampler.run([bell()]).result()[0].data.c.num_shots == 77
