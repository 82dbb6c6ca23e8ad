"""The README stays true: every option is documented, its commands run, CI runs its test command."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

from preftune.cli import main
from preftune.config import TrainConfig, flag

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_every_option_is_in_the_readme_table_with_its_help():
    for f in dataclasses.fields(TrainConfig):
        row = re.search(r"^\| `" + re.escape(flag(f.name)) + r"` \| .*? \| (.*) \|$", README, re.MULTILINE)
        assert row, flag(f.name)
        assert row.group(1).startswith(f.metadata["help"]), flag(f.name)  # the README may add a pointer after it


def test_ci_runs_the_readme_test_command():
    command = re.search(r"Run the tests.*?\n```\n(.+?)\n```", README, re.DOTALL).group(1).strip()
    assert command in (ROOT / ".ci" / "run").read_text()


@pytest.mark.slow  # about a minute: the whole demo at its --quick sizes
def test_readme_main_job_runs(tmp_path, monkeypatch, capsys):
    """The demo command of the README (its install part is what CI does): DPO raises the ground-truth reward of
    the SFT model clearly (the 95% interval of the rise excludes 0) at a bounded KL, and the report shows it."""
    command = re.search(r"Run the built-in demo.*?\n```\n(.+?)\n```", README, re.DOTALL).group(1)
    args = command.split("&& preftune ")[-1].split()
    assert args[:3] == ["demo", "--output", "runs/demo"]
    monkeypatch.chdir(tmp_path)
    assert main(args) == 0
    run = tmp_path / "runs/demo/dpo"
    result = json.loads((run / "eval.json").read_text(encoding="utf-8"))
    generation, rise = result["generation"], result["reward_difference"]
    assert generation["reward"]["policy"] > generation["reward"]["reference"] + 0.05 and rise["ci_low"] > 0
    assert 0 < generation["kl"] < 10  # nats per sequence: the policy stays near the SFT model
    assert generation["win_rate"]["ci_low"] > 0.5
    page = (run / "report.html").read_text(encoding="utf-8")
    assert "Sample continuations" in page and "reward_difference" in page
    assert capsys.readouterr().out.startswith("reward SFT ")
