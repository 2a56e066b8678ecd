"""The compiled GPU kernels of the statevector, built once per precision.

``kernels/statevector.cu`` holds every kernel as a C++ template over the real
type and, for dense matrices, the matrix width. :func:`kernels_for` hands out
one cached :class:`Kernels` per dtype; its first launch compiles a single
``cupy.RawModule`` holding all of that dtype's instances (see
:func:`instances`), which CuPy also caches on disk. Nothing here touches CUDA
at import time or when a :class:`Kernels` is created.

How each operation runs (details in the ``.cu`` file):

- ``apply_matrix``: one group of 2^k amplitudes per thread, in registers, when
  the lowest target leaves whole 128-byte lines contiguous for a warp
  ("strided"); otherwise through a shared-memory tile that holds the low bits
  and the high targets, loaded and stored with coalesced accesses ("tiled"),
  or through warp shuffles ("warp"). "tiled_async" is "tiled" as a persistent
  loop over each block's tiles with two tile buffers, the next tile copied in
  asynchronously (cp.async on sm_80+) while the current one is computed and
  stored. "strided_multi" is "strided" with
  ``MULTI_GROUPS`` groups per thread, each matrix element read once for all of
  them; "auto" picks from the measured tables ``HIGH_TARGET_METHOD`` and
  ``LOW_TARGET_METHOD``.
- ``apply_diagonal``, ``probability_one``, ``collapse`` ("streaming"): each
  thread moves ``STREAM_UNROLL`` vectors of 16 bytes per step (two complex64
  amplitudes as one ``float4``, or one complex128), all loads issued first;
  complex64 states that are not 16-byte aligned take one-amplitude vectors.
  The diagonal sits in shared memory; probabilities are per-block partial sums
  in double, added on the device; collapse reads only the kept half where it
  is a whole vector.
- ``run_small_circuits``: whole circuits, one per block in dynamic shared
  memory sized for the launch's widest circuit, many circuits per launch (the
  bulk path of :mod:`gpu_provider.engine.small_batch`). How wide a circuit it
  takes depends on the device's shared memory per block
  (:meth:`Kernels.small_max_qubits`, probed on first use, once per device).

:func:`compile_to_ptx` compiles the same source through NVRTC alone, without a
GPU, so CPU-only CI proves that every instance compiles.
"""

from __future__ import annotations

import functools
import importlib.resources
import logging
import threading
from dataclasses import dataclass
from typing import Any, Literal, Sequence

import numpy as np

from ..errors import GPUProviderError, InvalidInputError

logger = logging.getLogger(__name__)

SOURCE_NAME = "statevector.cu"
# Widest dense matrix with a kernel; wider ones take the array-module path.
MAX_MATRIX_QUBITS = 5
# Most targets of a diagonal kernel (its 2^10 entries fill 16 KiB of shared memory).
MAX_DIAGONAL_QUBITS = 10
# Our options; RawModule adds -ftz=true and --device-as-default-execution-space,
# which compile_to_ptx repeats so that CI compiles exactly what a GPU run does.
COMPILE_OPTIONS = ("--std=c++17",)
CUPY_IMPLIED_OPTIONS = ("-ftz=true", "--device-as-default-execution-space")
REAL_TYPES = {np.dtype(np.complex64): "float", np.dtype(np.complex128): "double"}
# log2 of a shared-memory tile in amplitudes; must match tile_traits<R>::TILE_LOG.
TILE_LOG = {"float": 12, "double": 11}
# The same for apply_matrix_low_async ("tiled_async"), whose two tile buffers and
# matrix share the 48 KiB of static shared memory; must match async_traits<R>::TILE_LOG.
ASYNC_TILE_LOG = {"float": 11, "double": 10}
# The strided matrix kernel runs when a warp's accesses cover whole lines of this size.
LINE_BYTES = 128
# Threads per block; wide matrices take fewer so more blocks fit their registers.
BLOCK = 256
MATRIX_BLOCK = {1: 256, 2: 256, 3: 256, 4: 128, 5: 128}
# probability_one's grid never exceeds this, so its sum is the same on every device.
MAX_REDUCTION_BLOCKS = 1024
# The streaming kernels (apply_diagonal, probability_one, collapse): amplitudes per
# 16-byte vector, and vectors per thread per grid-stride step (STREAM_UNROLL in
# the .cu file; a mismatch only mis-sizes the grid, never the result).
STREAM_VECTOR = {"float": 2, "double": 1}
STREAM_UNROLL = 4
VECTOR_BYTES = 16

