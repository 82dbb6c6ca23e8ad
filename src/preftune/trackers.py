"""Experiment trackers for `preftune train --report-to`: TensorBoard, Weights & Biases, MLflow and trackio, each
through its own library, an optional extra (`pip install 'preftune[mlflow]'`).

Each tracker is an `observe.Sink` on rank 0. It gets every metrics.jsonl record under the same names at the same
step, the resolved config as the run's hyperparameters, and at the end the final evaluation (the eval/* values of
the last record) as the run's summary. With no settings of their own they stay offline, writing into the run
folder (trackio: its own local store).

trackers.json in the run folder keeps each tracker's run id and the last step the tracker holds. --resume reopens
the same tracker run and sends only the steps it does not hold yet: a resumed run recomputes the steps after its
checkpoint with the same values (the resume is exact), so sending them again would only duplicate them.
"""

from __future__ import annotations

import atexit
import importlib
import importlib.util
import json
import logging
import os
import secrets
import time
from pathlib import Path
from typing import Any

from preftune.errors import UserError
from preftune.files import write_file_atomically
from preftune.rundir import METRICS, kept_records

log = logging.getLogger("preftune")

TRACKERS = ("tensorboard", "wandb", "mlflow", "trackio")  # each the name of its extra and of its package
STATE = "trackers.json"
TENSORBOARD = "tensorboard"  # run_dir/tensorboard: the event files
MLRUNS = "mlruns"  # run_dir/mlruns: MLflow's file store, unless MLFLOW_TRACKING_URI names another
PROJECT = "preftune"  # W&B project, MLflow experiment and trackio project, unless the tracker's settings name one


def names(report_to: str) -> list[str]:
    """The trackers of a --report-to value ("none": none)."""
    return [] if report_to.strip() == "none" else [name.strip() for name in report_to.split(",")]


def missing(name: str) -> str:
    return f"--report-to {name} needs the {name} package: pip install 'preftune[{name}]'"


def check_installed(chosen: list[str]) -> None:
    """Before anything is loaded or written. A package is found, not imported: importing one takes seconds."""
    for name in chosen:
        if importlib.util.find_spec(name) is None:
            raise UserError(missing(name))


