"""Host time per dense gate on small states, the gather path against the general one.

    python -m benchmarks.gate_overhead [--sizes 8,10,12,13,14] [--precision single]
                                       [--gates 1000] [--repeats 5] [--circuits 100]
                                       [--device cpu|gpu]

Applies the same random one- and two-qubit gates (alternating) to a
``StateVector`` on the CPU, once with the small-state gather path disabled
(``SMALL_STATE_QUBITS = 0``: axis bookkeeping, transposes, products) and once
with it forced on, and prints the process CPU time per gate (minimum over
``--repeats`` rounds, the two paths taking turns) and the largest amplitude
difference between the two results. CPU time, not wall time, so other
processes on the machine weigh less; run with ``OPENBLAS_NUM_THREADS=1`` to
keep BLAS threads out of it. Information only.

Then, per gate of whole circuits (``--circuits`` random 12-qubit circuits of
``benchmarks.batch``: 12 layers of ``u`` on every qubit and ``cx`` on alternate
pairs, 1024 shots), the CPU time of each step the host takes: translation,
fusion, and the engine (``run_program``: gates, sampling, counts), divided by
the circuits' gates before fusion. The same file runs against an older
checkout (``PYTHONPATH=<checkout> python <this file>``) to compare.

``--device gpu`` (a usable GPU): host and wall microseconds per gate on the
GPU instead (:func:`gpu_overhead`): the same gates on a ``StateVector`` with
the kernels, each matrix uploaded on its own and all of them preloaded in one
copy, and ``run_program`` over a whole random circuit of ``benchmarks.batch``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from qiskit.quantum_info import random_unitary

from gpu_provider.engine import statevector as S

PRECISIONS = {"single": np.complex64, "double": np.complex128}


def _gates(n: int, count: int, seed: int) -> list:
    rng = np.random.default_rng(seed)
    gates = []
    for i in range(count):
        k = 1 if i % 2 else 2
        qubits = tuple(int(q) for q in rng.choice(n, k, replace=False))
        gates.append((qubits, random_unitary(2**k, seed=seed + i).data))
    return gates


def _run(n: int, dtype, gates: list, small_limit: int) -> tuple[float, np.ndarray]:
    saved = S.SMALL_STATE_QUBITS
    S.SMALL_STATE_QUBITS = small_limit
    try:
        state = S.StateVector(np, n, dtype)
        start = time.process_time()
        state.preload([matrix for _, matrix in gates])  # as run_program does: the matrices' real forms, in bulk
        for qubits, matrix in gates:
            state.apply_unitary(qubits, matrix)
        state.to_canonical()
        return (time.process_time() - start) / len(gates), state.data.copy()
    finally:
        S.SMALL_STATE_QUBITS = saved


def _circuit_steps(num_qubits: int, circuits: int, precision: str, repeats: int) -> tuple[float, float, float, int]:
    """Minimum CPU seconds per source gate of translate, fuse and run_program over ``circuits`` circuits."""
    from qiskit import transpile

    from benchmarks.batch import random_circuit
    from gpu_provider.compiler.fusion import fuse
    from gpu_provider.compiler.translate import translate
    from gpu_provider.engine.devices import resolve_device
    from gpu_provider.engine.executor import RunConfig, run_program

    rng = np.random.default_rng(7)
    batch = transpile([random_circuit(num_qubits, 12, rng) for _ in range(circuits)], basis_gates=["u", "cx"], optimization_level=0)
    gates = sum(1 for circuit in batch for instruction in circuit.data if instruction.operation.name in ("u", "cx"))
    device, _ = resolve_device("cpu")
    config = RunConfig(shots=1024, seed=1, precision=precision)
    best = [float("inf")] * 3
    ops = 0
    for _ in range(repeats):
        start = time.process_time()
        programs = [translate(circuit) for circuit in batch]
        translated = time.process_time()
        fused = [fuse(program, "CPU", precision=precision) for program in programs]
        done_fusing = time.process_time()
        for program in fused:
            run_program(program, device, config)
        end = time.process_time()
        ops = sum(program.num_ops for program in fused)
        for i, seconds in enumerate((translated - start, done_fusing - translated, end - done_fusing)):
            best[i] = min(best[i], seconds / gates)
    return best[0], best[1], best[2], ops / circuits


def gpu_overhead(n: int, dtype, gates: list, repeats: int) -> dict:
    """Host and wall microseconds per gate on the GPU, a ``StateVector`` with the kernels on the
    device's stream: each gate's matrix uploaded on its own, and all of them in one copy first
    (``preload``, as ``run_program`` does); then ``run_program`` on a whole random circuit
    (its checkpoint events included). Minimum over ``repeats`` rounds, fresh matrices each round."""
    import cupy

    from benchmarks.batch import random_circuit
    from gpu_provider.compiler.translate import translate
    from gpu_provider.engine.devices import resolve_device
    from gpu_provider.engine.executor import RunConfig, run_program
    from gpu_provider.engine.kernels import kernels_for

    device, _ = resolve_device("GPU", 0)
    out = {}
    with device.stream() as stream:
        for label, preload in (("one upload per gate", False), ("matrices preloaded", True)):
            host, wall = float("inf"), float("inf")
            for _ in range(repeats + 1):  # the first round compiles the kernels
                state = S.StateVector(cupy, n, dtype, kernels_for(dtype))
                matrices = [np.array(matrix) for _, matrix in gates]  # new objects: no device copy cached from a past round
                stream.synchronize()
                start = time.perf_counter()
                if preload:
                    state.preload(matrices)
                for (qubits, _), matrix in zip(gates, matrices):
                    state.apply_unitary(qubits, matrix)
                issued = time.perf_counter()
                stream.synchronize()
                host, wall = min(host, issued - start), min(wall, time.perf_counter() - start)
            out[label] = {"host_us_per_gate": 1e6 * host / len(gates), "wall_us_per_gate": 1e6 * wall / len(gates)}
    program = translate(random_circuit(n, 12, np.random.default_rng(5)))
    precision = "single" if np.dtype(dtype) == np.complex64 else "double"
    config = RunConfig(shots=1024, seed=1, precision=precision)
    best = float("inf")
    for _ in range(repeats + 1):
        start = time.perf_counter()
        run_program(program, device, config)  # returns once the counts are on the host
        best = min(best, time.perf_counter() - start)
    out["run_program, whole circuit"] = {"wall_us_per_op": 1e6 * best / program.num_ops, "ops": program.num_ops}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="8,10,12,13,14")
    parser.add_argument("--precision", default="single", choices=sorted(PRECISIONS))
    parser.add_argument("--gates", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--circuits", type=int, default=100, help="whole circuits for the per-source-gate table (0: skip it)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "gpu"), help="gpu: host and wall us per gate on the GPU instead")
    args = parser.parse_args(argv)
    dtype = PRECISIONS[args.precision]
    if args.device == "gpu":
        from gpu_provider.engine.devices import probe_gpu

        probe = probe_gpu()
        if not probe.usable:
            print(f"no GPU: {probe.reason}; --device gpu needs a usable NVIDIA GPU, nothing was measured")
            return 0
        for n in (int(s) for s in args.sizes.split(",")):
            for label, row in gpu_overhead(n, dtype, _gates(n, args.gates, seed=n), args.repeats).items():
                print(f"n={n} {args.precision} {label}: " + ", ".join(f"{key} {value:.1f}" for key, value in row.items()))
        return 0
    print(f"# CPU time per 1-/2-qubit gate, {args.precision}; the default path is gather up to {S.SMALL_STATE_QUBITS} qubits")
    print(f"{'n':>3} {'general us':>11} {'gather us':>10} {'max diff':>9}")
    for n in (int(s) for s in args.sizes.split(",")):
        gates = _gates(n, args.gates, seed=n)
        general, gather = [], []
        for _ in range(args.repeats):
            t, a = _run(n, dtype, gates, 0)
            general.append(t)
            t, b = _run(n, dtype, gates, 64)
            gather.append(t)
        print(f"{n:>3} {1e6 * min(general):>11.1f} {1e6 * min(gather):>10.1f} {float(np.max(np.abs(a - b))):>9.1e}")
    if args.circuits:
        translate_s, fuse_s, engine_s, ops = _circuit_steps(12, args.circuits, args.precision, max(1, args.repeats // 2))
        print(f"# whole 12-qubit circuits ({args.circuits}, u + cx, 1024 shots): CPU us per source gate, {ops:.0f} ops a circuit")
        print(f"{'translate':>10} {'fuse':>6} {'engine':>7} {'total':>6}")
        total = translate_s + fuse_s + engine_s
        print(f"{1e6 * translate_s:>10.2f} {1e6 * fuse_s:>6.2f} {1e6 * engine_s:>7.2f} {1e6 * total:>6.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