# run_small_circuits keeps a circuit's 2^n amplitudes in dynamic shared memory.
# Every device gives a block DEFAULT_SHARED_BYTES; more needs the kernel's
# opt-in, up to the device's cudaDevAttrMaxSharedMemoryPerBlockOptin (227 KiB
# on sm_90, 163 KiB on sm_80, 96 KiB on sm_70). The widest circuit it runs, per
# real type: SMALL_DEFAULT_QUBITS fit the default (32 KiB) on any device;
# SMALL_MAX_QUBITS (N of its instance, 128 KiB) is the most the engine asks
# for, where the device allows it (see Kernels.small_max_qubits).
DEFAULT_SHARED_BYTES = 48 << 10
SMALL_DEFAULT_QUBITS = {"float": 12, "double": 11}
SMALL_MAX_QUBITS = {"float": 14, "double": 13}
ITEMSIZE = {"float": 8, "double": 16}
# The layout of its circuit headers and ops (SMALL_* in the .cu file), and its op kinds.
SMALL_HEADER_WORDS = 4
SMALL_OP_WORDS = 6
SMALL_MATRIX, SMALL_DIAGONAL, SMALL_PHASE = 0, 1, 2
# run_small_shots' further op kinds (the shots of a circuit that measures mid-circuit,
# resets or branches; see engine/small_shots.py), its while-loop counters, and the most
# 64-bit words of clbits a shot keeps in shared memory (2048 clbits).
SMALL_MEASURE, SMALL_RESET, SMALL_JUMP, SMALL_JUMP_IF, SMALL_LOOP_ENTER, SMALL_LOOP_COUNT = 3, 4, 5, 6, 7, 8
SMALL_LOOP_SLOTS = 8
SMALL_CLBIT_WORDS = 32
# Its shared memory beside the state: 32 doubles of warp partials, then the clbit words.
SMALL_PARTIAL_BYTES = 32 * 8
# Its block: one thread per pair of amplitudes of the widest circuit, from
# SMALL_BLOCK_MIN to SMALL_BLOCK_MAX; up to SMALL_BLOCK_WIDE (its
# __launch_bounds__, which caps registers at 128 as two blocks of 256 would)
# where the state takes more than SMALL_WIDE_STATE_BYTES, since then only one
# block fits a multiprocessor's shared memory (228 KiB on sm_90, 164 KiB on
# sm_80) and twice the threads hide more of each op's shared-memory latency.
# Under that cap the complex128 instances spill (ptxas, sm_90: about 300 bytes a
# thread, `python -m benchmarks.kernel_resources`), in the five-qubit matrix case
# alone: its 32 complex128 inputs fill the 128 registers. Gates of one to four
# qubits, nearly all a small circuit holds, run without spilling.
SMALL_BLOCK_MIN, SMALL_BLOCK_MAX, SMALL_BLOCK_WIDE = 32, 256, 512
SMALL_WIDE_STATE_BYTES = 64 << 10

MatrixMethod = Literal["auto", "strided", "strided_multi", "tiled", "tiled_async", "warp"]
MATRIX_METHODS = ("auto", "strided", "strided_multi", "tiled", "tiled_async", "warp")
# apply_matrix_multi<R, K, G>: groups per thread (G) for the (real type, k) it is
# built for; elsewhere "strided_multi" runs "strided". G = 2 wherever ptxas
# (sm_90) fits it without spilling; complex128 k = 5 would hold 64 complex128
# inputs (256 registers) and spills, so it has none. k = 1, 2 already run at
# 0.90-0.93 of copy bandwidth strided (docs/benchmarks.md).
MULTI_GROUPS: dict[tuple[str, int], int] = {
    ("float", 3): 2,
    ("float", 4): 2,
    ("float", 5): 2,
    ("double", 3): 2,
    ("double", 4): 2,
}
# Threads per block of apply_matrix_multi (multi_shape<R, K, G>::BLOCK in the .cu file).
MULTI_BLOCK = 128
# apply_matrix_warp: a warp's 32 lanes are state bits 0..4.
WARP_LANE_BITS = 5


class KernelCompileError(GPUProviderError, RuntimeError):
    """The CUDA kernels failed to compile; the message carries NVRTC's log."""


def source() -> str:
    """The CUDA source of every statevector kernel."""
    return (importlib.resources.files("gpu_provider") / "kernels" / SOURCE_NAME).read_text(encoding="utf-8")


def _real_names(real: str | None) -> tuple[str, ...]:
    if real is None:
        return tuple(REAL_TYPES.values())
    if real not in REAL_TYPES.values():
        raise InvalidInputError(f"real type must be one of {tuple(REAL_TYPES.values())}, not {real!r}")
    return (real,)


# Kernels built to be timed against the ones "auto" picks, not yet measured on a GPU: they are
# compiled into a module of their own on first use, so a job that never asks for them (every
# job with method="auto") never pays their compile time.
TRIAL_KERNELS = ("apply_matrix_multi", "apply_matrix_low_async")
# Each kernel's module (compiled on the first launch of one of its instances): "core" for
# what every job may launch, "trial" for TRIAL_KERNELS, "shots" for run_small_shots, which
# only the shots of small circuits that measure mid-circuit, reset or branch launch.
MODULES = ("core", "trial", "shots")
_MODULE_OF = {**{kernel: "trial" for kernel in TRIAL_KERNELS}, "run_small_shots": "shots"}


def module_of(name: str) -> str:
    """The module (one of ``MODULES``) that kernel instance ``name`` is compiled in."""
    return _MODULE_OF.get(name.split("<", 1)[0], "core")


def is_trial(name: str) -> bool:
    """Whether kernel instance ``name`` belongs to the trial module (see ``TRIAL_KERNELS``)."""
    return module_of(name) == "trial"


def instances(real: str | None = None, module: str | None = None) -> list[str]:
    """Every kernel name expression (template instance), for one real type or both; with
    ``module``, only those compiled in that one of ``MODULES``."""
    if module is not None and module not in MODULES:
        raise InvalidInputError(f"kernel modules are {MODULES}, not {module!r}")
    return [name for name in _all_instances(real) if module is None or module_of(name) == module]


def _all_instances(real: str | None) -> list[str]:
    names = []
    for r in _real_names(real):
        for k in range(1, MAX_MATRIX_QUBITS + 1):
            names.append(_matrix_name(r, k, "strided"))
            if (r, k) in MULTI_GROUPS:
                names.append(_multi_name(r, k, MULTI_GROUPS[(r, k)]))
            names.append(_matrix_name(r, k, "tiled"))
            names.append(_matrix_name(r, k, "tiled_async"))
            names += [_warp_name(r, lane, k - lane) for lane in range(1, k + 1)]
        for vector in sorted({1, STREAM_VECTOR[r]}):
            names += [_stream_name(kernel, r, vector) for kernel in STREAM_KERNELS]
        names.append(f"pauli_expectation<{r}>")
        names.append(small_circuits_name(r))
        names.append(small_shots_name(r))
    return names


def _matrix_name(real: str, k: int, method: str) -> str:
    kernel = {"strided": "apply_matrix", "tiled": "apply_matrix_low", "tiled_async": "apply_matrix_low_async"}[method]
    return f"{kernel}<{real}, {k}>"