def _import(name: str, module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(missing(name)) from None


_OPEN: list[Tracker] = []  # opened and not finished: what a run that stopped on an exception (Ctrl-C) left open


def close_interrupted() -> None:
    """Close, as interrupted, the tracker runs that a run left open when it stopped without finishing: at exit, and
    before a new run in this process, which may resume the same tracker run (W&B refuses a run id still open)."""
    while _OPEN:
        tracker = _OPEN.pop()
        try:
            tracker.interrupted()
        except Exception as e:  # the run failed already; a tracker's server that is gone must not stop the next one
            log.warning("could not close the %s run of an interrupted run: %s", type(tracker).__name__, e)


atexit.register(close_interrupted)


def open_trackers(cfg: Any, run_dir: Path, resumed: bool) -> list:  # cfg: a TrainConfig (config.py imports us)
    """The sinks of --report-to, then the one that rewrites trackers.json after them; [] for none."""
    close_interrupted()
    chosen = names(cfg.report_to)
    if not chosen:
        return []
    path = run_dir / STATE
    state = Ledger(path, json.loads(path.read_text(encoding="utf-8")) if resumed and path.exists() else {})
    config = cfg.to_dict()
    sinks = []
    for name in chosen:
        sinks.append(OPENERS[name](config, run_dir, state.entries.setdefault(name, {})))
        _OPEN.append(sinks[-1])
    if resumed:  # a tracker added at --resume (or whose run is gone) gets the steps kept so far; the others hold them
        kept = kept_records(run_dir / METRICS)
        for tracker in sinks:
            tracker.log(kept)
    state.save()  # the run ids, before the first step: a kill after it still resumes the same tracker runs
    return [*sinks, state]


class Ledger:
    """trackers.json ({tracker: {"run_id"..., "step": last step held}}), rewritten once the trackers have logged
    an interval: a step is marked only after its tracker took it (at worst an interval is sent twice, never lost)."""

    def __init__(self, path: Path, entries: dict[str, dict]):
        self.path = path
        self.entries = entries

    def save(self) -> None:
        write_file_atomically(self.path, json.dumps(self.entries, indent=2) + "\n")

    def log(self, records: list[dict]) -> None:
        self.save()

    def finish(self, summary: dict) -> None:
        self.save()


class Tracker:
    """Sends each step once (see the module's docstring); a subclass sends records and closes its run."""

    def __init__(self, entry: dict):
        self.entry = entry

    def log(self, records: list[dict]) -> None:
        new = [r for r in records if r["step"] > self.entry.get("step", 0)]
        if new:
            self.send(new)
            self.entry["step"] = new[-1]["step"]

    def finish(self, summary: dict) -> None:
        _OPEN.remove(self)
        self.close({k: v for k, v in summary.items() if k.startswith("eval/")})

    def send(self, records: list[dict]) -> None:
        raise NotImplementedError

    def close(self, evals: dict[str, float]) -> None:
        raise NotImplementedError

    def interrupted(self) -> None:
        """Close the run as interrupted; by default as finished (the tracker has no other state)."""
        self.close({})


def _metrics(record: dict) -> dict[str, float]:
    return {k: v for k, v in record.items() if k != "step"}


class TensorBoard(Tracker):
    """Event files in run_dir/tensorboard (one per start; TensorBoard shows a folder's files as one run); the
    config in the HParams dashboard, with the final eval/* values as its metrics."""

    def __init__(self, config: dict, run_dir: Path, entry: dict):
        super().__init__(entry)
        tb = _import("tensorboard", "torch.utils.tensorboard")
        self.summary = _import("tensorboard", "torch.utils.tensorboard.summary")
        self.config = {k: v for k, v in config.items() if v is not None}  # None: no hparam value type
        self.writer = tb.SummaryWriter(log_dir=str(run_dir / TENSORBOARD))
        if not entry.get("hparams"):  # once per run: a resumed run holds its hyperparameters already
            _, start, _ = self.summary.hparams(self.config, {})
            self.writer.file_writer.add_summary(start)
            entry["hparams"] = True

    def send(self, records: list[dict]) -> None:
        for record in records:
            for key, value in _metrics(record).items():
                self.writer.add_scalar(key, value, record["step"])
        self.writer.flush()  # on disk before the step is marked held: a kill loses nothing marked

    def close(self, evals: dict[str, float]) -> None:
        experiment, _, end = self.summary.hparams(self.config, evals)
        if evals:  # without it the dashboard lists every scalar as a metric
            self.writer.file_writer.add_summary(experiment)
        self.writer.file_writer.add_summary(end)
        self.writer.close()

    def interrupted(self) -> None:
        self.writer.close()  # no session end: the HParams dashboard shows the run as unfinished


class WandB(Tracker):
    """Offline (run_dir/wandb/offline-run-*) unless WANDB_MODE is set; W&B cannot resume a run offline, so each
    start writes its own offline-run folder under the same run id (`wandb sync` uploads them)."""

    def __init__(self, config: dict, run_dir: Path, entry: dict):
        super().__init__(entry)
        wandb = _import("wandb", "wandb")
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT") or PROJECT,
            name=run_dir.resolve().name,
            id=entry.get("run_id"),
            resume="allow",
            dir=str(run_dir),
            mode=None if os.environ.get("WANDB_MODE") else "offline",
            config=config,
            reinit="create_new",  # beside any run the caller has open, which stays the current one
        )
        entry["run_id"] = self.run.id

    def send(self, records: list[dict]) -> None:
        for record in records:
            self.run.log(_metrics(record), step=record["step"], commit=True)  # commit: written now, not at the next

    def close(self, evals: dict[str, float]) -> None:
        self.run.summary.update(evals)
        self.run.finish()

    def interrupted(self) -> None:
        self.run.finish(exit_code=1)  # shown as failed; a no-op if W&B's own exit hook finished it first


