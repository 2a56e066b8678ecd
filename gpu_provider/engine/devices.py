"""The two devices behind one small surface: array module, streams, events, memory.

``CPUDevice`` runs on NumPy with host events; ``GPUDevice`` runs on CuPy with
CUDA streams and events. The executor and the job are written once against
this surface. Nothing here touches CUDA at import time: the GPU is probed
lazily, once, and the answer and its reason are cached.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import CircuitTooLargeError, DeviceUnavailableError, InvalidOptionError

logger = logging.getLogger(__name__)

DEVICE_NAMES = ("auto", "CPU", "GPU")
PRECISIONS = {"double": np.complex128, "single": np.complex64}
# After the last running job on a GPU ends, the memory pool's cache is emptied
# if it holds more than this fraction of the device's memory.
POOL_CACHE_FRACTION = 0.125


@dataclass(frozen=True)
class GPUProbe:
    """The cached answer to "can this process use a GPU?" and why not."""

    usable: bool
    reason: str
    device_count: int = 0
    names: tuple[str, ...] = ()


@functools.lru_cache(maxsize=1)
def probe_gpu() -> GPUProbe:
    """Check, once, that CuPy imports, a CUDA device is visible and NVRTC loads."""
    if os.environ.get("GPU_PROVIDER_DISABLE_GPU"):
        return GPUProbe(False, "disabled by the GPU_PROVIDER_DISABLE_GPU environment variable")
    try:
        import cupy  # noqa: F401
    except Exception as exc:  # ImportError, or a broken CUDA install raising on import
        return GPUProbe(False, f"CuPy is not importable ({type(exc).__name__}: {exc}); install gpu-provider[cuda12] or [cuda13]")
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:
        return GPUProbe(False, f"no CUDA device is visible ({type(exc).__name__}: {exc})")
    if count < 1:
        return GPUProbe(False, "no CUDA device is visible (device count is 0)")
    try:
        cupy.cuda.nvrtc.getVersion()
    except Exception as exc:
        return GPUProbe(False, f"NVRTC cannot be loaded ({type(exc).__name__}: {exc}); install nvidia-cuda-nvrtc")
    names = []
    for index in range(count):
        try:
            props = cupy.cuda.runtime.getDeviceProperties(index)
            name = props["name"]
            names.append(name.decode() if isinstance(name, bytes) else str(name))
        except Exception as exc:
            return GPUProbe(False, f"CUDA device {index} cannot be queried ({type(exc).__name__}: {exc})")
    return GPUProbe(True, "", count, tuple(names))


def _after_fork_in_child() -> None:
    # A lock held by a parent thread at fork time would stay held forever in the child.
    global _DEVICES_LOCK
    _DEVICES_LOCK = threading.Lock()


def reset_probe() -> None:
    """Forget the cached probe and per-device limits (tests, or after the environment changed)."""
    from .kernels import forget_device_limits

    probe_gpu.cache_clear()
    _DEVICES.clear()
    forget_device_limits()


class HostEvent:
    """A CPU event: recorded when the host thread reaches it, like a CUDA event.

    CPU work is synchronous with the worker thread, so recording marks the point
    as reached; a plain flag is enough (its write is atomic) and costs nothing.
    """

    __slots__ = ("done",)

    def __init__(self) -> None:
        self.done = False

    def record(self, stream: Any = None) -> None:
        self.done = True


class Device:
    """What the engine needs of a device."""

    kind: str = ""
    xp: Any = np
    device_id: int = 0

    def __init__(self) -> None:
        self._running = 0
        self._running_lock = threading.Lock()

    def new_event(self):
        raise NotImplementedError

    def stream(self):
        """A context manager that makes the job's stream current."""
        raise NotImplementedError

    def free_bytes(self) -> int:
        raise NotImplementedError

    def total_bytes(self) -> int:
        raise NotImplementedError

    def to_host(self, array) -> np.ndarray:
        raise NotImplementedError

    def to_device(self, array):
        raise NotImplementedError

    def release_memory(self) -> None:
        """Give cached memory back after a job ends, fails or is cancelled (where that is worth it)."""

    def job_started(self) -> None:
        """A job began running on this device (see :meth:`release_memory`)."""
        with self._running_lock:
            self._running += 1

    def job_ended(self) -> None:
        with self._running_lock:
            self._running -= 1

    @property
    def running_jobs(self) -> int:
        return self._running

    def memory_capacity(self) -> int:
        """Bytes a new allocation can take now: free memory, capped by the process's limits."""
        return self.free_bytes()

    def check_fits(self, num_qubits: int, itemsize: int, arrays: int = 2, workspace: int = 0) -> None:
        """Raise :class:`CircuitTooLargeError` unless ``arrays`` states of ``num_qubits`` and
        ``workspace`` bytes fit."""
        needed = state_bytes(num_qubits, itemsize) * arrays + workspace
        free = self.memory_capacity()
        if needed > free:
            detail = f"{arrays} array{'s' if arrays != 1 else ''} of 2^{num_qubits} x {itemsize} bytes"
            if workspace:
                detail += f" and {workspace >> 20} MiB of workspace"
            raise too_large_error(self.kind, num_qubits, itemsize, needed, free, detail)

    @property
    def name(self) -> str:
        return self.kind if self.kind == "CPU" else f"{self.kind}:{self.device_id}"


