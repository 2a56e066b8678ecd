"""The PennyLane device side by side: gpu_provider.qubit against lightning.qubit.

    python -m benchmarks.pennylane_device [--qubits 16 20] [--layers 2] [--device auto|gpu|cpu]
                                          [--repeats 3] [--peer lightning.qubit] [--out DIR]

The workload is the issue's: ``StronglyEntanglingLayers`` (``--layers`` layers, random
weights) on each ``--qubits`` width, measured by one expectation value of
``sum_i Z_i Z_{i+1} + 0.5 sum_i X_i``. Timed per width, each device taking turns
for ``--repeats`` rounds after one warm-up (median reported):

- ``forward``: the expectation value (``diff_method=None``);
- ``adjoint``: the expectation value and its gradient with respect to every weight
  (``qml.grad`` on a ``diff_method="adjoint"`` QNode: one forward run, one backward sweep).

Prints the times, the ratio peer / gpu_provider (above 1: gpu_provider is faster), and
the largest difference of values and gradients from the peer; writes JSON to --out.
``pip install pennylane-lightning`` for the peer (not part of the test install).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import pennylane as qml
from pennylane import numpy as pnp

from benchmarks.report import emit


def observable(n: int):
    return qml.sum(*[qml.Z(i) @ qml.Z(i + 1) for i in range(n - 1)], *[0.5 * qml.X(i) for i in range(n)])


def qnodes(device, n: int):
    obs = observable(n)

    def circuit(weights):
        qml.StronglyEntanglingLayers(weights, wires=range(n))
        return qml.expval(obs)

    forward = qml.QNode(circuit, device, diff_method=None)
    adjoint = qml.QNode(circuit, device, diff_method="adjoint")
    return forward, qml.grad(adjoint)


def median_time(fn, weights, repeats: int):
    times, value = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        value = fn(weights)
        times.append(time.perf_counter() - start)
    return statistics.median(times), value


def measure(qubits: int, layers: int, device: str, repeats: int, peer: str) -> dict:
    weights = pnp.array(np.random.default_rng(7).uniform(0, 2 * np.pi, qml.StronglyEntanglingLayers.shape(layers, qubits)), requires_grad=True)
    devices = {
        "gpu_provider": qml.device("gpu_provider.qubit", wires=qubits, device={"auto": "auto", "gpu": "GPU", "cpu": "CPU"}[device]),
        "peer": qml.device(peer, wires=qubits),
    }
    engine = devices["gpu_provider"].engine_device
    fns = {name: qnodes(dev, qubits) for name, dev in devices.items()}
    small = pnp.array(np.zeros(qml.StronglyEntanglingLayers.shape(1, qubits)), requires_grad=True)
    for name, dev in devices.items():  # warm-up: imports, kernel builds, caches
        fwd, grad = qnodes(dev, qubits)
        fwd(small)
        grad(small)
    results: dict = {name: {"forward": [], "adjoint": []} for name in devices}
    values: dict = {}
    for _ in range(repeats):  # take turns, so load on the shared machine hits both alike
        for name, (fwd, grad) in fns.items():
            t, v = median_time(fwd, weights, 1)
            results[name]["forward"].append(t)
            t, g = median_time(grad, weights, 1)
            results[name]["adjoint"].append(t)
            values[name] = (float(v), np.asarray(g))
    report = {"qubits": qubits, "layers": layers, "parameters": int(weights.size), "engine_device": engine, "peer": peer}
    for kind in ("forward", "adjoint"):
        ours = statistics.median(results["gpu_provider"][kind])
        theirs = statistics.median(results["peer"][kind])
        report[f"{kind}_gpu_provider_s"] = round(ours, 4)
        report[f"{kind}_peer_s"] = round(theirs, 4)
        report[f"{kind}_ratio_peer_over_ours"] = round(theirs / ours, 3)
    report["max_value_difference"] = abs(values["gpu_provider"][0] - values["peer"][0])
    report["max_gradient_difference"] = float(np.max(np.abs(values["gpu_provider"][1] - values["peer"][1])))
    return report


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--qubits", type=int, nargs="+", default=[16, 20])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--device", choices=["auto", "gpu", "cpu"], default="auto")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--peer", default="lightning.qubit")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    for qubits in args.qubits:
        report = measure(qubits, args.layers, args.device, args.repeats, args.peer)
        emit(report, args.out, f"pennylane_{qubits}q_{report['engine_device'].replace(':', '')}.json")
        print()


if __name__ == "__main__":
    main()
