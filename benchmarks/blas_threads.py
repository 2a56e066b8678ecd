"""CPU jobs under three BLAS thread settings, side by side, on a quiet or a loaded machine.

    python -m benchmarks.blas_threads [--families qft,random,qv] [--sizes 13,14,15,16,18,20]
        [--load 0] [--concurrent 1] [--repeats 5] [--shots 1000]

Each circuit runs end to end on the CPU (``backend.run(...).result()``) under:

- ``threads``: ``statevector_parallel_threshold=0``, every job's products on every core;
- ``default``: the backend's defaults (one thread up to 14 qubits, every core above);
- ``one``: ``max_parallel_threads=1``.

The settings take turns within each repeat, so a change in the machine's load
falls on all three alike; the median of ``--repeats`` is printed, with each
setting's time over ``threads``'s. ``--load K`` starts K processes that spin on
a core each for the whole run (the "busy machine"); ``--concurrent J`` submits
J jobs of the circuit at once and times them all (the CPU runs two at a time,
which then share the cores). To compare with a checkout from before
engine/threads.py, copy this file into that checkout's ``benchmarks/`` and run it
there (its backend ignores the two options, with a warning). Information for docs/benchmarks.md, "BLAS threads";
never a test.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

from benchmarks.circuits import ghz, qft, quantum_volume, random_layers
from gpu_provider import GPUSimulator

try:
    from gpu_provider.engine.threads import cores
except ImportError:  # a checkout from before engine/threads.py (this file copied there to compare)
    def cores() -> int:
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1

FAMILIES = {"ghz": ghz, "qft": qft, "random": random_layers, "qv": quantum_volume}
SETTINGS = {
    "threads": {"statevector_parallel_threshold": 0},
    "default": {},
    "one": {"max_parallel_threads": 1},
}


def spinners(count: int) -> list:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default="qft,random,qv")
    parser.add_argument("--sizes", default="13,14,15,16,18,20")
    parser.add_argument("--load", type=int, default=0, help="processes spinning on a core each during the run")
    parser.add_argument("--concurrent", type=int, default=1, help="jobs of the circuit submitted at once")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--shots", type=int, default=1000)
    args = parser.parse_args(argv)
    backend = GPUSimulator(device="CPU")
    print(f"cores {cores()}, load average at start {os.getloadavg()[0]:.2f}, spinning processes {args.load}, "
          f"jobs at once {args.concurrent}", flush=True)
    load = spinners(args.load)
    try:
        time.sleep(0.5 if load else 0)
        for family in args.families.split(","):
            for n in (int(size) for size in args.sizes.split(",")):
                circuit = FAMILIES[family](n)
                if not circuit.num_clbits:
                    circuit.measure_all()
                backend.run(circuit, shots=args.shots, seed_simulator=1).result()  # warm-up (translation caches)
                times: dict = {name: [] for name in SETTINGS}
                for _ in range(args.repeats):
                    for name, options in SETTINGS.items():
                        start = time.perf_counter()
                        jobs = [backend.run(circuit, shots=args.shots, seed_simulator=j, **options) for j in range(args.concurrent)]
                        for job in jobs:
                            job.result()
                        times[name].append(time.perf_counter() - start)
                medians = {name: statistics.median(values) for name, values in times.items()}
                base = medians["threads"]
                cells = ", ".join(f"{name} {1e3 * t:8.1f} ms ({t / base:.2f})" for name, t in medians.items())
                print(f"{family:>6} {n:2d}: {cells}", flush=True)
    finally:
        for process in load:
            process.kill()
            process.wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
