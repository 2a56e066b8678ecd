"""One statevector over the ranks of an MPI communicator (mpi4py), on either device.

With 2^k ranks, each rank holds 2^(n-k) amplitudes in an ordinary
:class:`~gpu_provider.engine.statevector.StateVector` (its "local" qubits,
called slots here) on its own device; the k "global" qubits are the bits of the
rank number. Which logical qubit sits on which slot or rank bit is a layout
that changes as the circuit runs:

- a gate whose targets are all local runs through the local state's usual path
  (GPU kernels or the NumPy engine), unchanged;
- a control or a diagonal factor on a global qubit needs no data: each rank
  knows the value of its global bits, so it drops the control (or skips the
  gate) and slices the diagonal;
- before a gate that targets a global qubit, that qubit is swapped with a local
  slot (an index-bit swap): each rank exchanges half of its amplitudes with
  the partner rank whose number differs in that bit. The slot given up is the
  one whose next use lies furthest ahead in the program (Belady's rule over
  the op sequence, :class:`SwapPlanner`), and the first layout puts the qubits
  used last on the rank bits, so swaps are few;
- measurement, reset, sampling, expectation values and the final state use
  collective reductions, and every rank returns the same result for a seed.
  Sampling reads the state in canonical order (the top k qubits on the rank
  bits), so it draws exactly what one process draws from the same state.

Ranks stop only together, at sync points (one small all-reduce of stop
flags before every exchange and reduction, every ``SYNC_OPS`` ops, per shot
and at the end): a rank that fails or is cancelled raises its flag there, so
every rank ends the job at the same point, no exchange is left half done and
no wait can block on a rank that left. Each job has its own duplicated
communicators.

mpi4py is imported only when a distributed run is asked for.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import os
import time
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

from ..errors import DeviceUnavailableError, DistributedError, InvalidInputError, JobCancelledError
from .program import (
    CONTROL_FLOW,
    Initialize,
    LoopBodies,
    PauliEvolution,
    Reset,
    Unitary,
    op_bodies,
)
from .statevector import StateVector
from .threads import BLAS_THREADS, cores

# Amplitudes exchanged per message (2^20: 16 MiB in complex128), so the exchange
# buffers stay small whatever the state's size.
CHUNK_QUBITS = 20
# How long a wait on another rank sleeps between polls once it has spun a while.
POLL_SECONDS = 50e-6
_SPINS_BEFORE_SLEEP = 1000
# Bytes of exchange buffers a rank holds beside its state (send, receive, and a device staging buffer).
EXCHANGE_BYTES = 3 * (16 << CHUNK_QUBITS)
# Tag of control-channel messages (cancel / error notices).
_CONTROL_TAG = 7
# A sync point (where every rank learns whether another stopped) at least every this many ops.
SYNC_OPS = 64
# How far ahead the swap planner looks for a slot's next use.
PLAN_HORIZON = 512


def load_mpi():
    """mpi4py's ``MPI`` module, or a typed error saying how to get it."""
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise DeviceUnavailableError(
            "mpi=True needs mpi4py and an MPI library: pip install 'gpu_provider[mpi]' (mpi4py with the MPICH "
            "wheel), then start the script with mpiexec -n 2^k python script.py",
            reason=f"mpi4py is not importable: {exc}",
        ) from exc
    except Exception as exc:  # mpi4py present, the MPI shared library is not
        raise DeviceUnavailableError(
            "mpi4py is installed but its MPI library cannot be loaded; install one (pip install mpich, or your "
            "cluster's MPI module) and start the script with mpiexec",
            reason=f"loading MPI failed: {type(exc).__name__}: {exc}",
        ) from exc
    return MPI


def global_qubits_for(size: int) -> int:
    """k for 2^k ranks; a typed error for a rank count that is not a power of two."""
    if size < 1 or size & (size - 1):
        raise InvalidInputError(
            f"a distributed statevector needs a power-of-two number of ranks (1, 2, 4, 8, ...), not {size}; "
            "start mpiexec with -n 2^k"
        )
    return size.bit_length() - 1


def local_qubits_needed(ops) -> int:
    """How many qubits a gate of ``ops`` needs on one rank at once: the widest set of targets.

    Controls and diagonals never need to be local; targets of dense gates,
    initialize and Pauli evolutions do, and a reset's qubit.
    """
    need = 1
    for op in ops:
        if isinstance(op, (Unitary, Initialize, PauliEvolution)):
            need = max(need, len(op.qubits))
        elif isinstance(op, CONTROL_FLOW):
            for body in op_bodies(op):
                need = max(need, local_qubits_needed(body))
    return need


def _needs_local(op) -> Optional[frozenset]:
    """The qubits ``op`` needs on local slots, or None when it needs none there."""
    if isinstance(op, (Unitary, Initialize, PauliEvolution)):
        return frozenset(op.qubits)
    if isinstance(op, Reset):
        return frozenset((op.qubit,))
    return None


def _usage(ops) -> list:
    """The qubit sets ops need local, in program order (control-flow bodies flattened once): the planner's input."""
    out = []
    for op in ops:
        need = _needs_local(op)
        if need is not None:
            out.append(need)
        elif isinstance(op, CONTROL_FLOW):
            for body in op_bodies(op):
                out.extend(_usage(body))
    return out


# Fields that name things without changing what runs (Qiskit numbers unnamed circuits per process).
_COSMETIC_FIELDS = frozenset({"name", "label"})


