"""qiskit-experiments on this backend, as a user runs it: the experiments transpile
against the backend's Target with an explicit layout, so every circuit is as wide as
the Target and only the used qubits are simulated.

Oracles: the ideal Bell state and CX-after-H channel (fidelities), the identity of
every RB sequence, and heavy-output probabilities computed with
``qiskit.quantum_info.Statevector``.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from qiskit import QuantumCircuit

from tests.helpers import import_host

# In the test extra (CI fails without it); elsewhere, e.g. a GPU image without it, these tests skip.
experiments = import_host("qiskit_experiments.library")

from gpu_provider import GPUSimulator  # noqa: E402


@pytest.fixture
def backend():
    return GPUSimulator(device="CPU", seed_simulator=11)


# qiskit-experiments runs its circuits with seed_simulator=None unless told otherwise, which
# overrides the backend's seed (as Aer's run options do): the statistical tests below pass
# their seed to run() so they are repeatable (the state tomography's fidelity ranged
# 0.989-0.997 over unseeded runs, around its 0.99 bound).
SEED = {"seed_simulator": 11}


def _bell() -> QuantumCircuit:
    qc = QuantumCircuit(2)
    qc.h(0)
    qc.cx(0, 1)
    return qc


def _quietly(run):
    """Run an experiment and fail on any warning gpu_provider raises (e.g. unused run options)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = run().block_for_results()
    ours = [str(w.message) for w in caught if "gpu_provider" in w.filename or "not used by this backend" in str(w.message)]
    assert ours == []
    assert data.status().name == "DONE", data.errors()
    return data


def test_state_tomography_of_a_bell_pair(backend):
    data = _quietly(lambda: experiments.StateTomography(_bell()).run(backend, shots=4000, **SEED))
    fidelity = data.analysis_results("state_fidelity", dataframe=True).value.iloc[0]
    assert fidelity >= 0.99
    assert backend.target.num_qubits > 2  # the experiment's circuits were as wide as the Target


def test_process_tomography_of_a_bell_circuit(backend):
    data = _quietly(lambda: experiments.ProcessTomography(_bell()).run(backend, shots=20000, **SEED))
    assert data.analysis_results("process_fidelity", dataframe=True).value.iloc[0] >= 0.99


def test_standard_rb_sees_no_error(backend):
    data = _quietly(lambda: experiments.StandardRB([0], lengths=[1, 20, 80], num_samples=3, seed=4).run(backend, shots=200))
    for record in data.data():  # every sequence composes to the identity: all shots return 0
        assert record["counts"] == {"0": 200}
    epc = data.analysis_results("EPC", dataframe=True).value.iloc[0]
    assert abs(epc.nominal_value) < 1e-6


def test_quantum_volume_heavy_outputs_match_the_exact_states(backend):
    data = _quietly(lambda: experiments.QuantumVolume([0, 1, 2], trials=12, seed=3).run(backend, shots=1000, **SEED))
    expected, measured = [], []
    for record in data.data():
        counts = record["counts"]
        if any(len(key) != 3 for key in counts):
            continue  # a few of the experiment's circuits record fewer clbits (Aer returns the same keys)
        # The experiment stores each circuit's exact probabilities (from qiskit.quantum_info.Statevector).
        probabilities = np.asarray(record["metadata"]["ideal_probabilities"])
        heavy = {format(i, "03b") for i, p in enumerate(probabilities) if p > np.median(probabilities)}
        expected.append(sum(p for i, p in enumerate(probabilities) if format(i, "03b") in heavy))
        measured.append(sum(c for key, c in counts.items() if key in heavy) / sum(counts.values()))
    assert len(measured) >= 8
    # 1000 shots a trial: the mean heavy-output frequency is within a few standard errors of the exact value.
    assert abs(np.mean(measured) - np.mean(expected)) < 4 * np.sqrt(0.25 / (1000 * len(measured)))
