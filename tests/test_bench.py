"""The one bench command, in --quick mode on its cheap benchmarks: each runs, writes its JSON and
gets its row in the summary (the numbers of a quick run on a busy machine are not judged)."""

import json
import subprocess
import sys

from orthanc_server import ROOT

CHEAP = ["render", "scoring", "stages", "latency"]


def test_run_all_quick_summarises_every_benchmark(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "run_all.py"), "--quick", "--only", *CHEAP,
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["failed"] == [] and summary["quick"]
    assert len(summary["rows"]) == len(CHEAP)
    assert "met?" in done.stdout and all(row["benchmark"] in done.stdout for row in summary["rows"])
    latency = json.loads((tmp_path / "latency.json").read_text())
    assert latency["instances"] == 30 and latency["scored"] == 30
    assert 0 < latency["latency_ms"]["p50"] <= latency["latency_ms"]["p99"] <= latency["latency_ms"]["max"]
    # The index reader sees each verdict soon after the plugin wrote it: its clock is the measure.
    assert 0 <= latency["seen_after_indexed_at_ms"]["p50"] < 100
    stages = json.loads((tmp_path / "stages.json").read_text())
    assert stages["instances"] == 32 and len(stages["stages_ms"]) == 8
    assert stages["total_ms"] == sum(stages["stages_ms"].values()) and stages["empty_file_create_ms"] > 0
