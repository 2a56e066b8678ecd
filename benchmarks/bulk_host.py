"""Host work of the GPU's small-circuit bulk path, step by step, measured on any machine.

    python -m benchmarks.bulk_host [--circuits 300] [--qubits 12] [--precision single] [--repeats 2] [--fuse]

The bulk path (``engine/small_batch.py``) runs a job of small circuits in one
kernel launch per chunk; what is left is host work: translating each circuit
(and checking that the kernel takes it), packing the chunk's op stream and
matrix pool, drawing each circuit's shots on the host from its final
amplitudes, and laying the outputs out as a Qiskit ``Result``. Circuits the
bulk kernel takes are not fused (``backend.run`` skips fusion for them);
``--fuse`` fuses them as the one-at-a-time GPU path does (the bulk path did
so before), for comparison. This times those steps (CPU time per circuit,
minimum over ``--repeats``) on the circuits of ``benchmarks.batch``, without a
GPU: the amplitudes the kernel would return are computed by the CPU engine
outside the timing. The GPU's own time is not in these figures. Information only.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from qiskit.result import Result

from benchmarks.batch import transpiled_batch
from gpu_provider.backend import _gc_paused, experiment_result
from gpu_provider.compiler.fusion import fuse
from gpu_provider.compiler.translate import translate
from gpu_provider.engine import program as P
from gpu_provider.engine import small_batch
from gpu_provider.engine.devices import resolve_device
from gpu_provider.engine.executor import (
    RunConfig,
    experiment_output,
    final_state,
    sample_counts,
)
from gpu_provider.engine.program import compact, is_sampling_friendly
from gpu_provider.engine.statevector import StateVector

STEPS = ("translate", "fuse", "pack", "sample", "result")


def measure(circuits: int, qubits: int, precision: str, repeats: int, fused: bool = False) -> dict:
    batch = transpiled_batch(circuits, qubits)
    cpu, _ = resolve_device("cpu")
    config = RunConfig(shots=1024, seed=1, precision=precision)
    itemsize = np.dtype(config.dtype).itemsize
    best = {name: float("inf") for name in STEPS}
    ops = 0.0
    for _ in range(repeats):
        with _gc_paused():  # as backend.run() translates and fuses
            start = time.process_time()
            programs = [compact(translate(circuit)) for circuit in batch]
            # The bulk path's check of each circuit (small_batch.eligible, less its device lookup).
            if not all(is_sampling_friendly(program) and small_batch._scan(program, itemsize) is not None for program in programs):
                raise RuntimeError("a benchmark circuit the bulk kernel does not take")
            translated = time.process_time()
            if fused:
                programs = [fuse(program, "GPU", precision=precision) for program in programs]
            fused_at = time.process_time()
        small_batch.pack(programs, config.dtype)
        packed = time.process_time()
        amplitudes = [
            final_state(program.replace(ops=tuple(op for op in program.ops if not isinstance(op, P.Measure))), cpu, config).to_host()
            for program in programs
        ]
        sampling = time.process_time()
        outputs = []
        for program, vector in zip(programs, amplitudes):
            tally = sample_counts(StateVector.view(np, vector, config.dtype), program, config, np.random.default_rng(config.seed), None)
            outputs.append(experiment_output(program, cpu, config, tally, None, True, 0.0))
        sampled = time.process_time()
        Result.from_dict(
            {
                "backend_name": "bulk_host",
                "backend_version": "0",
                "job_id": "0",
                "results": [experiment_result(circuit, output, config) for circuit, output in zip(batch, outputs)],
                "status": "COMPLETED",
                "success": True,
            }
        )
        end = time.process_time()
        steps = (translated - start, fused_at - translated, packed - fused_at, sampled - sampling, end - sampled)
        for name, seconds in zip(STEPS, steps):
            best[name] = min(best[name], seconds / circuits)
        ops = sum(program.num_ops for program in programs) / circuits
    return {
        "circuits": circuits,
        "qubits": qubits,
        "precision": precision,
        "fused": fused,
        "ops_per_circuit": ops,
        **{f"{k}_ms": 1e3 * v for k, v in best.items()},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--circuits", type=int, default=300)
    parser.add_argument("--qubits", type=int, default=12)
    parser.add_argument("--precision", default="single", choices=["single", "double"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--fuse", action="store_true", help="fuse the circuits first (the one-at-a-time GPU path's preparation)")
    args = parser.parse_args(argv)
    report = measure(args.circuits, args.qubits, args.precision, args.repeats, args.fuse)
    print(
        f"# host CPU ms per circuit on the bulk path ({args.circuits} circuits, {args.qubits} qubits, "
        f"{report['ops_per_circuit']:.0f} ops each, {'fused' if args.fuse else 'not fused'})"
    )
    print(" ".join(f"{name:>9}" for name in STEPS + ("total",)))
    total = sum(report[f"{name}_ms"] for name in STEPS)
    print(" ".join(f"{report[f'{name}_ms']:>9.3f}" for name in STEPS) + f" {total:>9.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
