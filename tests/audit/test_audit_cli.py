"""``dptorch audit``: prints a report (or one JSON line) and exits 1 on a violation."""

from __future__ import annotations

import json

import pytest

from dptorch.cli import main

SMALL = ["--num-canaries", "200", "--steps", "10"]


def test_audit_json_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["audit", "--json", *SMALL]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1, "--json prints exactly one line"
    report = json.loads(lines[0])
    assert report["method"] == "one-run" and report["canary"] == "gradient"
    assert report["epsilon_upper_bound"] == pytest.approx(4.0, abs=0.05)
    assert 0 <= report["epsilon_lower_bound"] <= report["epsilon_upper_bound"]
    assert report["violated"] is False and report["planted_fault"] is None
    assert len(report["scores"]) == len(report["included"]) == 200


def test_audit_exits_1_on_a_planted_fault(capsys: pytest.CaptureFixture[str]) -> None:
    # 200 canaries show at most about log(200 / 3) = 4.2, so claim epsilon 2.
    code = main(["audit", *SMALL, "--target-epsilon", "2", "--plant-fault", "no-clipping"])
    out = capsys.readouterr().out
    assert code == 1
    assert "planted fault: no-clipping" in out and "VIOLATION" in out


def test_audit_many_runs_text(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["audit", "--runs", "8", "--steps", "5"]) == 0
    out = capsys.readouterr().out
    assert "many-run audit" in out and "upper bound" in out


def test_audit_bad_settings_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["audit", "--sample-rate", "2"]) == 2
    assert "dptorch audit:" in capsys.readouterr().err
