"""records/plot_logs.py and the log parser it shares with the record writer."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import REPO, final_line

sys.path.insert(0, str(REPO / "records"))
from run_log import parse_run  # noqa: E402


def test_parser_reads_curves_from_log(trained_run):
    run = parse_run(trained_run.log_file.read_text())
    assert run.seed == 7
    assert [point.step for point in run.train] == [1, 20, 40, 60]
    assert [point.step for point in run.val] == [0, 60]
    assert run.exact["val_bpb"] == final_line(trained_run.stdout, "_exact")["val_bpb"]
    assert run.size("Code size") == len((REPO / "train_mdlm.py").read_bytes())


def test_plot_script_renders_png(trained_run, tmp_path):
    pytest.importorskip("matplotlib", exc_type=ImportError)
    output = tmp_path / "curves.png"
    command = [sys.executable, str(REPO / "records" / "plot_logs.py"), str(trained_run.log_file), "--output", str(output)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert output.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert output.stat().st_size > 10_000  # four panels with curves, not an empty canvas
