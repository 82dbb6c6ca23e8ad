"""The README stays true: every option is documented, its commands run, CI runs its test command."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

from preftune.cli import main
from preftune.config import TrainConfig, flag

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_every_option_is_in_the_readme_table():
    for f in dataclasses.fields(TrainConfig):
        assert f"| `{flag(f.name)}` |" in README, flag(f.name)


def test_ci_runs_the_readme_test_command():
    command = re.search(r"Run the tests.*?\n```\n(.+?)\n```", README, re.S).group(1).strip()
    assert command in (ROOT / ".ci" / "run").read_text()


def test_readme_main_job_runs(tmp_path, monkeypatch):
    """The demo command of the README (its install part is what CI does)."""
    command = re.search(r"Run the built-in demo.*?\n```\n(.+?)\n```", README, re.S).group(1)
    args = command.split("&& preftune ")[-1].split()
    assert args[:3] == ["demo", "--output", "runs/demo"]
    monkeypatch.chdir(tmp_path)
    assert main(args) == 0
    records = [json.loads(line) for line in (tmp_path / "runs/demo/run/metrics.jsonl").read_text().splitlines()]
    assert records[-1]["eval/rewards/accuracies"] > 0.5 and records[-1]["loss"] < records[0]["loss"]