def job_digest(*values) -> str:
    """A digest of programs, configs and plain values, to check that every rank runs the same job."""
    digest = hashlib.blake2b(digest_size=16)

    def feed(value) -> None:
        if isinstance(value, np.ndarray):
            digest.update(str(value.dtype).encode() + str(value.shape).encode())
            digest.update(np.ascontiguousarray(value).tobytes())
        elif isinstance(value, LoopBodies):
            digest.update(b"loop%d" % len(value))
            feed(tuple(value.values) if len(value) <= 4096 else (len(value),))
            feed(value.first)
        elif isinstance(value, (tuple, list)):
            digest.update(b"(%d" % len(value))
            for item in value:
                feed(item)
            digest.update(b")")
        elif hasattr(value, "__dataclass_fields__"):
            digest.update(type(value).__name__.encode())
            for name in value.__dataclass_fields__:
                if name not in _COSMETIC_FIELDS:
                    feed(getattr(value, name))
        else:
            digest.update(type(value).__name__.encode() + repr(value).encode())

    feed(values)
    return digest.hexdigest()


def check_split(name: str, num_qubits: int, global_qubits: int, ops) -> None:
    """Refuse a circuit that 2^global_qubits ranks cannot split: each rank must hold its widest gate."""
    need = local_qubits_needed(ops)
    local = num_qubits - global_qubits
    if local < need:
        raise InvalidInputError(
            f"circuit {name!r} simulates {num_qubits} qubits; split over {1 << global_qubits} ranks each rank holds "
            f"{max(local, 0)} of them, but its widest gate acts on {need} at once, which must sit on one rank; "
            f"use at most {1 << max(num_qubits - need, 0)} ranks"
        )


def mpi_communicator(option):
    """The communicator the ``mpi`` option asks for (None when off): True means ``MPI.COMM_WORLD``.

    Raises the same typed error on every rank for what each can tell alone: no
    mpi4py or MPI library, MPI without thread support, a rank count that is not a
    power of two.
    """
    if option is None or (isinstance(option, (bool, np.bool_)) and not option):
        return None
    if isinstance(option, np.bool_):
        option = bool(option)
    MPI = load_mpi()
    comm = MPI.COMM_WORLD if option is True else option
    if not isinstance(comm, MPI.Comm):
        raise InvalidInputError(f"mpi must be True, False or an mpi4py communicator, not {type(option).__name__}")
    check_thread_support(MPI)
    global_qubits_for(comm.Get_size())
    return comm


@dataclass(frozen=True)
class Ranks:
    """The MPI ranks a front end splits its states over, and this rank's place on its node."""

    comm: Any
    node_rank: int
    node_ranks: int
    global_qubits: int

    def device(self, device: str, device_id: int):
        """This rank's device and fallback reason: its own GPU on the node, or on the CPU its share of the cores."""
        from .devices import resolve_device

        resolved, reason = resolve_device(device, mpi_device_id(device, device_id, self.node_rank))
        if resolved.kind == "CPU":
            share_cores(self.node_ranks)
        return resolved, reason


def ranks_for(option) -> Optional[Ranks]:
    """The ranks the ``mpi`` option asks for (None when off); collective across them (see node_local_rank)."""
    comm = mpi_communicator(option)
    if comm is None:
        return None
    node_rank, node_ranks = node_local_rank(comm)
    return Ranks(comm, node_rank, node_ranks, global_qubits_for(comm.Get_size()))


def mpi_device_id(device: str, device_id: int, node_rank: int) -> int:
    """Each rank on a node takes its own GPU: (device_id + node rank) modulo the GPUs visible."""
    if str(device).upper() == "CPU":
        return device_id
    from .devices import probe_gpu

    probe = probe_gpu()
    if not probe.usable or probe.device_count < 1:
        return device_id
    return (device_id + node_rank) % probe.device_count


def check_thread_support(MPI) -> None:
    """Jobs run on worker threads while the caller's thread may call MPI too: THREAD_MULTIPLE is needed."""
    if MPI.Query_thread() < MPI.THREAD_MULTIPLE:
        raise DeviceUnavailableError(
            "MPI was initialized without MPI_THREAD_MULTIPLE, but gpu_provider runs each job on a worker thread "
            "while run() may be called from yours; initialize MPI with thread level MULTIPLE (mpi4py's default: "
            "do not set mpi4py.rc.thread_level lower)",
            reason=f"thread level {MPI.Query_thread()}",
        )


_NODE_RANKS: dict = {}
_THREADS_LIMITED: list = []


def node_local_rank(comm) -> tuple[int, int]:
    """This rank's number among the ranks on its node, and how many share the node; collective, cached.

    Used to give each rank a GPU of its own and, on the CPU, a share of the
    cores. Found from the ranks' host names through a non-blocking all-gather
    with the run() timeout, so a rank that never comes makes this raise, not hang.
    """
    import socket

    MPI = load_mpi()
    key = comm.py2f()
    if key not in _NODE_RANKS:
        name = np.zeros(_HOST_BYTES, dtype=np.uint8)
        host = socket.gethostname().encode("utf-8", "replace")[:_HOST_BYTES]
        name[: len(host)] = np.frombuffer(host, dtype=np.uint8)
        names = np.zeros((comm.Get_size(), _HOST_BYTES), dtype=np.uint8)
        _wait_or_timeout(comm.Iallgather([name, MPI.BYTE], [names, MPI.BYTE]), comm.Get_size())
        rank = comm.Get_rank()
        same = [r for r in range(comm.Get_size()) if np.array_equal(names[r], name)]
        _NODE_RANKS[key] = (same.index(rank), len(same))
    return _NODE_RANKS[key]


_HOST_BYTES = 64


def _wait_or_timeout(request, size: int) -> None:
    """Wait for a collective that every rank's run() posts; raise if some rank never comes."""
    timeout = float(os.environ.get("GPU_PROVIDER_MPI_TIMEOUT", AGREE_TIMEOUT_SECONDS))
    deadline = time.monotonic() + timeout
    while not request.Test():
        if time.monotonic() > deadline:
            raise DistributedError(
                f"not every one of the {size} ranks called run() within {timeout:g} s; every rank must call run() "
                "with the same circuits and mpi option (GPU_PROVIDER_MPI_TIMEOUT sets the wait)"
            )
        time.sleep(POLL_SECONDS)


