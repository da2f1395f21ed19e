"""report: one file with doctor, status, verify --deep (and tune, bench) from a first run."""

from __future__ import annotations

import json

from click.testing import CliRunner
from codeobject_fixtures import needs_elf
from detect_fixtures import fake_sysfs
from test_verify_deep import gpu_less_prefix

from installer import report
from installer.cli import cli


@needs_elf
def test_report_runs_every_step_keeps_going_after_a_failure_and_writes_one_file(tmp_path, monkeypatch):
    monkeypatch.setenv("RDNA4_SYSFS_ROOT", str(fake_sysfs(tmp_path / "sys")))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    prefix = gpu_less_prefix(tmp_path / "p")
    out = tmp_path / "out" / "report.md"
    result = CliRunner().invoke(cli, ["report", "--prefix", str(prefix), "-o", str(out),
                                      "--tune-model", "org/not-cached"])
    assert result.exit_code == 0, result.output
    text = out.read_text()
    for title in ("detect", "doctor", "status", "verify --deep", "tune"):
        assert f"## {title} (exit code " in text, title
    # the GPU-less verify --deep passes with every deep probe skipped, its JSON is in the report
    verify = text.split("## verify --deep (exit code 0)")[1].split("```")[1]
    probes = json.JSONDecoder().raw_decode(verify[verify.index("{"):])[0]["probes"]
    assert {p["status"] for p in probes if p["name"].startswith("deep.")} == {"skip"}
    # tune of an uncached model fails with its usage exit code; the report still has it all
    assert "## tune (exit code 2)" in text and "neither a local folder nor in the Hugging Face cache" in text
    assert "tune: exit code 2" in result.output and f"report written to {out}" in result.output
    assert '"archs": [\n    "gfx1201"\n  ]' in text and "rdna4-install first-run report" in text
    assert "## bench" not in text, "bench runs only when asked"


def test_bench_and_model_reach_the_commands(tmp_path):
    got = dict(report.steps(tmp_path, model="m", tune_model="t", bench=True))
    assert got["verify --deep"][-2:] == ["--model", "m"]
    assert got["bench"] == ["bench", "--prefix", str(tmp_path), "--profile", "seed", "--profile", "rdna4-16g",
                            "--model", "t"]
