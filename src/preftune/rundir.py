"""The run folder: the names of the files it holds, and the checks before a run writes into it (a new folder, or
the same options and global batch for `--resume`).

    config.yaml     the resolved options               metrics.jsonl   one line per optimizer step
    launch.json     processes × batch of the last start  audit.json    the data audit
    eval.json       the last sampling evaluation       report.html, plots/   the report
    checkpoints/    step-N/ folders (checkpoint.py)    final/, final-merged/  the trained model
    tokens/         --stream's token ids
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import Any

import yaml

from preftune.errors import UserError
from preftune.files import write_file_atomically

CONFIG = "config.yaml"
AUDIT = "audit.json"
EVAL = "eval.json"
REPORT = "report.html"
PLOTS = "plots"
FINAL = "final"
FINAL_MERGED = "final-merged"
CHECKPOINTS = "checkpoints"  # step-00000012/ folders, written by checkpoint.py

METRICS = "metrics.jsonl"


TOKENS = "tokens"  # --stream: <output>/tokens/{train,eval}, the token ids of --data and --eval-data


def token_dir(run_dir: Path, training: bool, rank: int = 0, processes: int = 1) -> Path:
    """Where --stream keeps token ids: inside the run folder, so they live and go with the run and no two runs
    share (or must validate) them; rebuilt from --data at every start and resume, as the in-memory path re-reads
    it. Each process of several writes its own (their run folders may be on different machines). Without a run
    (`precompute`), a temporary folder the caller removes."""
    if not training:
        return Path(tempfile.mkdtemp(prefix="preftune-tokens-"))
    return run_dir / TOKENS / (f"rank{rank}" if processes > 1 else "")


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders of an interrupted write are ignored)."""
    folder = run_dir / CHECKPOINTS
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.name.startswith("step-") and not p.name.endswith(".tmp"))


def latest_checkpoint(run_dir: Path) -> Path | None:
    done = complete_checkpoints(run_dir)
    return done[-1] if done else None


def batch_text(batch_size: int, grad_accum: int, processes: int) -> str:
    """'--batch-size 4 × --grad-accum 2 × 2 processes = 16' (the processes only when more than one)."""
    many = f" × {processes} processes" if processes > 1 else ""
    return f"--batch-size {batch_size} × --grad-accum {grad_accum}{many} = {batch_size * grad_accum * processes}"


def prepare_run_dir(cfg: Any, processes: int = 1) -> Path:
    """--output, checked before anything is loaded: a new or empty folder, or with --resume a run of the same
    options and global batch (`processes`: of this launch)."""
    run_dir = Path(cfg.output)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--output {cfg.output}: exists and is not a folder")
    if cfg.resume:
        # A run killed before its first checkpoint still has its config.yaml: it starts again from step 0.
        if latest_checkpoint(run_dir) is None and not (run_dir / CONFIG).exists():
            raise UserError(f"--resume: no run to resume in {cfg.output} (no checkpoint, no config.yaml)")
        saved = (run_dir / CONFIG).read_text(encoding="utf-8") if (run_dir / CONFIG).exists() else ""
        check_same_config(cfg, saved, run_dir, processes)
    elif run_dir.exists() and any(p.name != TOKENS for p in run_dir.iterdir()):  # tokens/: a start killed early
        raise UserError(
            f"--output {cfg.output}: folder is not empty; pass --resume to continue it, or choose a new folder"
        )
    return run_dir


def check_same_config(cfg: Any, saved_text: str, run_dir: Path, processes: int) -> None:
    saved = yaml.safe_load(saved_text) or {}
    now = cfg.to_dict()
    # A checkpoint holds the whole model, so the number of processes may change between runs; what must not
    # change is the global batch (it fixes every step's pairs), so --batch-size and --grad-accum may change too.
    per_process = ("batch_size", "grad_accum", "fsdp")  # --fsdp too: its checkpoints hold the whole model
    for key, value in saved.items():
        if key not in ("resume", "report_to", *per_process) and now.get(key) != value:
            raise UserError(
                f"--resume: option {key} is {now.get(key)!r} but the run in {run_dir} used {value!r}; "
                "an exact resume needs the same options"
            )
    if not saved:
        return
    last = _last_launch(run_dir, saved)
    before = (last["batch_size"], last["grad_accum"], last["processes"])
    after = (cfg.batch_size, cfg.grad_accum, processes)
    if math.prod(before) != math.prod(after):
        raise UserError(
            f"--resume: the run in {run_dir} took {batch_text(*before)} pairs per optimizer step, now "
            f"{batch_text(*after)}; an exact resume needs the same global batch"
        )


LAUNCH = "launch.json"  # how the run was last started or resumed: processes and per-process batch


def _last_launch(run_dir: Path, saved_config: dict) -> dict:
    """{"processes", "batch_size", "grad_accum"} of the run's last start or resume (a run folder without
    launch.json ran in one process with the options of its config.yaml)."""
    path = run_dir / LAUNCH
    if path.exists():
        return json.loads(path.read_text(encoding="utf-8"))
    return {"processes": 1, "batch_size": saved_config["batch_size"], "grad_accum": saved_config["grad_accum"]}


def write_launch(cfg: Any, run_dir: Path, processes: int) -> None:
    launch = {"processes": processes, "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum}
    write_file_atomically(run_dir / LAUNCH, json.dumps(launch) + "\n")  # --resume reads it


def kept_records(path: Path) -> list[dict]:
    """The records of a metrics.jsonl (none when it does not exist yet): a resumed run's history."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def truncate_metrics(path: Path, step: int) -> None:
    """Drop the lines written after the checkpoint: they are about to be recomputed."""
    if not path.exists():
        return
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if lines and not lines[-1].endswith("}"):  # a line cut by a kill mid-write
        lines.pop()
    kept = [line for line in lines if json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def writing(run_dir: Path, what: str, write):
    """Run `write`; a full disk or a permission error becomes one line that says what is still intact."""
    try:
        return write()
    except OSError as e:
        previous = latest_checkpoint(run_dir)
        kept = f"the newest checkpoint {previous} is intact" if previous else "no checkpoint was written yet"
        raise UserError(f"--output {run_dir}: cannot write {what} ({e.strerror or e}); {kept}") from None
