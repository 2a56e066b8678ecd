"""benchmarks.kernel_resources: the per-instance register, shared-memory and occupancy report.

Without a GPU: the ptxas log parser on a known log, the occupancy model on cases worked
by hand from the SM's limits, the launch shapes against the planner, and, where the CUDA
toolkit's ptxas is installed (it is on the development and CI machines), the report for
sm_90 itself: every instance reported, and no instance spilling registers except the
known ones.
"""

from __future__ import annotations

import json
import os

import pytest

from benchmarks import kernel_resources as R
from gpu_provider.engine import kernels as K

LOG = """\
ptxas info    : 452 bytes gmem
ptxas info    : Compiling entry function '_Z3fooIdLi5EEvPv' for 'sm_90'
ptxas info    : Function properties for _Z3fooIdLi5EEvPv
    320 bytes stack frame, 264 bytes spill stores, 380 bytes spill loads
ptxas info    : Used 128 registers, used 1 barriers, 320 bytes cumulative stack size
ptxas info    : Compile time = 153.256 ms
ptxas info    : Compiling entry function '_Z3barIfEvPv' for 'sm_90'
ptxas info    : Function properties for _Z3barIfEvPv
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 56 registers, used 1 barriers, 32800 bytes smem, 400 bytes cmem[0]
"""

# Instances known to spill on sm_90 (ptxas 13.0), each only in a path rarely taken:
# the small-circuit kernels in complex128 under their 128-register cap (launch bounds of
# 512 threads), in the five-qubit matrix case alone (32 complex128 inputs fill 128
# registers); apply_matrix_warp<float, 2, 2> spills one word.
KNOWN_SPILLS = {"run_small_circuits<double, 13>", "run_small_shots<double, 13>", "apply_matrix_warp<float, 2, 2>"}


def test_parse_ptxas_reads_each_entry():
    entries = R.parse_ptxas(LOG)
    assert entries == {
        "_Z3fooIdLi5EEvPv": {"registers": 128, "spill_stores": 264, "spill_loads": 380, "stack_bytes": 320, "static_shared": 0},
        "_Z3barIfEvPv": {"registers": 56, "spill_stores": 0, "spill_loads": 0, "stack_bytes": 0, "static_shared": 32800},
    }


@pytest.mark.parametrize(
    "registers, block, shared, sm, blocks, limit",
    [
        (27, 256, 32, 90, 8, "threads+registers"),  # 2048 threads / 256; registers (27 -> 32 per thread) allow 8 too
        (182, 128, 16384, 90, 2, "registers"),  # 184 x 32 = 5888 per warp: 11 warps, 4 per block -> 2
        (216, 64, 49152, 90, 4, "shared+registers"),  # 6912 per warp: 9 warps, 2 per block -> 4; 228 / 49 KiB -> 4
        (32, 64, 100 << 10, 90, 2, "shared"),  # 228 KiB / (100 + 1 reserved) KiB
        (32, 64, 100 << 10, 80, 1, "shared"),  # 164 KiB on sm_80
        (32, 64, 76 << 10, 90, 2, "shared"),  # 3 x 76 KiB fit 228 KiB, but not with 1 KiB reserved per block
        (32, 32, 1 << 10, 90, 32, "blocks"),  # 32 blocks at most
        (32, 64, 228 << 10, 90, 0, "shared"),  # over the 227 KiB a block may have
        (255, 256, 0, 90, 1, "registers"),  # 8192 per warp: 8 warps, one block of 8
    ],
)
def test_occupancy_model(registers, block, shared, sm, blocks, limit):
    assert R.occupancy(registers, block, shared, sm) == (blocks, limit)


def test_occupancy_model_refuses_an_unknown_sm():
    with pytest.raises(ValueError, match="sm_75"):
        R.occupancy(32, 256, 0, 75)


