"""Parameter sets batched against one state at a time, on the CPU: where batching stops paying.

    python -m benchmarks.batch_crossover [--sizes 4,8,10,11,12,13] [--sets 64] [--repeats 3]

For each width, ``efficient_su2(n, reps=2)`` with ``--sets`` random parameter sets, a
2-term observable (EstimatorV2) and 100 shots of every qubit (SamplerV2): one PUB that holds
every set (batched where ``engine/batch.py`` batches that width) against one PUB per set (one
state at a time). Prints the best of ``--repeats`` for each and their ratio (below 1: the one
PUB is faster). Information only; it sets ``BATCH_MAX_QUBITS_CPU``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from qiskit.circuit.library import efficient_su2
from qiskit.quantum_info import SparsePauliOp

from gpu_provider import EstimatorV2, SamplerV2
from gpu_provider.engine.batch import batch_size


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="4,8,10,11,12,13")
    parser.add_argument("--sets", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    estimator = EstimatorV2(backend_options={"device": "CPU"})
    sampler = SamplerV2(seed=1, backend_options={"device": "CPU"})
    for n in (int(s) for s in args.sizes.split(",")):
        circuit = efficient_su2(n, reps=2)
        observable = SparsePauliOp.from_list([("Z" * n, 1.0), ("X" + "I" * (n - 1), 0.5)])
        values = rng.uniform(-3, 3, (args.sets, circuit.num_parameters))
        measured = circuit.measure_all(inplace=False)
        estimator.run([(circuit, observable, values[:2])]).result()  # warm-up
        one = best(lambda: estimator.run([(circuit, observable, values)]).result(), args.repeats)
        each = best(lambda: estimator.run([(circuit, observable, v) for v in values]).result(), args.repeats)
        one_s = best(lambda: sampler.run([(measured, values)], shots=100).result(), args.repeats)
        each_s = best(lambda: sampler.run([(measured, v) for v in values], shots=100).result(), args.repeats)
        batched = "batched" if batch_size(n, "CPU") > 1 else "one at a time"
        print(f"n={n:2d} ({batched}): estimator one PUB {one:.3f} s, {args.sets} PUBs {each:.3f} s ({one / each:.2f}); "
              f"sampler {one_s:.3f} s, {each_s:.3f} s ({one_s / each_s:.2f})", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
