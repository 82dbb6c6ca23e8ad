"""--report-to: real runs through the CLI, each tracker's records read back with the tracker's own reader and
compared with metrics.jsonl, every key at every step; resuming continues the same tracker run; a missing or unknown
tracker is one line before anything is written.

TensorBoard and MLflow are installed by CI; W&B and trackio tests skip where they are not installed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from preftune import trackers
from preftune.cli import main
from preftune.errors import UserError

from conftest import stopped_after
from helpers import records as read_metrics
from toy import counting_pairs, save_model_folder, write_jsonl

TIMING = {"pairs_per_s", "tokens_per_s", "step_time_s"}  # wall-clock: differ between two computations of a step


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    model = save_model_folder(root / "model")
    train = write_jsonl(counting_pairs(64, seed=1), root / "train.jsonl")
    held = write_jsonl(counting_pairs(32, seed=2), root / "eval.jsonl")
    return {"model": str(model), "train": str(train), "eval": str(held)}


@pytest.fixture(autouse=True)
def offline(tmp_path, monkeypatch):
    """No tracker settings from the environment (each would send data elsewhere), and the trackers' own homes in
    the test's folder. MLFLOW_ALLOW_FILE_STORE, which the MLflow tracker sets when absent, is removed after."""
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "WANDB_MODE", "WANDB_PROJECT", "WANDB_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home"))
    had = "MLFLOW_ALLOW_FILE_STORE" in os.environ
    yield
    if not had:
        os.environ.pop("MLFLOW_ALLOW_FILE_STORE", None)


def train(toy, out: Path, report_to: str, steps: int = 3, extra: tuple[str, ...] = ()) -> int:
    args = ["--model", toy["model"], "--data", toy["train"], "--eval-data", toy["eval"], "--output", str(out)]
    args += ["--batch-size", "8", "--max-steps", str(steps), "--learning-rate", "1e-3", "--eval-every", "2"]
    return main(["train", *args, "--no-report", "--report-to", report_to, *extra])


def expected(out: Path) -> dict[int, dict[str, float]]:
    """metrics.jsonl as {step: {key: value}}: what every tracker must hold."""
    return {r["step"]: {k: v for k, v in r.items() if k != "step"} for r in read_metrics(out)}


def assert_same(
    held: dict[int, dict[str, float]], out: Path, float32: bool = False, first_try: frozenset = frozenset()
):
    """Every step and key of metrics.jsonl, values equal. `float32`: the tracker stores float32, so a value is
    metrics.jsonl's rounded to float32. `first_try`: steps the tracker kept from before an interruption (a resumed
    run recomputes them exactly, but not their timings)."""
    want = expected(out)
    assert held.keys() == want.keys()
    for step, values in want.items():
        assert held[step].keys() == values.keys(), step
        for key, value in values.items():
            if step in first_try and key in TIMING:
                continue
            assert held[step][key] == (np.float32(value) if float32 else value), (step, key)


def state(out: Path) -> dict:
    return json.loads((out / trackers.STATE).read_text())


# ---------------------------------------------------------------------------------------------------- readers


def tensorboard_scalars(out: Path) -> dict[int, dict[str, float]]:
    """TensorBoard's own reader over the run's event files; each tag holds each step once."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / trackers.TENSORBOARD), size_guidance={"scalars": 0})
    acc.Reload()
    held: dict[int, dict[str, float]] = {}
    for tag in acc.Tags()["scalars"]:
        events = acc.Scalars(tag)
        assert len({e.step for e in events}) == len(events), f"{tag}: a step twice"
        for e in events:
            held.setdefault(e.step, {})[tag] = e.value
    return held


def tensorboard_hparams(out: Path):
    """(session start info, experiment or None) of the HParams plugin, read by TensorBoard's reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    acc = EventAccumulator(str(out / trackers.TENSORBOARD))
    acc.Reload()
    content = {tag: HParamsPluginData.FromString(c) for tag, c in acc.PluginTagToContent("hparams").items()}
    experiment = content.get("_hparams_/experiment")
    return content["_hparams_/session_start_info"].session_start_info, experiment and experiment.experiment


def mlflow_client(out: Path):
    from mlflow.tracking import MlflowClient

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow ≥ 3.13 reads a file store only with it
    return MlflowClient(tracking_uri=(out / trackers.MLRUNS).resolve().as_uri())


def mlflow_history(out: Path) -> dict[int, dict[str, float]]:
    """MlflowClient's metric histories of the run in trackers.json; each key holds each step once."""
    client, run_id = mlflow_client(out), state(out)["mlflow"]["run_id"]
    held: dict[int, dict[str, float]] = {}
    for key in client.get_run(run_id).data.metrics:
        history = client.get_metric_history(run_id, key)
        assert len({m.step for m in history}) == len(history), f"{key}: a step twice"
        for m in history:
            held.setdefault(m.step, {})[key] = m.value
    return held


