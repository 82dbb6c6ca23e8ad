"""End to end through the real CLI on a tiny Llama built from a config (no downloads)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from preftune.cli import main

from conftest import stopped_after
from helpers import SRC, assert_same_run
from helpers import records as read_metrics
from toy import build_model, counting_pairs, save_model_folder, write_jsonl

pytestmark = pytest.mark.exactness  # compares runs: CI runs it again under other CPU kernels


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    model = save_model_folder(root / "model")
    train = write_jsonl(counting_pairs(64, seed=1), root / "train.jsonl")
    held = write_jsonl(counting_pairs(32, seed=2), root / "eval.jsonl")
    return {"model": str(model), "train": str(train), "eval": str(held), "root": root}


def run(args: list[str]) -> int:
    return main(["train", *args])


def base_args(toy, out: Path, steps: int = 3) -> list[str]:
    return [
        "--model",
        toy["model"],
        "--data",
        toy["train"],
        "--output",
        str(out),
        "--batch-size",
        "8",
        "--max-steps",
        str(steps),
        "--learning-rate",
        "1e-3",
        "--lr-scheduler",
        "constant",
    ]


def test_first_step_is_ln2_and_metrics_complete(toy, tmp_path):
    out = tmp_path / "run"
    assert run(base_args(toy, out)) == 0
    records = read_metrics(out)
    assert [r["step"] for r in records] == [1, 2, 3]
    first = records[0]
    # π = π_ref before the first update: h = 0, so the loss is -log σ(0) = ln 2 and every reward is 0.
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["rewards/chosen"] == pytest.approx(0, abs=1e-6)
    assert first["rewards/margins"] == pytest.approx(0, abs=1e-6)
    # The cached reference log-probs come from other batches: equal up to float rounding, which is within the
    # tie band, so no pair counts as a win (as with --no-ref-cache and in TRL, where they are exactly equal).
    assert first["rewards/accuracies"] == 0.0
    expected = {
        "step",
        "loss",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
        "grad_norm",
        "lr",
        "pairs_per_s",
        "tokens_per_s",
        "step_time_s",
    }
    assert expected <= set(first)
    assert first["logps/chosen"] < 0 and first["grad_norm"] > 0 and first["lr"] == pytest.approx(1e-3)
    config = (out / "config.yaml").read_text()
    assert "beta: 0.1" in config and "batch_size: 8" in config


def test_run_files_get_the_permissions_of_the_umask(toy, tmp_path):
    out = tmp_path / "run"
    old = os.umask(0o022)
    try:
        assert run(base_args(toy, out, steps=2) + ["--save-every", "1", "--eval-data", toy["eval"]]) == 0
    finally:
        os.umask(old)
    paths = [p for p in out.rglob("*")]
    assert {"config.yaml", "audit.json", "launch.json", "report.html", "model.safetensors"} <= {p.name for p in paths}
    for p in paths:
        assert p.stat().st_mode & 0o777 == (0o755 if p.is_dir() else 0o644), p


def test_learns_toy_task_and_final_loads(toy, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "run"
    args = base_args(toy, out, steps=24) + ["--eval-data", toy["eval"], "--eval-every", "12"]
    assert run(args) == 0
    records = read_metrics(out)
    assert "eval/loss" in records[11] and "eval/loss" not in records[10]
    late = sum(r["loss"] for r in records[-4:]) / 4
    assert late < 0.65 * records[0]["loss"]
    assert records[-1]["eval/rewards/accuracies"] >= 0.9
    assert records[-1]["eval/rewards/margins"] > 0
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    tokenizer = AutoTokenizer.from_pretrained(out / "final")
    ids = tokenizer("count from 3 :", return_tensors="pt").input_ids
    assert model(ids).logits.shape == (1, ids.shape[1], len(tokenizer))


def test_resume_after_interruption_reproduces_the_run(toy, tmp_path):
    def args(out):
        return base_args(toy, out, steps=6) + ["--save-every", "2", "--lr-scheduler", "linear", "--warmup-steps", "2"]

    whole = tmp_path / "whole"
    assert run(args(whole)) == 0

    cut = tmp_path / "cut"
    with stopped_after(5):
        assert run(args(cut)) == 130
    assert len(read_metrics(cut)) == 5 and not (cut / "final").exists()
    assert run(args(cut) + ["--resume"]) == 0

    timing = {"pairs_per_s", "tokens_per_s", "step_time_s"}

    def strip(rs):
        return [{k: v for k, v in r.items() if k not in timing} for r in rs]

    assert strip(read_metrics(cut)) == strip(read_metrics(whole))
    from safetensors.torch import load_file

    a, b = load_file(whole / "final" / "model.safetensors"), load_file(cut / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_tr_dpo_resume_after_interruption_reproduces_the_run(toy, tmp_path):
    """TR-DPO's reference drifts: a checkpoint after its first update holds it, and resuming is exact."""
    from safetensors.torch import load_file

    def args(out):
        return base_args(toy, out, steps=6) + [
            "--save-every",
            "2",
            "--ref-update",
            "soft",
            "--ref-update-every",
            "3",
            "--ref-update-alpha",
            "0.5",
        ]

    whole = tmp_path / "whole"
    assert run(args(whole)) == 0

    cut = tmp_path / "cut"
    with stopped_after(5):
        assert run(args(cut)) == 130
    # Step 2 comes before the first update (step 3): its reference is the loaded model, not saved again.
    assert not (cut / "checkpoints" / "step-00000002" / "reference.safetensors").exists()
    saved = load_file(cut / "checkpoints" / "step-00000004" / "reference.safetensors")
    start = load_file(Path(toy["model"]) / "model.safetensors")
    policy = load_file(cut / "checkpoints" / "step-00000004" / "model.safetensors")
    # The reference of step 4 is the mix of step 3: neither the start nor the policy of step 4.
    assert any(not torch.equal(saved[k], start[k]) for k in start)
    assert any(not torch.equal(saved[k], policy[k]) for k in policy)
    assert run(args(cut) + ["--resume"]) == 0

    timing = {"pairs_per_s", "tokens_per_s", "step_time_s"}

    def strip(rs):
        return [{k: v for k, v in r.items() if k not in timing} for r in rs]

    assert strip(read_metrics(cut)) == strip(read_metrics(whole))
    a, b = load_file(whole / "final" / "model.safetensors"), load_file(cut / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_ld_alpha_cached_reference_matches_the_live_one(toy, tmp_path, capsys):
    """LD-DPO weights the reference's log-probs too: cached (α in the key) or live, the run is the same."""
    live, cached, plain = tmp_path / "live", tmp_path / "cached", tmp_path / "plain"
    cache = ["--ref-cache", str(tmp_path / "cache")]
    # The toy pairs' responses have equal lengths, where LD-DPO changes nothing: cut each rejected to 2 numbers.
    rows = [{**p, "rejected": " ".join(p["rejected"].split(" ")[:3])} for p in counting_pairs(64, seed=1)]
    data = ["--data", str(write_jsonl(rows, tmp_path / "uneven.jsonl"))]
    assert run(base_args(toy, live, steps=2) + data + ["--ld-alpha", "0.5", "--no-ref-cache"]) == 0
    assert run(base_args(toy, plain, steps=1) + data + cache) == 0
    capsys.readouterr()
    assert run(base_args(toy, cached, steps=2) + data + cache + ["--ld-alpha", "0.5"]) == 0
    assert "reference log-probs: computed" in capsys.readouterr().err  # not the plain run's file
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 2
    assert_same_run(read_metrics(live), read_metrics(cached))  # helpers.RUN_TOL
    # At step 1 π = π_ref either way (loss ln 2); the chosen responses are the longer ones, so the weighting
    # (tokens past the rejected's length count half) shrinks their log-probs and leaves the rejected's alone.
    first, unweighted = read_metrics(cached)[0], read_metrics(plain)[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert unweighted["logps/chosen"] < first["logps/chosen"] - 0.1
    assert unweighted["logps/rejected"] == pytest.approx(first["logps/rejected"], rel=1e-5)


def test_grad_accum_matches_one_big_batch(toy, tmp_path):
    big, small = tmp_path / "big", tmp_path / "small"
    assert run(base_args(toy, big, steps=2)) == 0
    assert (
        run(
            base_args(toy, small, steps=2)[:-6]
            + [
                "--batch-size",
                "2",
                "--grad-accum",
                "4",
                "--max-steps",
                "2",
                "--learning-rate",
                "1e-3",
                "--lr-scheduler",
                "constant",
            ]
        )
        == 0
    )
    assert_same_run(read_metrics(big), read_metrics(small))  # helpers.RUN_TOL


def test_rpo_combination_logs_and_trains(toy, tmp_path):
    out = tmp_path / "rpo"
    assert run(base_args(toy, out, steps=2) + ["--loss", "sigmoid,sft", "--loss-weights", "1,0.2"]) == 0
    first = read_metrics(out)[0]
    # loss = ln 2 + 0.2 · (mean NLL per chosen token) > ln 2
    assert first["loss"] > math.log(2) + 0.1


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--beta", "0"], "--beta must be positive"),
        (["--epochs", "1"], "--max-steps and --epochs contradict"),
        (["--label-smoothing", "0.1", "--loss", "hinge"], "--label-smoothing has no effect with --loss hinge"),
        (["--loss", "dpo"], "unknown loss 'dpo'"),
        (["--loss", "sigmoid,sft", "--loss-weights", "1"], "--loss-weights has 1 values for 2 losses"),
        (["--eval-every", "5"], "--eval-every has no effect without --eval-data"),
        (["--bogus"], "unrecognized arguments: --bogus"),
        (["--batch-size", "100"], "fewer than one optimizer step"),
        (["--max-prompt-length", "2000"], "--max-prompt-length (2000) must be below --max-length (1024)"),
        (["--ld-alpha", "0"], "--ld-alpha must be in (0, 1], got 0.0"),
        (["--ld-alpha", "0.5", "--loss", "sigmoid,sft"], "--ld-alpha is not defined for --loss sft"),
        (["--ref-update-every", "4"], "--ref-update-every has no effect without --ref-update"),
        (
            ["--ref-update", "hard", "--ref-update-alpha", "0.5"],
            "--ref-update-alpha has no effect with --ref-update hard",
        ),
        (["--ref-update", "soft", "--ref-cache", "c"], "--ref-update and --ref-cache contradict each other"),
        (["--ref-update", "soft", "--lora-r", "4"], "--ref-update is not supported with LoRA"),
        (["--ref-update", "soft", "--ref-update-alpha", "1.5"], "--ref-update-alpha must be in (0, 1], got 1.5"),
        (["--ref-update", "soft", "--loss", "simpo"], "--ref-update has no effect with --loss simpo"),
    ],
)
def test_bad_flags_give_one_line_and_write_nothing(toy, tmp_path, capsys, extra, message):
    out = tmp_path / "run"
    assert run(base_args(toy, out) + extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("preftune: error:") and message in err[-1]
    assert "Traceback" not in "\n".join(err)
    assert not out.exists()


def test_bad_inputs(toy, tmp_path, capsys):
    out = tmp_path / "run"
    cases = []
    cases.append((["--data", str(tmp_path / "missing.jsonl")], "missing.jsonl"))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": \n')
    cases.append((["--data", str(broken)], "line 2"))
    from transformers import ViTConfig

    vit = tmp_path / "vit"
    ViTConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8).save_pretrained(vit)
    cases.append((["--model", str(vit)], "not a causal language model"))
    cases.append((["--model", str(tmp_path)], "no config.json"))
    cfg = tmp_path / "c.yaml"
    cfg.write_text("beta: 0.2\nlearnig_rate: 1\n")
    cases.append((["--config", str(cfg)], "unknown key 'learnig_rate'"))
    evil = tmp_path / "evil.yaml"
    evil.write_text("beta: !!python/object/apply:os.system ['echo hi']\n")
    cases.append((["--config", str(evil)], "not valid YAML"))
    for extra, message in cases:
        assert run(base_args(toy, out) + extra) == 2, extra
        err = capsys.readouterr().err.strip().splitlines()
        assert message in err[-1] and "Traceback" not in "\n".join(err), (extra, err)
        assert not out.exists()


