"""The planning and reporting of ``benchmarks.gpu_kernels``, without a GPU.

The timing itself needs one; what it times, and how a run's table and JSON
name each kernel (apply_matrix_multi as "strided_multi" and apply_matrix_low_async
as "tiled_async" included), is checked here.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import gpu_kernels as bench
from gpu_provider.engine import kernels as K

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("real", ["float", "double"])
@pytest.mark.parametrize("n", [6, 28, 30])
def test_matrix_cases_time_every_kernel_that_applies(real, n):
    cases = bench.matrix_cases(n, real)
    assert [(c.k, c.placement) for c in cases] == [(1, "low"), (1, "high")] + [
        (k, p) for k in range(2, K.MAX_MATRIX_QUBITS + 1) for p in ("low", "split", "high")
    ]
    for case in cases:
        k, bits = case.k, case.bits
        assert len(bits) == len(set(bits)) == k and all(0 <= b < n for b in bits)
        expected = {"low": tuple(range(k)), "split": (0,) + tuple(range(n - k + 1, n)), "high": tuple(range(n - k, n))}
        assert bits == expected[case.placement]
        assert case.methods[:3] == ("strided", "tiled", "tiled_async")
        assert ("warp" in case.methods) == K.warp_applies(n, bits)
        assert ("strided_multi" in case.methods) == K.multi_applies(real, k)
        assert len(set(case.methods)) == len(case.methods)
        assert case.chosen == K.auto_method(real, bits)
        if n >= K.WARP_LANE_BITS:
            assert case.chosen in case.methods


def test_multi_group_kernel_is_timed_on_high_and_split_targets_where_built():
    for real in ("float", "double"):
        timed = {(c.k, c.placement) for c in bench.matrix_cases(30, real) if "strided_multi" in c.methods}
        built = {k for (r, k) in K.MULTI_GROUPS if r == real}
        assert timed == {(k, p) for k in built for p in ("low", "split", "high")}
    assert ("double", 5) not in K.MULTI_GROUPS and ("float", 5) in K.MULTI_GROUPS


def test_double_buffered_tiled_kernel_is_timed_on_every_placement():
    """"tiled_async" applies to every target set: timed beside "tiled" on low, split and high targets,
    never the one "auto" runs (it is not measured yet)."""
    for real in ("float", "double"):
        cases = bench.matrix_cases(30, real)
        assert {(c.k, c.placement) for c in cases if "tiled_async" in c.methods} == {(c.k, c.placement) for c in cases}
        assert all(c.chosen != "tiled_async" for c in cases)
        low = next(c for c in cases if (c.k, c.placement) == (4, "low"))
        assert K.matrix_launch(real, 30, low.bits, "tiled_async").name == f"apply_matrix_low_async<{real}, 4>"


def test_table_and_fastest_name_the_double_buffered_kernel(capsys):
    results = [
        bench.PassResult("copy", 30, "double", [], "", "memcpy", 1.0, 4000.0, 1.0),
        bench.PassResult("apply_matrix", 30, "double", [0, 1, 2, 3], "low", "tiled", 1.0, 100.0, 0.45, True),
        bench.PassResult("apply_matrix", 30, "double", [0, 1, 2, 3], "low", "tiled_async", 1.0, 100.0, 0.70, False),
        bench.PassResult("apply_matrix", 30, "double", [0, 1, 2, 3], "low", "warp", 1.0, 100.0, 0.40, False),
    ]
    bench.print_table(results)
    lines = capsys.readouterr().out.splitlines()
    assert any("tiled_async " in line and line.rstrip().endswith("0.700") for line in lines)
    assert any("tiled* " in line for line in lines)
    assert bench.fastest_methods(results) == {"30 double k=4 low": {"fastest": "tiled_async", "ratio_to_copy": 0.70, "chosen": "tiled"}}


def _pass(method: str, ratio: float, chosen: bool, placement: str = "high") -> bench.PassResult:
    return bench.PassResult("apply_matrix", 30, "single", [25, 26, 27, 28, 29], placement, method, 1.0, 100.0, ratio, chosen)


def test_table_and_fastest_name_the_multi_group_kernel(capsys):
    results = [
        bench.PassResult("copy", 30, "single", [], "", "memcpy", 1.0, 4000.0, 1.0),
        _pass("strided", 0.54, True),
        _pass("tiled", 0.30, False),
        _pass("strided_multi", 0.80, False),
        _pass("strided", 0.52, True, "split"),
        _pass("strided_multi", 0.51, False, "split"),
    ]
    bench.print_table(results)
    lines = capsys.readouterr().out.splitlines()
    assert any("strided_multi " in line and line.rstrip().endswith("0.800") for line in lines)
    assert any("strided* " in line for line in lines)
    fastest = bench.fastest_methods(results)
    assert fastest == {
        "30 single k=5 high": {"fastest": "strided_multi", "ratio_to_copy": 0.80, "chosen": "strided"},
        "30 single k=5 split": {"fastest": "strided", "ratio_to_copy": 0.52, "chosen": "strided"},
    }


def test_help_and_no_gpu_exit_cleanly(tmp_path):
    shown = subprocess.run([sys.executable, "-m", "benchmarks.gpu_kernels", "--help"], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert "--sizes" in shown.stdout
    from gpu_provider.engine.devices import probe_gpu

    if probe_gpu().usable:
        pytest.skip("a GPU is usable here: the run would time it")
    assert bench.main(["--sizes", "8", "--out", str(tmp_path)]) == 0
    assert not (tmp_path / "gpu_kernels.json").exists()


def test_gate_overhead_on_the_gpu_path_with_the_cupy_stand_in(fake_gpu, capsys):
    """benchmarks.gate_overhead --device gpu, run on the NumPy-backed CuPy stand-in: every row is
    reported, and the state it times is the one the CPU path computes (the timing itself needs a GPU)."""
    import numpy as np

    from benchmarks import gate_overhead
    from gpu_provider.engine.statevector import StateVector

    gates = gate_overhead._gates(6, 40, seed=6)
    rows = gate_overhead.gpu_overhead(6, np.complex128, gates, repeats=1)
    assert set(rows) == {"one upload per gate", "matrices preloaded", "run_program, whole circuit"}
    assert all(value > 0 for row in rows.values() for value in row.values())
    assert gate_overhead.main(["--device", "gpu", "--sizes", "5", "--gates", "10", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "n=5 single one upload per gate: host_us_per_gate" in out and "run_program, whole circuit: wall_us_per_op" in out
    device_state = StateVector(fake_gpu, 6, np.complex128)
    host_state = StateVector(np, 6, np.complex128)
    for qubits, matrix in gates:
        device_state.apply_unitary(qubits, matrix)
        host_state.apply_unitary(qubits, matrix)
    assert np.allclose(device_state.to_host(), host_state.to_host())


def test_gate_overhead_without_a_gpu_says_so(capsys):
    from benchmarks import gate_overhead
    from gpu_provider.engine import devices

    if devices.probe_gpu().usable:
        pytest.skip("a GPU is usable here")
    assert gate_overhead.main(["--device", "gpu", "--sizes", "5"]) == 0
    assert "nothing was measured" in capsys.readouterr().out


from tests.engine.test_gpu_plumbing import fake_gpu  # noqa: E402,F401  (a fixture)