class MLflow(Tracker):
    """MlflowClient on a file store in run_dir/mlruns unless MLFLOW_TRACKING_URI is set; experiment
    MLFLOW_EXPERIMENT_NAME or "preftune"; the config as the run's params."""

    BATCH = 1000  # MLflow's limit of metrics per log_batch call (and 100 params)

    def __init__(self, config: dict, run_dir: Path, entry: dict):
        super().__init__(entry)
        tracking = _import("mlflow", "mlflow.tracking")
        self.entities = _import("mlflow", "mlflow.entities")
        self.errors = _import("mlflow", "mlflow.exceptions")
        uri = None if os.environ.get("MLFLOW_TRACKING_URI") else (run_dir / MLRUNS).resolve().as_uri()
        if uri:  # MLflow ≥ 3.13 refuses a file store without this; mlflow-skinny has no database store to offer
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = tracking.MlflowClient(tracking_uri=uri)
        self.run_id = self._reopen(entry.get("run_id")) or self._create(config, run_dir)
        entry["run_id"] = self.run_id

    def _reopen(self, run_id: str | None) -> str | None:
        if run_id is None:
            return None
        try:
            self.client.update_run(run_id, status="RUNNING")
        except self.errors.MlflowException as e:  # the run was deleted, or MLFLOW_TRACKING_URI changed
            log.warning("MLflow run %s cannot be resumed (%s): logging to a new run", run_id, str(e).splitlines()[0])
            self.entry.clear()
            return None
        return run_id

    def _create(self, config: dict, run_dir: Path) -> str:
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or PROJECT
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
        run = self.client.create_run(
            experiment_id, run_name=run_dir.resolve().name, tags={"preftune.run_dir": str(run_dir.resolve())}
        )
        params = [self.entities.Param(k, str(v)) for k, v in config.items()]
        for i in range(0, len(params), 100):
            self.client.log_batch(run.info.run_id, params=params[i : i + 100])
        return run.info.run_id

    def send(self, records: list[dict]) -> None:
        now = int(time.time() * 1000)
        metrics = [
            self.entities.Metric(key, float(value), now, record["step"])
            for record in records
            for key, value in _metrics(record).items()
        ]
        for i in range(0, len(metrics), self.BATCH):
            self.client.log_batch(self.run_id, metrics=metrics[i : i + self.BATCH])

    def close(self, evals: dict[str, float]) -> None:
        # MLflow's summary of a run is each metric's latest value: the eval/* values of the last step already.
        self.client.set_terminated(self.run_id, "FINISHED")

    def interrupted(self) -> None:
        self.client.set_terminated(self.run_id, "KILLED")  # not left RUNNING


class Trackio(Tracker):
    """trackio's local store ($TRACKIO_DIR, by default ~/.cache/huggingface/trackio), project "preftune"; the run
    is named after the run folder plus a random suffix, so that two folders of the same name never share a run."""

    def __init__(self, config: dict, run_dir: Path, entry: dict):
        super().__init__(entry)
        trackio = _import("trackio", "trackio")
        name = entry.get("run") or f"{run_dir.resolve().name}-{secrets.token_hex(3)}"
        self.run = trackio.init(project=PROJECT, name=name, config=config, resume="allow")
        entry["run"] = name

    def send(self, records: list[dict]) -> None:
        for record in records:
            self.run.log(_metrics(record), step=record["step"])

    def close(self, evals: dict[str, float]) -> None:
        self.run.finish()  # trackio has no summary apart from the logged values


OPENERS = {"tensorboard": TensorBoard, "wandb": WandB, "mlflow": MLflow, "trackio": Trackio}