def wandb_records(out: Path) -> list[dict]:
    """Every record of the run's offline .wandb files (one folder per start), through W&B's own reader."""
    files = sorted((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert files
    records = []
    for path in files:
        done = subprocess.run(
            [sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(path)], capture_output=True, text=True
        )
        if done.returncode and "No such command" in done.stderr:
            pytest.skip("this wandb has no `wandb leet inspect` to read .wandb files")
        assert done.returncode == 0, done.stderr
        records += [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    return records


def wandb_history(records: list[dict]) -> dict[int, dict[str, float]]:
    held: dict[int, dict[str, float]] = {}
    for r in records:
        if r["type"] == "history":
            step = r["history"]["step"]["num"]
            assert step not in held, f"step {step} twice"
            held[step] = {k: v for k, v in r["history"]["item"].items() if not k.startswith("_")}  # W&B's own
    return held


# ---------------------------------------------------------------------------------------------------- tests


def test_tensorboard_and_mlflow_hold_every_record_and_the_config(toy, tmp_path):
    out = tmp_path / "run"
    assert train(toy, out, "tensorboard,mlflow") == 0
    config = yaml.safe_load((out / "config.yaml").read_text())
    last = expected(out)[3]
    evals = {k for k in last if k.startswith("eval/")}
    assert evals and "eval/loss" in expected(out)[2]

    assert_same(tensorboard_scalars(out), out, float32=True)  # TensorBoard's scalars are float32
    start, experiment = tensorboard_hparams(out)
    for key, value in config.items():
        if value is None:  # a hyperparameter has no "none" value in TensorBoard: left out
            assert key not in start.hparams
        elif isinstance(value, str):
            assert start.hparams[key].string_value == value, key
        else:
            assert start.hparams[key].number_value == value, key
    assert {m.name.tag for m in experiment.metric_infos} == evals  # the summary: the final evaluation

    assert_same(mlflow_history(out), out)  # MLflow keeps float64: equal
    client, run_id = mlflow_client(out), state(out)["mlflow"]["run_id"]
    run = client.get_run(run_id)
    assert run.data.params == {k: str(v) for k, v in config.items()}
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert {k: run.data.metrics[k] for k in evals} == {k: last[k] for k in evals}  # its latest values: the summary
    assert state(out)["tensorboard"]["step"] == state(out)["mlflow"]["step"] == 3


@pytest.mark.slow
@pytest.mark.exactness  # step 3's values of the first try against the resumed run's
def test_resume_continues_the_same_tracker_runs_without_a_step_twice(toy, tmp_path):
    """Killed after step 3 with the checkpoint at step 2: the trackers hold step 3 already, the resumed run
    recomputes it (same values) and does not send it again."""
    out = tmp_path / "run"
    extra = ("--save-every", "2")
    with stopped_after(3):
        assert train(toy, out, "tensorboard,mlflow", steps=4, extra=extra) == 130
    run_id = state(out)["mlflow"]["run_id"]
    assert state(out)["mlflow"]["step"] == 3 and mlflow_client(out).get_run(run_id).info.status == "RUNNING"
    trackers.close_interrupted()  # what the CLI's exit does (and the next run in this process)
    assert mlflow_client(out).get_run(run_id).info.status == "KILLED"
    assert train(toy, out, "tensorboard,mlflow", steps=4, extra=(*extra, "--resume")) == 0
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4]

    assert state(out)["mlflow"]["run_id"] == run_id
    client = mlflow_client(out)
    assert [r.info.run_id for r in client.search_runs([client.get_run(run_id).info.experiment_id])] == [run_id]
    assert client.get_run(run_id).info.status == "FINISHED"
    assert_same(mlflow_history(out), out, first_try=frozenset({3}))
    assert len(list((out / trackers.TENSORBOARD).glob("events.out.tfevents.*"))) == 2  # one folder: one run
    assert_same(tensorboard_scalars(out), out, float32=True, first_try=frozenset({3}))


@pytest.mark.slow
def test_a_tracker_added_at_resume_gets_the_steps_kept_so_far(toy, tmp_path):
    out = tmp_path / "run"
    with stopped_after(1):
        assert train(toy, out, "tensorboard", extra=("--save-every", "1")) == 130
    assert train(toy, out, "tensorboard,mlflow", extra=("--save-every", "1", "--resume")) == 0
    assert_same(mlflow_history(out), out)
    assert_same(tensorboard_scalars(out), out, float32=True)


@pytest.mark.slow
def test_wandb_offline_holds_every_record_and_resumes_its_run(toy, tmp_path):
    pytest.importorskip("wandb")
    out = tmp_path / "run"
    with stopped_after(1):
        assert train(toy, out, "wandb", extra=("--save-every", "1")) == 130
    run_id = state(out)["wandb"]["run_id"]
    assert train(toy, out, "wandb", extra=("--save-every", "1", "--resume")) == 0
    records = wandb_records(out)
    assert_same(wandb_history(records), out)  # W&B keeps float64 (JSON): equal
    runs = [r["run"] for r in records if r["type"] == "run"]
    assert {r["run_id"] for r in runs} == {run_id} and state(out)["wandb"]["run_id"] == run_id
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert {k: v for k, v in runs[-1]["config"]["update"].items() if k != "_wandb"} == {**config, "resume": True}
    summary = {}
    for r in records:
        if r["type"] == "summary":
            summary.update(r["summary"]["update"])
    last = expected(out)[3]
    assert {k: summary[k] for k in last if k.startswith("eval/")} == {k: v for k, v in last.items() if "eval/" in k}


@pytest.mark.slow
def test_trackio_holds_every_record_and_resumes_its_run(toy, tmp_path, monkeypatch):
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))  # read when trackio is first imported
    pytest.importorskip("trackio")
    for module in [m for name, m in sys.modules.items() if name.startswith("trackio") and hasattr(m, "TRACKIO_DIR")]:
        monkeypatch.setattr(module, "TRACKIO_DIR", tmp_path / "trackio")  # imported already by an earlier test
    from trackio.sqlite_storage import SQLiteStorage

    out = tmp_path / "run"
    with stopped_after(1):
        assert train(toy, out, "trackio", extra=("--save-every", "1")) == 130
    name = state(out)["trackio"]["run"]
    assert train(toy, out, "trackio", extra=("--save-every", "1", "--resume")) == 0
    assert state(out)["trackio"]["run"] == name and name.startswith("run-")
    assert SQLiteStorage.get_runs(trackers.PROJECT) == [name]  # one run, resumed
    logs = SQLiteStorage.get_logs(trackers.PROJECT, run=name)
    held = {log["step"]: {k: v for k, v in log.items() if k not in ("step", "timestamp")} for log in logs}
    assert len(held) == len(logs)  # each step once
    assert_same(held, out)  # trackio keeps float64: equal
    config = SQLiteStorage.get_run_config(trackers.PROJECT, run=name)
    assert config["beta"] == 0.1 and config["report_to"] == "trackio"