def share_cores(ranks_on_node: int) -> Optional[int]:
    """Limit this process's BLAS threads to its share of the node's cores (once; returns the limit).

    Ranks on one node each running BLAS with a thread per core oversubscribe it
    (on 2 cores, 2 ranks ran an 18-qubit circuit 20x slower). Nothing is changed
    where the user set OMP_NUM_THREADS / OPENBLAS_NUM_THREADS / MKL_NUM_THREADS.
    Set through :data:`~gpu_provider.engine.threads.BLAS_THREADS`, so it works from
    any thread and the jobs' own limits never exceed it.
    """
    import logging

    if _THREADS_LIMITED:
        return _THREADS_LIMITED[0]
    if any(os.environ.get(name) for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")):
        return None
    limit = max(1, cores() // max(1, ranks_on_node))
    BLAS_THREADS.set_ceiling(limit)
    _THREADS_LIMITED.append(limit)
    logging.getLogger(__name__).info("%d MPI ranks share this node: BLAS limited to %d thread(s) per rank", ranks_on_node, limit)
    return limit


# How long run() waits for every rank to reach it (GPU_PROVIDER_MPI_TIMEOUT seconds overrides).
AGREE_TIMEOUT_SECONDS = 300.0
_MESSAGE_BYTES = 480


def agree_on_job(comm, digest: str, seed: int, error: Optional[BaseException], all_seeds: bool = False):
    """Collective, in ``run()`` on every rank: exchange what each rank prepared; return rank 0's seed
    (with ``all_seeds``: also whether every rank gave that same seed).

    A rank whose preparation failed still takes part (with its ``error``), so
    every rank raises, never waits: the rank that failed its own error, the
    others a :class:`DistributedError` naming it; ranks whose circuits or
    options differ (``digest``) all raise too. A rank that never calls run()
    (say, given ``mpi=False``) makes the others raise after
    ``AGREE_TIMEOUT_SECONDS`` instead of waiting forever.
    """
    MPI = load_mpi()
    text = b"" if error is None else f"{type(error).__name__}: {error}".encode("utf-8", "replace")[:_MESSAGE_BYTES]
    record = np.zeros(16 + 8 + 2 + _MESSAGE_BYTES, dtype=np.uint8)
    record[:16] = np.frombuffer(bytes.fromhex(digest.ljust(32, "0")[:32]), dtype=np.uint8)
    record[16:24] = np.frombuffer(np.int64(seed).tobytes(), dtype=np.uint8)
    record[24] = 1 if error is not None else 0
    record[26 : 26 + len(text)] = np.frombuffer(text, dtype=np.uint8)
    size = comm.Get_size()
    records = np.zeros((size, record.size), dtype=np.uint8)
    _wait_or_timeout(comm.Iallgather([record, MPI.BYTE], [records, MPI.BYTE]), size)
    if error is not None:
        raise error
    for rank in range(size):
        if records[rank, 24]:
            message = bytes(records[rank, 26:]).rstrip(b"\0").decode("utf-8", "replace")
            raise DistributedError(f"rank {rank} refused the job, so every rank does: {message}", rank=rank)
    differing = [rank for rank in range(size) if not np.array_equal(records[rank, :16], records[0, :16])]
    if differing:
        raise DistributedError(
            f"the ranks disagree on the job: rank(s) {differing} were given other circuits or options than rank 0; "
            "every rank must call run() with the same circuits and options",
            rank=differing[0],
        )
    seed0 = int(np.frombuffer(records[0, 16:24].tobytes(), dtype=np.int64)[0])
    if all_seeds:
        return seed0, all(np.array_equal(records[rank, 16:24], records[0, 16:24]) for rank in range(size))
    return seed0


def run_on_ranks(group: "RankGroup", execution, work):
    """Run ``work()`` as one rank of ``group``'s job; every rank ends it the same way.

    A rank whose work raised (or was cancelled) takes part in the next sync
    point with its stop flag, so every rank stops there together; the job ends
    with a final sync, after which the job's communicators are freed.
    """
    group.execution = execution
    if execution is not None:
        execution.on_abandon = None
    try:
        result = work()
        group.sync()
    except BaseException as exc:
        group.stop_with(exc)
        group.close_if_stopped_together()
        raise
    group.close()
    return result


def abandon_on_ranks(group: "RankGroup", kind: str, message: str) -> None:
    """A job that ends on this rank without running (cancelled while queued, refused):
    join the job's first sync point with that stop, on a thread of its own, so the
    other ranks stop there instead of waiting for this one."""
    import threading

    error = None if kind == "cancel" else DistributedError(message, rank=group.rank)

    def stop() -> None:
        group.request_stop(kind, error)
        try:
            group.sync()
        except BaseException:
            pass
        group.close_if_stopped_together()

    threading.Thread(target=stop, name="gpu_provider-mpi-abandon", daemon=True).start()


class RankGroup:
    """One job's view of the ranks: its own data and control communicators.

    Made collectively (every rank, in the same order) from the user's
    communicator. Ranks stop only at sync points, all together: before every
    exchange of amplitudes and every reduction, every ``SYNC_OPS`` ops, at each
    shot and sampling chunk, and at the end, one small all-reduce of stop flags
    (go, cancel, error) decides for all. A rank that is cancelled or fails sets
    its flag (and posts its reason on the control channel) and stops at the
    next sync; no rank ever leaves an exchange half done, and no wait can block
    on a rank that left. It also stands in for the job's
    :class:`~gpu_provider.engine.executor.Execution` inside the run
    (``checkpoint``, ``poll_cancel``), so a cancel on any rank stops all.
    """

    def __init__(self, comm) -> None:
        MPI = load_mpi()
        self.MPI = MPI
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()
        self.global_qubits = global_qubits_for(self.size)
        self.data = comm.Dup()
        self.control = comm.Dup()
        self.execution = None  # the local Execution, when the run has one
        self._stop: Optional[tuple] = None  # this rank's (kind, exception or None) once it stops
        self._stopped_together = False  # a sync point has ended the job on every rank
        self._sends: list = []
        self._ops = 0
        self.syncs = 0
        self.swaps = 0
        self.exchanged_bytes = 0
        self.exchange_seconds = 0.0
        self.cuda_aware = _cuda_aware(MPI)
        node = _NODE_RANKS.get(comm.py2f())
        self._oversubscribed = node is not None and node[1] > cores()

    # -- stopping together ------------------------------------------------------

    def request_stop(self, kind: str, error: Optional[BaseException] = None) -> None:
        """Stop this rank at the next sync point ("cancel" or "error"); tell the others why."""
        if self._stop is not None:
            return
        self._stop = (kind, error)
        message = "cancel() was called" if error is None else f"{type(error).__name__}: {error}"
        for other in range(self.size):
            if other != self.rank:
                self._sends.append(self.control.isend((kind, self.rank, message), dest=other, tag=_CONTROL_TAG))

    def stop_with(self, error: BaseException) -> None:
        """This rank's run raised ``error``: unless a sync point already stopped every rank, join the
        next one with it, so the other ranks stop there too."""
        if self._stopped_together:
            return
        self.request_stop("cancel" if isinstance(error, JobCancelledError) else "error", error)
        try:
            self.sync()
        except BaseException:
            pass

    def _watch_cancel(self) -> None:
        if self._stop is None and self.execution is not None and self.execution.cancel_requested:
            self.request_stop("cancel")

    def sync(self) -> None:
        """A sync point: every rank's stop flag, all-reduced; raises on every rank if any stopped."""
        self._reduce(np.zeros(0))

    def _reduce(self, values: np.ndarray) -> np.ndarray:
        """Sum ``values`` over the ranks together with every rank's stop flag, in one all-reduce."""
        self._watch_cancel()
        values = np.ascontiguousarray(values).reshape(-1)
        send = np.zeros(values.size + self.size, dtype=values.dtype if values.size else np.int64)
        send[: values.size] = values
        if self._stop is not None:
            send[values.size + self.rank] = 1 if self._stop[0] == "cancel" else 2
        out = np.empty_like(send)
        self._wait(self.data.Iallreduce(send, out, op=self.MPI.SUM))
        self.syncs += 1
        flags = out[values.size :]
        if flags.any():
            self._stopped(flags)
        return out[: values.size]

    def _stopped(self, flags: np.ndarray) -> None:
        self._stopped_together = True
        if self._stop is not None:
            kind, error = self._stop
            if error is not None:
                raise error
            raise JobCancelledError("cancelled at a checkpoint")
        errors = np.nonzero(flags == 2)[0]
        if errors.size:
            rank = int(errors[0])
            raise DistributedError(f"rank {rank} of the job failed, so every rank stops: {self._reason(rank)}", rank=rank)
        rank = int(np.nonzero(flags)[0][0])
        if self.execution is not None:
            self.execution.request_cancel()
        raise JobCancelledError(f"cancelled on rank {rank}")

    def _reason(self, rank: int) -> str:
        """The reason ``rank`` posted before it joined the sync that stopped the job."""
        MPI = self.MPI
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline:
            status = MPI.Status()
            if self.control.iprobe(source=rank, tag=_CONTROL_TAG, status=status):
                _, _, message = self.control.recv(source=rank, tag=_CONTROL_TAG)
                return message
            time.sleep(POLL_SECONDS)
        return "(no reason received)"

    def _wait(self, *requests) -> None:
        """Wait for MPI requests to complete (they always do: every rank posts its part after a sync).

        Spins a while, then sleeps between polls; where the node has more ranks
        than cores it yields the core at every poll instead, since a spinning
        rank would hold up the one it waits for.
        """
        spins = 0
        pending = list(requests)
        while pending:
            pending = [r for r in pending if not r.Test()]
            if pending:
                spins += 1
                if self._oversubscribed:
                    os.sched_yield()
                elif spins > _SPINS_BEFORE_SLEEP:
                    time.sleep(POLL_SECONDS)

    # -- the Execution surface the interpreter calls -----------------------------

    def checkpoint(self, ops: int = 1) -> None:
        self._watch_cancel()
        if self.execution is not None:
            self.execution.checkpoint(ops, poll=False)
        self._ops += 1
        if self._ops % SYNC_OPS == 0:
            self.sync()

    def poll_cancel(self) -> None:
        self.sync()

    # What a batch of shots (engine/small_shots.py) calls: every rank runs the same chunks and
    # hand-over (a narrow circuit of an MPI job runs whole on each rank), so each chunk's end is
    # a sync point on all of them.

    def advance(self, ops: int) -> None:
        self._watch_cancel()
        if self.execution is not None:
            self.execution.checkpoint(ops, poll=False)
        self.sync()

    @property
    def enqueued(self) -> int:
        return self.execution.enqueued if self.execution is not None else 0

    def rewind(self, mark: int) -> None:
        if self.execution is not None:
            self.execution.rewind(mark)

    # -- collectives ------------------------------------------------------------

    def allreduce(self, values: np.ndarray) -> np.ndarray:
        """Element-wise sum of ``values`` over the ranks, on every rank; also a sync point."""
        return self._reduce(np.asarray(values)).reshape(np.shape(values))

    def allgather(self, part: np.ndarray, full: np.ndarray) -> None:
        """Every rank's ``part`` into ``full``, in rank order (a sync point first)."""
        self.sync()
        self._wait(self.data.Iallgather(part, full))

    def close(self) -> None:
        """Free the communicators after a run every rank finished (once; later calls do nothing)."""
        for comm in (self.data, self.control):
            if comm == self.MPI.COMM_NULL:
                continue
            try:
                comm.Free()  # mpi4py sets the handle to COMM_NULL
            except Exception:
                pass

    def close_if_stopped_together(self) -> None:
        """Free the communicators of a job that stopped early, where a sync point stopped it on
        every rank (so every rank frees them too, as MPI_Comm_free asks); where it did not
        (the sync itself failed), they are left: freeing them alone could wait on the others."""
        if self._stopped_together:
            self.close()

    # -- moving amplitudes ---------------------------------------------------------

    def exchange(self, views, dest: int, source: int, xp) -> None:
        """Send each view in ``views`` to ``dest`` and overwrite it with ``source``'s matching view.

        A sync point first; then chunk by chunk through contiguous buffers:
        device buffers straight to a CUDA-aware MPI, otherwise through host
        buffers (pinned on a GPU). Once started it always completes on every
        rank: a local failure is recorded (the job stops at the next sync) and
        the chunk is still sent and received.
        """
        self.sync()
        start = time.perf_counter()
        buffers = None
        for view in views:
            try:
                if buffers is None or buffers[0].size != view.size:
                    buffers = _exchange_buffers(xp, view.size, view.dtype, self.cuda_aware)
                send, recv, dev = buffers
                if xp is np:
                    np.copyto(send.reshape(view.shape), view)
                elif self.cuda_aware:
                    xp.copyto(send.reshape(view.shape), view)
                    xp.cuda.get_current_stream().synchronize()
                else:
                    xp.copyto(dev.reshape(view.shape), view)
                    dev.get(out=send)
            except Exception as exc:  # still take part in the exchange, then stop at the next sync
                self.request_stop("error", exc)
                send = recv = np.zeros(view.size, dtype=view.dtype)
                buffers = None
            self._wait(self.data.Irecv(recv, source=source, tag=1), self.data.Isend(send, dest=dest, tag=1))
            try:
                if buffers is None:
                    continue
                if xp is np or self.cuda_aware:
                    xp.copyto(view, recv.reshape(view.shape))
                else:
                    dev.set(recv)
                    xp.copyto(view, dev.reshape(view.shape))
            except Exception as exc:
                self.request_stop("error", exc)
            self.exchanged_bytes += send.nbytes
        self.exchange_seconds += time.perf_counter() - start


def _cuda_aware(MPI) -> bool:
    query = getattr(MPI, "Query_cuda_support", None)
    try:
        return bool(query()) if query is not None else False
    except Exception:
        return False


def _exchange_buffers(xp, size: int, dtype, cuda_aware: bool):
    if xp is np:
        return np.empty(size, dtype=dtype), np.empty(size, dtype=dtype), None
    if cuda_aware:
        return xp.empty(size, dtype=dtype), xp.empty(size, dtype=dtype), None
    import cupyx

    send = cupyx.empty_pinned((size,), dtype=dtype)
    recv = cupyx.empty_pinned((size,), dtype=dtype)
    return send, recv, xp.empty(size, dtype=dtype)


def _chunk_views(view, max_elements: int):
    """``view`` (a (2,)*m tensor) cut into sub-views of at most ``max_elements``, in a fixed order."""
    lead = 0
    size = view.size
    while size > max_elements and lead < view.ndim:
        lead += 1
        size //= 2
    for index in itertools.product((0, 1), repeat=lead):
        yield view[index] if index else view


class SwapPlanner:
    """Which slot gives way when a global qubit must come local: Belady's rule over the program.

    ``usage`` is the sequence of qubit sets the program's ops need local. Each
    request is matched to the next entry equal to it (ops that need nothing
    local are skipped), and the slot chosen is the one whose qubit is needed
    again furthest ahead, or never; if a request matches nothing (a run that
    left the plan, e.g. a branch not taken), the least recently used slot.
    """

    def __init__(self, usage: Sequence[frozenset]) -> None:
        self.usage = list(usage)
        self.position = 0
        self.clock = 0
        self.last_used: dict[int, int] = {}

    def initial_globals(self, num_qubits: int, count: int) -> list[int]:
        """The ``count`` qubits to start on the rank bits: those needed local last (or never)."""
        first = {q: len(self.usage) for q in range(num_qubits)}
        for index in range(len(self.usage) - 1, -1, -1):
            for q in self.usage[index]:
                first[q] = index
        ranked = sorted(range(num_qubits), key=lambda q: (first[q], q), reverse=True)
        return sorted(ranked[:count])

    def advance(self, needed: frozenset) -> None:
        self.clock += 1
        for q in needed:
            self.last_used[q] = self.clock
        for index in range(self.position, min(len(self.usage), self.position + PLAN_HORIZON)):
            if self.usage[index] == needed:
                self.position = index + 1
                return

    def victim(self, candidates: Sequence[int]) -> int:
        """The qubit among ``candidates`` (local, not needed now) to send to a rank bit."""
        horizon = self.usage[self.position : self.position + PLAN_HORIZON]
        next_use = {}
        for offset, needed in enumerate(horizon):
            for q in needed:
                if q not in next_use:
                    next_use[q] = offset
        never = len(horizon) + 1
        # Furthest next use first; then least recently used; then the highest qubit.
        return max(candidates, key=lambda q: (next_use.get(q, never), -self.last_used.get(q, 0), q))


class Layout:
    """Where each logical qubit of a split state sits, and the index-bit swaps that move them (no data).

    ``holder[p]`` is the logical qubit at position p: local slot p for
    p < num_local, rank bit p - num_local otherwise; ``where`` is its inverse.
    :meth:`bring_local` decides the swaps a gate needs and returns them, so the
    same decisions serve a run (which moves the amplitudes) and a plan (which
    only counts them, :func:`plan_swaps`).
    """

    def __init__(self, num_qubits: int, global_qubits: int, ops=()) -> None:
        self.num_qubits = num_qubits
        self.num_local = num_qubits - global_qubits
        self.planner = SwapPlanner(_usage(ops))
        self.initial_globals = self.planner.initial_globals(num_qubits, global_qubits)
        self.reset()

    def reset(self) -> None:
        locals_ = [q for q in range(self.num_qubits) if q not in self.initial_globals]
        self.holder = locals_ + list(self.initial_globals)
        self.where = {q: p for p, q in enumerate(self.holder)}
        self.planner.position = 0

    def copy_from(self, other: "Layout") -> None:
        self.holder = list(other.holder)
        self.where = dict(other.where)

    def is_global(self, qubit: int) -> bool:
        return self.where[qubit] >= self.num_local

    def swap(self, position: int, slot: int) -> None:
        a, c = self.holder[position], self.holder[slot]
        self.holder[position], self.holder[slot] = c, a
        self.where[a], self.where[c] = slot, position

    def bring_local(self, qubits: Sequence[int]) -> list:
        """The (rank-bit position, slot) swaps that put every qubit of ``qubits`` on a local slot, applied."""
        needed = frozenset(qubits)
        swaps = []
        for q in qubits:
            if not self.is_global(q):
                continue
            candidates = [self.holder[s] for s in range(self.num_local) if self.holder[s] not in needed]
            if not candidates:
                raise InvalidInputError(
                    f"a gate on {len(needed)} qubits needs them all on one rank, which holds only {self.num_local} "
                    f"of the state's {self.num_qubits} qubits; use fewer ranks"
                )
            victim = self.planner.victim(candidates)
            swap = (self.where[q], self.where[victim])
            self.swap(*swap)
            swaps.append(swap)
        self.planner.advance(needed)
        return swaps

    def canonical_swaps(self) -> list:
        """The swaps that put the top qubits on the rank bits (in some order), applied."""
        nl, n = self.num_local, self.num_qubits
        swaps = []
        for target in range(nl, n):
            if not self.is_global(target):
                position = next(p for p in range(nl, n) if self.holder[p] < nl)
                swap = (position, self.where[target])
                self.swap(*swap)
                swaps.append(swap)
        return swaps


def plan_swaps(ops, num_qubits: int, global_qubits: int) -> dict:
    """Count what a split run of ``ops`` exchanges, without running it: for the planned numbers in the docs.

    Returns the index-bit swaps the gates need (each moves half of every rank's
    amplitudes to its partner) and those that bring the state to canonical
    order for sampling at the end.
    """
    layout = Layout(num_qubits, global_qubits, ops)
    gates = 0
    for needed in _usage(ops):
        gates += len(layout.bring_local(sorted(needed)))
    return {"gate_swaps": gates, "final_swaps": len(layout.canonical_swaps())}


class DistributedStateVector:
    """An n-qubit state split over the 2^k ranks of a :class:`RankGroup`; the surface of a StateVector.

    ``holder[p]`` is the logical qubit at position p: a local slot for p < n - k,
    rank bit p - (n - k) otherwise; ``where`` is its inverse. The local
    :class:`StateVector` is indexed by slots.
    """

    distributed = True

    def __init__(self, xp, num_qubits: int, dtype, kernels, group: RankGroup, ops=()) -> None:
        k = group.global_qubits
        self.num_qubits = num_qubits
        self.num_local = num_qubits - k
        if self.num_local < 1:
            raise InvalidInputError(f"a {num_qubits}-qubit state cannot be split over {group.size} ranks")
        self.group = group
        self.xp = xp
        self.dtype = np.dtype(dtype)
        self.kernels = kernels
        self.local = StateVector(xp, self.num_local, dtype, kernels)
        self.layout = Layout(num_qubits, k, ops)
        if group.rank != 0:
            self.local.data.fill(0)  # |0...0> lives on the rank whose global bits are all 0

    # -- layout --------------------------------------------------------------

    @property
    def where(self) -> dict:
        return self.layout.where

    @property
    def holder(self) -> list:
        return self.layout.holder

    def _rank_bit(self, position: int) -> int:
        return (self.group.rank >> (position - self.num_local)) & 1

    def _is_global(self, qubit: int) -> bool:
        return self.layout.where[qubit] >= self.num_local

    def _localize(self, qubits: Sequence[int]) -> None:
        """Bring every qubit of ``qubits`` onto a local slot (index-bit swaps as needed)."""
        for position, slot in self.layout.bring_local(qubits):
            self._exchange_half(position, slot)

    def _exchange_half(self, position: int, slot: int) -> None:
        """The data of an index-bit swap of rank bit ``position - num_local`` with local ``slot``.

        A rank whose bit is b keeps the half where the slot's bit is b and
        exchanges the other half with the partner rank (bit 1 - b).
        """
        group = self.group
        j = position - self.num_local
        b = (group.rank >> j) & 1
        partner = group.rank ^ (1 << j)
        local = self.local
        index = [slice(None)] * self.num_local
        index[local.axis(slot)] = 1 - b
        half = local._tensor()[tuple(index)]
        group.exchange(list(_chunk_views(half, 1 << CHUNK_QUBITS)), partner, partner, self.xp)
        group.swaps += 1

    def _split_controls(self, controls: Sequence[int], ctrl_state: int):
        """Local controls and their state, or None when a global control is off on this rank."""
        local_controls, local_state = [], 0
        for i, c in enumerate(controls):
            want = (ctrl_state >> i) & 1
            if self._is_global(c):
                if self._rank_bit(self.where[c]) != want:
                    return None
            else:
                local_state |= want << len(local_controls)
                local_controls.append(self.where[c])
        return local_controls, local_state

    # -- gates -------------------------------------------------------------------

    def preload(self, arrays) -> None:
        self.local.preload(arrays)

    def apply_unitary(self, qubits: Sequence[int], matrix: np.ndarray) -> None:
        self._localize(qubits)
        self.local.apply_unitary([self.where[q] for q in qubits], matrix)

    def apply_controlled(self, controls: Sequence[int], ctrl_state: int, qubits: Sequence[int], matrix: np.ndarray) -> None:
        self._localize(qubits)
        split = self._split_controls(controls, ctrl_state)
        if split is None:
            return
        local_controls, local_state = split
        self.local.apply_controlled(local_controls, local_state, [self.where[q] for q in qubits], matrix)

    def apply_diagonal(self, qubits: Sequence[int], diagonal: np.ndarray) -> None:
        k = len(qubits)
        fixed = [(j, q) for j, q in enumerate(qubits) if self._is_global(q)]
        if fixed:
            # Bit j of the diagonal's index is qubits[j]: fix the global bits to this rank's values.
            tensor = np.asarray(diagonal).reshape((2,) * k) if k else np.asarray(diagonal)
            index = [slice(None)] * k
            for j, q in fixed:
                index[k - 1 - j] = self._rank_bit(self.where[q])
            diagonal = np.ascontiguousarray(tensor[tuple(index)]).reshape(-1)
            qubits = [q for q in qubits if not self._is_global(q)]
        self.local.apply_diagonal([self.where[q] for q in qubits], diagonal)

    def apply_pauli_evolution(self, qubits, x_masks, z_masks, angles) -> None:
        self._localize(qubits)
        self.local.apply_pauli_evolution([self.where[q] for q in qubits], x_masks, z_masks, angles)

    def apply_phase(self, phase: float) -> None:
        self.local.apply_phase(phase)

    def initialize(self, qubits: Sequence[int], vector: np.ndarray) -> None:
        self._localize(qubits)
        self.local.initialize([self.where[q] for q in qubits], vector)

    # -- measurement ---------------------------------------------------------------

    def _local_norm(self) -> float:
        data = self.local.data
        return float(self.xp.vdot(data, data).real)

    def probability_one(self, qubit: int) -> float:
        if self._is_global(qubit):
            part = self._local_norm() if self._rank_bit(self.where[qubit]) else 0.0
        else:
            part = self.local.probability_one(self.where[qubit])
        return float(self.group.allreduce(np.array([part]))[0])

    # The same rule as one process (probability_one and collapse are this class's).
    measure = StateVector.measure

    def collapse(self, qubit: int, outcome: int, probability: float, flip: bool = False) -> None:
        if flip and self._is_global(qubit):
            self._localize([qubit])
        if not self._is_global(qubit):
            self.local.collapse(self.where[qubit], outcome, probability, flip)
            return
        if self._rank_bit(self.where[qubit]) == outcome:
            self.local.data *= self.dtype.type(1.0 / math.sqrt(probability))
        else:
            self.local.data.fill(0)

    # -- canonical order ------------------------------------------------------------

    def canonicalize(self) -> None:
        """Top k qubits on the rank bits in order, the local state in canonical order.

        Then rank r holds global indices r * 2^(n-k) ... in order, as one process would.
        """
        nl, n = self.num_local, self.num_qubits
        for position, slot in self.layout.canonical_swaps():
            self._exchange_half(position, slot)
        # The rank bits now hold the top qubits in some order: move each rank's data where it belongs.
        dest = 0
        for p in range(nl, n):
            dest |= self._rank_bit(p) << (self.holder[p] - nl)
        if any(self.holder[p] != p for p in range(nl, n)):  # the same answer on every rank
            source = next(
                r for r in range(self.group.size)
                if sum((((r >> (p - nl)) & 1) << (self.holder[p] - nl)) for p in range(nl, n)) == self.group.rank
            )
            views = list(_chunk_views(self.local._tensor(), 1 << CHUNK_QUBITS))
            self.group.exchange(views, dest, source, self.xp)
            for p in range(nl, n):
                self.holder[p] = p
        # Local slots: rename so slot s holds qubit s, then put the local state in canonical order.
        local = self.local
        local.order = [self.holder[s] for s in local.order]
        for s in range(nl):
            self.holder[s] = s
        self.layout.where = {q: q for q in range(n)}
        local.to_canonical()

    # -- sampling --------------------------------------------------------------------

    def sampling_table(self):
        self.canonicalize()
        row_probs, row_cdf = self.local.sampling_table()
        local_total = float(row_cdf[-1]) if row_cdf.shape[0] else 0.0
        totals = np.zeros(self.group.size)
        totals[self.group.rank] = local_total
        totals = self.group.allreduce(totals)
        return row_probs, row_cdf, np.cumsum(totals)

    def sample_chunk_shots(self) -> int:
        return self.local.sample_chunk_shots()

    def sample(self, qubits: Sequence[int], shots: int, rng: np.random.Generator, table=None) -> np.ndarray:
        """Draw as one process draws from the same state: the same uniforms, one inverse cdf in canonical order."""
        if table is None:
            table = self.sampling_table()
        row_probs, row_cdf, rank_cdf = table
        total = float(rank_cdf[-1])
        uniforms = rng.random(shots) * total
        owner = np.minimum(np.searchsorted(rank_cdf, uniforms, side="right"), self.group.size - 1)
        # A draw at the very end belongs to the last rank with any weight.
        weighted = np.nonzero(np.diff(np.concatenate([[0.0], rank_cdf])) > 0)[0]
        if weighted.size:
            owner = np.minimum(owner, weighted[-1])
        mine = np.nonzero(owner == self.group.rank)[0]
        index = np.zeros(shots, dtype=np.int64)
        if mine.size:
            offset = rank_cdf[self.group.rank - 1] if self.group.rank else 0.0
            local_index = self.local.sample_indices(uniforms[mine] - offset, (row_probs, row_cdf))
            index[mine] = local_index + (self.group.rank << self.num_local)
        index = self.group.allreduce(index)
        out = np.zeros(shots, dtype=np.int64)
        for j, q in enumerate(qubits):
            out |= ((index >> q) & 1) << j
        return out

    def to_host(self) -> np.ndarray:
        """The whole state, in canonical order, on every rank's host."""
        self.canonicalize()
        part = self.local.to_host()
        full = np.empty(part.size * self.group.size, dtype=part.dtype)
        self.group.allgather(part, full)
        return full

    # -- copies ------------------------------------------------------------------------

    def snapshot(self, in_place: bool = False) -> "DistributedStateVector":
        """A copy of every rank's part. ``in_place`` is not taken here: the ranks' exchanges use
        the parts' buffers, so a copy keeps them (the callers count two arrays per rank)."""
        twin = DistributedStateVector.__new__(DistributedStateVector)
        twin.__dict__.update(self.__dict__)
        twin.local = self.local.snapshot()
        twin.layout = Layout.__new__(Layout)
        twin.layout.__dict__.update(self.layout.__dict__)  # the planner is shared: it only guides choices
        twin.layout.copy_from(self.layout)
        return twin

    def copy_from(self, other: "DistributedStateVector") -> None:
        self.local.copy_from(other.local)
        self.layout.copy_from(other.layout)

    def reset_to_zero(self) -> None:
        self.local.reset_to_zero()
        if self.group.rank != 0:
            self.local.data.fill(0)
        self.layout.reset()

    # -- expectation values ---------------------------------------------------------------

    def expectation_values(self, observables) -> np.ndarray:
        """``<psi|O|psi>`` for each :class:`~gpu_provider.engine.expectation.PauliSum`, on every rank.

        Per X mask: its global qubits are brought local (the flip must pair
        amplitudes on one rank); Z factors on global qubits are this rank's sign.
        The local sums go through the local state's own path, then one reduction.
        """
        from .expectation import PauliSum, _term_table, expectation_values

        n = self.num_qubits
        for index, observable in enumerate(observables):
            if observable.num_qubits != n:
                raise InvalidInputError(f"observable {index} acts on {observable.num_qubits} qubits but the state has {n}")
        out = np.zeros(len(observables), dtype=np.complex128)
        if observables and any(o.num_terms for o in observables):
            x, z, weights = _term_table(observables, n)
            for x_mask in np.unique(x):
                members = np.nonzero(x == x_mask)[0]
                flipped = [q for q in range(n) if (int(x_mask) >> q) & 1]
                if any(self._is_global(q) for q in flipped):
                    self._localize(flipped)
                signs = np.ones(len(members))
                local_x = self._local_mask(int(x_mask))
                local_z = np.zeros(len(members), dtype=np.uint64)
                for i, t in enumerate(members):
                    zt = int(z[t])
                    for q in range(n):
                        if (zt >> q) & 1:
                            if self._is_global(q):
                                if self._rank_bit(self.where[q]):
                                    signs[i] = -signs[i]
                            else:
                                local_z[i] |= np.uint64(1 << self.where[q])
                group_observables = [
                    PauliSum(self.num_local, np.full(len(members), local_x, dtype=np.uint64), local_z, weights[o, members] * signs)
                    for o in range(len(observables))
                ]
                out += expectation_values(self.local, group_observables)
        parts = np.concatenate([out.real, out.imag])
        total = self.group.allreduce(parts)
        return total[: len(observables)] + 1j * total[len(observables) :]

    def marginal_probabilities(self, qubits: Sequence[int]) -> np.ndarray:
        """Probabilities of the 2^k outcomes of measuring ``qubits`` (bit j = ``qubits[j]``), on every rank.

        In canonical order a rank's global qubits have fixed values (its rank
        bits): it sums its local marginal into the outcomes those values select,
        and one reduction adds the ranks.
        """
        from .observables import marginal_probabilities

        self.canonicalize()
        nl = self.num_local
        local = [(j, q) for j, q in enumerate(qubits) if q < nl]
        fixed = 0
        for j, q in enumerate(qubits):
            if q >= nl:
                fixed |= ((self.group.rank >> (q - nl)) & 1) << j
        part = marginal_probabilities(self.local, [q for _, q in local]) if local else np.array([self._local_norm()])
        out = np.zeros(1 << len(qubits))
        index = np.full(part.shape[0], fixed, dtype=np.int64)
        for bit, (j, _) in enumerate(local):
            index |= ((np.arange(part.shape[0]) >> bit) & 1) << j
        out[index] = part
        return self.group.allreduce(out)

    def _local_mask(self, mask: int) -> np.uint64:
        value = 0
        for q in range(self.num_qubits):
            if (mask >> q) & 1:
                value |= 1 << self.where[q]
        return np.uint64(value)

    # -- report ---------------------------------------------------------------------------

    def metadata(self) -> dict:
        group = self.group
        return {
            "ranks": group.size,
            "global_qubits": group.global_qubits,
            "local_qubits": self.num_local,
            "swaps": group.swaps,
            "exchanged_bytes": group.exchanged_bytes,
            "exchange_seconds": group.exchange_seconds,
            "sync_points": group.syncs,
        }
