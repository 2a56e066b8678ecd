"""Bandwidth of one kernel pass over the state, as a fraction of a device copy.

Run from the repository root on a machine with a GPU::

    python -m benchmarks.gpu_kernels [--out DIR] [--sizes 28,30]
                                     [--precision double,single]
                                     [--repeats 30] [--warmup 3]

A pass over a 2^n state reads and writes every amplitude once, so its
effective bandwidth is ``2 * 2^n * itemsize / time``. For each size and
precision the run times, with CUDA events on one stream after a warm-up
(median of ``--repeats``, random non-zero data), a device-to-device copy of the
state (cudaMemcpyAsync) and then each kernel pass: ``apply_matrix`` for k = 1..5
on the low targets (0..k-1), on target 0 with the k-1 highest ("split") and on
the high ones (n-k..n-1), with each of its kernels that applies ("strided",
"tiled", "tiled_async" (the tiled kernel double-buffered with cp.async),
"warp" where a target is among bits 0..4, and "strided_multi",
the strided kernel with several groups per thread, at the widths it is built
for; ``*`` marks the one it picks; :func:`matrix_cases` plans them), and
``apply_diagonal`` on two low and two high targets. It prints each pass's
bandwidth over the copy's (1.0 = as fast as a copy) and writes
``gpu_kernels.json`` to ``--out``. The copy is timed before and after the
passes and the median of both sets is used, so drift in clocks shows up in
``copy_spread``. Ratios are information, never a pass/fail gate. Without a
usable GPU the run says so and exits with status 0.
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

import numpy as np

logger = logging.getLogger(__name__)

PRECISIONS = {"double": np.complex128, "single": np.complex64}
DEFAULT_SIZES = (28, 30)
MATRIX_WIDTHS = range(1, 6)
DIAGONAL_WIDTH = 2
SEED = 1234


@dataclass(frozen=True)
class MatrixCase:
    """One apply_matrix target set to time, with every kernel that applies to it."""

    k: int
    placement: str  # "low" (0..k-1), "split" (0 and the k-1 highest) or "high" (n-k..n-1)
    bits: tuple[int, ...]
    methods: tuple[str, ...]
    chosen: str  # the kernel method="auto" runs


def matrix_cases(n: int, real: str) -> list[MatrixCase]:
    """The apply_matrix passes one size and real type ("float" or "double") times: k = 1..5 on each placement.

    Every kernel that applies is timed, so the margin to the one "auto" picks
    shows: "strided", "tiled" and "tiled_async" always, "warp" where a target is among bits
    0..4 on 32 or more amplitudes, "strided_multi" where apply_matrix_multi is
    built for (real, k) (elsewhere it would only repeat "strided").
    """
    from gpu_provider.engine.kernels import auto_method, multi_applies, warp_applies

    cases = []
    for k in MATRIX_WIDTHS:
        placements = [("low", tuple(range(k))), ("high", tuple(range(n - k, n)))]
        if k > 1:
            placements.insert(1, ("split", (0,) + tuple(range(n - k + 1, n))))  # one lane target, the rest high
        for placement, bits in placements:
            methods = ["strided", "tiled", "tiled_async"]
            if warp_applies(n, bits):
                methods.append("warp")
            if multi_applies(real, k):
                methods.append("strided_multi")
            cases.append(MatrixCase(k, placement, bits, tuple(methods), auto_method(real, bits)))
    return cases


@dataclass
class PassResult:
    """One timed kernel pass (or the copy) at one size and precision."""

    operation: str
    num_qubits: int
    precision: str
    targets: list[int]
    placement: str
    method: str
    median_ms: float
    bandwidth_gbs: float
    ratio_to_copy: Optional[float] = None
    chosen: bool = True  # the kernel apply_matrix picks for these targets ("auto")
    times_ms: list[float] = field(default_factory=list)


def time_on_stream(cupy: Any, stream: Any, run: Callable[[], None], repeats: int, warmup: int) -> list[float]:
    """Milliseconds per call of ``run``, each bracketed by CUDA events on ``stream``."""
    for _ in range(warmup):
        run()
    stream.synchronize()
    times = []
    start, end = cupy.cuda.Event(), cupy.cuda.Event()
    for _ in range(repeats):
        start.record(stream)
        run()
        end.record(stream)
        end.synchronize()
        times.append(float(cupy.cuda.get_elapsed_time(start, end)))
    return times


def fill_random(cupy: Any, data: Any, seed: int) -> None:
    """Normalized random non-zero amplitudes, drawn on the device in slices (no full-size temporary)."""
    real = data.real.dtype
    flat = data.view(real)
    cupy.random.seed(seed)
    step = 1 << 24
    for begin in range(0, flat.size, step):
        flat[begin : begin + step] = cupy.random.standard_normal(min(step, flat.size - begin), dtype=real)
    data /= cupy.linalg.norm(data)


def random_unitary(rng: np.random.Generator, dim: int) -> np.ndarray:
    """A Haar-like unitary: repeated passes keep the state's norm, so values never drift to zero."""
    q, r = np.linalg.qr(rng.normal(size=(dim, dim)) + 1j * rng.normal(size=(dim, dim)))
    return q * (np.diagonal(r) / np.abs(np.diagonal(r)))