@pytest.mark.parametrize("real", ["float", "double"])
def test_launch_shapes_are_the_planners(real):
    """The block the report assumes is the block the planner launches (a wide state, full tiles)."""
    n = 24
    methods = {"apply_matrix": "strided", "apply_matrix_multi": "strided_multi", "apply_matrix_low": "tiled", "apply_matrix_low_async": "tiled_async"}
    for name in K.instances(real):
        kernel = name.split("<")[0]
        block, shared = R.launch_shape(name)
        if kernel in methods:
            k = int(name.split(",")[1].rstrip(">"))
            assert block == K.matrix_launch(real, n, tuple(range(k)), methods[kernel]).block, name
            assert shared == 0
        elif kernel == "apply_matrix_warp":
            lane, high = (int(p) for p in name.rstrip(">").split(",")[1:])
            bits = tuple(range(lane)) + tuple(range(n - high, n))
            assert K.matrix_launch(real, n, bits, "warp").name == name
            assert block == K.matrix_launch(real, n, bits, "warp").block
        elif kernel in ("run_small_circuits", "run_small_shots"):
            widest = K.SMALL_MAX_QUBITS[real]
            assert block == K.small_circuits_block(real, widest)
            assert shared >= K.small_shared_bytes(real, widest)
        else:
            assert (block, shared) == (K.BLOCK, 0), name


def test_flags():
    row = R.finish(R.Resources("apply_matrix<double, 5>", 182, 0, 0, 0, 16384), 90)
    assert (row.block, row.blocks_per_sm, row.threads_per_sm, row.flags) == (128, 2, 256, ["LOW-OCCUPANCY"])
    row = R.finish(R.Resources("run_small_circuits<double, 13>", 128, 264, 380, 256, 0), 90)
    assert row.dynamic_shared == 1 << 17 and row.blocks_per_sm == 1 and row.flags == ["SPILLS", "LOCAL"]
    row = R.finish(R.Resources("apply_matrix<float, 1>", 27, 0, 0, 0, 32), 90, blocks=7)  # the driver's answer wins, the model is named
    assert row.blocks_per_sm == 7 and row.limited_by == "threads+registers (model: 8 blocks)" and row.flags == []


@pytest.fixture(scope="module")
def ptxas():
    path = R.find_ptxas()
    if path is None:
        pytest.skip("no ptxas (CUDA toolkit) on PATH, CUDA_HOME or CUDA_PATH")
    try:
        import cupy

        cupy.cuda.nvrtc.getVersion()
    except Exception as exc:
        if os.environ.get("GPU_PROVIDER_REQUIRE_NVRTC") == "1":
            pytest.fail(f"CuPy/NVRTC is not usable here: {exc}")
        pytest.skip(f"CuPy/NVRTC is not usable here: {type(exc).__name__}: {exc}")
    return path


def test_ptxas_report_covers_every_instance_and_only_known_ones_spill(ptxas, tmp_path, capsys):
    assert R.main(["--source", "ptxas", "--arch", "sm_90", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "kernel_resources.json").read_text())
    rows = {row["kernel"]: row for row in report["rows"]}
    assert sorted(rows) == sorted(K.instances())
    assert all(0 < row["registers"] <= 255 and row["blocks_per_sm"] >= 1 for row in rows.values())
    spilling = {name for name, row in rows.items() if row["spill_stores"] or row["spill_loads"]}
    assert spilling <= KNOWN_SPILLS, f"new register spills on sm_90: {sorted(spilling - KNOWN_SPILLS)}"
    # The tiled kernels' tile is static shared memory: at least the tile's bytes.
    itemsize = {"float": 8, "double": 16}
    for real in ("float", "double"):
        assert rows[f"apply_matrix_low<{real}, 1>"]["static_shared"] >= (1 << K.TILE_LOG[real]) * itemsize[real]
    assert f"{len(rows)} instances" in capsys.readouterr().out


def test_device_source_without_a_gpu_says_so(monkeypatch, capsys, tmp_path):
    from gpu_provider.engine import devices

    monkeypatch.setattr(devices, "probe_gpu", lambda: devices.GPUProbe(False, "no CUDA driver (test)"))
    assert R.main(["--source", "device", "--out", str(tmp_path)]) == 2
    assert "no CUDA driver (test)" in capsys.readouterr().out
    assert not (tmp_path / "kernel_resources.json").exists()


def test_bad_arch_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        R.main(["--source", "ptxas", "--arch", "sm_75"])
    assert info.value.code == 2
    assert "sm_75" in capsys.readouterr().err