@pytest.mark.parametrize("name", trackers.TRACKERS)
def test_a_tracker_not_installed_is_one_line_and_writes_nothing(toy, tmp_path, capsys, monkeypatch, name):
    monkeypatch.setitem(sys.modules, name, None)  # `import NAME` fails, and so does finding it
    out = tmp_path / "run"
    assert train(toy, out, name) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"preftune: error: --report-to {name} needs the {name} package: pip install 'preftune[{name}]'"
    assert "Traceback" not in "\n".join(err)
    assert not out.exists()


def test_a_tracker_that_fails_to_import_when_opened_is_the_same_line(tmp_path, monkeypatch):
    """Found but broken (a missing dependency of its own): the same error when the trackers are opened."""
    from preftune.config import TrainConfig

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    cfg = TrainConfig(model="m", data="d", output=str(tmp_path), report_to="tensorboard")
    with pytest.raises(UserError, match=r"^--report-to tensorboard needs the tensorboard package: pip install "):
        trackers.open_trackers(cfg, tmp_path, resumed=False)


@pytest.mark.parametrize(
    "value, message",
    [
        ("bogus", "--report-to: unknown tracker 'bogus' (choose from tensorboard, wandb, mlflow, trackio, or none)"),
        ("tensorboard,", "--report-to: unknown tracker ''"),
        ("none,mlflow", "--report-to none cannot be combined with trackers: none,mlflow"),
        ("mlflow,mlflow", "--report-to lists a tracker twice: mlflow,mlflow"),
    ],
)
def test_bad_report_to_is_one_line_and_writes_nothing(toy, tmp_path, capsys, value, message):
    out = tmp_path / "run"
    assert train(toy, out, value) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("preftune: error: " + message) and "Traceback" not in "\n".join(err)
    assert not out.exists()


def test_none_opens_no_tracker(tmp_path):
    from preftune.config import TrainConfig

    cfg = TrainConfig(model="m", data="d", output=str(tmp_path))
    assert cfg.report_to == "none" and trackers.open_trackers(cfg, tmp_path, resumed=False) == []
    assert not (tmp_path / trackers.STATE).exists()
