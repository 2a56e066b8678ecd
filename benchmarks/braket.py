"""Side-by-side benchmark of the Braket local simulators: ``gpu_provider`` against ``braket_sv``.

Run from the repository root (needs the ``braket`` extra)::

    python -m benchmarks.braket [--device cpu|gpu] [--families ghz,qft,random]
                                [--sizes 20,22] [--modes sample,exact]
                                [--precision double|single] [--repeats 3] [--out bench-out]

Every circuit is a Braket ``Circuit``; one timed call is
``LocalSimulator(name).run(circuit, shots=...).result()``, which includes the
serialization to OpenQASM 3 and the parse that each simulator does. Mode
``sample`` measures every qubit with 1024 shots; mode ``exact`` runs with
``shots=0`` and asks for an expectation value (``Z0 X1``), a probability
(qubits 0-2) and an amplitude. Each simulator gets one warm-up call, then they
take turns for ``--repeats`` rounds and the median is reported, with the ratio
``braket_sv / gpu_provider`` (the speed-up). The ``parse s`` column is the median
time of Braket's OpenQASM 3 interpreter alone on the same program, a cost that
both simulators pay inside their call. Timings are information only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import numpy as np

SHOTS = 1024
SEED = 1234


def ghz(n: int, rng: np.random.Generator):
    from braket.circuits import Circuit

    circuit = Circuit().h(0)
    for q in range(n - 1):
        circuit.cnot(q, q + 1)
    return circuit


def qft(n: int, rng: np.random.Generator):
    """A random product state, then the QFT written in Braket's gates (h, cphaseshift, swap)."""
    from braket.circuits import Circuit

    circuit = Circuit()
    for q in range(n):
        circuit.ry(q, float(rng.uniform(0, np.pi))).rz(q, float(rng.uniform(0, 2 * np.pi)))
    for target in reversed(range(n)):
        circuit.h(target)
        for control in reversed(range(target)):
            circuit.cphaseshift(control, target, np.pi / 2 ** (target - control))
    for q in range(n // 2):
        circuit.swap(q, n - 1 - q)
    return circuit


def random_layers(n: int, rng: np.random.Generator, depth: int = 10):
    """``depth`` layers: rx, ry, rz with random angles on every qubit, then a brick of cnots."""
    from braket.circuits import Circuit

    circuit = Circuit()
    for layer in range(depth):
        for q in range(n):
            circuit.rx(q, float(rng.uniform(0, 6))).ry(q, float(rng.uniform(0, 6))).rz(q, float(rng.uniform(0, 6)))
        for q in range(layer % 2, n - 1, 2):
            circuit.cnot(q, q + 1)
    return circuit


FAMILIES: dict[str, Callable] = {"ghz": ghz, "qft": qft, "random": random_layers}


def task(family: str, n: int, mode: str):
    """The circuit and the shots of one benchmark case."""
    from braket.circuits import Observable

    circuit = FAMILIES[family](n, np.random.default_rng(SEED))
    if mode == "sample":
        return circuit.measure(range(n)), SHOTS
    circuit.expectation(Observable.Z() @ Observable.X(), target=[0, 1]).probability([0, 1, 2]).amplitude(["0" * n])
    return circuit, 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "gpu"])
    parser.add_argument("--families", default="ghz,qft,random")
    parser.add_argument("--sizes", default="20,22")
    parser.add_argument("--modes", default="sample,exact")
    parser.add_argument("--precision", default="double", choices=["double", "single"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    from braket.devices import LocalSimulator

    from gpu_provider.braket_simulator import GPUBraketSimulator

    ours = LocalSimulator(GPUBraketSimulator(device=args.device.upper(), precision=args.precision))
    reference = LocalSimulator("braket_sv")
    from braket.circuits.serialization import IRType

    parser = GPUBraketSimulator(device="CPU")
    sims = {
        "gpu_provider": lambda c, s: ours.run(c, shots=s, seed=SEED).result(),
        "braket_sv": lambda c, s: reference.run(c, shots=s).result(),
        "parse": lambda c, s: parser.parse_program(c.to_ir(IRType.OPENQASM)).circuit,
    }
    rows = []
    print(f"{'circuit':<18}{'gpu_provider s':>16}{'braket_sv s':>14}{'parse s':>10}{'braket_sv / gpu_provider':>27}")
    for family in args.families.split(","):
        for n in [int(size) for size in args.sizes.split(",")]:
            for mode in args.modes.split(","):
                circuit, shots = task(family, n, mode)
                times: dict[str, list[float]] = {name: [] for name in sims}
                for run in sims.values():
                    run(circuit, shots)  # warm-up
                for _ in range(args.repeats):
                    for name, run in sims.items():
                        start = time.perf_counter()
                        run(circuit, shots)
                        times[name].append(time.perf_counter() - start)
                medians = {name: statistics.median(values) for name, values in times.items()}
                ratio = medians["braket_sv"] / medians["gpu_provider"]
                label = f"{family}-{n}-{mode}"
                print(f"{label:<18}{medians['gpu_provider']:>16.3f}{medians['braket_sv']:>14.3f}{medians['parse']:>10.3f}{ratio:>27.2f}", flush=True)
                rows.append({"circuit": label, "family": family, "num_qubits": n, "mode": mode, "shots": shots,
                             "times": times, "median": medians, "speedup": ratio, "load_average": os.getloadavg()})  # fmt: skip
    if args.out:
        import braket.default_simulator
        import braket._sdk

        args.out.mkdir(parents=True, exist_ok=True)
        machine = {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                   "python": platform.python_version(), "numpy": np.__version__,
                   "amazon-braket-sdk": braket._sdk.__version__, "amazon-braket-default-simulator": braket.default_simulator.__version__}  # fmt: skip
        report = {"machine": machine, "device": args.device, "precision": args.precision, "repeats": args.repeats, "rows": rows}
        (args.out / "braket.json").write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
