"""Soak near the memory limit: many jobs of random sizes in a process with an address-space limit.

    python -m benchmarks.soak [--jobs 200] [--threads 4] [--budget-mib 1024] [--min-qubits 16] [--max-qubits 40] [--out DIR]

The work runs in a child process whose ``RLIMIT_AS`` leaves ``--budget-mib``
of address space beyond what it maps after start-up, so an out-of-memory can
only kill that child. Jobs are sized at random so that each alone needs from
about a quarter of the budget to a little more than all of it (those are
refused from ``run()`` with ``CircuitTooLargeError``); several threads submit
them at once, so admission control has to hold jobs back for the others to
finish (a job refused when its turn comes, because memory shrank meanwhile,
is counted as refused_in_job). Every answer is checked exactly: GHZ states (only all-zeros and
all-ones, within six standard deviations of half each), bit patterns set by
X gates (one outcome), and the same pattern written after a mid-circuit
measurement and reset (shot by shot, one outcome). Prints and writes a JSON
report; exit code 1 on any wrong answer, unexpected error, MemoryError or hang.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from benchmarks.report import emit

_CHILD = """
import collections, json, math, random, resource, sys, threading, time
from qiskit import QuantumCircuit
from gpu_provider import GPUSimulator
from gpu_provider.engine import devices
from gpu_provider.engine.executor import WORKSPACE_BYTES
from gpu_provider.errors import CircuitTooLargeError

jobs, threads, budget, min_qubits, max_qubits, seed = {jobs}, {threads}, {budget}, {min_qubits}, {max_qubits}, {seed}
backend = GPUSimulator(device="CPU")
warm = [backend.run(QuantumCircuit(1), shots=1) for _ in range(2)]  # start both workers first
for job in warm:
    job.result()

def need(n, arrays):
    return arrays * (16 << n) + WORKSPACE_BYTES

top = min_qubits
while need(top + 1, 2) <= 1.3 * budget and top < max_qubits:
    top += 1

def make(rng):
    kind = rng.choice(["ghz", "pattern", "reset"])
    n = rng.randint(min_qubits, top)
    qc = QuantumCircuit(n, n)
    pattern = rng.getrandbits(n)
    if kind == "ghz":
        qc.h(0)
        for q in range(n - 1):
            qc.cx(q, q + 1)
        expected = None
    else:
        if kind == "reset":
            qc.x(0)
            qc.measure(0, 0)
            qc.reset(0)
        for q in range(n):
            if pattern >> q & 1:
                qc.x(q)
        expected = format(pattern, f"0{{n}}b")
    qc.measure(range(n), range(n))
    return kind, n, qc, expected, (3 if kind == "reset" else 2)

stats = collections.Counter()
problems = []
lock = threading.Lock()
longest = [0.0]

go = threading.Event()
ready = threading.Barrier(threads + 1)

def worker(index):
    rng = random.Random(seed * 1000 + index)
    make(random.Random(0))  # this thread's malloc arena and stack exist before the limit is set
    ready.wait()
    go.wait()
    for _ in range(index, jobs, threads):
        kind, n, qc, expected, arrays = make(rng)
        shots = 2000 if kind != "reset" else 20
        start = time.monotonic()
        try:
            job = backend.run(qc, shots=shots, seed_simulator=rng.randrange(2**31))
        except CircuitTooLargeError:
            with lock:
                stats["refused_from_run"] += 1
                # Near the limit a refusal is right: what earlier jobs left mapped (malloc's
                # heaps, thread arenas) counts against the address-space limit too.
                if need(n, arrays) <= 0.75 * budget:
                    problems.append(f"{{kind}} n={{n}} refused although it needs under 3/4 of the budget")
            continue
        try:
            counts = job.result(timeout=600).get_counts()
        except Exception as exc:
            with lock:
                if isinstance(exc.__cause__, CircuitTooLargeError):  # admission found it cannot fit now
                    stats["refused_in_job"] += 1
                    continue
                stats["failed"] += 1
                problems.append(f"{{kind}} n={{n}}: {{type(exc).__name__}}: {{exc}} (cause {{exc.__cause__!r}})")
            continue
        elapsed = time.monotonic() - start
        if expected is None:
            zeros = counts.get("0" * n, 0)
            good = set(counts) <= {{"0" * n, "1" * n}} and sum(counts.values()) == shots and abs(zeros - shots / 2) <= 6 * math.sqrt(shots / 4)
        else:
            good = counts == {{expected: shots}}
        with lock:
            longest[0] = max(longest[0], elapsed)
            stats["done_correct" if good else "wrong"] += 1
            stats[f"qubits_{{n}}"] += 1
            if not good:
                problems.append(f"{{kind}} n={{n}} wrong counts {{dict(list(counts.items())[:4])}}")

start = time.monotonic()
pool = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(threads)]
for t in pool:
    t.start()
ready.wait()
used = devices._proc_status_bytes(("VmSize",))["VmSize"]
resource.setrlimit(resource.RLIMIT_AS, (used + budget, resource.RLIM_INFINITY))
go.set()
for t in pool:
    t.join(timeout=3600)
hung = sum(t.is_alive() for t in pool)
print(json.dumps({{
    "jobs": jobs,
    "threads": threads,
    "budget_bytes": budget,
    "qubits": [min_qubits, top],
    "done_correct": stats["done_correct"],
    "refused_from_run": stats["refused_from_run"],
    "refused_in_job": stats["refused_in_job"],
    "failed": stats["failed"],
    "wrong": stats["wrong"],
    "hung_threads": hung,
    "longest_job_s": round(longest[0], 2),
    "wall_s": round(time.monotonic() - start, 1),
    "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    "sizes": {{k: v for k, v in sorted(stats.items()) if k.startswith("qubits_")}},
    "problems": problems[:10],
}}))
"""


def soak(
    jobs: int = 200, threads: int = 4, budget_mib: int = 1024, min_qubits: int = 16, max_qubits: int = 40, seed: int = 1, timeout: float = 3600
) -> dict:
    """Run the soak in a child process and return its report (``ok`` says whether it passed).

    Sizes run from ``min_qubits`` to the width whose state arrays need 1.3x the
    budget, or ``max_qubits`` if that is less.
    """
    script = textwrap.dedent(
        _CHILD.format(jobs=jobs, threads=threads, budget=budget_mib << 20, min_qubits=min_qubits, max_qubits=max_qubits, seed=seed)
    )
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "GPU_PROVIDER_DISABLE_GPU": "1", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    process = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout, cwd=root, env=env)
    if process.returncode != 0:
        return {"ok": False, "exit_code": process.returncode, "stderr": process.stderr[-3000:]}
    report = json.loads(process.stdout.strip().splitlines()[-1])
    report["ok"] = (
        report["failed"] == 0
        and report["wrong"] == 0
        and report["hung_threads"] == 0
        and not report["problems"]
        and report["done_correct"] + report["refused_from_run"] + report["refused_in_job"] == jobs
    )
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--budget-mib", type=int, default=1024)
    parser.add_argument("--min-qubits", type=int, default=16)
    parser.add_argument("--max-qubits", type=int, default=40)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    report = soak(args.jobs, args.threads, args.budget_mib, args.min_qubits, args.max_qubits, args.seed)
    emit(report, args.out, "soak.json")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
