"""The CUDA kernels, checked on a machine without a GPU.

1. NVRTC compiles every template instance to PTX for sm_80 and sm_90 (it needs
   CuPy and the NVRTC library, no device), and each instance's entry point is
   in the PTX.
2. The launch planning of ``gpu_provider.engine.kernels`` (tiles, packing,
   path choice) holds for every target set, and importing it touches no CUDA.
3. A host C++ compiler builds the same ``.cu`` file against a small emulation
   of the CUDA features it uses (each block's threads as real threads, barriers
   for ``__syncthreads``), and the kernels, launched through the real
   :class:`~gpu_provider.engine.kernels.Kernels` planning, must match the NumPy
   statevector. That runs the kernels' indexing, tiling and reductions in CI;
   timing and true GPU memory semantics still need ``test_kernels_gpu.py``.
   Dynamic shared memory (``extern __shared__``) is a buffer of exactly the
   launch's ``shared_mem`` bytes, filled with NaN bytes and followed by a guard
   the launch checks; a launch asking for more than the function allows (48 KiB
   unless its ``max_dynamic_shared_size_bytes`` was raised, as CUDA) fails.
"""

from __future__ import annotations

import ctypes
import itertools
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gpu_provider.engine import kernels as K
from tests.engine import test_kernels_gpu as gpu_checks

ARCHS = ["compute_80", "compute_90"]
REPO_ROOT = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------
# 1. PTX through NVRTC


@pytest.fixture(scope="module", params=ARCHS)
def ptx_build(request) -> K.PTXBuild:
    # CI sets GPU_PROVIDER_REQUIRE_NVRTC=1: there a missing NVRTC must fail, not hide the kernel check.
    required = os.environ.get("GPU_PROVIDER_REQUIRE_NVRTC") == "1"
    try:
        import cupy

        cupy.cuda.nvrtc.getVersion()
    except Exception as exc:  # CuPy or the NVRTC wheel is missing, or its library cannot be loaded
        message = f"CuPy/NVRTC is not usable here: {type(exc).__name__}: {exc}"
        if required:
            pytest.fail(message)
        pytest.skip(message)
    return K.compile_to_ptx(request.param)


def test_every_instance_compiles_to_ptx(ptx_build):
    names = K.instances()
    assert set(ptx_build.lowered_names) == set(names)
    for name in names:
        lowered = ptx_build.lowered_names[name]
        assert re.search(rf"\.entry\s+{re.escape(lowered)}\s*\(", ptx_build.ptx), f"{name} ({lowered}) is not in the PTX"


def _entry_body(build: K.PTXBuild, name: str) -> str:
    """The PTX of one kernel entry: from its .entry line to the next entry (or the end)."""
    lowered = re.escape(build.lowered_names[name])
    found = re.search(rf"\.entry\s+{lowered}\s*\((.*?)(?=\.entry\s|\Z)", build.ptx, re.DOTALL)
    assert found, name
    return found.group(1)


def test_async_tiled_kernel_copies_with_cp_async(ptx_build):
    """On sm_80 and sm_90 apply_matrix_low_async copies tiles with cp.async (16-byte .cg in double,
    8-byte .ca in float), commits a group per tile and waits for it; apply_matrix_low does not."""
    for real, copy in (("double", r"cp\.async\.cg\.shared\.global\s*\[[^]]+\],\s*\[[^]]+\],\s*16;"),
                       ("float", r"cp\.async\.ca\.shared\.global\s*\[[^]]+\],\s*\[[^]]+\],\s*8;")):
        for k in range(1, K.MAX_MATRIX_QUBITS + 1):
            body = _entry_body(ptx_build, f"apply_matrix_low_async<{real}, {k}>")
            assert re.search(copy, body), (real, k)
            assert "cp.async.commit_group" in body and re.search(r"cp\.async\.wait_group\s+0;", body), (real, k)
            assert "cp.async" not in _entry_body(ptx_build, f"apply_matrix_low<{real}, {k}>")


def test_ptx_is_for_the_requested_architecture(ptx_build):
    digits = ptx_build.arch.split("_")[1]
    assert re.search(rf"^\.target\s+sm_{digits}\b", ptx_build.ptx, re.MULTILINE)


def test_instances_cover_every_kernel_width_and_precision():
    names = set(K.instances())
    assert len(names) == len(K.instances())
    for real in ("float", "double"):
        assert set(K.instances(real)) <= names
        for k in range(1, K.MAX_MATRIX_QUBITS + 1):
            assert f"apply_matrix<{real}, {k}>" in names
            assert f"apply_matrix_low<{real}, {k}>" in names
            assert f"apply_matrix_low_async<{real}, {k}>" in names
            # The multi-group strided kernel, where it is built (one G per width and precision).
            multi = {name for name in names if name.startswith(f"apply_matrix_multi<{real}, {k}, ")}
            if K.multi_applies(real, k):
                assert multi == {f"apply_matrix_multi<{real}, {k}, {K.MULTI_GROUPS[(real, k)]}>"}
            else:
                assert not multi
        assert f"pauli_expectation<{real}>" in names
        assert f"run_small_circuits<{real}, {K.SMALL_MAX_QUBITS[real]}>" in names
        # The streaming kernels: 16-byte vectors, and one-amplitude ones for unaligned complex64 states.
        for kernel in K.STREAM_KERNELS:
            assert f"{kernel}<{real}, {K.STREAM_VECTOR[real]}>" in names
            assert f"{kernel}<{real}, 1>" in names


def test_multi_group_instances_are_the_ones_chosen():
    """G = 2 for k = 3..5 in float and k = 3, 4 in double: double k = 5 spills at G = 2 (ptxas, sm_90)."""
    assert K.MULTI_GROUPS == {("float", 3): 2, ("float", 4): 2, ("float", 5): 2, ("double", 3): 2, ("double", 4): 2}
    assert all(1 <= k <= K.MAX_MATRIX_QUBITS and g >= 2 for (_, k), g in K.MULTI_GROUPS.items())
    # The host's block is the kernel's (multi_shape<R, K, G>::BLOCK).
    assert re.search(rf"struct multi_shape \{{\s*static constexpr int BLOCK = {K.MULTI_BLOCK};", K.source())


def test_stream_planning():
    assert K.STREAM_VECTOR["float"] * 8 == K.STREAM_VECTOR["double"] * 16 == K.VECTOR_BYTES
    assert K.stream_vector("float", 4096) == 2 and K.stream_vector("float", 4104) == 1
    assert K.stream_vector("double", 4104) == 1
    # Whole state; the bit = 1 half: whole vectors above bit 0, one pair per vector at bit 0.
    assert K.stream_vectors(1 << 10, 2) == 512 and K.stream_vectors(1 << 10, 1) == 1024
    assert K.stream_vectors(1 << 10, 2, bit=0) == 512 and K.stream_vectors(1 << 10, 2, bit=1) == 256
    assert K.stream_vectors(1 << 10, 1, bit=0) == 512 and K.stream_vectors(2, 2, bit=0) == 1
    assert K.stream_vectors(4, 2, bit=1) == 1
    assert K.stream_blocks(1) == 1 and K.stream_blocks(K.BLOCK * K.STREAM_UNROLL) == 1
    assert K.stream_blocks(K.BLOCK * K.STREAM_UNROLL + 1) == 2
    # The .cu file's unroll is the one the host sizes grids for.
    assert re.search(rf"constexpr int STREAM_UNROLL = {K.STREAM_UNROLL};", K.source())


