"""End-to-end time of wide circuits for each fusion width, per precision.

    python -m benchmarks.fusion_width [--device gpu] [--families qv] [--sizes 30]
                                      [--widths 3,4,5] [--precision single,double]
                                      [--repeats 2] [--out DIR]

Each circuit is transpiled once to ``u, cx`` (as ``benchmarks.run`` does); then,
for every precision and ``fusion_max_qubits`` in ``--widths``, one warm-up call
and ``--repeats`` timed calls of ``backend.run(tc, shots=1024).result()``
(median reported), with the number of fused ops and of dense passes per width
(k qubits each) from a fusion run on the host. It tells which width the fuser
should use per precision on a device, and with ``--widths auto`` what the
default (priced) choice gives. Information only: nothing is gated on it.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import time
from pathlib import Path

from qiskit import transpile

from benchmarks.circuits import FAMILIES
from benchmarks.report import emit
from benchmarks.run import BASIS, SEED, SHOTS
from gpu_provider import GPUSimulator
from gpu_provider.compiler.fusion import fuse
from gpu_provider.compiler.translate import translate
from gpu_provider.engine import program as P


def dense_passes(program: P.Program, device_kind: str, width, precision: str) -> dict:
    """Dense fused ops by width and diagonal ops, as the fuser emits them for ``width``."""
    fused = fuse(program, device_kind, None if width == "auto" else width, precision=precision)
    counts: collections.Counter = collections.Counter()
    for op in fused.ops:
        if isinstance(op, P.Unitary):
            counts[f"k{len(op.qubits) + len(op.controls)}"] += 1
        elif isinstance(op, P.Diagonal):
            counts["diagonal"] += 1
    return dict(sorted(counts.items()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="gpu", choices=("gpu", "cpu", "GPU", "CPU"))
    parser.add_argument("--families", default="qv")
    parser.add_argument("--sizes", default="30")
    parser.add_argument("--widths", default="3,4,5", help="comma-separated fusion_max_qubits values, or 'auto' for the default")
    parser.add_argument("--precision", default="single,double")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    device = args.device.upper()
    widths = [w if w == "auto" else int(w) for w in args.widths.split(",")]
    report: dict = {"device": None, "command": "python -m benchmarks.fusion_width " + " ".join(sys.argv[1:] if argv is None else argv)}
    for family in args.families.split(","):
        for n in (int(s) for s in args.sizes.split(",")):
            tc = transpile(FAMILIES[family](n, seed=SEED), basis_gates=BASIS, optimization_level=1, seed_transpiler=SEED)
            program = translate(tc)
            for precision in args.precision.split(","):
                for width in widths:
                    options = {} if width == "auto" else {"fusion_max_qubits": width}
                    backend = GPUSimulator(device=device, precision=precision, **options)
                    first = backend.run(tc, shots=SHOTS, seed_simulator=SEED).result().results[0].metadata
                    report["device"] = first["device"]
                    times = []
                    for _ in range(args.repeats):
                        start = time.perf_counter()
                        backend.run(tc, shots=SHOTS, seed_simulator=SEED).result()
                        times.append(time.perf_counter() - start)
                    key = f"{family}-{n} {precision} width={width}"
                    report[key] = {
                        "median_s": round(statistics.median(times), 4),
                        "ops": first["fusion_ops_after"],
                        "passes": dense_passes(program, device, width, precision),
                    }
    emit(report, args.out, "fusion_width.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
