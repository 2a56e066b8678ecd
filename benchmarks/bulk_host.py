"""Host work of the GPU's small-circuit bulk path, step by step, measured on any machine.

    python -m benchmarks.bulk_host [--circuits 300] [--qubits 12] [--precision single] [--repeats 2]

The bulk path (``engine/small_batch.py``) runs a job of small circuits in one
kernel launch per chunk; what is left is host work: translating each circuit,
fusing it (for the GPU), packing the chunk's op stream and matrix pool, and
drawing each circuit's shots on the host from its final amplitudes. This
times those steps (CPU time per circuit, minimum over ``--repeats``) on the
circuits of ``benchmarks.batch``, without a GPU: the amplitudes the kernel
would return are computed by the CPU engine outside the timing. The GPU's own
time is not in these figures. Information only.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from benchmarks.batch import transpiled_batch
from gpu_provider.backend import _gc_paused
from gpu_provider.compiler.fusion import fuse
from gpu_provider.compiler.translate import translate
from gpu_provider.engine import program as P
from gpu_provider.engine import small_batch
from gpu_provider.engine.devices import resolve_device
from gpu_provider.engine.executor import RunConfig, final_state, sample_counts
from gpu_provider.engine.statevector import StateVector


def measure(circuits: int, qubits: int, precision: str, repeats: int) -> dict:
    batch = transpiled_batch(circuits, qubits)
    cpu, _ = resolve_device("cpu")
    config = RunConfig(shots=1024, seed=1, precision=precision)
    best = {"translate": float("inf"), "fuse": float("inf"), "pack": float("inf"), "sample": float("inf")}
    ops = 0.0
    for _ in range(repeats):
        with _gc_paused():  # as backend.run() translates and fuses
            start = time.process_time()
            programs = [translate(circuit) for circuit in batch]
            translated = time.process_time()
            fused = [fuse(program, "GPU", precision=precision) for program in programs]
            fused_at = time.process_time()
        small_batch.pack(fused, config.dtype)
        packed = time.process_time()
        amplitudes = [
            final_state(program.replace(ops=tuple(op for op in program.ops if not isinstance(op, P.Measure))), cpu, config).to_host()
            for program in fused
        ]
        sampling = time.process_time()
        for program, vector in zip(fused, amplitudes):
            sample_counts(StateVector.view(np, vector, config.dtype), program, config, np.random.default_rng(config.seed), None)
        end = time.process_time()
        for name, seconds in (("translate", translated - start), ("fuse", fused_at - translated), ("pack", packed - fused_at), ("sample", end - sampling)):
            best[name] = min(best[name], seconds / circuits)
        ops = sum(program.num_ops for program in fused) / circuits
    return {"circuits": circuits, "qubits": qubits, "precision": precision, "ops_per_circuit": ops, **{f"{k}_ms": 1e3 * v for k, v in best.items()}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--circuits", type=int, default=300)
    parser.add_argument("--qubits", type=int, default=12)
    parser.add_argument("--precision", default="single", choices=["single", "double"])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    report = measure(args.circuits, args.qubits, args.precision, args.repeats)
    steps = ("translate", "fuse", "pack", "sample")
    print(f"# host CPU ms per circuit on the bulk path ({args.circuits} circuits, {args.qubits} qubits, {report['ops_per_circuit']:.0f} ops each)")
    print(" ".join(f"{name:>9}" for name in steps + ("total",)))
    total = sum(report[f"{name}_ms"] for name in steps)
    print(" ".join(f"{report[f'{name}_ms']:>9.3f}" for name in steps) + f" {total:>9.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