def test_output_folder_in_use(toy, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert run(base_args(toy, out)) == 2
    assert "folder is not empty" in capsys.readouterr().err
    assert run(base_args(toy, tmp_path / "new") + ["--resume"]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"


@pytest.mark.slow
def test_console_script_and_pickle_refusal(toy, tmp_path):
    """The installed `preftune` entry point, in a fresh process: a pickle-only model folder is refused."""
    from safetensors.torch import load_file

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    for f in Path(toy["model"]).iterdir():
        if f.suffix != ".safetensors":
            (pickled / f.name).write_bytes(f.read_bytes())
    torch.save(load_file(Path(toy["model"]) / "model.safetensors"), pickled / "pytorch_model.bin")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "preftune",
            "train",
            "--model",
            str(pickled),
            "--data",
            toy["train"],
            "--output",
            str(tmp_path / "run"),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(SRC)},
    )
    assert proc.returncode == 2
    assert "pickle weights" in proc.stderr.strip().splitlines()[-1]
    assert "Traceback" not in proc.stderr


def test_a_run_prints_only_its_own_lines_and_progress_bars(toy, tmp_path):
    """A fresh process with a fresh matplotlib cache (it logs "generated new fontManager" once) that imports peft and
    so bitsandbytes (which logs that it cannot fetch optional CPU kernels): neither reaches the user."""
    env = {
        **os.environ,
        "MPLCONFIGDIR": str(tmp_path / "mpl"),
        "PYTHONWARNINGS": "ignore::DeprecationWarning",
        "PYTHONPATH": str(SRC),
    }
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "preftune",
            "train",
            *base_args(toy, tmp_path / "run", steps=2),
            "--eval-data",
            toy["eval"],
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [line.strip() for line in proc.stderr.replace("\r", "\n").splitlines() if line.strip()]
    bars = ("train:", "reference:")  # tqdm's lines, redrawn in place
    assert [line for line in lines if not line.startswith(("preftune: ", *bars))] == []
    # Other libraries' notices would come out under our prefix too: these two did.
    assert "fontManager" not in proc.stderr and "kernels-community" not in proc.stderr
    assert any(line.startswith("preftune: report: ") for line in lines)


