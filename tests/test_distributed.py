"""Two processes under the real `torchrun` (CPU, gloo) train exactly like one process with the same global batch.

One launch carries most checks: a one-process run (--batch-size 8) is interrupted after step 1, then resumed by
2 processes (--batch-size 4 each, the same 8 pairs per step) with an empty reference cache, so the 2 processes
compute the cache together, train steps 2-4 (the last step holds 1 pair: process 1 has none) and evaluate
9 held-out pairs (5 + 4). It must match an uninterrupted one-process run; one of its checkpoints then resumes in
one process. A second launch checks that an error after training started is printed once.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from preftune.cli import main
from preftune.distributed import share

from conftest import stopped_after
from helpers import assert_same_run, assert_same_weights, copy_run, records, torchrun
from toy import counting_pairs, save_model_folder, write_jsonl

pytestmark = pytest.mark.exactness  # compares runs: CI runs it again under other CPU kernels


def args(toy: dict, out: Path, batch_size: int, *extra: str) -> list[str]:
    """25 pairs, 8 per step in file order: 4 steps of 8, 8, 8, 1 pairs; warmup makes step 1's learning rate 0."""
    return [
        "train",
        "--model",
        toy["model"],
        "--data",
        toy["train"],
        "--eval-data",
        toy["eval"],
        "--eval-every",
        "2",
        "--output",
        str(out),
        "--batch-size",
        str(batch_size),
        "--no-shuffle",
        "--epochs",
        "1",
        "--learning-rate",
        "1e-3",
        "--lr-scheduler",
        "linear",
        "--warmup-steps",
        "1",
        "--save-every",
        "1",
        *extra,
    ]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    return {
        "model": str(save_model_folder(root / "model")),
        "root": root,
        "train": str(write_jsonl(counting_pairs(25, seed=1), root / "train.jsonl")),
        "eval": str(write_jsonl(counting_pairs(9, seed=2), root / "eval.jsonl")),
    }


@pytest.fixture(scope="module")
def whole(toy):
    """The uninterrupted one-process run."""
    out = toy["root"] / "whole"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PREFTUNE_CACHE", str(toy["root"] / "cache-one"))
        assert main(args(toy, out, 8)) == 0
    return out


@pytest.fixture(scope="module")
def mixed(toy):
    """Step 1 in one process, interrupted; steps 2-4 in 2 processes (`torchrun`), which resume it."""
    out = toy["root"] / "mixed"

    with pytest.MonkeyPatch.context() as mp, stopped_after(1):
        mp.setenv("PREFTUNE_CACHE", str(toy["root"] / "cache-one"))
        assert main(args(toy, out, 8)) == 130
    assert len(records(out)) == 1 and not (out / "final").exists()
    proc = torchrun(args(toy, out, 4, "--resume"), toy["root"] / "cache-two")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_two_processes_continue_a_one_process_run_as_one_process(whole, mixed):
    out, proc = mixed
    assert_same_run(records(out), records(whole))
    assert_same_weights(out, whole)
    assert json.loads((out / "launch.json").read_text()) == {"processes": 2, "batch_size": 4, "grad_accum": 1}
    # Rank 0 alone logs progress and writes: one line per step, one log line per event.
    assert proc.stderr.count("training 4 steps of 8 pairs (25 pairs, 4 steps per epoch) on cpu × 2 processes") == 1
    assert proc.stderr.count("resumed from") == 1
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "step-00000001",
        "step-00000002",
        "step-00000003",
    ]


def test_the_shared_reference_cache_is_the_one_process_file(toy, mixed):
    """Each process computed every other batch; the assembled files equal those of one process, byte for byte."""
    single = toy["root"] / "cache-single"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PREFTUNE_CACHE", str(single))
        assert (
            main(
                [
                    "precompute",
                    "--model",
                    toy["model"],
                    "--data",
                    toy["train"],
                    "--eval-data",
                    toy["eval"],
                    "--batch-size",
                    "4",
                ]
            )
            == 0
        )
    shared = sorted((toy["root"] / "cache-two").iterdir())
    assert [p.name for p in shared] == sorted(p.name for p in single.iterdir())
    assert len(shared) == 2  # --data and --eval-data, no temporary file left
    for path in shared:
        assert path.read_bytes() == (single / path.name).read_bytes(), path.name


