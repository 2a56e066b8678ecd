"""How many BLAS threads the CPU engine's products use while a job runs.

On the CPU a dense gate is one BLAS matrix product (OpenBLAS's, through
NumPy), and OpenBLAS splits a product over all the cores it found. On a state
of a few thousand amplitudes a product takes tens of microseconds; its threads
hand off work and wait for each other, and wherever the cores are busy (other
processes, parallel tests, or two of our own jobs at once) a thread that lost
its core holds up the product for a scheduler slice. Measured on 2 cores under
load, 14-qubit circuits ran 1.7-3x slower with two threads than with one
(medians; single runs up to 16x), and a single product up to 240x
(docs/benchmarks.md, "BLAS threads").

So, as Qiskit Aer does with its OpenMP threads:

- a job whose widest state has at most ``parallel_threshold`` qubits (Aer's
  ``statevector_parallel_threshold``, 14 by default) runs its products on one
  thread; wider ones may use ``max_parallel_threads`` (0: every core);
- jobs that run at the same time share the cores: with two jobs on 2 cores,
  each gets one thread;
- the count is never raised above what the process had when the first of our
  jobs started (the user's ``OPENBLAS_NUM_THREADS``, ``threadpoolctl`` limit,
  or an MPI rank's share), and is put back when the last one ends.

The limit is process-wide (OpenBLAS's pthreads build has one thread pool per
process), so while a small job runs the user's own NumPy products in other
threads also use one thread. OpenBLAS's count is set through its own C entry
point: ``threadpoolctl`` (which finds the library) lets only the first thread
that set a limit change it, and jobs run in worker threads. Without
``threadpoolctl`` or a recognised BLAS nothing is changed.

This module imports neither Qiskit nor any host framework.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import threading
from typing import Any, Iterator, Optional

logger = logging.getLogger(__name__)

# Aer's default: states of up to this many qubits run their products on one thread.
DEFAULT_PARALLEL_THRESHOLD = 14


def cores() -> int:
    """The cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def threads_for(num_qubits: int, max_parallel_threads: int = 0, parallel_threshold: int = DEFAULT_PARALLEL_THRESHOLD) -> int:
    """The BLAS threads a job whose widest state has ``num_qubits`` qubits asks for."""
    if num_qubits <= parallel_threshold:
        return 1
    available = cores()
    return available if max_parallel_threads <= 0 else max(1, min(available, max_parallel_threads))


class _Setter:
    """Reads and sets the thread count of the BLAS library NumPy loaded."""

    def __init__(self, controller: Any) -> None:
        self._controller = controller
        self._get = self._set = None
        if controller.internal_api == "openblas" and getattr(controller, "threading_layer", None) != "openmp":
            # Its C entry points, whichever thread calls (threadpoolctl ignores any but its first caller).
            dynlib = getattr(controller, "dynlib", None)
            for prefix, suffix in itertools.product(("", "scipy_"), ("", "64_", "_64")):
                get = getattr(dynlib, f"{prefix}openblas_get_num_threads{suffix}", None)
                put = getattr(dynlib, f"{prefix}openblas_set_num_threads{suffix}", None)
                if get is not None and put is not None:
                    self._get, self._set = get, put
                    break

    def get(self) -> Optional[int]:
        value = self._get() if self._get is not None else self._controller.get_num_threads()
        return int(value) if value else None

    def set(self, count: int) -> None:
        if self._set is not None:
            self._set(int(count))
        else:
            self._controller.set_num_threads(int(count))


def _in_numpy(path: str) -> bool:
    """Whether a library file is NumPy's own (numpy.libs/ on Linux and Windows, numpy/.dylibs/ on macOS)."""
    parts = path.replace("\\", "/").split("/")
    folder, parent = parts[-2] if len(parts) > 1 else "", parts[-3] if len(parts) > 2 else ""
    return folder == "numpy.libs" or (folder in (".libs", ".dylibs") and parent == "numpy")


def _find_setter() -> Optional[_Setter]:
    try:
        import numpy  # noqa: F401  (loads the BLAS the controller looks for)
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return None
    try:
        controllers = ThreadpoolController().select(user_api="blas").lib_controllers
    except Exception:  # an unusual library layout must never fail a job
        logger.debug("could not inspect the BLAS libraries", exc_info=True)
        return None
    if not controllers:
        return None
    # SciPy's wheels bring an OpenBLAS of their own; the engine's products run in NumPy's.
    numpy_own = [controller for controller in controllers if _in_numpy(controller.filepath)]
    return _Setter((numpy_own or controllers)[0])


class BlasThreads:
    """The process's BLAS thread count while jobs run: the smallest ask of the jobs running
    now, at most their share of the cores, never above the count found before the first one."""

    def __init__(self, setter: Any = None) -> None:
        self._lock = threading.Lock()
        self._asks: dict = {}  # one entry per running hold: its ask
        self._setter = setter
        self._looked = setter is not None
        self._found: Optional[int] = None  # the count before the first running job
        self._current: Optional[int] = None
        self._inherited: Optional[tuple] = None  # in a child forked during a job: (its count, the count before)

    def _library(self) -> Any:
        if not self._looked:
            self._looked = True
            self._setter = _find_setter()
        return self._setter

    @contextlib.contextmanager
    def hold(self, threads: int) -> Iterator[None]:
        """Run the body with at most ``threads`` BLAS threads (shared with other holders)."""
        token = object()  # this hold's entry (a child forked during it drops every entry: see after_fork)
        with self._lock:
            self._asks[token] = max(1, int(threads))
            self._apply()
        try:
            yield
        finally:
            with self._lock:
                if self._asks.pop(token, None) is not None:
                    self._apply()

    def set_ceiling(self, threads: int) -> None:
        """Set the count outside jobs (an MPI rank's share of its node): later jobs never exceed it."""
        with self._lock:
            setter = self._library()
            if setter is None:
                return
            if self._asks:
                self._found = max(1, int(threads))
                self._apply()
            else:
                self._safe_set(setter, max(1, int(threads)))

    def _apply(self) -> None:
        setter = self._library()
        if setter is None:
            return
        if not self._asks:
            if self._found is not None and self._current != self._found:
                self._safe_set(setter, self._found)
            self._found = self._current = None
            return
        if self._found is None:
            try:
                self._current = self._found = setter.get() or cores()
            except Exception:
                logger.debug("could not read the BLAS thread count", exc_info=True)
                self._setter = None
                return
            if self._inherited is not None:  # a forked child's first job: the parent's count before its jobs
                if self._current == self._inherited[0]:
                    self._found = self._inherited[1]
                self._inherited = None
        share = max(1, cores() // len(self._asks))
        wanted = max(1, min(self._found, share, *self._asks.values()))
        if wanted != self._current:
            self._safe_set(setter, wanted)

    def _safe_set(self, setter: Any, count: int) -> None:
        try:
            setter.set(count)
            self._current = count
        except Exception:  # a library that refuses must never fail a job: leave its count alone
            logger.debug("could not set the BLAS thread count to %d", count, exc_info=True)
            self._setter = None

    def after_fork(self) -> None:
        """In a forked child: the parent's jobs do not exist here. The library is not called in
        the fork handler; the child keeps the count it inherited until its first job, which
        starts from the count the parent had before its jobs (unless the child changed it)."""
        self._lock = threading.Lock()
        if self._asks and self._found is not None:
            self._inherited = (self._current, self._found)
        self._asks = {}
        self._found = self._current = None

BLAS_THREADS = BlasThreads()

if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=BLAS_THREADS.after_fork)