def bench_size(cupy: Any, n: int, precision: str, repeats: int, warmup: int) -> tuple[list[PassResult], dict]:
    """Copy and kernel passes at one size and precision; returns the passes and the copy's figures."""
    from gpu_provider.engine.kernels import kernels_for
    from gpu_provider.engine.statevector import StateVector

    dtype = np.dtype(PRECISIONS[precision])
    nbytes = (1 << n) * dtype.itemsize
    moved = 2 * nbytes  # every pass reads and writes the whole state once
    rng = np.random.default_rng(SEED + n)
    kernels = kernels_for(dtype)
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        state = StateVector(cupy, n, dtype, kernels)
        fill_random(cupy, state.data, SEED + n)
        copy = cupy.empty_like(state.data)

        def copy_pass() -> None:
            copy.data.copy_from_device_async(state.data.data, nbytes, stream)

        copy_times = time_on_stream(cupy, stream, copy_pass, repeats, warmup)
        results = []
        matrices = {k: cupy.asarray(random_unitary(rng, 1 << k).astype(dtype)) for k in MATRIX_WIDTHS}
        for case in matrix_cases(n, kernels.real):
            bits, matrix = list(case.bits), matrices[case.k]
            # Every kernel that applies is timed; the one apply_matrix picks is marked, the others show the margin.
            for method in case.methods:
                times = time_on_stream(
                    cupy, stream, lambda: kernels.apply_matrix(state, bits, matrix, method=method), repeats, warmup
                )
                result = _result("apply_matrix", n, precision, bits, case.placement, method, times, moved)
                result.chosen = method == case.chosen
                results.append(result)
        phases = cupy.asarray(np.exp(1j * rng.uniform(0, 2 * np.pi, 1 << DIAGONAL_WIDTH)).astype(dtype))
        for placement, bits in (("low", list(range(DIAGONAL_WIDTH))), ("high", list(range(n - DIAGONAL_WIDTH, n)))):
            times = time_on_stream(cupy, stream, lambda: kernels.apply_diagonal(state, bits, phases), repeats, warmup)
            results.append(_result("apply_diagonal", n, precision, bits, placement, "", times, moved))
        copy_times += time_on_stream(cupy, stream, copy_pass, repeats, 0)
        if not np.isfinite(float(cupy.linalg.norm(state.data))):
            raise RuntimeError(f"the state went non-finite during the {n}-qubit {precision} passes")
    del state, copy
    copy_result = _result("copy", n, precision, [], "", "memcpy", copy_times, moved)
    first, second = copy_times[:repeats], copy_times[repeats:]
    copy_spread = abs(statistics.median(first) - statistics.median(second)) / copy_result.median_ms
    for result in results:
        result.ratio_to_copy = result.bandwidth_gbs / copy_result.bandwidth_gbs
    copy_result.ratio_to_copy = 1.0
    return [copy_result] + results, {"copy_bandwidth_gbs": copy_result.bandwidth_gbs, "copy_spread": copy_spread}


def _result(
    operation: str, n: int, precision: str, bits: list[int], placement: str, method: str, times: list[float], moved: int
) -> PassResult:
    median = statistics.median(times)
    bandwidth = moved / (median * 1e-3) / 1e9
    return PassResult(operation, n, precision, list(bits), placement, method, median, bandwidth, times_ms=times)


def print_table(results: list[PassResult]) -> None:
    """One row per pass; '*' marks the matrix kernel that apply_matrix picks for those targets."""
    header = f"{'n':>3} {'precision':<9} {'operation':<15} {'targets':<18} {'path':<14} {'ms':>9} {'GB/s':>9} {'/copy':>7}"
    print(header)
    print("-" * len(header))
    for r in results:
        targets = f"{r.placement} {r.targets[0]}..{r.targets[-1]}" if r.targets else ""
        print(
            f"{r.num_qubits:>3} {r.precision:<9} {r.operation:<15} {targets:<18} "
            f"{r.method + ('*' if r.operation == 'apply_matrix' and r.chosen else ''):<14} "
            f"{r.median_ms:>9.3f} {r.bandwidth_gbs:>9.1f} {r.ratio_to_copy:>7.3f}"
        )