def test_packed_and_padded_layouts_give_the_same_run(toy, tmp_path):
    padded, packed = tmp_path / "padded", tmp_path / "packed"
    assert run(base_args(toy, padded) + ["--layout", "padded"]) == 0
    assert run(base_args(toy, packed) + ["--pack-tokens", "64"]) == 0
    assert_same_run(read_metrics(padded), read_metrics(packed))  # helpers.RUN_TOL


def test_group_by_length_is_seeded_and_covers_every_pair(toy):
    from preftune.config import TrainConfig
    from preftune.data.load import epoch_order
    from preftune.data.tokenize import TokenizedPair

    pairs = [TokenizedPair([1] * (i % 7 + 1), [2], [3], str(i)) for i in range(50)]
    cfg = TrainConfig(model="m", data="d", output="o", batch_size=4, group_by_length=True)
    order = epoch_order(pairs, cfg, epoch=0)
    assert sorted(order) == list(range(50)) and order == epoch_order(pairs, cfg, epoch=0)
    assert order != epoch_order(pairs, cfg, epoch=1)

    def mean_spread(order):  # mean (longest − shortest prompt) within a step
        steps = [order[i : i + 4] for i in range(0, 48, 4)]
        return sum(
            max(len(pairs[i].prompt_ids) for i in s) - min(len(pairs[i].prompt_ids) for i in s) for s in steps
        ) / len(steps)

    cfg.group_by_length = False
    assert mean_spread(order) < 0.5 * mean_spread(epoch_order(pairs, cfg, epoch=0))


