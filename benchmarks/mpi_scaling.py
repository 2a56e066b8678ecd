"""Weak scaling of the MPI statevector, and the planned exchanges of wide circuits.

    python -m benchmarks.mpi_scaling [--qubits 20] [--ranks 1,2,4] [--families qv,qft,random]
                                     [--repeats 2] [--precision double] [--out DIR]
    python -m benchmarks.mpi_scaling --plan [--qubits 30] [--ranks 2,4,8] [--families qv,qft]

Weak scaling: for each rank count R = 2^k it starts ``mpiexec -n R`` on this
module (``--worker``) with an (n + k)-qubit circuit, so every rank holds 2^n
amplitudes as one rank does at n. Each worker transpiles the circuit to
``u, cx`` (as ``benchmarks.run`` does), runs it once to warm up, then
``--repeats`` timed ``backend.run(tc, shots=1024, mpi=True).result()`` calls on
the CPU; rank 0 reports the median wall time, the time spent exchanging
amplitudes (the job's metadata, the slowest rank), the swaps and the bytes each
rank sent. Ideal weak scaling keeps the time flat; what grows is the exchange.
BLAS threads per rank follow the engine's policy (the node's cores shared).

``--plan`` runs nothing: it fuses each circuit as the GPU would (complex64,
width 4) and counts, with the engine's own swap planner, the index-bit swaps a
run on 2^k GPUs would make, and the bytes each exchange moves per rank. Those
are the planned numbers in docs/architecture.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from qiskit import transpile

from benchmarks.circuits import FAMILIES
from benchmarks.report import emit
from benchmarks.run import BASIS, SEED, SHOTS


def worker(family: str, n: int, repeats: int, precision: str) -> None:
    from mpi4py import MPI

    from gpu_provider import GPUSimulator

    comm = MPI.COMM_WORLD
    circuit = transpile(FAMILIES[family](n, seed=SEED), basis_gates=BASIS, optimization_level=1, seed_transpiler=SEED)
    backend = GPUSimulator(device="CPU", precision=precision, mpi=True)
    backend.run(circuit, shots=SHOTS, seed_simulator=SEED).result()  # warm-up
    times, exchange, meta = [], [], {}
    for _ in range(repeats):
        comm.Barrier()
        start = time.perf_counter()
        result = backend.run(circuit, shots=SHOTS, seed_simulator=SEED).result()
        times.append(time.perf_counter() - start)
        meta = result.results[0].metadata.get("mpi") or {}
        exchange.append(comm.allreduce(meta.get("exchange_seconds", 0.0), op=MPI.MAX))
    if comm.Get_rank() == 0:
        seconds = statistics.median(times)
        print(
            json.dumps(
                {
                    "family": family,
                    "qubits": n,
                    "ranks": comm.Get_size(),
                    "seconds": seconds,
                    "exchange_seconds": statistics.median(exchange),
                    "exchange_fraction": statistics.median(exchange) / seconds if seconds else 0.0,
                    "swaps": meta.get("swaps", 0),
                    "bytes_sent_per_rank": meta.get("exchanged_bytes", 0),
                    "ops": len(circuit.data),
                }
            ),
            flush=True,
        )


def weak_scaling(args) -> dict:
    mpiexec = shutil.which("mpiexec", path=os.path.dirname(sys.executable)) or shutil.which("mpiexec")
    if mpiexec is None:
        raise SystemExit("mpiexec not found: pip install '.[mpi]'")
    rows = []
    for family in args.families:
        for ranks in args.ranks:
            k = ranks.bit_length() - 1
            n = args.qubits + k
            command = [mpiexec, "-n", str(ranks), sys.executable, "-m", "benchmarks.mpi_scaling", "--worker",
                       "--families", family, "--qubits", str(n), "--repeats", str(args.repeats), "--precision", args.precision]
            done = subprocess.run(command, capture_output=True, text=True, timeout=3600)
            if done.returncode != 0:
                raise SystemExit(f"{' '.join(command)} failed:\n{done.stdout}\n{done.stderr}")
            row = json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])
            rows.append(row)
            print(
                f"{family:>7} n={n:>2} ranks={ranks}: {row['seconds']:.3f} s, exchange {row['exchange_seconds']:.3f} s "
                f"({100 * row['exchange_fraction']:.0f}%), {row['swaps']} swaps, {row['bytes_sent_per_rank'] / 2**20:.0f} MiB sent per rank",
                flush=True,
            )
    for family in args.families:
        base = next(r for r in rows if r["family"] == family and r["ranks"] == args.ranks[0])
        for row in rows:
            if row["family"] == family:
                row["efficiency"] = base["seconds"] / row["seconds"]
    return {"precision": args.precision, "cpu_count": os.cpu_count(), "rows": rows}


def plan(args) -> dict:
    from gpu_provider.compiler.fusion import fuse
    from gpu_provider.compiler.translate import translate
    from gpu_provider.engine.distributed import plan_swaps

    rows = []
    itemsize = 8  # complex64
    for family in args.families:
        circuit = transpile(FAMILIES[family](args.qubits, seed=SEED), basis_gates=BASIS, optimization_level=1, seed_transpiler=SEED)
        circuit.remove_final_measurements()
        program = translate(circuit)
        for ranks in args.ranks:
            k = ranks.bit_length() - 1
            fused = fuse(program, "GPU", min(4, args.qubits - k), precision="single")
            dense = sum(1 for op in fused.ops if type(op).__name__ == "Unitary")
            counts = plan_swaps(fused.ops, args.qubits, k)
            half = (1 << (args.qubits - k - 1)) * itemsize
            rows.append(
                {
                    "family": family,
                    "qubits": args.qubits,
                    "ranks": ranks,
                    "fused_ops": len(fused.ops),
                    "dense_ops": dense,
                    **counts,
                    "bytes_per_swap_per_rank": half,
                    "bytes_sent_per_rank": half * (counts["gate_swaps"] + counts["final_swaps"]),
                }
            )
            print(
                f"{family:>7} n={args.qubits} ranks={ranks}: {len(fused.ops)} fused ops, {counts['gate_swaps']} gate swaps "
                f"+ {counts['final_swaps']} final, {half / 2**30:.2f} GiB per swap per rank",
                flush=True,
            )
    return {"precision": "single", "fusion_width": 4, "rows": rows}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--qubits", type=int, default=20)
    parser.add_argument("--ranks", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4])
    parser.add_argument("--families", type=lambda s: s.split(","), default=["qv", "qft", "random"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--precision", default="double")
    parser.add_argument("--plan", action="store_true")
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.families[0], args.qubits, args.repeats, args.precision)
        return 0
    report = plan(args) if args.plan else weak_scaling(args)
    emit(report, args.out, "mpi_plan.json" if args.plan else "mpi_scaling.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
