"""Exact Pauli-sum expectation values on one state (the estimator's read), CPU, best of a few calls.

Run from the repository root (or with another checkout first on ``PYTHONPATH`` to time its code)::

    python -m benchmarks.pauli_sums [--sizes 6,12,18,24] [--repeats 3]

Two observables per size, on a random normalized state in each precision:

- ``chain``: ``Z Z`` on every neighbouring pair, ``X X`` on three pairs and a ``Y`` (the
  capacity benchmark's; five X-mask groups, the ``Z Z`` group reading every bit);
- ``random``: 200 random Pauli words (about one X-mask group each).

Timed: ``expectation_values(state, [observable])`` on a state with its scratch buffer already
allocated (as after a buffered run). Timings are information only.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from .report import emit


def _observables(n: int, rng: np.random.Generator) -> dict:
    from gpu_provider.engine.expectation import pauli_sum

    def masks(labels_on: list[tuple[str, list[int]]]):
        x = z = 0
        for letter, qubit in labels_on:
            if letter in "XY":
                x |= 1 << qubit
            if letter in "ZY":
                z |= 1 << qubit
        return x, z

    chain = [[("Z", q), ("Z", q + 1)] for q in range(n - 1)] + [[("X", q), ("X", q + 1)] for q in (0, n // 2, n - 2)] + [[("Y", n // 3)]]
    coeffs = [1.0] * (n - 1) + [0.5] * 3 + [0.25]
    pairs = [masks(term) for term in chain]
    out = {"chain": pauli_sum(n, [p[0] for p in pairs], [p[1] for p in pairs], coeffs)}
    terms = 200
    out["random"] = pauli_sum(n, rng.integers(0, 1 << n, terms), rng.integers(0, 1 << n, terms), rng.normal(size=terms))
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="6,12,18,24")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    from gpu_provider.engine.expectation import expectation_values
    from gpu_provider.engine.statevector import StateVector

    rows = []
    rng = np.random.default_rng(0)
    for n in [int(v) for v in args.sizes.split(",")]:
        observables = _observables(n, rng)
        for dtype in (np.complex128, np.complex64):
            state = StateVector(np, n, dtype)
            amplitudes = rng.normal(size=1 << n) + 1j * rng.normal(size=1 << n)
            state.data[:] = (amplitudes / np.linalg.norm(amplitudes)).astype(dtype)
            state.buffer  # allocated, as after a buffered run
            for name, observable in observables.items():
                best = float("inf")
                for _ in range(args.repeats):
                    start = time.perf_counter()
                    value = expectation_values(state, [observable])[0]
                    best = min(best, time.perf_counter() - start)
                row = {"qubits": n, "precision": np.dtype(dtype).name, "observable": name, "ms": round(best * 1e3, 2), "value": float(value.real)}
                print(row, flush=True)
                rows.append(row)
    report = {"benchmark": "pauli_sums", "rows": rows}
    emit(report, args.out, "pauli_sums.json")
    return report


if __name__ == "__main__":
    main()
