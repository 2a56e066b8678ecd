"""Side-by-side benchmark: gpu_provider against Qiskit Aer, BasicSimulator and qsim.

Run from the repository root::

    python -m benchmarks.run [--device cpu|gpu|all] [--families ghz,qft,random,qv]
                             [--sizes 18,20,22] [--precision double|single]
                             [--repeats 3] [--out bench-out]

Every circuit is transpiled once per simulator, outside the timing (to the
``u, cx`` basis, which every simulator here accepts, so all run the same gate
list). One timed call is ``backend.run(tc, shots=1024, seed_simulator=...).result()``;
each simulator gets one warm-up call, then the simulators take turns for
``--repeats`` rounds so background load hits them alike, and the median is
reported. The table prints ratios (gpu_provider / Aer: below 1 is faster than
Aer; BasicSimulator / gpu_provider: the speed-up), and the run writes
``results.json`` and ``times.png`` to ``--out``. Timings are information,
never a pass/fail gate.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional

from qiskit import QuantumCircuit, transpile

from .circuits import FAMILIES

logger = logging.getLogger(__name__)

SHOTS = 1024
SEED = 1234
BASIS = ["u", "cx"]


@dataclass
class Measurement:
    """One simulator on one circuit: its timed calls, or why there are none."""

    simulator: str
    family: str
    num_qubits: int
    times: list[float] = field(default_factory=list)
    skipped: Optional[str] = None

    @property
    def median(self) -> Optional[float]:
        return statistics.median(self.times) if self.times else None


class Simulator:
    """A named way to run a transpiled circuit once, with the timing done by the caller."""

    def __init__(self, name: str, prepare: Callable[[QuantumCircuit], Any], run: Callable[[Any], Any], max_qubits: Optional[int] = None, time_cap: Optional[float] = None) -> None:
        self.name = name
        self.prepare = prepare
        self.run = run
        self.max_qubits = max_qubits
        self.time_cap = time_cap
        self.capped_at: Optional[int] = None  # width at which a call first passed time_cap


def _qiskit_runner(backend, **options) -> Callable[[Any], Any]:
    def run(tc):
        return backend.run(tc, shots=SHOTS, seed_simulator=SEED, **options).result()

    return run


def _u_cx(circuit: QuantumCircuit) -> QuantumCircuit:
    return transpile(circuit, basis_gates=BASIS, optimization_level=1, seed_transpiler=SEED)


def build_simulators(device: str, precision: str, basic_max_qubits: int, basic_time_cap: float) -> tuple[list[Simulator], dict]:
    """The simulators this machine can run, and notes on those it cannot."""
    from gpu_provider import GPUSimulator
    from gpu_provider.engine.devices import probe_gpu

    notes: dict = {}
    sims: list[Simulator] = []
    devices = {"cpu": ["CPU"], "gpu": ["GPU"], "all": ["CPU", "GPU"]}[device]
    if "GPU" in devices:
        probe = probe_gpu()
        if not probe.usable:
            notes["gpu_provider[GPU]"] = f"skipped: {probe.reason}"
            devices = [d for d in devices if d != "GPU"]
            if not devices:
                raise SystemExit(f"--device gpu, but no GPU is usable here: {probe.reason}")
        else:
            notes["gpu"] = ", ".join(probe.names)
    for kind in devices:
        backend = GPUSimulator(device=kind, precision=precision)
        sims.append(Simulator(f"gpu_provider[{kind}]", _u_cx, _qiskit_runner(backend)))

    try:
        from qiskit_aer import AerSimulator

        aer = AerSimulator(method="statevector", precision=precision)
        sims.append(Simulator("aer", _u_cx, _qiskit_runner(aer)))
    except ImportError as exc:
        notes["aer"] = f"skipped: qiskit-aer is not installed ({exc})"

    from qiskit.providers.basic_provider import BasicSimulator

    basic = BasicSimulator()
    sims.append(Simulator("basic", _u_cx, _qiskit_runner(basic), max_qubits=basic_max_qubits, time_cap=basic_time_cap))
    if precision != "double":
        notes["basic"] = "BasicSimulator always runs in double precision"

    try:
        import cirq
        import qsimcirq
        from cirq.contrib.qasm_import import circuit_from_qasm
        from qiskit import qasm2

        qsim = qsimcirq.QSimSimulator(qsimcirq.QSimOptions(cpu_threads=os.cpu_count() or 1, use_gpu=False))

        from qiskit.transpiler.passes import RemoveBarriers

        def prepare(circuit):
            # cirq's OpenQASM reader knows no barrier; they change nothing in a simulation.
            return circuit_from_qasm(qasm2.dumps(RemoveBarriers()(_u_cx(circuit))))

        sims.append(Simulator("qsim", prepare, lambda c: qsim.run(c, repetitions=SHOTS)))
        if precision == "double":
            notes["qsim"] = "qsim computes in single precision"
        del cirq
    except ImportError as exc:
        notes["qsim"] = f"skipped: qsimcirq is not installed ({exc})"
    return sims, notes


def measure(sims: list[Simulator], family: str, n: int, repeats: int) -> list[Measurement]:
    """Warm every simulator up on the circuit, then time them in turns."""
    circuit = FAMILIES[family](n, seed=SEED)
    rows = {sim.name: Measurement(sim.name, family, n) for sim in sims}
    ready = []
    for sim in sims:
        row = rows[sim.name]
        if sim.max_qubits is not None and n > sim.max_qubits:
            row.skipped = f"only run up to {sim.max_qubits} qubits"
            continue
        if sim.capped_at is not None and n > sim.capped_at:
            row.skipped = f"a {sim.capped_at}-qubit call already took over {sim.time_cap:.0f} s"
            continue
        try:
            prepared = sim.prepare(circuit)
            start = time.perf_counter()
            sim.run(prepared)  # warm-up
            elapsed = time.perf_counter() - start
        except Exception as exc:  # a peer that cannot run this circuit is a note, not a crash
            row.skipped = f"failed: {type(exc).__name__}: {exc}"
            continue
        if sim.time_cap is not None and elapsed > sim.time_cap:
            # Too slow to repeat: its warm-up call is its one measurement.
            sim.capped_at = n
            row.times.append(elapsed)
            row.skipped = f"one call only ({elapsed:.0f} s > cap {sim.time_cap:.0f} s)"
            continue
        ready.append((sim, prepared))
    for _ in range(repeats):
        for sim, prepared in ready:
            start = time.perf_counter()
            sim.run(prepared)
            rows[sim.name].times.append(time.perf_counter() - start)
    return list(rows.values())


def machine_info(precision: str) -> dict:
    import numpy
    import qiskit

    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "cpu": _cpu_model(),
        "precision": precision,
        "shots": SHOTS,
        "numpy": numpy.__version__,
        "qiskit": qiskit.__version__,
        "load_average_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    try:
        import qiskit_aer

        info["qiskit_aer"] = qiskit_aer.__version__
    except ImportError:
        pass
    try:
        blas = numpy.show_config(mode="dicts").get("Build Dependencies", {}).get("blas", {})
        info["blas"] = f"{blas.get('name')} {blas.get('version')}"
    except Exception:  # informational only
        pass
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def ratio_table(results: list[Measurement], sim_names: list[str]) -> list[dict]:
    """One row per circuit: medians and the two headline ratios."""
    table = []
    keys = sorted({(m.family, m.num_qubits) for m in results}, key=lambda key: (list(FAMILIES).index(key[0]), key[1]))
    for family, n in keys:
        row: dict = {"family": family, "num_qubits": n}
        by_name = {m.simulator: m for m in results if (m.family, m.num_qubits) == (family, n)}
        for name in sim_names:
            m = by_name.get(name)
            row[name] = m.median if m else None
        aer = row.get("aer")
        basic = row.get("basic")
        for name in sim_names:
            if not name.startswith("gpu_provider") or row.get(name) is None:
                continue
            ours = row[name]
            row[f"{name}/aer"] = ours / aer if aer else None
            row[f"basic/{name}"] = basic / ours if basic else None
        table.append(row)
    return table


def print_table(table: list[dict], sim_names: list[str]) -> None:
    ours = [name for name in sim_names if name.startswith("gpu_provider")]
    columns = ["circuit"] + [f"{name} s" for name in sim_names]
    for name in ours:
        columns += [f"{name}/aer", f"basic/{name}"]
    lines = [columns]
    for row in table:
        line = [f"{row['family']}-{row['num_qubits']}"]
        line += ["-" if row.get(name) is None else f"{row[name]:.3f}" for name in sim_names]
        for name in ours:
            for key in (f"{name}/aer", f"basic/{name}"):
                value = row.get(key)
                line.append("-" if value is None else f"{value:.2f}")
        lines.append(line)
    widths = [max(len(line[i]) for line in lines) for i in range(len(columns))]
    for index, line in enumerate(lines):
        print("  ".join(cell.rjust(width) for cell, width in zip(line, widths)))
        if index == 0:
            print("  ".join("-" * width for width in widths))


def plot(table: list[dict], sim_names: list[str], path: str, precision: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = list(dict.fromkeys(row["family"] for row in table))
    fig, axes = plt.subplots(1, len(families), figsize=(4 * len(families), 3.6), squeeze=False)
    for ax, family in zip(axes[0], families):
        rows = [row for row in table if row["family"] == family]
        for name in sim_names:
            points = [(row["num_qubits"], row[name]) for row in rows if row.get(name)]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="o", label=name)
        ax.set_yscale("log")
        ax.set_title(family)
        ax.set_xlabel("qubits")
        ax.set_ylabel("seconds (median)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"run(...).result(), {SHOTS} shots, {precision} precision")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "gpu", "all"), default="all", help="gpu_provider devices to time (all: those this machine has)")
    parser.add_argument("--families", default="ghz,qft,random,qv", help=f"comma-separated, from {','.join(FAMILIES)}")
    parser.add_argument("--sizes", default="18,20,22", help="comma-separated qubit counts")
    parser.add_argument("--precision", choices=("double", "single"), default="double")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per simulator after one warm-up")
    parser.add_argument("--out", default="bench-out", help="folder for results.json and times.png")
    parser.add_argument("--basic-max-qubits", type=int, default=18, help="largest width BasicSimulator is asked to run")
    parser.add_argument("--basic-time-cap", type=float, default=60.0, help="seconds; a slower BasicSimulator call is not repeated, nor tried wider")
    args = parser.parse_args(argv)

    families = [f.strip() for f in args.families.split(",") if f.strip()]
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        parser.error(f"unknown families {unknown}; choose from {list(FAMILIES)}")
    sizes = sorted(int(s) for s in args.sizes.split(",") if s.strip())
    os.makedirs(args.out, exist_ok=True)

    sims, notes = build_simulators(args.device, args.precision, args.basic_max_qubits, args.basic_time_cap)
    sim_names = [sim.name for sim in sims]
    info = machine_info(args.precision)
    print(f"# {info['cpu']} ({info['cpu_count']} cores), {args.precision} precision, {SHOTS} shots, median of {args.repeats}")
    for name, note in notes.items():
        print(f"# {name}: {note}")
    results: list[Measurement] = []
    for family in families:
        for n in sizes:
            rows = measure(sims, family, n, args.repeats)
            results.extend(rows)
            summary = ", ".join(f"{m.simulator} {m.median:.3f}s" if m.median is not None else f"{m.simulator} -" for m in rows)
            print(f"{family}-{n}: {summary}", flush=True)

    table = ratio_table(results, sim_names)
    print()
    print_table(table, sim_names)
    payload = {
        "command": " ".join([os.path.basename(sys.executable), "-m", "benchmarks.run"] + (argv if argv is not None else sys.argv[1:])),
        "machine": info,
        "notes": notes,
        "measurements": [asdict(m) | {"median": m.median} for m in results],
        "table": table,
    }
    json_path = os.path.join(args.out, "results.json")
    with open(json_path, "w") as handle:
        json.dump(payload, handle, indent=2)
    png_path = os.path.join(args.out, "times.png")
    try:
        plot(table, sim_names, png_path, args.precision)
    except ImportError as exc:
        print(f"# no plot: matplotlib is not installed ({exc})")
        png_path = None
    print(f"\nwrote {json_path}" + (f" and {png_path}" if png_path else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