def _multi_name(real: str, k: int, groups_per_thread: int) -> str:
    return f"apply_matrix_multi<{real}, {k}, {groups_per_thread}>"


def multi_applies(real: str, k: int) -> bool:
    """Whether apply_matrix_multi is built for this real type and width (else "strided_multi" runs "strided")."""
    return (real, k) in MULTI_GROUPS


def _warp_name(real: str, lane_targets: int, high_targets: int) -> str:
    return f"apply_matrix_warp<{real}, {lane_targets}, {high_targets}>"


def small_circuits_name(real: str) -> str:
    return f"run_small_circuits<{real}, {SMALL_MAX_QUBITS[real]}>"


def small_circuits_block(real: str, num_qubits: int) -> int:
    """Threads per block for run_small_circuits on circuits of up to ``num_qubits`` qubits."""
    most = SMALL_BLOCK_WIDE if small_shared_bytes(real, num_qubits) > SMALL_WIDE_STATE_BYTES else SMALL_BLOCK_MAX
    return max(SMALL_BLOCK_MIN, min(most, 1 << max(num_qubits - 1, 0)))


def small_shared_bytes(real: str, num_qubits: int) -> int:
    """Dynamic shared memory a run_small_circuits launch takes per block for circuits of up to ``num_qubits`` qubits."""
    return (1 << num_qubits) * ITEMSIZE[real]


def small_shots_name(real: str) -> str:
    return f"run_small_shots<{real}, {SMALL_MAX_QUBITS[real]}>"


def small_shots_shared_bytes(real: str, num_qubits: int, clbit_words: int) -> int:
    """Dynamic shared memory a run_small_shots launch takes per block: the state, the warp partials, the clbits."""
    return small_shared_bytes(real, num_qubits) + SMALL_PARTIAL_BYTES + 8 * clbit_words


def small_widest(real: str, shared_limit: int) -> int:
    """The widest circuit run_small_circuits runs with ``shared_limit`` bytes of shared memory per block.

    Never above ``SMALL_MAX_QUBITS`` nor below ``SMALL_DEFAULT_QUBITS`` (which the
    default 48 KiB holds on every device, opt-in or not).
    """
    widest = SMALL_MAX_QUBITS[real]
    while widest > SMALL_DEFAULT_QUBITS[real] and small_shots_shared_bytes(real, widest, SMALL_CLBIT_WORDS) > shared_limit:
        widest -= 1
    return widest


_SHARED_OPTIN: dict[int, int] = {}
_SHARED_OPTIN_LOCK = threading.Lock()


def shared_memory_optin(device_id: int) -> int:
    """Shared memory one block may opt in to on CUDA device ``device_id``, in bytes.

    The device attribute cudaDevAttrMaxSharedMemoryPerBlockOptin, read on the
    first call for each device (never at import) and cached. Where it cannot be
    read, the default ``DEFAULT_SHARED_BYTES``, which every device gives.
    """
    found = _SHARED_OPTIN.get(device_id)
    if found is not None:
        return found
    with _SHARED_OPTIN_LOCK:
        found = _SHARED_OPTIN.get(device_id)
        if found is None:
            import cupy

            runtime = cupy.cuda.runtime
            try:
                found = int(runtime.deviceGetAttribute(runtime.cudaDevAttrMaxSharedMemoryPerBlockOptin, device_id))
            except (AttributeError, RuntimeError) as exc:  # a CuPy without the attribute, or CUDARuntimeError
                logger.warning(
                    "cannot read the opt-in shared memory per block of GPU %d (%s: %s); small circuits in bulk keep to %d bytes",
                    device_id, type(exc).__name__, exc, DEFAULT_SHARED_BYTES,
                )
                found = DEFAULT_SHARED_BYTES
            found = max(found, DEFAULT_SHARED_BYTES)
            _SHARED_OPTIN[device_id] = found
    return found


def forget_device_limits() -> None:
    """Forget the probed per-device limits (tests, or after the environment changed; see devices.reset_probe)."""
    with _SHARED_OPTIN_LOCK:
        _SHARED_OPTIN.clear()


STREAM_KERNELS = ("apply_diagonal", "probability_one", "collapse")


def _stream_name(kernel: str, real: str, vector: int) -> str:
    return f"{kernel}<{real}, {vector}>"


def stream_vector(real: str, pointer: int) -> int:
    """Amplitudes per vector for a state at device address ``pointer``: 2 in float when 16-byte aligned, else 1."""
    vector = STREAM_VECTOR[real]
    return vector if pointer % VECTOR_BYTES == 0 else 1


def stream_vectors(size: int, vector: int, bit: int | None = None) -> int:
    """Vectors a streaming kernel visits: of the whole state, or of the ``bit = 1`` half (``bit`` given).

    For a bit below log2(vector) (bit 0 in two-amplitude vectors) each vector is one
    (bit = 0, bit = 1) pair, so the half takes every vector; otherwise its halves are whole vectors.
    """
    if bit is None:
        return size // vector
    half = size // 2
    return half if (1 << bit) < vector else half // vector