def test_arch_spellings():
    assert K._normalize_arch("sm_90") == K._normalize_arch("90") == K._normalize_arch("compute_90") == "compute_90"
    with pytest.raises(ValueError):
        K._normalize_arch("hopper")


# ---------------------------------------------------------------------------
# 2. Host-side planning, and no CUDA at import


def test_trial_kernels_compile_in_a_module_of_their_own_on_first_use(monkeypatch):
    # Kernels "auto" never picks (not yet measured on a GPU) must not add to the compile time of
    # every job: they live in a second module, built only when one of them is asked for.
    for real in ("float", "double"):
        trial, core, shots = (K.instances(real, module) for module in ("trial", "core", "shots"))
        assert sorted(trial + core + shots) == sorted(K.instances(real)) and not set(trial) & set(core)
        assert shots == [K.small_shots_name(real)] and K.small_circuits_name(real) in core
        assert trial and all(name.split("<")[0] in K.TRIAL_KERNELS for name in trial)
        assert all(K.is_trial(name) for name in trial) and not any(K.is_trial(name) for name in core)
    for real, k in ((r, k) for r in ("float", "double") for k in range(1, K.MAX_MATRIX_QUBITS + 1)):
        bits = tuple(range(k))
        assert not K.is_trial(K.matrix_launch(real, 14, bits).name)  # what "auto" launches
        assert not K.is_trial(K.matrix_launch(real, 14, tuple(range(14 - k, 14))).name)

    built = []

    class FakeModule:
        def __init__(self, code, options, name_expressions):
            self.names = list(name_expressions)
            built.append(self.names)

        def compile(self):
            pass

        def get_function(self, name):
            assert name in self.names
            return ("function", name)

    fake_cupy = type(sys)("cupy")
    fake_cupy.RawModule = FakeModule
    fake_cupy.cuda = type(sys)("cupy.cuda")
    fake_cupy.cuda.compiler = type(sys)("cupy.cuda.compiler")
    fake_cupy.cuda.compiler.CompileException = RuntimeError
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy)
    kernels = K.Kernels(np.complex64)
    kernels._function("apply_matrix<float, 2>")
    kernels._function("apply_matrix_low<float, 3>")
    assert built == [K.instances("float", "core")]
    trial_name = K.instances("float", "trial")[0]
    assert kernels._function(trial_name) == ("function", trial_name)
    assert built == [K.instances("float", "core"), K.instances("float", "trial")]
    kernels._function(K.instances("float", "trial")[-1])
    assert len(built) == 2
    kernels._function(K.small_shots_name("float"))
    assert built[2:] == [[K.small_shots_name("float")]]