def test_reference_cache_is_reused_and_matches_the_live_reference(toy, tmp_path, capsys):
    live, first, second = tmp_path / "live", tmp_path / "first", tmp_path / "second"
    assert run(base_args(toy, live) + ["--no-ref-cache"]) == 0
    assert read_metrics(live)[0]["rewards/accuracies"] == 0  # an exact tie is not a win (as in TRL)
    cache = ["--ref-cache", str(tmp_path / "cache")]
    assert run(base_args(toy, first) + cache) == 0
    assert "reference log-probs: computed" in capsys.readouterr().err
    assert run(base_args(toy, second) + cache + ["--beta", "0.3"]) == 0  # a β sweep pays for the reference once
    err = capsys.readouterr().err
    assert "reference log-probs: reused" in err and "computed" not in err
    assert_same_run(read_metrics(live), read_metrics(first))  # helpers.RUN_TOL
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 1


def test_precompute_then_train_skips_the_reference(toy, tmp_path, capsys):
    cache = ["--ref-cache", str(tmp_path / "cache")]
    assert main(["precompute", "--model", toy["model"], "--data", toy["train"], "--batch-size", "8"] + cache) == 0
    assert "reference log-probs: computed" in capsys.readouterr().err
    assert run(base_args(toy, tmp_path / "run") + cache) == 0
    assert "reference log-probs: reused" in capsys.readouterr().err