def stream_blocks(vectors: int) -> int:
    """Blocks of ``BLOCK`` threads that give every thread ``STREAM_UNROLL`` vectors."""
    return max(1, -(-vectors // (BLOCK * STREAM_UNROLL)))


# ---------------------------------------------------------------------------
# Compiling without a GPU


@dataclass(frozen=True)
class PTXBuild:
    """The whole source compiled for one virtual architecture."""

    arch: str
    ptx: str
    lowered_names: dict[str, str]  # name expression -> mangled entry name in ``ptx``
    log: str


def _normalize_arch(arch: str) -> str:
    text = str(arch).strip().lower()
    for prefix in ("compute_", "sm_"):
        if text.startswith(prefix):
            text = text[len(prefix) :]
    if not text.isdigit():
        raise InvalidInputError(f"arch must look like 'compute_90', 'sm_90' or '90', not {arch!r}")
    return f"compute_{text}"


def compile_to_ptx(arch: str = "compute_90", real: str | None = None) -> PTXBuild:
    """Compile every instance (or one real type's) to PTX for ``arch`` through NVRTC.

    Needs CuPy and NVRTC but no GPU: NVRTC only compiles, it never touches a
    device. Raises :class:`KernelCompileError` with NVRTC's log on failure.
    """
    from cupy.cuda import nvrtc  # CuPy is an optional dependency: import on use

    target = _normalize_arch(arch)
    names = instances(real)
    options = COMPILE_OPTIONS + CUPY_IMPLIED_OPTIONS + (f"--gpu-architecture={target}",)
    program = nvrtc.createProgram(source(), SOURCE_NAME, (), ())
    try:
        for name in names:
            nvrtc.addNameExpression(program, name)
        try:
            nvrtc.compileProgram(program, options)
        except nvrtc.NVRTCError as exc:
            raise KernelCompileError(
                f"NVRTC could not compile {SOURCE_NAME} for {target} with {options}:\n{nvrtc.getProgramLog(program)}"
            ) from exc
        lowered = {name: nvrtc.getLoweredName(program, name) for name in names}
        ptx = nvrtc.getPTX(program)
        log = nvrtc.getProgramLog(program)
    finally:
        nvrtc.destroyProgram(program)
    if isinstance(ptx, bytes):
        ptx = ptx.decode("utf-8")
    if isinstance(log, bytes):
        log = log.decode("utf-8")
    return PTXBuild(target, ptx.rstrip("\x00"), lowered, log.rstrip("\x00"))


# ---------------------------------------------------------------------------
# Launch planning (pure host arithmetic, testable without a GPU)


def pack_bits(bits: Sequence[int]) -> int:
    """Bit positions packed 6 bits each (entry j in bits 6j..6j+5), as the kernels read them."""
    packed = 0
    for j, bit in enumerate(bits):
        packed |= int(bit) << (6 * j)
    return packed


@dataclass(frozen=True)
class TilePlan:
    """How apply_matrix_low cuts the state into tiles for one target set.

    A tile holds all values of bits ``0..low_bits-1`` and of ``high_sorted``
    (the targets at or above ``low_bits``): ``2^tile_log`` amplitudes, with
    ``tile_log = low_bits + len(high_sorted)``. ``local_targets[j]`` is target j's
    bit inside a tile.
    """

    tile_log: int
    low_bits: int
    high_sorted: tuple[int, ...]
    local_targets: tuple[int, ...]


def tile_plan(num_qubits: int, bits: Sequence[int], tile_log: int) -> TilePlan:
    """Choose ``low_bits`` so the low bits plus the targets above them fill one tile.

    Counting the targets at or above ``T - h`` grows by at most one per step of h
    and reaches at most k, so some h in 0..k equals its own count.
    """
    size = min(tile_log, num_qubits)
    for high_count in range(len(bits) + 1):
        low_bits = size - high_count
        high = sorted(b for b in bits if b >= low_bits)
        if len(high) == high_count:
            local = tuple(b if b < low_bits else low_bits + high.index(b) for b in bits)
            return TilePlan(size, low_bits, tuple(high), local)
    raise AssertionError(f"no tile plan for targets {list(bits)} on {num_qubits} qubits")  # unreachable, see above


def strided_is_coalesced(bits: Sequence[int], itemsize: int) -> bool:
    """Whether one group per thread reads whole lines: the lowest target's run fills one."""
    return (1 << min(bits)) * itemsize >= LINE_BYTES


# The kernel "auto" runs where the strided one would not read whole lines, per
# real type and width: (with at most half the targets among bits 0..4, with
# more), from ``benchmarks.gpu_kernels`` on an NVIDIA H200 (2026-11-27, n = 28
# and 30; docs/benchmarks.md), which times every kernel on targets 0..k-1 (all
# k among bits 0..4) and on target 0 plus the k-1 highest (one among them).
# Warp shuffles win wherever few targets are lane bits and up to k = 4 in
# complex64 (0.90-0.92 of copy bandwidth for k <= 2, 0.74-0.90 at k = 3); with
# four or five lane targets the shuffles cost more than the shared-memory tile,
# and five-qubit gates with one lane target are fastest strided (0.51-0.55).
LOW_TARGET_METHOD: dict[tuple[str, int], tuple[str, str]] = {
    ("float", 1): ("strided", "strided"),
    ("float", 2): ("warp", "warp"),
    ("float", 3): ("warp", "warp"),
    ("float", 4): ("warp", "warp"),
    ("float", 5): ("strided", "tiled"),
    ("double", 1): ("warp", "warp"),
    ("double", 2): ("warp", "warp"),
    ("double", 3): ("warp", "tiled"),
    ("double", 4): ("strided", "tiled"),
    ("double", 5): ("strided", "tiled"),
}


# The kernel "auto" runs where the strided one reads whole lines (all targets
# high enough), per real type and width. Every entry is "strided": measured on
# an NVIDIA H200 (2026-11-27, n = 28 and 30, docs/benchmarks.md) at 0.89-0.93
# of copy bandwidth for k <= 3, 0.75-0.87 at k = 4 and 0.50-0.57 at k = 5.
# "strided_multi" (apply_matrix_multi, G groups per thread) is built for the
# widths in MULTI_GROUPS but has not been timed on a GPU: when
# ``benchmarks.gpu_kernels`` shows it faster for some (real, k) on high
# targets, that entry is the one line to change.
HIGH_TARGET_METHOD: dict[tuple[str, int], str] = {
    ("float", 1): "strided",
    ("float", 2): "strided",
    ("float", 3): "strided",
    ("float", 4): "strided",
    ("float", 5): "strided",
    ("double", 1): "strided",
    ("double", 2): "strided",
    ("double", 3): "strided",
    ("double", 4): "strided",
    ("double", 5): "strided",
}


def auto_method(real: str, bits: Sequence[int]) -> str:
    """The kernel ``method="auto"`` picks: from ``HIGH_TARGET_METHOD`` where the strided kernels read whole lines, else from ``LOW_TARGET_METHOD``.

    "warp" needs 32 amplitudes; on a smaller state :func:`matrix_launch` runs "tiled" instead.
    """
    itemsize = 8 if real == "float" else 16
    if strided_is_coalesced(bits, itemsize):
        return HIGH_TARGET_METHOD[(real, len(bits))]
    lane_targets = sum(1 for b in bits if b < WARP_LANE_BITS)
    few, many = LOW_TARGET_METHOD[(real, len(bits))]
    return few if 2 * lane_targets <= len(bits) else many


@dataclass(frozen=True)
class MatrixLaunch:
    """Everything about one apply_matrix launch but the arrays and the grid."""

    name: str
    block: int
    blocks_needed: int
    scalars: tuple  # the kernel's arguments after (state, matrix), as exact C types


@functools.lru_cache(maxsize=4096)
def matrix_launch(real: str, num_qubits: int, bits: tuple[int, ...], method: MatrixMethod = "auto") -> MatrixLaunch:
    """Plan an apply_matrix launch (cached: circuits repeat the same targets)."""
    k = len(bits)
    if method == "auto":
        method = auto_method(real, bits)
    if method == "strided":
        groups = 1 << (num_qubits - k)
        block = MATRIX_BLOCK[k]
        scalars = (np.uint64(groups), np.uint64(pack_bits(bits)), np.uint64(pack_bits(sorted(bits))))
        return MatrixLaunch(_matrix_name(real, k, "strided"), block, -(-groups // block), scalars)
    if method == "strided_multi":
        if not multi_applies(real, k):
            return matrix_launch(real, num_qubits, bits, "strided")
        groups = 1 << (num_qubits - k)
        per_thread = MULTI_GROUPS[(real, k)]
        scalars = (np.uint64(groups), np.uint64(pack_bits(bits)), np.uint64(pack_bits(sorted(bits))))
        # Each thread takes per_thread groups a grid-stride step.
        blocks = -(-groups // (per_thread * MULTI_BLOCK))
        return MatrixLaunch(_multi_name(real, k, per_thread), MULTI_BLOCK, blocks, scalars)
    if method in ("tiled", "tiled_async"):
        # "tiled_async" takes the same arguments on its smaller tile; its blocks
        # loop over their tiles, so the grid is what the device keeps resident
        # (Kernels._grid), never more than the tiles.
        plan = tile_plan(num_qubits, bits, (TILE_LOG if method == "tiled" else ASYNC_TILE_LOG)[real])
        scalars = (
            np.uint64(1 << (num_qubits - plan.tile_log)),
            np.int32(plan.low_bits),
            np.int32(len(plan.high_sorted)),
            np.uint64(pack_bits(plan.high_sorted)),
            np.uint64(pack_bits(plan.local_targets)),
            np.uint64(pack_bits(sorted(plan.local_targets))),
        )
        # One tile per block at a time; a block's threads split the tile's groups
        # (low_shape<R, K>::BLOCK or low_async_shape<R, K>::BLOCK in the kernel, for a full tile).
        block = min(BLOCK, 1 << (plan.tile_log - k))
        return MatrixLaunch(_matrix_name(real, k, method), block, 1 << (num_qubits - plan.tile_log), scalars)
    if method == "warp":
        if not warp_applies(num_qubits, bits):
            return matrix_launch(real, num_qubits, bits, "tiled")
        lane = [(b, j) for j, b in enumerate(bits) if b < WARP_LANE_BITS]
        high = sorted((b, j) for j, b in enumerate(bits) if b >= WARP_LANE_BITS)
        units = 1 << (num_qubits - WARP_LANE_BITS - len(high))
        scalars = (
            np.uint64(units),
            np.uint64(pack_bits([b for b, _ in lane])),
            np.uint64(pack_bits([j for _, j in lane])),
            np.uint64(pack_bits([b for b, _ in high])),
            np.uint64(pack_bits([j for _, j in high])),
        )
        return MatrixLaunch(_warp_name(real, len(lane), len(high)), BLOCK, -(-(units << WARP_LANE_BITS) // BLOCK), scalars)
    raise InvalidInputError(f"method must be one of {MATRIX_METHODS}, not {method!r}")


def warp_applies(num_qubits: int, bits: Sequence[int]) -> bool:
    """Whether apply_matrix_warp can run: some target among bits 0..4 and a state of 32 amplitudes or more.

    With no lane target the strided kernel is the same work without shuffles;
    a smaller state has no full warp of amplitudes. Otherwise "warp" falls back to "tiled".
    """
    return num_qubits >= WARP_LANE_BITS and min(bits) < WARP_LANE_BITS


# ---------------------------------------------------------------------------
# The kernels of one dtype


class Kernels:
    """The statevector kernels for one dtype; compiled on first use, then cached.

    Every method takes the :class:`~gpu_provider.engine.statevector.StateVector`
    whose ``data`` (a flat CuPy array of ``2^num_qubits`` amplitudes) it updates
    in place, and launches on the current CuPy stream.
    """

    def __init__(self, dtype: Any) -> None:
        self.dtype = np.dtype(dtype)
        if self.dtype not in REAL_TYPES:
            raise InvalidInputError(f"GPU kernels exist for complex64 and complex128, not {self.dtype}")
        self.real = REAL_TYPES[self.dtype]
        self._real_scalar = np.float32 if self.real == "float" else np.float64
        self._lock = threading.Lock()
        self._modules: dict[str, Any] = {}  # one of MODULES -> the compiled module
        self._functions: dict[str, Any] = {}
        self._resident: dict[tuple[int, str, int, int], int] = {}
        self._shared_allowed: set[tuple[int, str]] = set()  # (device, kernel) whose dynamic shared memory limit is raised

    # -- what this object can do ---------------------------------------------

    def can_apply(self, k: int) -> bool:
        return 1 <= k <= MAX_MATRIX_QUBITS

    def can_apply_diagonal(self, k: int) -> bool:
        return 1 <= k <= MAX_DIAGONAL_QUBITS

    def small_max_qubits(self, device_id: int) -> int:
        """The widest circuit :meth:`run_small_circuits` runs on CUDA device ``device_id``.

        What the device's opt-in shared memory per block holds (:func:`small_widest`):
        14 qubits in complex64 and 13 in complex128 on sm_80 and sm_90, 12 and 11
        on a device that gives only the default 48 KiB. The first call for a
        device reads its limit (:func:`shared_memory_optin`); later ones are cached.
        """
        return small_widest(self.real, self._shared_optin(device_id))

    # -- operations -------------------------------------------------------------

    def apply_matrix(self, state: Any, bits: Sequence[int], matrix: Any, *, method: MatrixMethod = "auto") -> None:
        """Apply the dense ``(2^k, 2^k)`` ``matrix`` to ``bits``; matrix index bit j is ``bits[j]``.

        ``method`` forces one of the kernels: "strided", "tiled" and "tiled_async"
        are correct for every target set, "warp" for sets with a target among bits 0..4 on 5 or more
        qubits (elsewhere it runs "tiled"), "strided_multi" for the widths in
        ``MULTI_GROUPS`` (elsewhere it runs "strided"); "auto" picks from the
        measured tables.
        """
        k = len(bits)
        if not self.can_apply(k):
            raise InvalidInputError(f"apply_matrix has kernels for 1 to {MAX_MATRIX_QUBITS} targets, not {k}")
        n = self._check_bits(state, bits)
        xp = state.xp
        matrix = xp.ascontiguousarray(matrix, dtype=self.dtype)
        if matrix.shape != (1 << k, 1 << k):
            raise InvalidInputError(f"a matrix on {k} targets must be {1 << k}x{1 << k}, not {matrix.shape}")
        plan = matrix_launch(self.real, n, tuple(bits), method)
        grid = self._grid(state, plan.name, plan.block, plan.blocks_needed)
        self._function(plan.name)((grid,), (plan.block,), (state.data, matrix) + plan.scalars)

    def apply_diagonal(self, state: Any, bits: Sequence[int], diagonal: Any) -> None:
        """Multiply each amplitude by ``diagonal[j]``, bit i of j being the amplitude's bit ``bits[i]``."""
        k = len(bits)
        if not self.can_apply_diagonal(k):
            raise InvalidInputError(f"apply_diagonal has a kernel for 1 to {MAX_DIAGONAL_QUBITS} targets, not {k}")
        n = self._check_bits(state, bits)
        diagonal = state.xp.ascontiguousarray(diagonal, dtype=self.dtype).reshape(-1)
        if diagonal.shape[0] != 1 << k:
            raise InvalidInputError(f"a diagonal on {k} targets has {1 << k} entries, not {diagonal.shape[0]}")
        size = 1 << n
        vector = self._stream_vector(state)
        name = _stream_name("apply_diagonal", self.real, vector)
        grid = self._grid(state, name, BLOCK, stream_blocks(stream_vectors(size, vector)))
        args = (state.data, diagonal, np.uint64(size), np.int32(k), np.uint64(pack_bits(bits)))
        self._function(name)((grid,), (BLOCK,), args)

    def probability_one(self, state: Any, bit: int) -> float:
        """The total probability of the amplitudes whose ``bit`` is 1 (waits for the stream)."""
        n = self._check_bits(state, [bit])
        vector = self._stream_vector(state)
        name = _stream_name("probability_one", self.real, vector)
        half = 1 << (n - 1)
        # Fixed by the state's size, bit and alignment alone: the same sum on every run and device.
        grid = min(stream_blocks(stream_vectors(1 << n, vector, bit)), MAX_REDUCTION_BLOCKS)
        partial = state.xp.empty(grid, dtype=np.float64)
        self._function(name)((grid,), (BLOCK,), (state.data, np.uint64(half), np.int32(bit), partial))
        return float(partial.sum())

    def collapse(self, state: Any, bit: int, outcome: int, scale: float, flip: bool) -> None:
        """Keep the half where ``bit == outcome`` times ``scale``, zero the rest; ``flip`` moves it to ``bit == 0``."""
        n = self._check_bits(state, [bit])
        if outcome not in (0, 1):
            raise InvalidInputError(f"a measurement outcome is 0 or 1, not {outcome!r}")
        vector = self._stream_vector(state)
        name = _stream_name("collapse", self.real, vector)
        half = 1 << (n - 1)
        grid = self._grid(state, name, BLOCK, stream_blocks(stream_vectors(1 << n, vector, bit)))
        args = (state.data, np.uint64(half), np.int32(bit), np.int32(outcome), self._real_scalar(scale), np.int32(bool(flip)))
        self._function(name)((grid,), (BLOCK,), args)

    def run_small_circuits(self, out: Any, headers: Any, ops: Any, pool: Any, num_qubits: int) -> None:
        """Run whole circuits of up to ``num_qubits`` qubits, one per block, in one launch.

        ``headers`` (uint64, ``SMALL_HEADER_WORDS`` per circuit), ``ops`` (uint64,
        ``SMALL_OP_WORDS`` per op) and ``pool`` (this dtype) are device arrays laid
        out as the .cu file's run_small_circuits describes (see
        :mod:`gpu_provider.engine.small_batch`, which packs them); each circuit's
        final amplitudes land in the flat ``out`` at its header's offset. Each
        block takes ``2^num_qubits`` amplitudes of dynamic shared memory, so
        ``num_qubits`` should be the widest circuit's (circuits wider than it are
        skipped); it may be at most :meth:`small_max_qubits` of ``out``'s device,
        which must be the current device (the launch goes there).
        """
        device_id = self._device_id(_Buffer(out))
        widest = self.small_max_qubits(device_id)
        if not 0 <= num_qubits <= widest:
            raise InvalidInputError(
                f"run_small_circuits holds at most {widest} qubits in {self.dtype} on GPU {device_id}, not {num_qubits}"
            )
        for name, array, dtype in (("out", out, self.dtype), ("pool", pool, self.dtype), ("headers", headers, np.uint64), ("ops", ops, np.uint64)):
            if array.dtype != dtype or array.ndim != 1:
                raise InvalidInputError(f"run_small_circuits needs {name} as a flat {np.dtype(dtype)} array, not {array.dtype} of shape {array.shape}")
        if headers.shape[0] % SMALL_HEADER_WORDS or ops.shape[0] % SMALL_OP_WORDS:
            raise InvalidInputError(f"headers and ops come in words of {SMALL_HEADER_WORDS} and {SMALL_OP_WORDS}")
        circuits = headers.shape[0] // SMALL_HEADER_WORDS
        if circuits == 0:
            return
        name = small_circuits_name(self.real)
        block = small_circuits_block(self.real, num_qubits)
        shared = small_shared_bytes(self.real, num_qubits)
        function = self._function(name)
        if shared > DEFAULT_SHARED_BYTES:
            self._allow_dynamic_shared(function, name, device_id, small_shared_bytes(self.real, widest))
        grid = self._grid(_Buffer(out), name, block, circuits, shared)
        function((grid,), (block,), (out, headers, ops, pool, np.uint64(circuits), np.int32(num_qubits)), shared_mem=shared)

    def run_small_shots(
        self,
        out: Any,
        ops: Any,
        pool: Any,
        words: Any,
        num_qubits: int,
        clbit_words: int,
        first_shot: int,
        shots: int,
        key: tuple[int, int],
        max_iterations: int,
    ) -> None:
        """Run shots ``first_shot`` .. ``first_shot + shots - 1`` of one small circuit, one per block, in one launch.

        ``ops`` (uint64, ``SMALL_OP_WORDS`` per op: gates, measurements, resets,
        jumps and loop counters), ``pool`` (this dtype) and ``words`` (uint64: the
        conditions' masks and patterns) are device arrays laid out as the .cu
        file's run_small_shots describes (:mod:`gpu_provider.engine.small_shots`
        flattens a program to them). ``out`` (uint64, ``(clbit_words + 1) x
        shots``) receives each shot's clbit words and its status. ``key``: the
        Philox key of the circuit's uniforms (two 64-bit integers); a shot's draws
        depend on the key and the shot's index only.
        """
        device_id = self._device_id(_Buffer(out))
        widest = self.small_max_qubits(device_id)
        if not 1 <= num_qubits <= widest:
            raise InvalidInputError(f"run_small_shots holds 1 to {widest} qubits in {self.dtype} on GPU {device_id}, not {num_qubits}")
        if not 1 <= clbit_words <= SMALL_CLBIT_WORDS:
            raise InvalidInputError(f"run_small_shots keeps 1 to {SMALL_CLBIT_WORDS} words of clbits, not {clbit_words}")
        for name, array, dtype in (("out", out, np.uint64), ("ops", ops, np.uint64), ("pool", pool, self.dtype), ("words", words, np.uint64)):
            if array.dtype != dtype or array.ndim != 1:
                raise InvalidInputError(f"run_small_shots needs {name} as a flat {np.dtype(dtype)} array, not {array.dtype} of shape {array.shape}")
        if ops.shape[0] % SMALL_OP_WORDS:
            raise InvalidInputError(f"ops come in words of {SMALL_OP_WORDS}")
        if out.shape[0] != (clbit_words + 1) * shots:
            raise InvalidInputError(f"out holds {out.shape[0]} words, not (clbit_words + 1) x shots = {(clbit_words + 1) * shots}")
        if shots <= 0:
            return
        name = small_shots_name(self.real)
        block = small_circuits_block(self.real, num_qubits)
        shared = small_shots_shared_bytes(self.real, num_qubits, clbit_words)
        function = self._function(name)
        if shared > DEFAULT_SHARED_BYTES:
            self._allow_dynamic_shared(function, name, device_id, small_shots_shared_bytes(self.real, widest, SMALL_CLBIT_WORDS))
        grid = self._grid(_Buffer(out), name, block, shots, shared)
        mask = (1 << 64) - 1
        args = (
            out, ops, pool, words, np.uint64(ops.shape[0] // SMALL_OP_WORDS), np.int32(num_qubits), np.uint64(first_shot), np.uint64(shots),
            np.uint64(key[0] & mask), np.uint64(key[1] & mask), np.int32(clbit_words), np.uint64(max_iterations),
        )
        function((grid,), (block,), args, shared_mem=shared)

    def _allow_dynamic_shared(self, function: Any, name: str, device_id: int, limit: int) -> None:
        """Let ``function`` take up to ``limit`` bytes of dynamic shared memory per block, once per device.

        Sets the kernel's cudaFuncAttributeMaxDynamicSharedMemorySize (CuPy's
        ``max_dynamic_shared_size_bytes``) on the current device, where the launch goes.
        """
        key = (device_id, name)
        if key in self._shared_allowed:
            return
        with self._lock:
            if key not in self._shared_allowed:
                function.max_dynamic_shared_size_bytes = limit
                self._shared_allowed.add(key)

    # -- plumbing ---------------------------------------------------------------

    def _check_bits(self, state: Any, bits: Sequence[int]) -> int:
        n = int(state.num_qubits)
        if state.data.dtype != self.dtype:
            raise InvalidInputError(f"these kernels are for {self.dtype}, the state is {state.data.dtype}")
        if len(set(bits)) != len(bits) or any(not 0 <= b < n for b in bits):
            raise InvalidInputError(f"target bits must be distinct and in 0..{n - 1}, not {list(bits)}")
        return n

    def _stream_vector(self, state: Any) -> int:
        """The streaming kernels' vector width for this state's buffer (its alignment)."""
        data = state.data
        pointer = getattr(getattr(data, "data", None), "ptr", None)  # CuPy: data.data is a MemoryPointer
        if pointer is None:  # a NumPy array (the host emulation in the tests)
            pointer = data.__array_interface__["data"][0]
        return stream_vector(self.real, int(pointer))

    def _function(self, name: str) -> Any:
        """The launchable kernel ``name``; the first call for an instance of one of ``MODULES``
        compiles that module of this dtype."""
        function = self._functions.get(name)
        if function is not None:
            return function
        group = module_of(name)
        with self._lock:
            module = self._modules.get(group)
            if module is None:
                module = self._modules[group] = self._build_module(group)
            function = self._functions.get(name)
            if function is None:
                function = module.get_function(name)
                self._functions[name] = function
        return function

    def _build_module(self, module: str = "core") -> Any:
        import cupy

        names = instances(self.real, module)
        module = cupy.RawModule(code=source(), options=COMPILE_OPTIONS, name_expressions=names)
        try:
            module.compile()  # compile now, so a failure names the kernels rather than a launch
        except cupy.cuda.compiler.CompileException as exc:
            raise KernelCompileError(f"the {self.real} statevector kernels failed to compile: {exc}") from exc
        logger.debug("compiled %d %s statevector kernels", len(names), self.real)
        return module

    def _grid(self, state: Any, name: str, block: int, needed: int, shared: int = 0) -> int:
        """Blocks to launch: what the work needs, capped at what the device keeps resident
        (with ``shared`` bytes of dynamic shared memory per block)."""
        key = (self._device_id(state), name, block, shared)
        resident = self._resident.get(key)
        if resident is None:
            resident = self._resident_blocks(name, block, shared)
            self._resident[key] = resident
        return max(1, min(needed, resident))

    def _device_id(self, state: Any) -> int:
        return int(state.data.device.id)

    def _resident_blocks(self, name: str, block: int, shared: int = 0) -> int:
        """Blocks of ``name`` the current device runs at once (occupancy x multiprocessors),
        each with ``shared`` bytes of dynamic shared memory."""
        import cupy

        function = self._function(name)
        sms = cupy.cuda.Device().attributes["MultiProcessorCount"]
        per_sm = cupy.cuda.driver.occupancyMaxActiveBlocksPerMultiprocessor(function.kernel.ptr, block, shared)
        return max(1, int(per_sm)) * int(sms)

    def _shared_optin(self, device_id: int) -> int:
        """The device's opt-in shared memory per block (:func:`shared_memory_optin`, cached per device)."""
        return shared_memory_optin(device_id)

    # -- expectation values (see engine/expectation.py) -------------------------

    def pauli_expectation(self, state: Any, x_mask: int, z_masks: Any, weights: Any) -> complex:
        """``sum_i f(i) conj(psi[i ^ x_mask]) psi[i]``, ``f(i) = sum_t weights[t] (-1)^popcount(i & z_masks[t])``.

        One pass over the state per ``MAX_PAULI_TERMS`` terms (one for almost any
        group); masks are physical bit positions. Waits for the stream.
        """
        n = self._check_bits(state, [])
        size = 1 << n
        xp = state.xp
        z_host = np.ascontiguousarray(np.asarray(z_masks, dtype=np.uint64).reshape(-1))
        w_host = np.ascontiguousarray(np.asarray(weights, dtype=np.complex128).reshape(-1))
        if z_host.shape != w_host.shape:
            raise InvalidInputError(f"one weight per Z mask: {z_host.shape[0]} masks, {w_host.shape[0]} weights")
        if int(x_mask) >> n or np.any(z_host >> np.uint64(n)):
            raise InvalidInputError(f"Pauli masks must lie within the state's {n} bits")
        name = f"pauli_expectation<{self.real}>"
        grid = min(-(-size // BLOCK), MAX_REDUCTION_BLOCKS)
        total = 0j
        for start in range(0, z_host.shape[0], MAX_PAULI_TERMS):
            z_chunk = xp.asarray(z_host[start : start + MAX_PAULI_TERMS])
            w_chunk = xp.asarray(w_host[start : start + MAX_PAULI_TERMS])
            partial = xp.empty(2 * grid, dtype=np.float64)
            args = (state.data, np.uint64(size), np.uint64(x_mask), z_chunk, w_chunk, np.int32(z_chunk.shape[0]), partial)
            self._function(name)((grid,), (BLOCK,), args)
            sums = partial.reshape(grid, 2).sum(axis=0)
            sums = sums.get() if xp is not np else sums
            total += complex(float(sums[0]), float(sums[1]))
        return total


class _Buffer:
    """A device array posing as a state for :meth:`Kernels._grid`, which only reads its device."""

    def __init__(self, data: Any) -> None:
        self.data = data


_KERNELS: dict[np.dtype, Kernels] = {}
_KERNELS_LOCK = threading.Lock()


def kernels_for(dtype: Any) -> Kernels:
    """The cached :class:`Kernels` for ``dtype`` (complex64 or complex128); compiles nothing yet."""
    key = np.dtype(dtype)
    with _KERNELS_LOCK:
        kernels = _KERNELS.get(key)
        if kernels is None:
            kernels = _KERNELS[key] = Kernels(key)
        return kernels


# Pauli terms one pauli_expectation launch weighs (its shared-memory table in the .cu file).
MAX_PAULI_TERMS = 256
