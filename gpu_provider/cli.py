"""Command line: ``gpu-provider run FILE`` and ``gpu-provider devices``.

``run`` reads an OpenQASM 2 or 3 file with Qiskit's own parsers, simulates it
(on the GPU when one is usable, else on the CPU) and prints the counts.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from importlib import resources
from pathlib import Path

from .errors import GPUProviderError

logger = logging.getLogger(__name__)

_VERSION_RE = re.compile(r"^\s*OPENQASM\s+(\d+)", re.MULTILINE)
# What only OpenQASM 2 writes: its register declarations and its standard include.
_QASM2_ONLY_RE = re.compile(r'\b(?:qreg|creg)\b|include\s+"qelib1\.inc"')


def load_qasm(text: str, source: str = "<string>", include_dirs: tuple = ()):
    """Parse OpenQASM 2 or 3 (by its ``OPENQASM`` header; without one, 2 where ``qreg``, ``creg`` or
    ``include "qelib1.inc"`` appear, else 3) into a QuantumCircuit.

    ``include_dirs`` are searched first for OpenQASM 2 ``include`` files (the
    program's own folder, when it came from a file). A UTF-8 byte-order mark is
    ignored.
    """
    import qiskit.qasm2
    import qiskit.qasm3

    text = text.removeprefix("\ufeff")
    stripped = re.sub(r"//[^\n]*|/\*.*?\*/", "", text, flags=re.DOTALL)
    if not stripped.strip():
        raise GPUProviderError(f"{source} is empty (or only comments); expected an OpenQASM 2 or 3 program")
    match = _VERSION_RE.search(stripped)
    if match:
        version = int(match.group(1))
    else:  # no OPENQASM line (QASMBench has such files): OpenQASM 2 where its own syntax shows, else 3
        version = 2 if _QASM2_ONLY_RE.search(stripped) else 3
    try:
        if version == 2:
            return qiskit.qasm2.loads(
                text,
                custom_instructions=qiskit.qasm2.LEGACY_CUSTOM_INSTRUCTIONS,
                include_path=tuple(str(d) for d in include_dirs) + tuple(qiskit.qasm2.LEGACY_INCLUDE_PATH),
            )
        return qiskit.qasm3.loads(text)
    except Exception as exc:  # the parsers raise several types; one clear message for the user
        raise GPUProviderError(f"could not parse {source} as OpenQASM {version}: {_describe_parse_error(exc, text)}") from exc


def _describe_parse_error(exc: BaseException, text: str) -> str:
    """The parser's message, or where it stopped and on what when it gave none."""
    message = str(exc).strip()
    if message:
        return message
    seen = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        for candidate in (cause, *(arg for arg in cause.args if isinstance(arg, BaseException))):
            token = getattr(candidate, "offendingToken", None)
            line = getattr(token, "line", None)
            if token is not None and line:
                column = getattr(token, "column", 0) + 1
                what = "the end of the file" if token.text in (None, "<EOF>") else repr(token.text)
                lines = text.splitlines()
                shown = f"; the line reads: {lines[line - 1].strip()!r}" if 0 < line <= len(lines) else ""
                return f"syntax error at line {line}, column {column}: unexpected {what}{shown}"
        cause = cause.__cause__ or cause.__context__
    return f"syntax error ({type(exc).__name__}, no position given)"


def _read_circuit(spec: str):
    path = Path(spec)
    if not path.exists():
        candidate = resources.files("gpu_provider.examples") / f"{spec.removesuffix('.qasm')}.qasm"
        if candidate.is_file():
            circuit = load_qasm(candidate.read_text(), f"example {spec}")
            circuit.name = candidate.name.removesuffix(".qasm")
            return circuit
        raise GPUProviderError(f"no such file: {spec} (bundled examples: {', '.join(list_examples())})")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise GPUProviderError(f"{path} is not UTF-8 text ({exc}); save it as UTF-8") from exc
    circuit = load_qasm(text, str(path), include_dirs=(path.resolve().parent,))
    circuit.name = path.stem  # errors and results name the file, not "circuit-41"
    return circuit


def list_examples() -> list[str]:
    return sorted(entry.name.removesuffix(".qasm") for entry in resources.files("gpu_provider.examples").iterdir() if entry.name.endswith(".qasm"))


def _cmd_run(args: argparse.Namespace) -> int:
    from .backend import GPUSimulator

    circuit = _read_circuit(args.file)
    backend = GPUSimulator()
    options = {"shots": args.shots, "device": args.device, "precision": args.precision, "memory": args.memory}
    if args.seed is not None:
        options["seed_simulator"] = args.seed
    result = backend.run(circuit, **options).result()
    counts = result.get_counts()
    metadata = result.results[0].metadata
    if args.json:
        payload = {
            "circuit": circuit.name,
            "num_qubits": circuit.num_qubits,
            "shots": args.shots,
            "counts": dict(counts),
            "device": metadata.get("device"),
            "precision": metadata.get("precision"),
            "method": metadata.get("method"),
            "time_taken": metadata.get("time_taken"),
        }
        if args.memory:
            payload["memory"] = result.get_memory()
        if metadata.get("gpu_unavailable_reason"):
            payload["gpu_unavailable_reason"] = metadata["gpu_unavailable_reason"]
        print(json.dumps(payload, indent=2, sort_keys=True))
        return 0
    how = "a stabilizer state (Clifford circuit)" if metadata.get("method") == "stabilizer" else metadata.get("precision")
    print(f"# {args.file}: {circuit.num_qubits} qubits, {args.shots} shots on {metadata.get('device')} ({how}), "
          f"{metadata.get('time_taken', 0.0) * 1e3:.2f} ms")
    if metadata.get("gpu_unavailable_reason"):
        print(f"# no GPU used: {metadata['gpu_unavailable_reason']}")
    if not circuit.num_clbits:
        print("# the program measures nothing, so there are no counts: add measurements (measure q -> c; or c = measure q;)")
    width = max((len(key) for key in counts), default=0)
    for key, count in sorted(counts.items(), key=lambda item: (-item[1], item[0])):
        print(f"{key:>{width}}  {count}")
    if args.memory:
        print("memory:", " ".join(result.get_memory()))
    return 0


def _cmd_devices(args: argparse.Namespace) -> int:
    from .engine.devices import probe_gpu

    probe = probe_gpu()
    info = {
        "cpu": True,
        "gpu_usable": probe.usable,
        "gpus": list(probe.names),
        "reason": probe.reason or None,
        "auto_uses": "GPU:0" if probe.usable else "CPU",
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print("CPU: usable (NumPy)")
    if probe.usable:
        for index, name in enumerate(probe.names):
            print(f"GPU {index}: {name} (usable)")
    else:
        print(f"GPU: not usable: {probe.reason}")
    print(f"device='auto' runs on: {info['auto_uses']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpu-provider", description="Exact statevector simulation of OpenQASM circuits on a GPU or the CPU.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="simulate an OpenQASM 2/3 file (or a bundled example name) and print the counts")
    run.add_argument("file", help=f"path to a .qasm file, or a bundled example ({', '.join(list_examples())})")
    run.add_argument("--shots", type=int, default=1024)
    run.add_argument("--seed", type=int, default=None, help="seed_simulator, for repeatable samples")
    run.add_argument("--device", default="auto", choices=["auto", "GPU", "CPU", "gpu", "cpu"])
    run.add_argument("--precision", default="double", choices=["double", "single"])
    run.add_argument("--memory", action="store_true", help="also print every shot's outcome")
    run.add_argument("--json", action="store_true", help="print a JSON object instead of a table")
    run.set_defaults(handler=_cmd_run)
    devices = sub.add_parser("devices", help="say whether a GPU is usable and, if not, why")
    devices.add_argument("--json", action="store_true")
    devices.set_defaults(handler=_cmd_devices)
    return parser


def main(argv: list[str] | None = None) -> int:
    from qiskit.exceptions import QiskitError

    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (GPUProviderError, QiskitError, ValueError, OSError) as exc:
        print(f"gpu-provider: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
