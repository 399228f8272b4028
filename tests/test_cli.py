import subprocess
import sys

from tempflow import cli


def test_demo_runs_and_checks_itself(capsys):
    assert cli.main(["demo", "--samples", "4000", "--steps", "10"]) == 0
    out = capsys.readouterr().out
    assert "identical" in out and "within 5 points of its weight: yes" in out
    for name in ("ode", "flow-grpo", "cps", "dance"):
        assert f"\n{name} " in out


def test_doctor_reports_extensions_and_backends(capsys):
    assert cli.main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "tempflow._C" in out and "backends" in out and "cpu: auto ->" in out


def test_bad_arguments_give_a_clear_error(capsys):
    assert cli.main(["demo", "--steps", "0"]) == 2
    assert "must be positive" in capsys.readouterr().err
    assert cli.main(["demo", "--noise-level", "-1", "--samples", "10"]) == 2
    assert "noise_level" in capsys.readouterr().err


def test_console_entry_point():
    done = subprocess.run([sys.executable, "-m", "tempflow.cli", "--version"], capture_output=True, text=True)
    assert done.returncode == 0 and "tempflow" in done.stdout