def state_bytes(num_qubits: int, itemsize: int) -> int:
    return (1 << num_qubits) * itemsize


def byte_count(value: int) -> str:
    """``value`` bytes for a message: with thousands separators, or as a power of two past 2^64
    (a state of thousands of qubits has more digits than Python converts to text by default)."""
    value = int(value)
    if value.bit_length() <= 64:
        return f"{value:,}"
    return f"about 2^{value.bit_length() - 1}"


def too_large_error(kind: str, num_qubits: int, itemsize: int, needed: int, free: int, detail: str) -> CircuitTooLargeError:
    """The error for a state that does not fit, with advice that applies to this run."""
    advice = "use fewer qubits, precision='single', or another device" if itemsize > 8 else "use fewer qubits or another device"
    return CircuitTooLargeError(
        f"a {num_qubits}-qubit state needs {byte_count(needed)} bytes on the {kind} ({detail}) "
        f"but only {byte_count(free)} bytes are free; {advice}",
        num_qubits=num_qubits,
        bytes_needed=needed,
        bytes_free=free,
    )


class _NullContext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


class CPUDevice(Device):
    kind = "CPU"
    xp = np

    def new_event(self) -> HostEvent:
        return HostEvent()

    def stream(self):
        return _NullContext()

    def free_bytes(self) -> int:
        return host_available_bytes()

    def memory_capacity(self) -> int:
        return min(host_available_bytes(), process_limit_bytes())

    def total_bytes(self) -> int:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")

    def to_host(self, array) -> np.ndarray:
        return array

    def to_device(self, array):
        return np.asarray(array)


