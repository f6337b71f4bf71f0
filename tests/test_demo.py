"""The README's main command (`python -m fasttrack.demo`) runs end to end: every family, parity ok.
One timed run per path; the speed it prints is not asserted (benchmarks show speed, tests never)."""
import json
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_demo_runs_every_family_with_parity(tmp_path):
    r = subprocess.run([sys.executable, "-m", "fasttrack.demo", "--reps", "1", "--out", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    rows = json.loads((tmp_path / "demo.json").read_text())["rows"]
    assert len(rows) == 6
    assert all(row["parity_ok"] for row in rows), [(row["family"], row["feature_max_abs"]) for row in rows]
    # the CPU model / family and the vector ISA in use head the output (results depend on them)
    assert re.search(r"^CPU: .*family .*vector ISA in use", r.stdout, re.M), r.stdout[:2000]
