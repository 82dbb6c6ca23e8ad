"""Unpaired examples (prompt, completion, label) and the losses that train on them: kto, apo_zero_unpaired.

Reading and unpairing (data/unpaired.py), the KL completions, the losses' values worked by hand, the masked
metrics, and runs through the real CLI. Parity with TRL's KTOTrainer is in tests/test_trl_kto_parity.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from preftune.cli import main
from preftune.data import unpaired
from preftune.data.tokenize import TokenizedPair
from preftune.data.unpaired import (
    ExampleReport,
    KLReport,
    read_examples,
    with_kl_completions,
)
from preftune.errors import UserError
from preftune.losses import LOSSES, combined_loss, example_metrics, kl_estimate
from preftune.metrics import per_pair, without_empty_means

from toy import counting_pairs, save_model_folder, write_jsonl

pytestmark = pytest.mark.exactness  # compares runs: CI runs it again under other CPU kernels


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# ---------------------------------------------------------------------------------------------------- reading


def read(path: Path, **kwargs):
    report = ExampleReport()
    return list(read_examples(str(path), report, **kwargs)), report


def test_unpaired_rows_text_and_conversational(tmp_path):
    rows = [
        {"prompt": "Q: hi\nA: ", "completion": "good", "label": True},
        {
            "prompt": [{"role": "user", "content": "hi"}],
            "completion": [{"role": "assistant", "content": "bad"}],
            "label": 0,
        },
        {"prompt": "Q: yo\nA: ", "completion": "fine", "label": "TRUE"},
    ]
    examples, report = read(write_jsonl(rows, tmp_path / "d.jsonl"))
    assert [(e.prompt, e.chosen, e.label) for e in examples] == [
        ("Q: hi\nA: ", "good", True),
        ([{"role": "user", "content": "hi"}], [{"role": "assistant", "content": "bad"}], False),
        ("Q: yo\nA: ", "fine", True),
    ]
    assert all(e.rejected is e.chosen for e in examples)  # one sequence: tokenized once
    assert examples[1].where == f"{tmp_path / 'd.jsonl'} line 2"
    assert report.summary() == "3 rows → 3 examples (2 desirable, 1 undesirable; conversational 1, standard 2)"


def test_csv_labels_and_columns(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("question,answer,ok\nQ: a,x,false\nQ: b,y,1\n")
    examples, _ = read(path, columns={"prompt": "question", "completion": "answer", "label": "ok"})
    assert [(e.prompt, e.chosen, e.label) for e in examples] == [("Q: a", "x", False), ("Q: b", "y", True)]


def test_pairs_are_unpaired_in_trls_order(tmp_path, monkeypatch):
    # TRL's unpair_preference_dataset maps blocks of 1000 rows: per block the chosen, then the rejected responses.
    # With blocks of 2 (patched), 3 pairs → c1 c2 r1 r2 | c3 r3.
    monkeypatch.setattr(unpaired, "UNPAIR_BLOCK", 2)
    rows = [{"prompt": f"p{i}", "chosen": f"c{i}", "rejected": f"r{i}"} for i in (1, 2, 3)]
    rows.append({"prompt": "p4", "chosen": "same", "rejected": "same"})  # skipped and counted, as for pairs
    examples, report = read(write_jsonl(rows, tmp_path / "d.jsonl"))
    assert [(e.chosen, e.label) for e in examples] == [
        ("c1", True),
        ("c2", True),
        ("r1", False),
        ("r2", False),
        ("c3", True),
        ("r3", False),
    ]
    assert report.summary() == (
        "4 rows → 3 pairs (standard 3); 1 skipped (chosen == rejected) → 6 examples "
        "(3 desirable, 3 undesirable; unpaired as TRL's unpair_preference_dataset)"
    )


@pytest.mark.parametrize(
    "rows, message",
    [
        (
            [{"prompt": "p", "completion": "c", "label": "maybe"}],
            "line 1: field 'label' must be true or false (or 1/0), got 'maybe'",
        ),
        (
            [{"prompt": "p", "completion": "c", "label": 2}],
            "line 1: field 'label' must be true or false (or 1/0), got 2",
        ),
        (
            [{"prompt": "p", "completion": "c"}],
            ("line 1: missing field 'label' (the row has: prompt, completion); rename columns with --columns"),
        ),
        ([{"prompt": "p", "completion": " ", "label": True}], "line 1: field 'completion' is empty"),
        (
            [{"prompt": "p", "completion": "c", "label": True}, {"prompt": "p", "chosen": "a", "rejected": "b"}],
            (
                "line 2: missing field 'completion' (the row has: prompt, chosen, rejected); a pair (chosen, rejected) in a "
                "source of unpaired examples? use one format per file"
            ),
        ),
        (
            [{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "p", "completion": "c", "label": True}],
            (
                "line 2: an unpaired example (completion, label) in a source of pairs (its first row is a pair); use one "
                "format per file"
            ),
        ),
        (
            [
                {
                    "prompt": [{"role": "user", "content": "hi"}],
                    "completion": [{"role": "user", "content": "x"}],
                    "label": True,
                }
            ],
            "line 1: field 'completion': conversation with no assistant turn",
        ),
    ],
)
def test_bad_rows_name_the_row_and_field(tmp_path, rows, message):
    path = write_jsonl(rows, tmp_path / "d.jsonl")
    with pytest.raises(UserError) as error:
        read(path)
    assert str(error.value).startswith(f"{path} {message}")


def test_an_unpaired_file_for_a_pair_loss_says_which_loss_it_needs(tmp_path):
    from preftune.data.formats import load_pairs

    path = write_jsonl([{"prompt": "p", "completion": "c", "label": True}], tmp_path / "d.jsonl")
    with pytest.raises(
        UserError,
        match=r"missing field 'chosen' .*an unpaired example \(prompt, completion, "
        r"label\) trains only with --loss kto or apo_zero_unpaired",
    ):
        load_pairs(str(path))


# ---------------------------------------------------------------------------------------------------- KL completions


def example(prompt: list[int], completion: list[int], label: bool = True) -> TokenizedPair:
    return TokenizedPair(prompt, completion, completion, f"line {completion[0]}", label)


def test_kl_completions_rotate_within_blocks():
    # Blocks of 3: (x1..x3) take (y3, y1, y2); the last block (x4, x5) takes (y5, y4).
    examples = [example([10 * i], [i, i]) for i in range(1, 6)]
    report = KLReport()
    out = list(with_kl_completions(iter(examples), 3, None, report))
    assert [(e.prompt_ids, e.chosen_ids, e.rejected_ids) for e in out] == [
        ([10], [1, 1], [3, 3]),
        ([20], [2, 2], [1, 1]),
        ([30], [3, 3], [2, 2]),
        ([40], [4, 4], [5, 5]),
        ([50], [5, 5], [4, 4]),
    ]
    assert (report.examples, report.cut, report.same_prompt) == (5, 0, 0)


def test_a_last_lone_example_takes_the_completion_before_it_and_cuts_are_counted():
    # Blocks of 2: x3 alone would get its own y3; it takes y2 instead. max_length 4: x1's prompt (2 tokens)
    # leaves room for 2 tokens of y2 = [2, 2, 2] → [2, 2]; x3 shares x2's prompt.
    examples = [example([7, 7], [1]), example([8], [2, 2, 2]), example([8], [3], False)]
    report = KLReport()
    out = list(with_kl_completions(examples, 2, 4, report))
    assert [e.rejected_ids for e in out] == [[2, 2], [1], [2, 2, 2]]
    assert (report.examples, report.desirable, report.cut, report.same_prompt) == (3, 2, 1, 1)
    assert report.summary() == (
        "3 examples (2 desirable, 1 undesirable); KL completions: 1 cut to --max-length, 1 share their example's prompt"
    )


# ---------------------------------------------------------------------------------------------------- the losses


def test_kto_by_hand():
    # β = 0.5, z = 0.4, λD = 0.8, λU = 1.3. Desirable: h = −3 − (−4) = 1 → 0.8·(1 − σ(0.5·(1 − 0.4))) = 0.8·(1 −
    # σ(0.3)); undesirable: h = −6 − (−5) = −1 → 1.3·(1 − σ(0.5·(0.4 + 1))) = 1.3·(1 − σ(0.7)). The rejected slot
    # (the mismatched completions) does not enter: z is given.
    policy = torch.tensor([-3.0, -6.0], dtype=torch.float64, requires_grad=True)
    kl_side = torch.tensor([-9.0, -9.0], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([-4.0, -5.0], dtype=torch.float64)
    losses = LOSSES["kto"].fn(
        policy,
        kl_side,
        ref,
        ref,
        beta=0.5,
        labels=torch.tensor([1.0, 0.0]),
        kl=torch.tensor(0.4, dtype=torch.float64),
        desirable_weight=0.8,
        undesirable_weight=1.3,
    )
    expected = [0.8 * (1 - sig(0.3)), 1.3 * (1 - sig(0.7))]
    assert losses.tolist() == pytest.approx(expected, abs=1e-12)
    assert expected == pytest.approx([0.3404459865, 0.4313558962], abs=1e-10)
    losses.sum().backward()
    # d/dπ: desirable −λD·β·σ'(0.3) < 0 (raise it); undesirable +λU·β·σ'(0.7) > 0 (lower it).
    assert policy.grad.tolist() == pytest.approx(
        [-0.8 * 0.5 * sig(0.3) * (1 - sig(0.3)), 1.3 * 0.5 * sig(0.7) * (1 - sig(0.7))], abs=1e-12
    )
    assert kl_side.grad is None


def test_apo_zero_unpaired_by_hand():
    # β = 0.5, h = ±1: desirable 0.8·(1 − σ(0.5)), undesirable 1.3·σ(−0.5); σ(0.5) = 0.6224593312.
    policy, ref = torch.tensor([-3.0, -6.0]), torch.tensor([-4.0, -5.0])
    losses = LOSSES["apo_zero_unpaired"].fn(
        policy,
        policy,
        ref,
        ref,
        beta=0.5,
        labels=torch.tensor([1.0, 0.0]),
        desirable_weight=0.8,
        undesirable_weight=1.3,
    )
    assert losses.tolist() == pytest.approx([0.8 * 0.3775406688, 1.3 * 0.3775406688], abs=1e-7)


def test_kl_estimate_and_combined_mean():
    # Mismatched log-ratios 1, 0, −3: Σ = −2 over 3 (the trainer clamps Σ / n at 0).
    estimate = kl_estimate(torch.tensor([-3.0, -5.0, -4.0]), torch.tensor([-4.0, -5.0, -1.0]))
    assert estimate.tolist() == [-2.0, 3.0]
    # combined_loss divides by the step's example count: 2 examples of a step of 4.
    loss = combined_loss(
        ["kto"],
        [1.0],
        policy_chosen_logps=torch.tensor([-1.0, -1.0]),
        policy_rejected_logps=torch.zeros(2),
        ref_chosen_logps=torch.tensor([-1.0, -1.0]),
        ref_rejected_logps=torch.zeros(2),
        chosen_lengths=torch.ones(2),
        rejected_lengths=torch.ones(2),
        num_pairs=4,
        num_chosen_tokens=2,
        labels=torch.tensor([1.0, 0.0]),
        kl=torch.tensor(0.0),
        beta=0.1,
        desirable_weight=1.0,
        undesirable_weight=1.0,
    )
    assert loss.item() == pytest.approx((0.5 + 0.5) / 4)  # h = z = 0: 1 − σ(0) = ½ each


def test_masked_means_are_over_each_label():
    # Rewards β·h = 0.5·[1, −1, 3] with labels [1, 0, 1]: desirable mean (0.5 + 1.5)/2 = 1, undesirable −0.5.
    policy, ref = torch.tensor([-3.0, -6.0, -1.0]), torch.tensor([-4.0, -5.0, -4.0])
    metrics = example_metrics(policy, ref, torch.tensor([1.0, 0.0, 1.0]), 0.5, torch.tensor(0.25))
    sums = {k: v.sum() for k, v in metrics.items()} | {"loss": torch.tensor(0.3)}
    means = {k: v.item() for k, v in per_pair(sums, 3).items()}
    assert means == pytest.approx(
        {
            "rewards/chosen": 1.0,
            "rewards/rejected": -0.5,
            "rewards/margins": 1.5,
            "logps/chosen": -2.0,
            "logps/rejected": -6.0,
            "kl": 0.25,
            "loss": 0.3,
            "desirable_share": 2 / 3,
        }
    )
    # A step without undesirable examples logs no mean over them (0 / 0), as TRL's KTOTrainer.
    only = example_metrics(policy, ref, torch.ones(3), 0.5)
    means = {k: v.item() for k, v in per_pair({k: v.sum() for k, v in only.items()}, 3).items()}
    assert set(without_empty_means(means)) == {"rewards/chosen", "logps/chosen", "desirable_share"}


# ---------------------------------------------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("kto")
    pairs = counting_pairs(24, seed=3)
    rows = [
        {"prompt": p["prompt"], "completion": p["chosen" if i % 3 else "rejected"], "label": bool(i % 3)}
        for i, p in enumerate(pairs)
    ]
    return {
        "model": str(save_model_folder(root / "model")),
        "root": root,
        "unpaired": str(write_jsonl(rows, root / "kto.jsonl")),
        "pairs": str(write_jsonl(pairs, root / "pairs.jsonl")),
    }


def train(toy, out: Path, *extra: str) -> list[dict]:
    assert (
        main(
            [
                "train",
                "--model",
                toy["model"],
                "--data",
                toy["unpaired"],
                "--output",
                str(out),
                "--loss",
                "kto",
                "--batch-size",
                "24",
                "--max-steps",
                "3",
                "--learning-rate",
                "1e-3",
                "--lr-scheduler",
                "constant",
                "--no-report",
                *extra,
            ]
        )
        == 0
    )
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_kto_trains_and_streaming_gives_the_same_run(toy, tmp_path, capsys):
    ours = train(toy, tmp_path / "memory")
    err = capsys.readouterr().err
    assert "24 rows → 24 examples (16 desirable, 8 undesirable; standard 24)" in err
    assert "training 3 steps of 24 examples (24 examples, 1 steps per epoch)" in err
    assert set(ours[0]) >= {"loss", "kl", "rewards/chosen", "rewards/rejected", "desirable_share"}
    assert "rewards/accuracies" not in ours[0]  # pairs only
    assert ours[0]["loss"] == pytest.approx(0.5, abs=1e-6)  # π = π_ref, z = 0: 1 − σ(0) for every example
    assert ours[2]["loss"] < ours[0]["loss"] - 1e-3  # one full batch: the same examples at every step
    streamed = train(toy, tmp_path / "stream", "--stream")
    for a, b in zip(ours, streamed, strict=True):
        for key in set(a) - {"pairs_per_s", "tokens_per_s", "step_time_s"}:
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-7), key


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--loss", "kto,sft"], "--loss kto trains on unpaired examples and cannot be combined with other losses"),
        (["--loss", "kto", "--wpo"], "--wpo is defined for pairs and has no effect with --loss kto"),
        (["--loss", "kto", "--batch-size", "1"], "--loss kto needs --batch-size of at least 2"),
        (["--loss", "sigmoid", "--desirable-weight", "2"], "--desirable-weight has no effect with --loss sigmoid"),
        (["--loss", "kto", "--undesirable-weight", "-1"], "--undesirable-weight must be zero or positive, got -1.0"),
        (
            ["--loss", "sigmoid", "--columns", "completion=answer"],
            (
                "--columns completion=...: unpaired examples train only with --loss kto or apo_zero_unpaired, not --loss "
                "sigmoid"
            ),
        ),
    ],
)
def test_bad_kto_flags(toy, tmp_path, capsys, extra, message):
    out = tmp_path / "run"
    argv = ["train", "--model", toy["model"], "--data", toy["unpaired"], "--output", str(out), "--max-steps", "1"]
    assert main([*argv, *extra]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.slow
def test_two_processes_train_kto_as_one(toy, tmp_path):
    """KTO's KL estimate is all-reduced over the micro-batches the processes run together: 2 processes × 4 examples
    equal 1 process × 8 on 21 examples (steps of 8, 8, 5; the KL completions are rotated within the global batch,
    the same 8 in both). A second launch, 2 processes × 2 × --grad-accum 2, splits the last step's 5 examples 3 + 2:
    process 0 runs two micro-batches, process 1 one, and pads the second KL all-reduce; the run must finish."""
    from test_distributed import torchrun

    data = write_jsonl(
        [json.loads(line) for line in Path(toy["unpaired"]).read_text().splitlines()][:21], tmp_path / "kto21.jsonl"
    )
    common = [
        "--model",
        toy["model"],
        "--data",
        str(data),
        "--loss",
        "kto",
        "--no-shuffle",
        "--epochs",
        "1",
        "--learning-rate",
        "1e-3",
        "--lr-scheduler",
        "constant",
        "--no-report",
    ]
    one = tmp_path / "one"
    assert main(["train", *common, "--output", str(one), "--batch-size", "8"]) == 0
    two = tmp_path / "two"
    proc = torchrun(["train", *common, "--output", str(two), "--batch-size", "4"], tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr[-3000:]
    timing = {"pairs_per_s", "tokens_per_s", "step_time_s"}
    a, b = [[json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()] for run in (one, two)]
    assert len(a) == len(b) == 3 and a[2]["kl"] > 0
    for x, y in zip(a, b):
        assert set(x) == set(y)
        for key in set(x) - timing:
            assert x[key] == pytest.approx(y[key], rel=1e-5, abs=1e-6), (x["step"], key)
    uneven = tmp_path / "uneven"
    proc = torchrun(
        ["train", *common, "--output", str(uneven), "--batch-size", "2", "--grad-accum", "2"], tmp_path / "cache"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (uneven / "final").is_dir()


# ---------------------------------------------------------------------------------------------------- the audit


def test_audit_of_unpaired_examples(tmp_path, tiny_tokenizer, capsys):
    """Planted findings: row 2 repeats row 1; rows 3 and 4 give one prompt and completion both labels; row 5 is
    empty; row 6 holds U+FFFD; row 7's prompt is an eval prompt."""
    from preftune.data.audit_examples import audit_examples, longer_probability
    from preftune.data.unpaired import iter_examples

    rows = [
        {"prompt": "Q: a", "completion": "good", "label": True},
        {"prompt": "Q: a", "completion": "good", "label": True},
        {"prompt": "Q: b", "completion": "ok", "label": True},
        {"prompt": "Q: b", "completion": "ok", "label": False},
        {"prompt": "Q: c", "completion": " ", "label": False},
        {"prompt": "Q: d", "completion": "bad\ufffd", "label": True},
        {"prompt": "Q: e", "completion": "meh", "label": False},
    ]
    data = write_jsonl(rows, tmp_path / "kto.jsonl")
    held = write_jsonl([{"prompt": "Q: e", "completion": "x", "label": True}], tmp_path / "eval.jsonl")
    report = audit_examples(list(iter_examples(str(data))), list(iter_examples(str(held))))

    def line(i: int) -> str:
        return f"{data} line {i}"

    assert (report.rows, report.desirable, report.undesirable) == (7, 4, 3)
    assert report.duplicates.examples == [line(2)]
    assert report.conflicting_labels.examples == [line(3), line(4)]
    assert report.empty_completions.examples == [line(5)]
    assert report.encoding["replacement_char"].examples == [line(6)]
    assert report.eval_leakage.examples == [line(7)] and report.eval_leakage.prompts == 1
    # Desirable lengths [4, 4, 2, 4], undesirable [2, 3]: wins 2 + 2 + 0.5 + 2 = 6.5 (4 beats 2 and 3 each; 2 ties
    # 2 and loses to 3) of 8.
    assert report.desirable_longer_probability == 6.5 / 8
    assert longer_probability([3, 5], [4]) == 0.5 and longer_probability([1], []) is None
    assert any("same prompt and completion as an example with the other label" in w for w in report.warnings())
    # Through the CLI, with a tokenizer: lengths in tokens, --json written.
    tiny_tokenizer.save_pretrained(tmp_path / "tok")
    out = tmp_path / "audit.json"
    assert (
        main(["audit", str(data), "--tokenizer", str(tmp_path / "tok"), "--max-length", "4", "--json", str(out)]) == 0
    )
    printed = capsys.readouterr().out
    assert printed.startswith("audit of 7 unpaired examples: 4 desirable, 3 undesirable (57.1% desirable)")
    saved = json.loads(out.read_text())
    assert saved["conflicting_labels"]["count"] == 2 and saved["lengths"]["unit"] == "tokens"
    assert saved["truncated"]["count"] >= 1


def test_training_writes_the_unpaired_audit(toy, tmp_path):
    train(toy, tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "audit.json").read_text())
    assert (saved["rows"], saved["desirable"], saved["undesirable"]) == (24, 16, 8)
