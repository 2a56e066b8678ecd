"""The command line: gpu-provider run / devices."""

from __future__ import annotations

import json

import pytest

from gpu_provider import cli
from gpu_provider.engine.devices import probe_gpu


def run_json(capsys, *args: str) -> dict:
    assert cli.main(["run", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_run_bundled_openqasm2_bell(capsys):
    report = run_json(capsys, "bell", "--shots", "2000", "--seed", "3", "--device", "cpu")
    assert set(report["counts"]) == {"00", "11"} and sum(report["counts"].values()) == 2000
    assert 850 < report["counts"]["00"] < 1150
    assert report["device"] == "CPU" and report["precision"] == "double"


def test_run_openqasm3_teleport_matches_the_sent_state(capsys):
    report = run_json(capsys, "teleport", "--shots", "4000", "--seed", "5", "--precision", "single")
    ones = sum(count for key, count in report["counts"].items() if key[0] == "1")
    # The teleported qubit was ry(1.1)|0>: P(1) = sin^2(0.55) = 0.272.
    assert abs(ones / 4000 - 0.272) < 0.03
    assert report["precision"] == "single"


def test_run_a_file_with_memory_and_seed_repeats(tmp_path, capsys):
    path = tmp_path / "x.qasm"
    path.write_text('OPENQASM 2.0;\ninclude "qelib1.inc";\nqreg q[3];\ncreg c[3];\nx q[1];\nh q[2];\nmeasure q -> c;\n')
    first = run_json(capsys, str(path), "--shots", "50", "--seed", "9", "--memory")
    second = run_json(capsys, str(path), "--shots", "50", "--seed", "9", "--memory")
    assert first["memory"] == second["memory"] and len(first["memory"]) == 50
    assert set(first["counts"]) <= {"010", "110"}


def test_table_output_and_errors(tmp_path, capsys):
    assert cli.main(["run", "ghz", "--shots", "100", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert "00000" in out and "11111" in out
    assert cli.main(["run", str(tmp_path / "missing.qasm")]) == 2
    assert "no such file" in capsys.readouterr().err
    bad = tmp_path / "bad.qasm"
    bad.write_text("OPENQASM 2.0;\nqreg q[1];\nfoo q[0];\n")
    assert cli.main(["run", str(bad)]) == 2
    assert "could not parse" in capsys.readouterr().err


def test_devices_reports_usability_and_reason(capsys):
    assert cli.main(["devices", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    probe = probe_gpu()
    assert info["gpu_usable"] == probe.usable
    if not probe.usable:
        assert info["reason"] == probe.reason and info["auto_uses"] == "CPU"


def test_gpu_without_gpu_is_an_error(capsys):
    if probe_gpu().usable:
        pytest.skip("a GPU is usable here")
    assert cli.main(["run", "bell", "--device", "GPU"]) == 2
    assert "no GPU is usable" in capsys.readouterr().err


def run_error(capsys, *args: str) -> str:
    assert cli.main(["run", *args]) == 2
    return capsys.readouterr().err


def test_an_empty_file_is_a_clear_error(tmp_path, capsys):
    for text in ("", "\n  \n", "// only a comment\n"):
        path = tmp_path / "empty.qasm"
        path.write_text(text)
        err = run_error(capsys, str(path))
        assert "empty" in err and "OpenQASM" in err and "NoneType" not in err
    assert run_json(capsys, "bell", "--shots", "100", "--device", "cpu")["counts"].keys() <= {"00", "11"}


def test_an_openqasm3_syntax_error_names_line_column_and_text(tmp_path, capsys):
    path = tmp_path / "broken.qasm"
    path.write_text('OPENQASM 3.0;\ninclude "stdgates.inc";\nqubit[2] q;\nh q[0]\ncx q[0], q[1];\n')
    err = run_error(capsys, str(path))
    assert "as OpenQASM 3: syntax error at line 5, column 1: unexpected 'cx'" in err
    assert "cx q[0], q[1];" in err
    path.write_text('OPENQASM 3.0;\ninclude "stdgates.inc";\nqubit[2] q;\nh q[0];\n')
    assert run_json(capsys, str(path), "--shots", "10", "--device", "cpu")["counts"] == {}


def test_an_openqasm2_include_beside_the_program_works_from_any_folder(tmp_path, capsys, monkeypatch):
    (tmp_path / "mine.inc").write_text("gate bell a, b { h a; cx a, b; }\n")
    program = tmp_path / "prog.qasm"
    program.write_text('OPENQASM 2.0;\ninclude "qelib1.inc";\ninclude "mine.inc";\nqreg q[2];\ncreg c[2];\nbell q[0], q[1];\nmeasure q -> c;\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    counts = run_json(capsys, str(program), "--shots", "1000", "--seed", "4", "--device", "cpu")["counts"]
    assert set(counts) == {"00", "11"} and 400 < counts["00"] < 600


def test_a_byte_order_mark_is_ignored(tmp_path, capsys):
    path = tmp_path / "bom.qasm"
    path.write_bytes("\ufeffOPENQASM 2.0;\ninclude \"qelib1.inc\";\nqreg q[1];\ncreg c[1];\nx q[0];\nmeasure q -> c;\n".encode("utf-8"))
    assert run_json(capsys, str(path), "--shots", "50", "--device", "cpu")["counts"] == {"1": 50}


def test_a_file_without_an_openqasm_line_is_read_by_its_syntax(tmp_path, capsys):
    """QASMBench has OpenQASM 2 files with no version line (sat_n11): qreg, creg or qelib1.inc mark
    them as 2 (Qiskit's qasm2 reads them); otherwise the program is read as OpenQASM 3."""
    two = tmp_path / "two.qasm"
    two.write_text('// no version line\ninclude "qelib1.inc";\nqreg q[2];\ncreg c[2];\nx q[1];\nmeasure q -> c;\n')
    assert run_json(capsys, str(two), "--shots", "20", "--device", "cpu")["counts"] == {"10": 20}
    three = tmp_path / "three.qasm"
    three.write_text('include "stdgates.inc";\nqubit[2] q;\nbit[2] c;\nx q[0];\nc = measure q;\n')
    assert run_json(capsys, str(three), "--shots", "20", "--device", "cpu")["counts"] == {"01": 20}
    neither = tmp_path / "neither.qasm"
    neither.write_text("qubit q;\nfoo q;\n")
    assert cli.main(["run", str(neither), "--device", "cpu"]) == 2
    assert "as OpenQASM 3" in capsys.readouterr().err


def test_a_program_that_measures_nothing_says_so(tmp_path, capsys):
    path = tmp_path / "unmeasured.qasm"
    path.write_text('OPENQASM 2.0;\ninclude "qelib1.inc";\nqreg q[2];\nh q[0];\n')
    assert cli.main(["run", str(path), "--device", "cpu"]) == 0
    assert "measures nothing, so there are no counts" in capsys.readouterr().out
    report = run_json(capsys, str(path), "--device", "cpu")
    assert report["counts"] == {} and report["circuit"] == "unmeasured"  # named after its file


def test_a_wide_clifford_file_runs_as_a_stabilizer_state(tmp_path, capsys):
    """A 200-qubit GHZ program (as QASMBench's large ones): far past a state vector, a stabilizer state."""
    n = 200
    lines = ["OPENQASM 2.0;", 'include "qelib1.inc";', f"qreg q[{n}];", f"creg c[{n}];", "h q[0];"]
    lines += [f"cx q[{i}],q[{i + 1}];" for i in range(n - 1)] + [f"measure q[{i}] -> c[{i}];" for i in range(n)]
    path = tmp_path / "ghz200.qasm"
    path.write_text("\n".join(lines))
    report = run_json(capsys, str(path), "--shots", "400", "--seed", "2", "--device", "cpu")
    assert report["method"] == "stabilizer" and set(report["counts"]) == {"0" * n, "1" * n}
    assert sum(report["counts"].values()) == 400 and 120 < report["counts"]["0" * n] < 280
    assert cli.main(["run", str(path), "--shots", "10", "--device", "cpu"]) == 0
    assert "stabilizer state" in capsys.readouterr().out