def test_a_two_process_checkpoint_resumes_in_one_process(toy, whole, mixed, tmp_path):
    """Cut the run back to its step-2 checkpoint (written by 2 processes), finish it in one process."""
    out = copy_run(mixed[0], tmp_path / "run")
    shutil.rmtree(out / "final")
    shutil.rmtree(out / "checkpoints" / "step-00000003")
    assert main(args(toy, out, 8, "--resume")) == 0
    assert_same_weights(out, whole)
    assert_same_run(records(out), records(whole))
    assert json.loads((out / "launch.json").read_text()) == {"processes": 1, "batch_size": 8, "grad_accum": 1}


def test_resume_with_another_global_batch_is_refused(toy, mixed, tmp_path, capsys):
    out = copy_run(mixed[0], tmp_path / "run")
    assert main(args(toy, out, 4, "--resume")) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (
        f"preftune: error: --resume: the run in {out} took --batch-size 4 × --grad-accum 1 × 2 processes "
        "= 8 pairs per optimizer step, now --batch-size 4 × --grad-accum 1 = 4; an exact resume needs the "
        "same global batch"
    )


@pytest.mark.slow
def test_an_error_after_training_started_is_printed_once(toy, tmp_path):
    """Step 1 is trained (π = π_ref: loss ln 2), its huge update makes step 2's loss NaN on both processes."""
    out = tmp_path / "run"
    argv = [
        "train",
        "--model",
        toy["model"],
        "--data",
        toy["train"],
        "--output",
        str(out),
        "--batch-size",
        "4",
        "--max-steps",
        "3",
        "--learning-rate",
        "1e20",
        "--max-grad-norm",
        "0",
        "--lr-scheduler",
        "constant",
    ]
    proc = torchrun(argv, tmp_path / "cache")
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("preftune: error")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert errors[0].startswith("preftune: error: step 2: ") and "stopping before a broken model is saved" in errors[0]
    # No traceback from our code on any process (torchrun adds its own summary of the failed processes).
    assert not [line for line in proc.stderr.splitlines() if line.strip().startswith("File ") and "preftune" in line]
    assert not (out / "final").exists()
    [first] = records(out)
    assert first["step"] == 1 and first["loss"] == pytest.approx(math.log(2), abs=1e-6)


# ---------------------------------------------------------------------------------------------------- --fsdp


@pytest.fixture(scope="module")
def tied(toy):
    """A toy model with tied embeddings (the LM head is the embedding matrix) and its uninterrupted one-process
    run: (toy with that model, run folder)."""
    spec = {**toy, "model": str(save_model_folder(toy["root"] / "tied-model", tie=True))}
    out = toy["root"] / "tied-whole"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PREFTUNE_CACHE", str(toy["root"] / "cache-tied"))
        assert main(args(spec, out, 8)) == 0
    return spec, out


@pytest.fixture(scope="module")
def sharded(tied):
    """The tied model's run by 2 processes with --fsdp (--batch-size 4 each: the same 8 pairs per step)."""
    spec, _ = tied
    out = spec["root"] / "tied-fsdp"
    proc = torchrun(args(spec, out, 4, "--fsdp"), spec["root"] / "cache-tied")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