def test_log_every_writes_every_step_with_the_same_values(toy, tmp_path):
    each, batched = tmp_path / "each", tmp_path / "batched"
    assert run(base_args(toy, each, steps=5)) == 0
    assert run(base_args(toy, batched, steps=5) + ["--log-every", "3"]) == 0
    timing = {"pairs_per_s", "tokens_per_s", "step_time_s"}
    strip = lambda rs: [{k: v for k, v in r.items() if k not in timing} for r in rs]  # noqa: E731
    assert strip(read_metrics(each)) == strip(read_metrics(batched))


def test_gradient_checkpointing_changes_nothing_and_bf16_runs(toy, tmp_path):
    plain, ckpt, bf16 = tmp_path / "plain", tmp_path / "ckpt", tmp_path / "bf16"
    assert run(base_args(toy, plain)) == 0
    assert run(base_args(toy, ckpt) + ["--gradient-checkpointing"]) == 0
    assert_same_run(read_metrics(plain), read_metrics(ckpt))  # helpers.RUN_TOL
    assert run(base_args(toy, bf16) + ["--dtype", "bfloat16"]) == 0
    records = read_metrics(bf16)
    # bf16 rounding of the logits: the first loss is ln 2 to ~2 digits, and training still moves it
    assert records[0]["loss"] == pytest.approx(math.log(2), abs=0.02)
    assert records[-1]["loss"] < records[0]["loss"]


def test_checkpoint_activations_turns_it_on_without_a_deprecation_warning():
    import warnings

    from preftune.loading import checkpoint_activations

    model = build_model(50)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        checkpoint_activations(model)
    new = hasattr(type(model), "is_activation_checkpointing")  # transformers 5's name
    assert getattr(model, "is_activation_checkpointing" if new else "is_gradient_checkpointing")
    assert not [w for w in caught if issubclass(w.category, FutureWarning)]


def test_a_diverging_run_stops_with_one_line_and_no_model(toy, tmp_path, capsys):
    out = tmp_path / "run"
    args = base_args(toy, out, steps=4) + ["--learning-rate", "1e20", "--max-grad-norm", "0"]
    assert run(args) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("preftune: error: step ") and "stopping before a broken model is saved" in err
    assert not (out / "final").exists()


@pytest.mark.parametrize(
    "command", ["train", "precompute", "reward-model", "demo", "frontier", "eval", "audit", "report", "push"]
)
def test_every_subcommand_prints_its_help(command, capsys):
    """argparse formats help texts with %: an option whose help says "P%" once crashed `preftune train --help`."""
    with pytest.raises(SystemExit) as exit:
        main([command, "--help"])
    assert exit.value.code == 0 and f"usage: preftune {command}" in capsys.readouterr().out