def test_import_and_kernels_for_touch_no_cuda():
    code = (
        "import sys, numpy\n"
        "import gpu_provider.engine.kernels as k\n"
        "kernels = k.kernels_for(numpy.complex64)\n"
        "assert kernels.can_apply(5) and not kernels.can_apply(6) and kernels.can_apply_diagonal(10)\n"
        "assert 'cupy' not in sys.modules, 'importing the kernels module imported CuPy'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO_ROOT)


def test_kernels_for_is_cached_per_dtype():
    assert K.kernels_for(np.complex64) is K.kernels_for(np.dtype("complex64"))
    assert K.kernels_for(np.complex64) is not K.kernels_for(np.complex128)
    with pytest.raises(ValueError):
        K.kernels_for(np.float64)


def test_pack_bits_matches_the_kernels_layout():
    assert K.pack_bits([]) == 0
    assert K.pack_bits([3, 0, 63]) == 3 | (0 << 6) | (63 << 12)


def test_async_tile_constants_match_the_source():
    """The host's ASYNC_TILE_LOG is async_traits<R>::TILE_LOG; two tiles and the widest matrix fit the
    48 KiB of static shared memory a block gets on every device (half of apply_matrix_low's tile)."""
    source = K.source()
    for real, itemsize in (("float", 8), ("double", 16)):
        assert re.search(rf"struct async_traits<{real}> \{{\s*static constexpr int TILE_LOG = {K.ASYNC_TILE_LOG[real]};", source)
        assert re.search(rf"struct tile_traits<{real}> \{{\s*static constexpr int TILE_LOG = {K.TILE_LOG[real]};", source)
        assert K.ASYNC_TILE_LOG[real] == K.TILE_LOG[real] - 1
        widest_matrix = (1 << (2 * K.MAX_MATRIX_QUBITS)) * itemsize
        assert 2 * (1 << K.ASYNC_TILE_LOG[real]) * itemsize + widest_matrix <= K.DEFAULT_SHARED_BYTES


@pytest.mark.parametrize("tiles", [K.TILE_LOG, K.ASYNC_TILE_LOG], ids=["tiled", "tiled_async"])
@pytest.mark.parametrize("real", ["float", "double"])
@pytest.mark.parametrize("n", [1, 3, 8, 12, 13, 20, 33])
def test_tile_plans_cover_every_target_set(real, n, tiles):
    tile_log = tiles[real]
    for k in range(1, min(n, K.MAX_MATRIX_QUBITS) + 1):
        # Every target set on small n; on large n those among 16 bits, plus the top ones.
        pool = range(n) if n <= 13 else list(range(14)) + [n - 2, n - 1]
        for bits in itertools.combinations(pool, k):
            plan = K.tile_plan(n, list(bits), tile_log)
            assert plan.tile_log == min(tile_log, n) == plan.low_bits + len(plan.high_sorted)
            assert list(plan.high_sorted) == sorted(b for b in bits if b >= plan.low_bits)
            assert all(0 <= t < plan.tile_log for t in plan.local_targets)
            assert len(set(plan.local_targets)) == k
            for bit, local in zip(bits, plan.local_targets):
                assert local == bit if bit < plan.low_bits else plan.high_sorted[local - plan.low_bits] == bit
            if n >= tile_log:
                # Coalesced tile loads: runs of at least 2^(TILE_LOG - 5) contiguous amplitudes.
                assert plan.low_bits >= tile_log - K.MAX_MATRIX_QUBITS


def test_strided_path_only_when_warps_read_whole_lines():
    assert K.strided_is_coalesced([3, 9], 16) and not K.strided_is_coalesced([2, 9], 16)
    assert K.strided_is_coalesced([4], 8) and not K.strided_is_coalesced([3, 20], 8)


def test_matrix_launch_plans():
    strided = K.matrix_launch("double", 20, (19, 3))
    assert strided.name == "apply_matrix<double, 2>"
    assert strided.blocks_needed * strided.block >= 1 << 18
    assert [type(v) for v in strided.scalars] == [np.uint64] * 3
    assert int(strided.scalars[1]) == K.pack_bits([19, 3]) and int(strided.scalars[2]) == K.pack_bits([3, 19])
    tiled = K.matrix_launch("float", 20, (0, 19, 7), "tiled")
    assert tiled.name == "apply_matrix_low<float, 3>"
    assert tiled.blocks_needed == 1 << (20 - K.TILE_LOG["float"])  # one tile per block
    assert tiled.block == 256
    assert [type(v) for v in tiled.scalars] == [np.uint64, np.int32, np.int32, np.uint64, np.uint64, np.uint64]
    assert K.matrix_launch("double", 20, (0, 19), "strided").name == "apply_matrix<double, 2>"
    # Double-buffered tiles: half the tile, the same arguments; every tile counts as a block
    # needed (the grid is capped at the resident blocks, each looping over its tiles).
    tiled_async = K.matrix_launch("float", 20, (0, 19, 7), "tiled_async")
    assert tiled_async.name == "apply_matrix_low_async<float, 3>"
    assert tiled_async.blocks_needed == 1 << (20 - K.ASYNC_TILE_LOG["float"])
    assert tiled_async.block == 256 and K.matrix_launch("double", 20, (0, 19, 7, 3, 1), "tiled_async").block == 1 << (10 - 5)
    plan = K.tile_plan(20, (0, 19, 7), K.ASYNC_TILE_LOG["float"])
    assert plan.low_bits == 10 and plan.high_sorted == (19,) and plan.local_targets == (0, 10, 7)
    assert [int(v) for v in tiled_async.scalars] == [
        1 << 9, 10, 1, K.pack_bits([19]), K.pack_bits([0, 10, 7]), K.pack_bits([0, 7, 10])
    ]
    assert [type(v) for v in tiled_async.scalars] == [type(v) for v in tiled.scalars]
    assert K.matrix_launch("double", 4, (0, 2), "tiled_async").blocks_needed == 1  # one tile smaller than a full one
    with pytest.raises(ValueError):
        K.matrix_launch("double", 20, (0, 19), "fastest")
    # Warp: one lane target (bit 0) and two high ones, a warp per 32 x 4 amplitudes.
    warp = K.matrix_launch("float", 20, (0, 19, 7))
    assert warp.name == "apply_matrix_warp<float, 1, 2>"
    assert [type(v) for v in warp.scalars] == [np.uint64] * 5
    units = int(warp.scalars[0])
    assert units == 1 << (20 - 5 - 2) and warp.blocks_needed * warp.block == units * 32
    assert int(warp.scalars[1]) == K.pack_bits([0]) and int(warp.scalars[2]) == K.pack_bits([0])
    assert int(warp.scalars[3]) == K.pack_bits([7, 19]) and int(warp.scalars[4]) == K.pack_bits([2, 1])
    # Below 32 amplitudes there is no full warp: "warp" runs the tiled kernel.
    assert K.matrix_launch("double", 4, (0, 2), "warp").name == "apply_matrix_low<double, 2>"


def test_multi_group_launch_plans():
    multi = K.matrix_launch("float", 20, (19, 3, 7), "strided_multi")
    assert multi.name == "apply_matrix_multi<float, 3, 2>" and multi.block == K.MULTI_BLOCK
    # Two groups per thread: half the threads of the strided launch.
    assert multi.blocks_needed == (1 << 17) // (2 * K.MULTI_BLOCK)
    assert [type(v) for v in multi.scalars] == [np.uint64] * 3
    strided = K.matrix_launch("float", 20, (19, 3, 7), "strided")
    assert multi.scalars == strided.scalars
    # Fewer groups than one block's threads take: one block.
    assert K.matrix_launch("double", 5, (4, 0, 2, 1), "strided_multi").blocks_needed == 1
    assert K.matrix_launch("double", 4, (3, 0, 2, 1), "strided_multi").name == "apply_matrix_multi<double, 4, 2>"
    # Where it is not built, "strided_multi" is "strided".
    for real, bits in [("float", (0,)), ("double", (5, 9)), ("double", (0, 1, 2, 3, 4))]:
        assert K.matrix_launch(real, 12, bits, "strided_multi") == K.matrix_launch(real, 12, bits, "strided")


def test_high_target_table_is_the_measured_one_and_drives_auto(monkeypatch):
    """Every (real, k) has an entry naming a kernel that exists for it; today all are "strided"
    (apply_matrix_multi is not measured on a GPU yet), and changing one entry changes "auto" there only."""
    assert set(K.HIGH_TARGET_METHOD) == {(r, k) for r in ("float", "double") for k in range(1, K.MAX_MATRIX_QUBITS + 1)}
    assert set(K.HIGH_TARGET_METHOD.values()) == {"strided"}
    assert set(K.LOW_TARGET_METHOD) == set(K.HIGH_TARGET_METHOD)
    assert K.auto_method("float", (20, 9, 13, 14)) == "strided"
    monkeypatch.setitem(K.HIGH_TARGET_METHOD, ("float", 4), "strided_multi")
    assert K.auto_method("float", (20, 9, 13, 14)) == "strided_multi"
    assert K.matrix_launch.__wrapped__("float", 22, (20, 9, 13, 14)).name == "apply_matrix_multi<float, 4, 2>"
    assert K.auto_method("double", (20, 9, 13, 14)) == "strided"
    assert K.auto_method("float", (20, 9, 13)) == "strided"
    assert K.auto_method("float", (0, 1, 2, 3)) == "warp"  # low targets: LOW_TARGET_METHOD


def test_method_tables_name_only_known_methods():
    for (real, k), method in K.HIGH_TARGET_METHOD.items():
        assert method in K.MATRIX_METHODS and method != "auto"
        assert method != "strided_multi" or K.multi_applies(real, k), (real, k)
    for methods in K.LOW_TARGET_METHOD.values():
        assert set(methods) <= set(K.MATRIX_METHODS) - {"auto"}


@pytest.mark.parametrize(
    "real, bits, method",
    [
        ("float", (9, 20), "strided"),  # whole lines: always strided
        ("double", (3, 20), "strided"),
        ("float", (0,), "strided"),
        ("double", (0,), "warp"),
        ("float", (0, 1, 2, 3), "warp"),
        ("double", (0, 1, 2, 3), "tiled"),  # four lane targets: the tile beats the shuffles
        ("double", (0, 17, 18, 19), "strided"),  # one lane target in four
        ("float", (1, 2, 3, 4, 5), "tiled"),
        ("float", (2, 16, 17, 18, 19), "strided"),
        ("double", (0, 1, 19), "tiled"),  # two lane targets of three: "many"
        ("double", (2, 18, 19), "warp"),
    ],
)
def test_auto_method_follows_the_measured_table(real, bits, method):
    assert K.auto_method(real, bits) == method


# ---------------------------------------------------------------------------
# 3. The kernels themselves, compiled for the host and run on the CPU

EMULATION_HEADER = r"""
// The CUDA subset statevector.cu uses, on the host: a launch runs one thread
// per CUDA thread; they walk the grid's blocks in step, a barrier between
// blocks, so __shared__ (function statics) holds one block at a time.
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <thread>
#include <vector>
struct float2 { float x, y; };
struct float4 { float x, y, z, w; };
struct double2 { double x, y; };
struct emu_dim3 { unsigned x, y, z; };
thread_local emu_dim3 threadIdx, blockIdx;
emu_dim3 blockDim, gridDim;
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__ __restrict
#define __shared__ static
using std::fma;

class emu_barrier {
  public:
    void reset(unsigned count) { count_ = count; waiting_ = 0; }
    void wait() {
        std::unique_lock<std::mutex> lock(mutex_);
        const unsigned long generation = generation_;
        if (++waiting_ == count_) {
            waiting_ = 0;
            ++generation_;
            cv_.notify_all();
        } else {
            cv_.wait(lock, [&] { return generation != generation_; });
        }
    }
  private:
    std::mutex mutex_;
    std::condition_variable cv_;
    unsigned count_ = 1, waiting_ = 0;
    unsigned long generation_ = 0;
};
emu_barrier emu_block_barrier, emu_warp_barrier[32];
double emu_lanes[1024];

inline void __syncthreads() { emu_block_barrier.wait(); }
template <class T> inline T __ldg(const T* p) { return *p; }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline unsigned long long __umul64hi(unsigned long long a, unsigned long long b) {
    return (unsigned long long)(((unsigned __int128)a * b) >> 64);
}
template <class T> inline T __shfl_sync(unsigned, T value, int source) {
    const unsigned t = threadIdx.x;
    emu_lanes[t] = (double)value;  // float and double values both round-trip exactly
    emu_warp_barrier[t / 32].wait();
    const T out = (T)emu_lanes[(t / 32) * 32 + (source & 31)];
    emu_warp_barrier[t / 32].wait();
    return out;
}
inline double __shfl_down_sync(unsigned, double value, int offset) {
    const unsigned t = threadIdx.x, lane = t % 32;
    emu_lanes[t] = value;
    emu_warp_barrier[t / 32].wait();
    const double out = (lane + offset < 32 && t + offset < blockDim.x) ? emu_lanes[t + offset] : value;
    emu_warp_barrier[t / 32].wait();
    return out;
}
// Dynamic shared memory: each `extern __shared__ T name[];` of the source is
// rewritten (see emulated_source in the test) to `T* const name = (T*)emu_dynamic_shared;`.
unsigned char* emu_dynamic_shared = nullptr;
// Past the buffer: a guard larger than any shared state (2^N amplitudes, 128 KiB), so an
// undersized launch is reported, not a crash.
constexpr std::size_t EMU_GUARD_BYTES = 256 << 10;
// Returns 0, or 1 if the kernel wrote past the launch's dynamic shared memory.
template <class F> int emu_launch(unsigned grid, unsigned block, std::size_t shared, F kernel) {
    blockDim = {block, 1, 1};
    gridDim = {grid, 1, 1};
    emu_block_barrier.reset(block);
    for (unsigned w = 0; w * 32 < block; ++w) emu_warp_barrier[w].reset(block - 32 * w < 32 ? block - 32 * w : 32);
    std::vector<unsigned char> raw(shared + EMU_GUARD_BYTES + 16);
    unsigned char* base = raw.data() + (16 - reinterpret_cast<std::uintptr_t>(raw.data()) % 16) % 16;
    std::memset(base, 0xff, shared);  // NaN in float and double: a read before a write shows in the result
    std::memset(base + shared, 0xa5, EMU_GUARD_BYTES);
    emu_dynamic_shared = base;
    std::vector<std::thread> threads;
    for (unsigned t = 0; t < block; ++t)
        threads.emplace_back([=] {
            threadIdx = {t, 0, 0};
            for (unsigned b = 0; b < grid; ++b) {
                blockIdx = {b, 0, 0};
                kernel();
                emu_block_barrier.wait();  // the next block reuses the shared arrays
            }
        });
    for (auto& thread : threads) thread.join();
    emu_dynamic_shared = nullptr;
    for (std::size_t i = 0; i < EMU_GUARD_BYTES; ++i)
        if (base[shared + i] != 0xa5) return 1;
    return 0;
}
"""

_DYNAMIC_SHARED = re.compile(r"extern\s+__shared__\s+(?:__align__\(\d+\)\s+)?([\w:\s]+?)\s+(\w+)\[\];")
_ANY_DYNAMIC_SHARED = re.compile(r"^\s*extern\s+__shared__[^;]*\[\s*\]\s*;", re.MULTILINE)


def emulated_source(source: str) -> str:
    """The .cu text with each ``extern __shared__`` array made a pointer to the launch's dynamic shared memory."""
    rewritten, count = _DYNAMIC_SHARED.subn(r"\1* const \2 = reinterpret_cast<\1*>(emu_dynamic_shared);", source)
    assert count >= 1 and not _ANY_DYNAMIC_SHARED.search(rewritten), "the emulation does not know this dynamic shared memory declaration"
    return rewritten

_C_TYPES = {"u": ctypes.c_uint64, "i": ctypes.c_int32, "p": ctypes.c_void_p}
# Per kernel: its parameters after the launch shape (p pointer, u uint64, i int32,
# r the real type) and the call forwarding them, {c} standing for float2/double2.
_SIGNATURES = {
    "apply_matrix": ("ppuuu", "({c}*)a0, (const {c}*)a1, a2, a3, a4"),
    "apply_matrix_multi": ("ppuuu", "({c}*)a0, (const {c}*)a1, a2, a3, a4"),
    "apply_matrix_low": ("ppuiiuuu", "({c}*)a0, (const {c}*)a1, a2, a3, a4, a5, a6, a7"),
    "apply_matrix_low_async": ("ppuiiuuu", "({c}*)a0, (const {c}*)a1, a2, a3, a4, a5, a6, a7"),
    "apply_matrix_warp": ("ppuuuuu", "({c}*)a0, (const {c}*)a1, a2, a3, a4, a5, a6"),
    "apply_diagonal": ("ppuiu", "({c}*)a0, (const {c}*)a1, a2, a3, a4"),
    "probability_one": ("puip", "(const {c}*)a0, a1, a2, (double*)a3"),
    "collapse": ("puiiri", "({c}*)a0, a1, a2, a3, a4, a5"),
    "pauli_expectation": ("puuppip", "(const {c}*)a0, a1, a2, (const index_t*)a3, (const double2*)a4, a5, (double*)a6"),
    "run_small_circuits": ("ppppui", "({c}*)a0, (const index_t*)a1, (const index_t*)a2, (const {c}*)a3, a4, a5"),
    "run_small_shots": ("ppppuiuuuuiu", "(index_t*)a0, (const index_t*)a1, (const {c}*)a2, (const index_t*)a3, a4, a5, a6, a7, a8, a9, a10, a11"),
}
# Threads per block each kernel's __launch_bounds__ allows (256 unless named).
_MAX_BLOCK = {"run_small_circuits": K.SMALL_BLOCK_WIDE, "run_small_shots": K.SMALL_BLOCK_WIDE}
# A launch may take this much dynamic shared memory unless the function's limit was raised (CUDA's default).
DEFAULT_DYNAMIC_SHARED = 48 << 10
# The opt-in shared memory per block of an sm_90 device (cudaDevAttrMaxSharedMemoryPerBlockOptin: 227 KiB).
HOPPER_SHARED_OPTIN = 227 << 10


def _wrapper_source(source_path: str) -> str:
    """The emulation, the kernels of the .cu file at ``source_path`` (its dynamic shared memory
    rewritten by :func:`emulated_source`), and one extern "C" launcher per instance.

    Self-contained: the GPU kit (``../shared/gpu/extra_checks.py``) compiles it as it is.
    """
    with open(source_path, encoding="utf-8") as fh:
        kernels_text = emulated_source(fh.read())
    lines = [EMULATION_HEADER, f'#line 1 "{source_path}"', kernels_text]
    for name in K.instances():
        kernel, real = re.fullmatch(r"(\w+)<(\w+)(?:, \d+)*>", name).groups()
        kinds, call = _SIGNATURES[kernel]
        types = {"p": "void*", "u": "index_t", "i": "int", "r": real}
        params = ", ".join(f"{types[kind]} a{i}" for i, kind in enumerate(kinds))
        arguments = call.format(c=real + "2")
        lines.append(
            f'extern "C" int {_symbol(name)}(unsigned grid, unsigned block, unsigned long long shared, {params}) '
            f"{{ return emu_launch(grid, block, shared, [=] {{ {name}({arguments}); }}); }}"
        )
    return "\n".join(lines) + "\n"


def _symbol(name: str) -> str:
    return "emu_" + re.sub(r"\W+", "_", name).strip("_")


class _EmulatedFunction:
    """Calls like a cupy.RawKernel: ``function((grid,), (block,), args, shared_mem=0)``.

    ``max_dynamic_shared_size_bytes`` starts at CUDA's 48 KiB and may be raised up
    to the device's opt-in limit ``shared_optin``, as CUDA allows; a launch asking
    for more dynamic shared memory than it allows fails.
    """

    def __init__(self, library: ctypes.CDLL, name: str, real: str, shared_optin: int | None = None) -> None:
        kernel = name.split("<")[0]
        self._signature = _SIGNATURES[kernel][0]
        self._max_block = _MAX_BLOCK.get(kernel, 256)
        self._shared_optin = shared_optin
        self._max_dynamic_shared = DEFAULT_DYNAMIC_SHARED
        self.attribute_sets: list[int] = []
        real_type = ctypes.c_float if real == "float" else ctypes.c_double
        self._function = getattr(library, _symbol(name))
        self._function.restype = ctypes.c_int
        self._function.argtypes = [ctypes.c_uint, ctypes.c_uint, ctypes.c_ulonglong] + [
            real_type if c == "r" else _C_TYPES[c] for c in self._signature
        ]
        self._scalar_types = {"u": np.uint64, "i": np.int32, "r": np.float32 if real == "float" else np.float64}

    @property
    def max_dynamic_shared_size_bytes(self) -> int:
        return self._max_dynamic_shared

    @max_dynamic_shared_size_bytes.setter
    def max_dynamic_shared_size_bytes(self, value: int) -> None:
        assert isinstance(value, int) and value >= 0
        assert self._shared_optin is None or value <= self._shared_optin, f"{value} bytes is over the device's opt-in {self._shared_optin}"
        self.attribute_sets.append(value)
        self._max_dynamic_shared = value

    def __call__(self, grid: tuple, block: tuple, args: tuple, shared_mem: int = 0) -> None:
        assert len(grid) == 1 and len(block) == 1 and 1 <= block[0] <= self._max_block and grid[0] >= 1
        assert 0 <= shared_mem <= self._max_dynamic_shared, (
            f"a launch with {shared_mem} bytes of dynamic shared memory, the function allows {self._max_dynamic_shared}"
        )
        values = []
        for arg, kind in zip(args, self._signature, strict=True):
            if kind == "p":
                assert isinstance(arg, np.ndarray) and arg.flags.c_contiguous
                values.append(arg.ctypes.data)
            else:
                # The loader must pass exactly the C type the kernel declares.
                assert type(arg) is self._scalar_types[kind], (arg, kind)
                values.append(arg.item())
        status = self._function(grid[0], block[0], shared_mem, *values)
        assert status == 0, f"the kernel wrote past its {shared_mem} bytes of dynamic shared memory"


class EmulatedKernels(K.Kernels):
    """The real launch planning, with launches going to the host-compiled kernels.

    ``shared_optin``: the device's opt-in shared memory per block (an sm_90's by
    default); None asks the real probe (:func:`K.shared_memory_optin`, through
    whatever ``cupy`` is loaded: the tests' stand-in).
    """

    def __init__(self, dtype, library: ctypes.CDLL, resident_blocks: int, shared_optin: int | None = HOPPER_SHARED_OPTIN) -> None:
        super().__init__(dtype)
        self._library = library
        self._resident_blocks_value = resident_blocks
        self._optin = shared_optin
        self.launched: list[str] = []
        self.occupancy_queries: list[tuple[str, int, int]] = []

    def _function(self, name: str):
        assert name in K.instances(self.real)
        self.launched.append(name)
        if name not in self._functions:
            optin = self._optin if self._optin is not None else K.shared_memory_optin(0)
            self._functions[name] = _EmulatedFunction(self._library, name, self.real, optin)
        return self._functions[name]

    def _device_id(self, state) -> int:
        return 0

    def _resident_blocks(self, name: str, block: int, shared: int = 0) -> int:
        self.occupancy_queries.append((name, block, shared))
        return self._resident_blocks_value

    def _shared_optin(self, device_id: int) -> int:
        return self._optin if self._optin is not None else super()._shared_optin(device_id)


@pytest.fixture(scope="module")
def emulated_library(tmp_path_factory) -> ctypes.CDLL:
    compiler = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if compiler is None:
        pytest.skip("no host C++ compiler to build the emulated kernels")
    folder = tmp_path_factory.mktemp("emulated_kernels")
    source_path = folder / K.SOURCE_NAME
    source_path.write_text(K.source(), encoding="utf-8")
    wrapper = folder / "emulated.cpp"
    wrapper.write_text(_wrapper_source(str(source_path)), encoding="utf-8")
    library = folder / "libemulated.so"
    # -fno-strict-aliasing: the kernels read float2 arrays through float4 pointers, as CUDA allows.
    flags = ["-std=c++17", "-O1", "-fno-strict-aliasing", "-fPIC", "-shared", "-pthread", "-Wno-unknown-pragmas"]
    command = [compiler, *flags, str(wrapper), "-o", str(library)]
    built = subprocess.run(command, capture_output=True, text=True)
    assert built.returncode == 0, f"{' '.join(command)} failed:\n{built.stderr[-4000:]}"
    return ctypes.CDLL(str(library))


@pytest.fixture(scope="module", params=["double", "single"])
def emulated(request, emulated_library):
    precision = request.param
    # Two resident blocks: grid-stride loops and several tiles per block get exercised.
    return precision, EmulatedKernels(gpu_checks.DTYPES[precision], emulated_library, resident_blocks=2)


@pytest.mark.parametrize("k", range(1, K.MAX_MATRIX_QUBITS + 1))
def test_emulated_apply_matrix(emulated, k):
    precision, kernels = emulated
    n = 13  # several shared-memory tiles in both precisions
    cases = [("low", "tiled"), ("low", "tiled_async"), ("low", "strided"), ("low", "warp"), ("high", "strided"), ("high", "tiled"),
             ("high", "tiled_async"), ("mixed", "auto"), ("mixed", "warp")]
    for placement, method in cases:
        seed = 100 * k + gpu_checks.PLACEMENTS.index(placement)
        bits = gpu_checks.place_targets(np.random.default_rng(seed), n, k, placement)
        gpu_checks.check_apply_matrix(np, kernels, precision, n, bits, method, seed)


@pytest.mark.parametrize("n,bits", [(1, [0]), (3, [2, 0, 1]), (6, [4, 0, 2, 1, 5])])
def test_emulated_apply_matrix_small_states(emulated, n, bits):
    precision, kernels = emulated
    for method in ("strided", "strided_multi", "tiled", "tiled_async", "warp"):
        gpu_checks.check_apply_matrix(np, kernels, precision, n, bits, method, seed=n)


def _async_sizes(real: str, k: int) -> list[int]:
    """From one group (n = k) through part of a tile, one tile, and up to 8 tiles."""
    tile_log = K.ASYNC_TILE_LOG[real]
    return sorted({k, k + 1, k + 3, tile_log - 1, tile_log, tile_log + 1, tile_log + 3} - set(range(k)))


@pytest.mark.parametrize("k", range(1, K.MAX_MATRIX_QUBITS + 1))
@pytest.mark.parametrize("resident_blocks", [1, 2, 3])
def test_emulated_apply_matrix_low_async(emulated_library, resident_blocks, k):
    """apply_matrix_low_async for k = 1..5 in both precisions: targets 0..k-1, split (low and the highest)
    and random, on states from n = k to ASYNC_TILE_LOG + 3 (8 tiles), with 1, 2 or 3 resident blocks, so a
    block loops over several tiles through both buffers (and over uneven shares of them); against NumPy
    and bit for bit against apply_matrix_low."""
    for precision in ("double", "single"):
        kernels = EmulatedKernels(gpu_checks.DTYPES[precision], emulated_library, resident_blocks=resident_blocks)
        real = kernels.real
        name, tiled = f"apply_matrix_low_async<{real}, {k}>", f"apply_matrix_low<{real}, {k}>"
        rng = np.random.default_rng(500 + 10 * k + resident_blocks)
        for n in _async_sizes(real, k):
            for index, bits in enumerate(gpu_checks.async_target_sets(rng, n, k)):
                kernels.launched.clear()
                kernels.occupancy_queries.clear()
                kernels._resident.clear()  # ask for the resident blocks again (cached per kernel and block)
                gpu_checks.check_apply_matrix_async(np, kernels, precision, n, bits, seed=1000 * k + 10 * n + index)
                assert kernels.launched == [name, tiled, name]
                plan = K.matrix_launch(real, n, tuple(bits), "tiled_async")
                assert plan.blocks_needed == 1 << (n - min(n, K.ASYNC_TILE_LOG[real]))
                assert (name, plan.block, 0) in kernels.occupancy_queries


def _multi_target_sets(rng: np.random.Generator, n: int, k: int) -> list[list[int]]:
    """Targets 0..k-1, the k highest, target 0 with the k-1 highest, and a random set; each shuffled."""
    sets = [list(range(k)), list(range(n - k, n)), [0] + list(range(n - k + 1, n)), [int(b) for b in rng.choice(n, size=k, replace=False)]]
    for bits in sets:
        rng.shuffle(bits)
    return sets


@pytest.mark.parametrize("k", range(1, K.MAX_MATRIX_QUBITS + 1))
def test_emulated_apply_matrix_multi(emulated, k):
    """apply_matrix_multi for every built (R, K, G), against NumPy and bit for bit against apply_matrix.

    Two resident blocks of 128 threads, two groups each: n = 13 takes several
    grid-stride steps; n = k (one group) up to k + 7 (128 groups) leave most
    threads, and every second group of a thread, without a group."""
    precision, kernels = emulated
    if not K.multi_applies(kernels.real, k):
        kernels.launched.clear()
        gpu_checks.check_apply_matrix(np, kernels, precision, 9, list(range(k)), "strided_multi", seed=k)
        assert set(kernels.launched) == {f"apply_matrix<{kernels.real}, {k}>"}
        return
    name = f"apply_matrix_multi<{kernels.real}, {k}, {K.MULTI_GROUPS[(kernels.real, k)]}>"
    rng = np.random.default_rng(300 + k)
    for n in (13, k, k + 1, k + 4, k + 7):
        for index, bits in enumerate(_multi_target_sets(rng, n, k)):
            kernels.launched.clear()
            gpu_checks.check_apply_matrix_multi(np, kernels, precision, n, bits, seed=1000 * k + 10 * n + index)
            assert kernels.launched == [name, f"apply_matrix<{kernels.real}, {k}>", name]


@pytest.mark.parametrize("k", [3, 4, 5])
@pytest.mark.parametrize("resident_blocks", [1, 3])
def test_emulated_apply_matrix_multi_uneven_grids(emulated_library, resident_blocks, k):
    """Group counts the grid's G * threads do not divide: the last step's second groups are past the end
    (three resident blocks: 384 threads, steps of 768 groups over 1024 or 2048); one block: many steps."""
    for precision in ("single", "double"):
        kernels = EmulatedKernels(gpu_checks.DTYPES[precision], emulated_library, resident_blocks=resident_blocks)
        if not K.multi_applies(kernels.real, k):
            continue
        for n in (k + 10, k + 11):
            bits = [n - 1] + list(range(k - 1))
            kernels.launched.clear()
            gpu_checks.check_apply_matrix_multi(np, kernels, precision, n, bits, seed=n + resident_blocks)
            assert kernels.launched[0].startswith("apply_matrix_multi<")


def test_emulated_diagonal_probability_and_collapse(emulated):
    precision, kernels = emulated
    n = 11
    for k, placement in [(1, "low"), (3, "mixed"), (K.MAX_DIAGONAL_QUBITS, "high")]:
        bits = gpu_checks.place_targets(np.random.default_rng(k), n, k, placement)
        gpu_checks.check_apply_diagonal(np, kernels, precision, n, bits, seed=k)
    for bit in (0, 4, n - 1):
        gpu_checks.check_probability_one(np, kernels, precision, n, bit, seed=bit)
    for bit, outcome, flip in itertools.product((0, n - 1), (0, 1), (False, True)):
        gpu_checks.check_collapse(np, kernels, precision, n, bit, outcome, flip, seed=bit + outcome)


@pytest.mark.parametrize("n", [2, 5, 9])
def test_emulated_to_canonical_in_place(emulated, n):
    precision, kernels = emulated
    gpu_checks.check_in_place_canonical(np, kernels, precision, n, seed=n)


def test_emulated_statevector_program(emulated):
    precision, kernels = emulated
    gpu_checks.check_statevector_program(np, kernels, precision, n=7, seed=3, steps=40)


@pytest.mark.parametrize("n", [1, 4, 11])
def test_emulated_pauli_expectation(emulated, n):
    precision, kernels = emulated
    gpu_checks.check_pauli_expectation(np, kernels, precision, n, seed=n)


def test_emulated_pauli_expectation_chunks_many_terms(emulated):
    precision, kernels = emulated
    gpu_checks.check_pauli_expectation(np, kernels, precision, 6, seed=9, count=K.MAX_PAULI_TERMS + 20)


def test_emulated_big_state_checks_pass_and_catch_planted_errors(emulated):
    """The checks test_kernels_gpu_big.py makes on 2^32-amplitude states, here on 2^14 and 2^13
    with the emulated kernels: they pass, and each planted kernel error fails at least one."""
    from tests.engine import test_kernels_gpu_big as big

    precision, kernels = emulated
    n = 14 if precision == "single" else 13
    rows = big.big_state_checks(np, kernels, n)
    assert not big.failures(rows), big.failures(rows)
    assert len(rows) == 22
    for plant in big.PLANTS:  # the matrix cases of two methods are enough to meet each planted error
        rows = big.big_state_checks(np, big.planted(kernels, plant), n, methods=("strided", "tiled"))
        assert big.failures(rows), f"planted error {plant!r} not caught"



# ---------------------------------------------------------------------------
# run_small_circuits: whole circuits per block, many per launch


@pytest.mark.parametrize("k, controls", [(1, 1), (2, 1), (1, 2), (2, 2)])
def test_controlled_unitary_is_qiskits(k, controls):
    """The oracle's controlled gates (one unitary on targets then controls) are Qiskit's UnitaryGate.control."""
    from qiskit.circuit.library import UnitaryGate
    from qiskit.quantum_info import Operator

    matrix = gpu_checks.random_unitary(np.random.default_rng(k + 3 * controls), 1 << k)
    for ctrl_state in range(1 << controls):
        qiskit = Operator(UnitaryGate(matrix).control(controls, ctrl_state=ctrl_state)).data  # controls first, then targets
        order = list(range(controls, controls + k)) + list(range(controls))  # ours: targets first, then controls
        ours = Operator(gpu_checks.controlled_unitary(matrix, controls, ctrl_state)).data
        perm = [sum(((i >> j) & 1) << order[j] for j in range(k + controls)) for i in range(1 << (k + controls))]
        np.testing.assert_allclose(ours, qiskit[np.ix_(perm, perm)], atol=1e-12)


def test_small_circuit_constants_match_the_source():
    source = K.source()
    assert re.search(rf"constexpr int SMALL_HEADER_WORDS = {K.SMALL_HEADER_WORDS};", source)
    assert re.search(rf"constexpr int SMALL_OP_WORDS = {K.SMALL_OP_WORDS};", source)
    for name in ("SMALL_MATRIX", "SMALL_DIAGONAL", "SMALL_PHASE"):
        assert re.search(rf"constexpr int {name} = {getattr(K, name)};", source)
    # The shared state is dynamic; its __launch_bounds__ allow the widest block the host picks.
    assert re.search(rf"__launch_bounds__\({K.SMALL_BLOCK_WIDE}, 1\) run_small_circuits\(", source)
    assert re.search(r"extern __shared__ __align__\(16\) unsigned char small_shared\[\];", source)
    for real in ("float", "double"):
        # The defaults fit CUDA's 48 KiB without an opt-in, one qubit more does not; the most is 128 KiB.
        default, most = K.SMALL_DEFAULT_QUBITS[real], K.SMALL_MAX_QUBITS[real]
        assert K.small_shared_bytes(real, default) <= K.DEFAULT_SHARED_BYTES < K.small_shared_bytes(real, default + 1)
        assert K.small_shared_bytes(real, most) == 128 << 10
        assert K.small_circuits_name(real) == f"run_small_circuits<{real}, {most}>"
        for n in range(1, most + 1):
            block = K.small_circuits_block(real, n)
            assert K.SMALL_BLOCK_MIN <= block <= K.SMALL_BLOCK_WIDE and block % 32 == 0
            assert block <= max(K.SMALL_BLOCK_MIN, 1 << (n - 1))  # no thread without a pair of amplitudes
    assert K.small_circuits_block("float", 1) == K.SMALL_BLOCK_MIN and K.small_circuits_block("float", 7) == 64
    # 256 threads up to 64 KiB states (two blocks a multiprocessor by registers); 512 for 128 KiB (one fits by shared memory).
    assert K.small_circuits_block("float", 12) == K.small_circuits_block("float", 13) == K.SMALL_BLOCK_MAX
    assert K.small_circuits_block("double", 12) == K.SMALL_BLOCK_MAX
    assert K.small_circuits_block("float", 14) == K.small_circuits_block("double", 13) == K.SMALL_BLOCK_WIDE


@pytest.mark.parametrize(
    "optin, widths",
    [
        (48 << 10, (12, 11)),  # the default only (e.g. sm_60)
        (96 << 10, (13, 12)),  # sm_70
        (163 << 10, (14, 13)),  # sm_80
        (227 << 10, (14, 13)),  # sm_90
        (1 << 30, (14, 13)),  # never above the engine's most
        (0, (12, 11)),  # never below the default
    ],
)
def test_small_widest_follows_the_device_limit(optin, widths):
    assert (K.small_widest("float", optin), K.small_widest("double", optin)) == widths


def test_small_circuits_name_every_instance():
    assert {K.small_circuits_name(real) for real in ("float", "double")} <= set(K.instances())


@pytest.mark.parametrize("widths", [range(1, 7), range(7, 10), range(10, 13)], ids=["n1-6", "n7-9", "n10-12"])
def test_emulated_small_circuits(emulated, widths):
    """Random circuits of every width that fits the default 48 KiB (12 in single, 11 in double), mixed in
    one launch (two resident blocks: grid-stride over circuits), against qiskit.quantum_info.Statevector."""
    precision, kernels = emulated
    limit = K.SMALL_DEFAULT_QUBITS[kernels.real]
    widths = [n for n in widths if n <= limit]
    kernels.launched.clear()
    kernels.occupancy_queries.clear()
    gpu_checks.check_small_circuits(np, kernels, precision, widths * 2, seed=widths[0], ops=14)
    name = K.small_circuits_name(kernels.real)
    assert kernels.launched == [name]
    # Shared memory for the launch's widest circuit, within the default: the function's limit stays as it is.
    widest = max(widths)
    assert kernels.occupancy_queries[-1] == (name, K.small_circuits_block(kernels.real, widest), K.small_shared_bytes(kernels.real, widest))
    assert kernels._function(name).attribute_sets == []


def _wide_widths(real: str) -> list[int]:
    """The widths past the default, up to the engine's most: 12 and 13 in double, 13 and 14 in single."""
    return list(range(K.SMALL_DEFAULT_QUBITS[real] + 1, K.SMALL_MAX_QUBITS[real] + 1))


@pytest.mark.parametrize("position", ["first", "last"])
def test_emulated_wide_small_circuits(emulated_library, position):
    """12- and 13-qubit complex128, 13- and 14-qubit complex64 circuits in dynamic shared memory over 48 KiB
    (an sm_90's opt-in), each with a plain and a controlled dense matrix on k = 1..5 targets, random
    diagonals and phases, alone and among narrow circuits in one launch, against Qiskit's Statevector."""
    for precision, real in (("double", "double"), ("single", "float")):
        kernels = EmulatedKernels(gpu_checks.DTYPES[precision], emulated_library, resident_blocks=2)
        name = K.small_circuits_name(real)
        assert kernels.small_max_qubits(0) == K.SMALL_MAX_QUBITS[real]
        wide = _wide_widths(real)
        widths = wide + [3] if position == "first" else [2, 9] + wide[::-1]
        gpu_checks.check_small_circuits(np, kernels, precision, widths, seed=len(widths) + 7 * len(real), ops=14, matrix_widths=range(1, 6))
        widest = max(widths)
        shared = K.small_shared_bytes(real, widest)
        assert shared > K.DEFAULT_SHARED_BYTES
        assert kernels.launched == [name]
        assert kernels.occupancy_queries == [(name, K.small_circuits_block(real, widest), shared)]
        # The function's limit was raised once, to what this device's widest circuit takes.
        assert kernels._function(name).attribute_sets == [K.small_shared_bytes(real, K.SMALL_MAX_QUBITS[real])]
        gpu_checks.check_small_circuits(np, kernels, precision, [wide[0]], seed=5, ops=4)
        assert kernels._function(name).attribute_sets == [K.small_shared_bytes(real, K.SMALL_MAX_QUBITS[real])]


def test_emulated_small_circuits_on_a_device_with_the_default_shared_memory(emulated_library):
    """A device that allows only 48 KiB per block keeps 12 qubits in single and 11 in double, never raising the limit."""
    for precision, real in (("double", "double"), ("single", "float")):
        kernels = EmulatedKernels(gpu_checks.DTYPES[precision], emulated_library, resident_blocks=2, shared_optin=48 << 10)
        default = K.SMALL_DEFAULT_QUBITS[real]
        assert kernels.small_max_qubits(0) == default
        gpu_checks.check_small_circuits(np, kernels, precision, [default, 4], seed=3, ops=8)
        assert kernels._function(K.small_circuits_name(real)).attribute_sets == []
        dtype = gpu_checks.DTYPES[precision]
        out = np.zeros(1 << (default + 1), dtype=dtype)
        with pytest.raises(ValueError, match=f"at most {default} qubits"):
            kernels.run_small_circuits(out, np.zeros(K.SMALL_HEADER_WORDS, dtype=np.uint64), np.zeros(0, dtype=np.uint64), out, default + 1)


def test_emulated_small_circuit_wider_than_the_shared_state_is_skipped(emulated):
    """A header naming more qubits than the launch's shared state holds (the packing never writes one)
    leaves its output alone and writes nothing past the dynamic shared memory (the emulation's guard)."""
    precision, kernels = emulated
    dtype = gpu_checks.DTYPES[precision]
    limit = K.SMALL_MAX_QUBITS[kernels.real]
    # Two bad circuits (3 qubits in a launch sized for 2, and more than the kernel's N), then a one-qubit one with no ops.
    headers = np.array([0, 0, 3, 0, 0, 0, limit + 1, 0, 0, 0, 1, 8], dtype=np.uint64)
    out = np.full(10, 7 + 7j, dtype=dtype)
    kernels.run_small_circuits(out, headers, np.zeros(0, dtype=np.uint64), np.zeros(1, dtype=dtype), 2)
    np.testing.assert_array_equal(out, np.array([7 + 7j] * 8 + [1, 0], dtype=dtype))


def test_emulated_small_circuits_refuse_bad_input(emulated):
    precision, kernels = emulated
    dtype = gpu_checks.DTYPES[precision]
    words = np.zeros(K.SMALL_HEADER_WORDS, dtype=np.uint64)
    out = np.zeros(8, dtype=dtype)
    limit = kernels.small_max_qubits(0)
    with pytest.raises(ValueError, match=f"at most {limit}"):
        kernels.run_small_circuits(out, words, np.zeros(0, dtype=np.uint64), out, limit + 1)
    with pytest.raises(ValueError, match="flat"):
        kernels.run_small_circuits(out.astype(np.complex256), words, np.zeros(0, dtype=np.uint64), out, 3)
    with pytest.raises(ValueError, match="words"):
        kernels.run_small_circuits(out, words[:3], np.zeros(0, dtype=np.uint64), out, 3)


# ---------------------------------------------------------------------------
# The streaming kernels' vector paths (apply_diagonal, probability_one,
# collapse), on every size down to one qubit, every bit, and both the 16-byte
# vectors of an aligned state and the one-amplitude path of a complex64 state
# that is not 16-byte aligned.

# Per precision: run on a misaligned buffer too? (complex128 always takes one-amplitude vectors.)
MISALIGNED = {"double": (False,), "single": (False, True)}


@pytest.fixture(scope="module", params=["double", "single"])
def streaming(request, emulated_library):
    precision = request.param
    # Three resident blocks (768 threads): grid-stride steps whose later vectors
    # run past the end, and grids that do not divide the state.
    return precision, EmulatedKernels(gpu_checks.DTYPES[precision], emulated_library, resident_blocks=3)


def _state_in_buffer(n: int, dtype, initial: np.ndarray, misaligned: bool):
    """A StateVector whose data starts at an address that is 16-byte aligned, or 8 bytes past one."""
    state = gpu_checks.host_state(n, dtype, initial)
    itemsize = np.dtype(dtype).itemsize
    raw = np.zeros(((1 << n) + 4) * itemsize, dtype=np.uint8)
    start = (-raw.ctypes.data) % K.VECTOR_BYTES + (8 if misaligned else 0)
    data = raw[start : start + (1 << n) * itemsize].view(dtype)
    assert data.ctypes.data % K.VECTOR_BYTES == (8 if misaligned else 0) and data.flags.c_contiguous
    data[...] = initial.astype(dtype)
    state.data = data
    return state


def _expected_name(kernel: str, kernels: EmulatedKernels, misaligned: bool) -> str:
    vector = 1 if misaligned else K.STREAM_VECTOR[kernels.real]
    return f"{kernel}<{kernels.real}, {vector}>"


@pytest.mark.parametrize("n", range(1, 15))
def test_emulated_diagonal_every_width_and_size(streaming, n):
    precision, kernels = streaming
    dtype = gpu_checks.DTYPES[precision]
    rng = np.random.default_rng(n)
    for misaligned in MISALIGNED[precision]:
        for k in range(1, min(n, K.MAX_DIAGONAL_QUBITS) + 1):
            # One set with bit 0 (the bit inside a float4 vector), one of the k highest bits.
            with_zero = [0] + [int(b) for b in rng.choice(np.arange(1, n), size=k - 1, replace=False)]
            highest = list(range(n - k, n))
            for bits in (with_zero, highest):
                rng.shuffle(bits)  # diagonal index bit j is bits[j], not j
                initial = gpu_checks.random_state(rng, n)
                diagonal = gpu_checks.random_phases(rng, 1 << k)
                state = _state_in_buffer(n, dtype, initial, misaligned)
                kernels.launched.clear()
                kernels.apply_diagonal(state, bits, diagonal.astype(dtype))
                assert kernels.launched == [_expected_name("apply_diagonal", kernels, misaligned)]
                oracle = gpu_checks.host_state(n, dtype, initial)
                oracle.apply_diagonal(bits, diagonal)
                gpu_checks.assert_close(state.data, oracle.to_host(), gpu_checks.TOLERANCE[precision])


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 13])
def test_emulated_probability_every_bit_is_exact_and_deterministic(streaming, n):
    precision, kernels = streaming
    dtype = gpu_checks.DTYPES[precision]
    rng = np.random.default_rng(100 + n)
    for misaligned in MISALIGNED[precision]:
        for bit in range(n):
            initial = gpu_checks.random_state(rng, n)
            state = _state_in_buffer(n, dtype, initial, misaligned)
            stored = state.data.copy()
            kernels.launched.clear()
            p1 = kernels.probability_one(state, bit)
            assert kernels.launched == [_expected_name("probability_one", kernels, misaligned)]
            # Same grid, same partials, same sum: bit for bit.
            assert kernels.probability_one(state, bit) == p1
            np.testing.assert_array_equal(state.data, stored)  # read only
            # The stored amplitudes' |a|^2 summed in double, as the kernel does: exact up to summation order.
            ones = (np.arange(1 << n) >> bit) & 1 == 1
            exact = float(np.sum(np.abs(stored[ones].astype(np.complex128)) ** 2))
            assert abs(p1 - exact) <= 1e-12, (bit, p1, exact)
            expected = gpu_checks.host_state(n, dtype, initial).probability_one(bit)
            assert abs(p1 - expected) <= gpu_checks.TOLERANCE[precision]


@pytest.mark.parametrize("n", [1, 2, 3, 6, 11])
def test_emulated_collapse_every_bit(streaming, n):
    precision, kernels = streaming
    dtype = gpu_checks.DTYPES[precision]
    rng = np.random.default_rng(200 + n)
    for misaligned in MISALIGNED[precision]:
        for bit, outcome, flip in itertools.product(range(n), (0, 1), (False, True)):
            initial = gpu_checks.random_state(rng, n)
            oracle = gpu_checks.host_state(n, dtype, initial)
            p1 = oracle.probability_one(bit)
            probability = p1 if outcome else 1.0 - p1
            state = _state_in_buffer(n, dtype, initial, misaligned)
            kernels.launched.clear()
            kernels.collapse(state, bit, outcome, 1.0 / np.sqrt(probability), flip)
            assert kernels.launched == [_expected_name("collapse", kernels, misaligned)]
            oracle.collapse(bit, outcome, probability, flip=flip)
            gpu_checks.assert_close(state.data, oracle.to_host(), gpu_checks.TOLERANCE[precision])
            # The discarded half is exactly zero.
            kept = 0 if flip else outcome
            assert not np.any(state.data[((np.arange(1 << n) >> bit) & 1) != kept])
