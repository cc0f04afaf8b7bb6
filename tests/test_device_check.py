"""bench/device_check.py, the prepared GPU check (docs/gpu.md), run here with --device cpu.

Run as a command, as on the device (tests do not import bench): the dry run on a tiny random model must
produce every phase's figures, and a budget too small for the phases must still leave a full report.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "device_check.py"


def run_check(out: Path, *args: str, timeout: float) -> tuple[subprocess.CompletedProcess, dict]:
    done = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--out", str(out), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done, json.loads((out / "device_check.json").read_text())


def test_a_budget_too_small_skips_phases_and_still_writes_the_report(tmp_path):
    done, report = run_check(tmp_path, "--shapes", "tiny", "--budget", "0.5", "--strict", timeout=120)
    phases = report["phases"]
    assert phases["bootstrap"]["status"] == "ok"
    for name in ("env", "models", "pytest", "engine:tiny", "serve:tiny:switchboard", "serve:tiny:peft"):
        assert phases[name]["status"] == "skipped", (name, phases[name])
        assert "budget" in phases[name]["reason"]
    md = (tmp_path / "device_check.md").read_text()
    assert md.startswith("# Device check — CPU dry run") and "| serve:tiny:peft | skipped |" in md
    assert md.strip() in done.stdout  # the table is printed at the end


@pytest.mark.slow
def test_cpu_dry_run_on_a_tiny_model_has_every_phases_figures(tmp_path):
    done, report = run_check(tmp_path, "--shapes", "tiny", "--tasks", "8", "--seconds", "2", "--strict", timeout=600)
    phases = report["phases"]
    assert phases["env"]["result"]["torch"] and phases["env"]["result"]["cuda_available"] in (True, False)
    assert phases["models"]["result"]["tiny"]["params"] > 0
    assert phases["pytest"]["status"] == "ok"  # no GPU here: the cuda tests collect and skip
    assert phases["pytest"]["result"].get("skipped", 0) >= 1
    engine = phases["engine:tiny"]["result"]
    assert engine["best_mixed_rows_per_s"] > 0 and engine["rows_per_s"]["mixed_32"] > 0
    for server in ("switchboard", "peft"):
        result = phases[f"serve:tiny:{server}"]["result"]
        for load in ("one_text", "batch32", "at70"):
            figures = result[load]
            assert figures["requests"] > 0 and figures["rps"] > 0 and figures["p99_ms"] > 0, (server, load)
            assert figures["errors"] == 0, (server, load, result.get("server_log_tail"))
    summary = report["summary"]["tiny"]
    for key in ("engine_rows_per_s", "one_rps", "one_p99_ms", "b32_rows_per_s", "b32_vs_engine", "at70_p99_ms",
                "peft_one_rps", "ratio_one", "ratio_b32"):
        assert summary[key] is not None and summary[key] > 0, key
    assert summary["top1_agree_vs_peft"] == "4/4"  # the same (IA)³ weights give the same answers on both servers
    for name, rec in phases.items():  # where `serve` has --fronts: measured (figures, not their size, checked)
        if name.startswith("serve:tiny:fronts-"):
            assert rec["status"] == "skipped" or "rps" in rec["result"]["batch32"], (name, rec)
    md = (tmp_path / "device_check.md").read_text()
    assert "| one-text requests/s (closed loop) |" in md and md.strip() in done.stdout