@pytest.mark.slow
def test_fsdp_trains_a_tied_model_like_one_process(tied, sharded):
    """Packed layout (the LM head read outside forward), tied embeddings, the last step's single pair on rank 0 only
    and 9 eval pairs (5 + 4): the same metrics, gradient norms (clipping sees the whole norm) and weights."""
    (_, whole), (out, proc) = tied, sharded
    got = records(out)
    assert got[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # π = π_ref at step 1
    assert_same_run(got, records(whole))
    assert_same_weights(out, whole)
    assert "Traceback" not in proc.stderr and "returned a view tensor" not in proc.stderr
    # The files of a run without --fsdp: the tied matrix saved once, under the name safetensors keeps.
    for step in ("step-00000001", "step-00000003"):
        sharded_file = load_file(out / "checkpoints" / step / "model.safetensors")
        assert sharded_file.keys() == load_file(whole / "checkpoints" / step / "model.safetensors").keys()
        assert "lm_head.weight" in sharded_file and "model.embed_tokens.weight" not in sharded_file
    assert "lm_head.weight" not in load_file(out / "final" / "model.safetensors")
    config = json.loads((out / "final" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"] is True
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out / "final")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


@pytest.mark.slow
def test_an_fsdp_checkpoint_resumes_in_one_process_without_fsdp(tied, sharded, tmp_path, monkeypatch):
    """Its step-2 checkpoint (model and AdamW state gathered from 2 shards) finishes the run in one process."""
    spec, whole = tied
    out = copy_run(sharded[0], tmp_path / "run")
    shutil.rmtree(out / "final")
    shutil.rmtree(out / "checkpoints" / "step-00000003")
    monkeypatch.setenv("PREFTUNE_CACHE", str(spec["root"] / "cache-tied"))
    assert main(args(spec, out, 8, "--resume")) == 0
    assert_same_weights(out, whole)
    assert_same_run(records(out), records(whole))


@pytest.mark.slow
def test_fsdp_resumes_a_one_process_checkpoint(toy, whole):
    """Untied model: step 1 in one process, then 2 processes with --fsdp shard its checkpoint and train on with
    --batch-size 2 × --grad-accum 2 (step 4's single pair: rank 1 runs its one micro-batch with a zero loss)."""
    out = toy["root"] / "fsdp-resumed"
    with pytest.MonkeyPatch.context() as mp, stopped_after(1):
        mp.setenv("PREFTUNE_CACHE", str(toy["root"] / "cache-one"))
        assert main(args(toy, out, 8)) == 130
    proc = torchrun(args(toy, out, 2, "--grad-accum", "2", "--fsdp", "--resume"), toy["root"] / "cache-one")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("resumed from") == 1
    assert_same_run(records(out), records(whole))
    assert_same_weights(out, whole)


@pytest.mark.parametrize(
    "extra, refused",
    [
        (["--lora-r", "4"], "LoRA (--lora-r, or a --model that holds an adapter): train adapters without it"),
        (["--ref-update", "hard"], "--ref-update (the live reference would be updated from sharded weights)"),
        (
            ["--eval-prompts", "prompts.jsonl"],
            "--eval-prompts (sampling on rank 0 alone would wait for the other processes)",
        ),
        (
            ["--loss", "kto"],
            "--loss kto (its KL estimate is exchanged between processes in the middle of each micro-batch)",
        ),
    ],
)
def test_fsdp_refuses_what_it_does_not_handle(toy, tmp_path, capsys, extra, refused):
    out = tmp_path / "run"
    assert main(["train", "--model", toy["model"], "--data", toy["train"], "--output", str(out), "--fsdp", *extra]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"preftune: error: --fsdp: not supported with {refused}"
    assert not out.exists()


def test_tied_groups_name_the_tied_embeddings_once():
    from preftune.fsdp import tied_groups

    from toy import build_model

    assert tied_groups(build_model(12, tie=True)) == [["lm_head.weight", "model.embed_tokens.weight"]]
    assert tied_groups(build_model(12, tie=False)) == []


@pytest.mark.parametrize(
    "n, size, expected",
    [
        (7, 3, [[0, 1, 2], [3, 4], [5, 6]]),  # 7 = 3 + 2 + 2: the first parts are larger
        (8, 2, [[0, 1, 2, 3], [4, 5, 6, 7]]),
        (1, 2, [[0], []]),  # fewer items than ranks: rank 0 still gets one
        (5, 4, [[0, 1], [2], [3], [4]]),
    ],
)
def test_share_splits_contiguously(n, size, expected):
    parts = [share(list(range(n)), rank, size) for rank in range(size)]
    assert parts == expected


@pytest.mark.parametrize(
    "n, size, unit, expected",
    [
        (6, 2, 2, [[0, 1, 2, 3], [4, 5]]),  # 3 groups of 2: 2 + 1 groups
        (9, 2, 3, [[0, 1, 2, 3, 4, 5], [6, 7, 8]]),
        (3, 2, 3, [[0, 1, 2], []]),  # one group: rank 0 takes it whole
        (8, 2, 1, [[0, 1, 2, 3], [4, 5, 6, 7]]),
    ],
)
def test_share_keeps_groups_whole(n, size, unit, expected):
    assert [share(list(range(n)), rank, size, unit) for rank in range(size)] == expected


def test_gradient_buckets_hold_one_dtype_up_to_the_limit(monkeypatch):
    from preftune import distributed

    monkeypatch.setattr(distributed, "BUCKET_ELEMENTS", 8)
    params = [
        torch.nn.Parameter(torch.zeros(n, dtype=dtype))
        for n, dtype in [
            (3, torch.float32),
            (4, torch.float32),
            (2, torch.float32),
            (10, torch.float32),
            (1, torch.float32),
            (1, torch.bfloat16),
        ]
    ]
    for p in params:
        p.grad = torch.zeros_like(p)
    # 3 + 4 fit in 8; 2 would make 9; 10 is alone (too big for any bucket); 1 after it would make 11; bf16 apart.
    sizes = [[p.numel() for p in bucket] for bucket in distributed._buckets(params)]
    assert sizes == [[3, 4], [2], [10], [1], [1]]
