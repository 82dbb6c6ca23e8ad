"""The Python API: `from preftune import TrainConfig, train, evaluate, audit`, the README's example, callbacks and
errors as exceptions."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import preftune
from preftune import TrainConfig, UserError, audit, evaluate, train

from toy import counting_pairs, save_model_folder, write_jsonl

README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    return {
        "model": str(save_model_folder(root / "model")),
        "train": str(write_jsonl(counting_pairs(32, seed=1), root / "train.jsonl")),
        "eval": str(write_jsonl(counting_pairs(8, seed=2), root / "eval.jsonl")),
        "root": root,
    }


def test_the_readme_example_runs(toy, tmp_path, monkeypatch, capsys):
    code = re.search(r"## Python API\n.*?```python\n(.+?)```", README, re.DOTALL).group(1)
    for name, path in (("./sft-model", toy["model"]), ("prefs.jsonl", toy["train"]), ("heldout.jsonl", toy["eval"])):
        code = code.replace(f'"{name}"', repr(path))
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert re.search(r"^4 steps, loss 0\.693 → 0\.\d+, held-out accuracy \d\.\d\d$", printed, re.MULTILINE), printed
    assert (tmp_path / "runs" / "dpo1" / "final" / "model.safetensors").exists()


def test_on_log_sees_every_record_of_metrics_jsonl(toy, tmp_path):
    seen = []
    final = train(
        {
            "model": toy["model"],
            "data": toy["train"],
            "output": str(tmp_path / "run"),
            "max_steps": 3,
            "batch_size": 8,
            "eval_data": toy["eval"],
            "eval_every": 2,
            "no_report": True,
        },
        on_log=lambda step, metrics: seen.append((step, metrics)),
    )
    written = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert final == tmp_path / "run" / "final"
    assert [step for step, _ in seen] == [1, 2, 3] and [m for _, m in seen] == written
    assert "eval/rewards/accuracies" in seen[1][1]


def test_a_yaml_file_and_a_train_config_train_alike(toy, tmp_path):
    options = {"model": toy["model"], "data": toy["train"], "max_steps": 2, "batch_size": 8, "no_report": True}
    (tmp_path / "run.yaml").write_text("".join(f"{k}: {v}\n" for k, v in {**options, "output": tmp_path / "a"}.items()))
    train(tmp_path / "run.yaml")
    train(TrainConfig(**options, output=str(tmp_path / "b")))
    a, b = ((tmp_path / run / "metrics.jsonl").read_text().splitlines() for run in "ab")
    assert [json.loads(x)["loss"] for x in a] == [json.loads(x)["loss"] for x in b]


def test_mistakes_raise_user_error_not_system_exit(toy, tmp_path):
    with pytest.raises(UserError, match="--keep-last has no effect without --save-every"):
        train(TrainConfig(model=toy["model"], data=toy["train"], output=str(tmp_path / "run"), keep_last=2))
    with pytest.raises(UserError, match="--output is required"):
        train({"model": toy["model"], "data": toy["train"]})
    with pytest.raises(UserError, match="no such file"):
        audit(str(tmp_path / "missing.jsonl"))
    with pytest.raises(UserError, match="--ref is required"):
        evaluate(model=toy["model"], data=toy["eval"])
    assert not (tmp_path / "run").exists()


def test_audit_returns_the_report(toy):
    report = audit(toy["train"], eval_data=toy["eval"], model=toy["model"])
    assert report.to_dict()["rows"] == 32 and isinstance(report.warnings(), list)


def test_import_preftune_loads_no_torch():
    import subprocess
    import sys

    code = "import sys, preftune; preftune.__version__; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run(
        [sys.executable, "-c", code], check=True, env={"PYTHONPATH": str(Path(preftune.__file__).parents[1])}
    )
