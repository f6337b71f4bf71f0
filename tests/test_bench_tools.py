"""`python -m bench bandwidth` and `python -m bench paired` run end to end; timing values are not
asserted (speed is shown by benchmarks, never by tests)."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bandwidth_tool_runs_and_reports_each_selected_case():
    r = subprocess.run([sys.executable, "-m", "bench", "bandwidth", "--rounds", "1", "-k", "ostrack256-R1/bfloat16"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    rows = [line for line in r.stdout.splitlines() if line.startswith("| topk_select |")]
    assert len(rows) == 1 and "ostrack256-R1/bfloat16" in rows[0]
    assert "case(s) below target" in r.stdout


def test_paired_tool_runs_and_reports_each_selected_case():
    r = subprocess.run([sys.executable, "-m", "bench", "paired", "--rounds", "1", "-k", "proj/B1/float32"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    rows = [line for line in r.stdout.splitlines() if line.startswith("| proj |")]
    assert len(rows) == 1 and "| 1 | float32 |" in rows[0]
    assert "case(s) off target" in r.stdout