def host_available_bytes() -> int:
    """Memory the host can hand out now (MemAvailable on Linux)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def process_limit_bytes() -> int:
    """What this process may still allocate under its own limits (a huge number when unlimited).

    The address-space and data-segment rlimits (``ulimit -v`` / ``-d``) less what
    the process already maps, and the cgroup memory limit (containers) less the
    cgroup's usage, whichever is least.
    """
    room = [1 << 62]
    status = _proc_status_bytes(("VmSize", "VmData"))
    try:
        import resource

        for limit, used in ((resource.RLIMIT_AS, status.get("VmSize")), (resource.RLIMIT_DATA, status.get("VmData"))):
            soft, _ = resource.getrlimit(limit)
            if soft != resource.RLIM_INFINITY and used is not None:
                room.append(max(soft - used, 0))
    except (ImportError, OSError, ValueError):
        pass
    cgroup = cgroup_room_bytes()
    if cgroup is not None:
        room.append(cgroup)
    return min(room)


def _proc_status_bytes(keys) -> dict:
    found: dict = {}
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                key, _, value = line.partition(":")
                if key in keys:
                    found[key] = int(value.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return found


_CGROUP_FILES = (
    ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),  # cgroup v2
    ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),  # v1
)


def cgroup_room_bytes():
    """The cgroup memory limit less its usage, or None where no limit is set."""
    for limit_path, usage_path in _CGROUP_FILES:
        try:
            with open(limit_path, encoding="ascii") as f:
                limit = f.read().strip()
            with open(usage_path, encoding="ascii") as f:
                usage = int(f.read().strip())
        except (OSError, ValueError):
            continue
        if limit == "max" or not limit.isdigit() or int(limit) >= 1 << 60:
            return None
        return max(int(limit) - usage, 0)
    return None


class GPUDevice(Device):
    """One CUDA device through CuPy; each job gets its own stream from a pool."""

    kind = "GPU"

    def __init__(self, device_id: int) -> None:
        super().__init__()
        import cupy

        self.xp = cupy
        self.device_id = device_id
        self._cupy = cupy
        self._streams: list = []
        self._lock = threading.Lock()
        with cupy.cuda.Device(device_id):
            self._pool = cupy.get_default_memory_pool()

    def new_event(self):
        # Status and progress only ask whether an event was reached: no timing.
        return self._cupy.cuda.Event(block=False, disable_timing=True)

    def stream(self):
        return _GPUStreamContext(self)

    def _take_stream(self):
        with self._lock:
            if self._streams:
                return self._streams.pop()
        with self._cupy.cuda.Device(self.device_id):
            return self._cupy.cuda.Stream(non_blocking=True)

    def _give_stream(self, stream) -> None:
        with self._lock:
            self._streams.append(stream)

    def free_bytes(self) -> int:
        with self._cupy.cuda.Device(self.device_id):
            free, _ = self._cupy.cuda.runtime.memGetInfo()
            return int(free) + int(self._pool.free_bytes())

    def total_bytes(self) -> int:
        with self._cupy.cuda.Device(self.device_id):
            return int(self._cupy.cuda.runtime.memGetInfo()[1])

    def to_host(self, array) -> np.ndarray:
        return self._cupy.asnumpy(array)

    def to_device(self, array):
        return self._cupy.asarray(array)

    def release_memory(self) -> None:
        """Empty the memory pool's cache only when it holds much and no job runs here.

        Freeing blocks synchronizes the device, which would stall the other
        jobs' streams, and a kept cache lets the next job of the same size
        allocate without cudaMalloc. A large cache left by a finished job is
        given back once the device is idle, so other processes get the memory;
        while jobs run, CuPy's pool empties its cache itself before it reports
        out of memory, and the memory check counts cached blocks as free.
        """
        if self.running_jobs > 0:
            return
        with self._cupy.cuda.Device(self.device_id):
            if self._pool.free_bytes() > self.total_bytes() * POOL_CACHE_FRACTION:
                self._pool.free_all_blocks()


class _GPUStreamContext:
    def __init__(self, device: GPUDevice) -> None:
        self._device = device
        self._cuda_device = device._cupy.cuda.Device(device.device_id)

    def __enter__(self):
        self._cuda_device.__enter__()
        self.stream = self._device._take_stream()
        self.stream.__enter__()
        return self.stream

    def __exit__(self, *exc):
        self.stream.__exit__(*exc)
        self._device._give_stream(self.stream)
        self._cuda_device.__exit__(*exc)
        return False


_DEVICES: dict = {}
_DEVICES_LOCK = threading.Lock()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def check_device_option(device, device_id) -> None:
    """Raise :class:`InvalidOptionError` unless ``device`` and ``device_id`` are well formed."""
    if not isinstance(device, str) or device.upper() not in {name.upper() for name in DEVICE_NAMES}:
        raise InvalidOptionError(f"device must be one of {DEVICE_NAMES}, not {device!r}")
    if isinstance(device_id, bool) or not isinstance(device_id, (int, np.integer)) or device_id < 0:
        raise InvalidOptionError(f"device_id must be a non-negative integer, not {device_id!r}")


def resolve_device(device: str = "auto", device_id: int = 0) -> tuple[Device, str]:
    """Pick the device for a run; returns it with the reason when auto chose the CPU.

    ``device="GPU"`` where no GPU is usable raises :class:`DeviceUnavailableError`
    with the probe's reason: never a silent fallback from a device that was asked for.
    """
    check_device_option(device, device_id)
    wanted = device.upper()
    if wanted == "CPU":
        return _cached("CPU", 0, CPUDevice), ""
    probe = probe_gpu()
    if not probe.usable:
        if wanted == "GPU":
            raise DeviceUnavailableError(
                f"device='GPU' was asked for but no GPU is usable: {probe.reason}. "
                "Use device='CPU' or device='auto' to run on the CPU.",
                reason=probe.reason,
            )
        _log_fallback(probe.reason)
        return _cached("CPU", 0, CPUDevice), probe.reason
    if device_id >= probe.device_count:
        raise InvalidOptionError(
            f"device_id={device_id} does not exist: this machine has {probe.device_count} GPU(s) "
            f"({', '.join(probe.names)}); use 0..{probe.device_count - 1}"
        )
    return _cached("GPU", int(device_id), lambda: GPUDevice(int(device_id))), ""


_LOGGED_REASONS: set = set()


def _log_fallback(reason: str) -> None:
    """Log why auto chose the CPU once per process (each result's metadata carries it anyway)."""
    with _DEVICES_LOCK:
        if reason in _LOGGED_REASONS:
            return
        _LOGGED_REASONS.add(reason)
    logger.info("gpu_provider runs on the CPU: %s", reason)


def _cached(kind: str, device_id: int, factory) -> Device:
    key = (kind, device_id)
    with _DEVICES_LOCK:
        if key not in _DEVICES:
            _DEVICES[key] = factory()
        return _DEVICES[key]
