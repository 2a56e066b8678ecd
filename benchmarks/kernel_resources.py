"""Registers, spills, shared memory and occupancy of every kernel instance.

    python -m benchmarks.kernel_resources [--arch sm_90] [--source auto|ptxas|device]
                                          [--out DIR]

For each template instance the project compiles (``kernels.instances()``) it
reports what the compiler gave it (registers per thread, spill stores and loads,
stack frame, static shared memory), the launch the planner makes for it (threads
per block, dynamic shared memory) and what that allows on one multiprocessor
(resident blocks and threads, and the share of the SM's thread slots: the
occupancy). Flags: ``SPILLS`` (ptxas: spill stores or loads, registers the
compiler could not keep), ``LOCAL`` (per-thread local memory: a stack frame, for
arrays indexed at run time or for spills; the driver reports only this) and
``LOW-OCCUPANCY`` (under a quarter of the thread slots: little memory traffic in
flight to hide latency).

Two sources, the same table:

- ``ptxas`` (no GPU needed): the kernels are compiled to PTX through NVRTC for
  ``--arch`` (:func:`gpu_provider.engine.kernels.compile_to_ptx`), then ``ptxas -v``
  (from the CUDA toolkit: ``PATH``, ``CUDA_HOME`` or ``CUDA_PATH``) assembles them
  for that SM and prints each entry's resources; occupancy follows from the SM's
  published limits (:data:`SM_LIMITS`). These are the compiler's figures, not
  measurements of a run.
- ``device`` (a usable GPU): the driver's attributes of the kernels CuPy loaded
  (``num_regs``, ``local_size_bytes``, ``shared_size_bytes``) and its occupancy
  calculator (``cudaOccupancyMaxActiveBlocksPerMultiprocessor``) for the same
  launches, on the card in the machine.

``auto`` takes ``device`` where a GPU is usable, else ``ptxas``. Writes
``kernel_resources.json`` to ``--out``. Information, not a pass/fail gate; exits
with status 0 unless nothing could be reported (no ptxas and no GPU: status 2).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from gpu_provider.engine import kernels as K

# Per-SM limits (CUDA C++ Programming Guide, "Compute Capabilities"; the occupancy
# calculator's allocation rules): registers, thread slots, resident blocks, shared
# memory per SM and per block (opt-in), shared memory the driver reserves per block,
# and the register allocation unit (registers per warp are rounded up to it).
SM_LIMITS = {
    80: {"registers": 65536, "threads": 2048, "blocks": 32, "shared": 164 << 10, "shared_per_block": 163 << 10, "reserved": 1 << 10, "register_unit": 256},
    86: {"registers": 65536, "threads": 1536, "blocks": 16, "shared": 100 << 10, "shared_per_block": 99 << 10, "reserved": 1 << 10, "register_unit": 256},
    89: {"registers": 65536, "threads": 1536, "blocks": 24, "shared": 100 << 10, "shared_per_block": 99 << 10, "reserved": 1 << 10, "register_unit": 256},
    90: {"registers": 65536, "threads": 2048, "blocks": 32, "shared": 228 << 10, "shared_per_block": 227 << 10, "reserved": 1 << 10, "register_unit": 256},
}
LOW_OCCUPANCY = 0.25


@dataclass
class Resources:
    """One kernel instance: compiler figures, its planned launch, and the occupancy they allow."""

    kernel: str
    registers: int
    spill_stores: int
    spill_loads: int
    stack_bytes: int
    static_shared: int
    block: int = 0
    dynamic_shared: int = 0
    blocks_per_sm: int = 0
    threads_per_sm: int = 0
    occupancy: float = 0.0
    limited_by: str = ""
    flags: list = field(default_factory=list)


def _sm_number(arch: str) -> int:
    return int(K._normalize_arch(arch).split("_")[1])


def launch_shape(name: str) -> tuple[int, int]:
    """(threads per block, dynamic shared bytes) of the launches the planner makes for
    instance ``name`` (the widest state a small-circuit kernel holds, full tiles)."""
    kernel, _, params = name.partition("<")
    params = [p.strip() for p in params.rstrip(">").split(",")]
    real = params[0]
    if kernel == "apply_matrix":
        return K.MATRIX_BLOCK[int(params[1])], 0
    if kernel == "apply_matrix_multi":
        return K.MULTI_BLOCK, 0
    if kernel == "apply_matrix_low":
        return min(K.BLOCK, 1 << (K.TILE_LOG[real] - int(params[1]))), 0
    if kernel == "apply_matrix_low_async":
        return min(K.BLOCK, 1 << (K.ASYNC_TILE_LOG[real] - int(params[1]))), 0
    if kernel == "run_small_circuits":
        widest = int(params[1])
        return K.small_circuits_block(real, widest), K.small_shared_bytes(real, widest)
    if kernel == "run_small_shots":
        widest = int(params[1])
        return K.small_circuits_block(real, widest), K.small_shots_shared_bytes(real, widest, K.SMALL_CLBIT_WORDS)
    # apply_matrix_warp, the streaming kernels, pauli_expectation
    return K.BLOCK, 0


def occupancy(registers: int, block: int, shared_bytes: int, sm: int) -> tuple[int, str]:
    """Resident blocks of one SM for a kernel of ``registers`` per thread launched with
    ``block`` threads and ``shared_bytes`` (static + dynamic) per block, and the limits
    that bind ("threads", "blocks", "shared", "registers", joined by "+" where several do)."""
    limits = SM_LIMITS.get(sm)
    if limits is None:
        raise ValueError(f"no SM limits recorded for sm_{sm} (known: {sorted(SM_LIMITS)})")
    warps = -(-block // 32)
    unit = limits["register_unit"]
    per_warp = -(-max(registers, 1) * 32 // unit) * unit
    candidates = {
        "threads": limits["threads"] // (warps * 32),
        "blocks": limits["blocks"],
        "registers": (limits["registers"] // per_warp) // warps,
    }
    if shared_bytes:
        if shared_bytes > limits["shared_per_block"]:
            candidates["shared"] = 0
        else:
            candidates["shared"] = limits["shared"] // (shared_bytes + limits["reserved"])
    fewest = min(candidates.values())
    return fewest, "+".join(key for key in ("threads", "blocks", "shared", "registers") if candidates.get(key) == fewest)


def finish(row: Resources, sm: int, blocks: Optional[int] = None) -> Resources:
    """Fill the launch shape, occupancy and flags of ``row`` (``blocks``: the driver's answer, if any)."""
    row.block, row.dynamic_shared = launch_shape(row.kernel)
    modelled, row.limited_by = occupancy(row.registers, row.block, row.static_shared + row.dynamic_shared, sm)
    if blocks is not None and blocks != modelled:
        row.limited_by += f" (model: {modelled} blocks)"
    row.blocks_per_sm = modelled if blocks is None else blocks
    row.threads_per_sm = row.blocks_per_sm * row.block
    row.occupancy = row.threads_per_sm / SM_LIMITS[sm]["threads"]
    row.flags = [flag for flag, bad in (
        ("SPILLS", row.spill_stores > 0 or row.spill_loads > 0),
        ("LOCAL", row.stack_bytes > 0),
        ("LOW-OCCUPANCY", row.occupancy < LOW_OCCUPANCY),
    ) if bad]
    return row


_ENTRY = re.compile(r"Compiling entry function '([^']+)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas(log: str) -> dict[str, dict]:
    """Each entry's figures from ``ptxas -v`` output, keyed by its mangled name."""
    entries: dict[str, dict] = {}
    current = None
    for line in log.splitlines():
        match = _ENTRY.search(line)
        if match:
            current = entries.setdefault(match.group(1), {"registers": 0, "spill_stores": 0, "spill_loads": 0, "stack_bytes": 0, "static_shared": 0})
            continue
        if current is None:
            continue
        match = _FRAME.search(line)
        if match:
            current["stack_bytes"], current["spill_stores"], current["spill_loads"] = (int(g) for g in match.groups())
        match = _USED.search(line)
        if match:
            current["registers"] = int(match.group(1))
            smem = _SMEM.search(line)
            current["static_shared"] = int(smem.group(1)) if smem else 0
    return entries


def find_ptxas() -> Optional[str]:
    found = shutil.which("ptxas")
    if found:
        return found
    for variable in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(variable)
        if root and os.path.isfile(os.path.join(root, "bin", "ptxas")):
            return os.path.join(root, "bin", "ptxas")
    return None


def ptxas_report(arch: str, ptxas: str) -> list[Resources]:
    """Every instance's resources as ``ptxas -v`` gives them for ``arch``."""
    sm = _sm_number(arch)
    build = K.compile_to_ptx(f"compute_{sm}")
    with tempfile.TemporaryDirectory() as folder:
        source = os.path.join(folder, "kernels.ptx")
        with open(source, "w", encoding="utf-8") as fh:
            fh.write(build.ptx)
        done = subprocess.run([ptxas, "-v", f"--gpu-name=sm_{sm}", source, "-o", os.path.join(folder, "kernels.cubin")],
                              capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"ptxas failed (status {done.returncode}):\n{done.stderr[-3000:]}")
    entries = parse_ptxas(done.stdout + done.stderr)
    rows = []
    for name, mangled in build.lowered_names.items():
        figures = entries.get(mangled)
        if figures is None:
            raise RuntimeError(f"ptxas reported nothing for {name} ({mangled})")
        rows.append(finish(Resources(name, **figures), sm))
    return rows


def device_report() -> tuple[list[Resources], dict]:
    """Every instance's resources as the driver gives them on the current GPU."""
    import cupy

    device = cupy.cuda.Device()
    major, minor = device.compute_capability[:-1], device.compute_capability[-1]
    sm = int(major) * 10 + int(minor)
    rows = []
    for dtype in K.REAL_TYPES:
        kernels = K.kernels_for(dtype)
        for name in K.instances(kernels.real):
            function = kernels._function(name)
            block, dynamic = launch_shape(name)
            if dynamic > K.DEFAULT_SHARED_BYTES:
                kernels._allow_dynamic_shared(function, name, device.id, dynamic)
            blocks = cupy.cuda.driver.occupancyMaxActiveBlocksPerMultiprocessor(function.kernel.ptr, block, dynamic)
            # The driver gives local memory per thread, not spills apart from a stack frame.
            row = Resources(name, int(function.num_regs), 0, 0, int(function.local_size_bytes), int(function.shared_size_bytes))
            rows.append(finish(row, sm if sm in SM_LIMITS else 90, int(blocks)))
    properties = cupy.cuda.runtime.getDeviceProperties(device.id)
    name = properties["name"]
    info = {"device": name.decode() if isinstance(name, bytes) else str(name), "sm": sm,
            "multiprocessors": device.attributes["MultiProcessorCount"], "cupy": cupy.__version__}
    return rows, info


def print_table(rows: list[Resources], source: str) -> None:
    print(f"{'kernel':44s} {'regs':>4s} {'spill st/ld':>11s} {'stack':>5s} {'smem':>7s} {'block':>5s} {'dyn smem':>8s} {'blk/SM':>6s} {'thr/SM':>6s} {'occ':>5s}  limit / flags")
    for row in rows:
        spills = "-" if source == "device" else f"{row.spill_stores}/{row.spill_loads}"
        print(f"{row.kernel:44s} {row.registers:4d} {spills:>11s} {row.stack_bytes:5d} {row.static_shared:7d} {row.block:5d} {row.dynamic_shared:8d} "
              f"{row.blocks_per_sm:6d} {row.threads_per_sm:6d} {row.occupancy:5.2f}  {row.limited_by} {' '.join(row.flags)}".rstrip())


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="sm_90", help="for --source ptxas: the SM to assemble for (sm_80, sm_90, ...)")
    parser.add_argument("--source", choices=("auto", "ptxas", "device"), default="auto")
    parser.add_argument("--out", default="bench-out", help="folder for kernel_resources.json")
    args = parser.parse_args(argv)
    try:
        sm = _sm_number(args.arch)
    except Exception as exc:
        parser.error(str(exc))
    if sm not in SM_LIMITS:
        parser.error(f"no SM limits recorded for sm_{sm} (known: {', '.join(f'sm_{s}' for s in sorted(SM_LIMITS))})")
    source = args.source
    if source in ("auto", "device"):
        from gpu_provider.engine.devices import probe_gpu

        probe = probe_gpu()
        if probe.usable:
            source = "device"
        elif source == "device":
            print(f"no GPU: {probe.reason}; --source device needs a usable NVIDIA GPU (try --source ptxas)")
            return 2
        else:
            source = "ptxas"
    info: dict = {}
    if source == "device":
        rows, info = device_report()
    else:
        ptxas = find_ptxas()
        if ptxas is None:
            print("no ptxas on PATH, CUDA_HOME or CUDA_PATH and no usable GPU: nothing to report")
            return 2
        rows = ptxas_report(args.arch, ptxas)
        version = subprocess.run([ptxas, "--version"], capture_output=True, text=True).stdout.strip().splitlines()
        info = {"sm": sm, "ptxas": version[-1] if version else ptxas}
    print(f"source: {source} {info}")
    print_table(rows, source)
    flagged = [row for row in rows if row.flags]
    print(f"{len(rows)} instances; {sum('SPILLS' in r.flags for r in rows)} spill, {sum('LOCAL' in r.flags for r in rows)} use local memory, "
          f"{sum('LOW-OCCUPANCY' in r.flags for r in rows)} under {LOW_OCCUPANCY:.0%} occupancy")
    for row in flagged:
        print(f"  {row.kernel}: {', '.join(row.flags)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"benchmark": "kernel_resources", "source": source, **info, "sm_limits": SM_LIMITS.get(info.get("sm", sm)),
              "rows": [asdict(row) for row in rows]}
    (out / "kernel_resources.json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