def fastest_methods(results: list[PassResult]) -> dict[str, dict]:
    """Per apply_matrix target set timed ("n precision k placement"): the fastest kernel, its ratio to copy, and the one auto picks.

    Where the fastest is not the chosen one on high targets, ``HIGH_TARGET_METHOD``
    in gpu_provider/engine/kernels.py is the table to revisit (``LOW_TARGET_METHOD``
    for low and split targets), with the margin and the other size in view.
    """
    best: dict[str, dict] = {}
    for r in results:
        if r.operation != "apply_matrix":
            continue
        key = f"{r.num_qubits} {r.precision} k={len(r.targets)} {r.placement}"
        entry = best.setdefault(key, {"fastest": r.method, "ratio_to_copy": r.ratio_to_copy, "chosen": None})
        if r.chosen:
            entry["chosen"] = r.method
        if r.ratio_to_copy is not None and (entry["ratio_to_copy"] is None or r.ratio_to_copy > entry["ratio_to_copy"]):
            entry["fastest"], entry["ratio_to_copy"] = r.method, r.ratio_to_copy
    return best


def _device_info(cupy: Any) -> dict:
    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    name = props["name"]
    return {
        "name": name.decode() if isinstance(name, bytes) else str(name),
        "compute_capability": cupy.cuda.Device().compute_capability,
        "multiprocessors": cupy.cuda.Device().attributes["MultiProcessorCount"],
        "cupy": cupy.__version__,
        "cuda_runtime": cupy.cuda.runtime.runtimeGetVersion(),
        "nvrtc": ".".join(str(v) for v in cupy.cuda.nvrtc.getVersion()),
    }


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench-out", help="folder for gpu_kernels.json")
    parser.add_argument("--sizes", default=",".join(map(str, DEFAULT_SIZES)), help="comma-separated qubit counts")
    parser.add_argument("--precision", default="double,single", help="comma-separated: double, single")
    parser.add_argument("--repeats", type=int, default=30, help="timed calls per pass (the median is reported)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls before timing (the first one compiles)")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    precisions = [p for p in args.precision.split(",") if p]
    unknown = [p for p in precisions if p not in PRECISIONS]
    if unknown or args.repeats < 1 or args.warmup < 0 or any(n < 6 for n in sizes):
        parser.error("precision is double and/or single, repeats >= 1, warmup >= 0, sizes >= 6")

    from gpu_provider.engine.devices import probe_gpu

    probe = probe_gpu()
    if not probe.usable:
        print(f"no GPU: {probe.reason}; the kernel benchmark needs a usable NVIDIA GPU, nothing was measured")
        return 0
    import cupy

    os.makedirs(args.out, exist_ok=True)
    started = time.time()
    results: list[PassResult] = []
    copies: dict[str, dict] = {}
    skipped: list[dict] = []
    pool = cupy.get_default_memory_pool()
    for n in sizes:
        for precision in precisions:
            needed = 2 * (1 << n) * np.dtype(PRECISIONS[precision]).itemsize  # the state and the copy's target
            free = cupy.cuda.runtime.memGetInfo()[0] + pool.free_bytes()
            if needed > free:
                reason = f"needs {needed:,} bytes, {free:,} free"
                print(f"skip n={n} {precision}: {reason}")
                skipped.append({"num_qubits": n, "precision": precision, "reason": reason})
                continue
            passes, copy = bench_size(cupy, n, precision, args.repeats, args.warmup)
            results += passes
            copies[f"{n}-{precision}"] = copy
            pool.free_all_blocks()
    print_table(results)
    fastest = fastest_methods(results)
    for key, entry in fastest.items():
        if entry["fastest"] != entry["chosen"]:
            print(f"{key}: fastest {entry['fastest']} ({entry['ratio_to_copy']:.3f} of copy), auto runs {entry['chosen']}")
    report = {
        "benchmark": "gpu_kernels",
        "device": _device_info(cupy),
        "host": platform.node(),
        "python": sys.version.split()[0],
        "repeats": args.repeats,
        "warmup": args.warmup,
        "bytes_per_pass": "2 * 2^n * itemsize",
        "copy": copies,
        "skipped": skipped,
        "results": [asdict(r) for r in results],
        "fastest": fastest,
        "wall_seconds": time.time() - started,
    }
    path = os.path.join(args.out, "gpu_kernels.json")
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=2)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
