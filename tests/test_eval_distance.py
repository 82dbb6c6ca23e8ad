"""`preftune eval --train-data`: prompt embeddings and nearest-neighbour distances against a naive computation,
planted far prompts, by-distance buckets against hand computations, the table, the plot, the training file formats."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from preftune.cli import main
from preftune.data.formats import load_pairs
from preftune.data.tokenize import tokenize_pairs
from preftune.errors import UserError
from preftune.evaluation.distance import (
    distance_label,
    generation_buckets,
    load_train_prompts,
    nearest_distances,
    pair_buckets,
    plot_by_distance,
    prompt_embeddings,
)
from preftune.evaluation.evaluate import EvalOptions, run_eval
from preftune.evaluation.pairs import pair_logps
from preftune.evaluation.stats import wilson_interval
from preftune.loading import load_causal_lm, load_tokenizer

from toy import counting_pairs, save_model_folder, write_jsonl

PAD = 2  # the toy tokenizer's EOS, which preftune pads with
# Float32 rounding of a cosine: the same prompt embedded in two batches (other padding, other kernels) gives hidden
# states equal up to a few ulps, which moves 1 − cos by about |δ|²/2 (negligible); the dot product of two hidden =
# 64 float32 unit-vector coordinates is off by at most 64 · 2⁻²⁴ · Σ|aᵢbᵢ| ≤ 64 · 6e-8 ≈ 4e-6. 1e-5 bounds both.
COS_TOL = 1e-5
# Another template than the training prompts' "count from N :": bare number runs, no instruction words.
FAR = ["2 3 4 5 6 7", "8 9 10 11 12 13", "13 14 15 16 17 18", "19 18 17 16 15 14 13"]


def row(prompt: str) -> dict:
    return {"prompt": prompt, "chosen": " 1 2 3", "rejected": " 3 2 1"}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("distance")
    train = counting_pairs(48, seed=1)
    assert {r["prompt"] for r in train} == {f"count from {n} :" for n in range(12)}
    near_seen = [row(f"count from {n} :") for n in (0, 2, 3, 5, 7, 8, 10, 11)]  # training prompts themselves
    near_unseen = [row(f"count from {n} :") for n in (12, 14, 16, 19)]  # the template with new numbers
    (root / "score_words.py").write_text(
        "def score(texts):\n    return [float(len(t.split())) for t in texts]\n", encoding="utf-8"
    )
    return {
        "root": root,
        "policy": str(save_model_folder(root / "policy", seed=0)),
        "reference": str(save_model_folder(root / "reference", seed=1)),
        "train": str(write_jsonl(train, root / "train.jsonl")),
        "held": str(write_jsonl(near_seen + near_unseen + [row(p) for p in FAR], root / "held.jsonl")),
        "prompts": str(
            write_jsonl([{"prompt": p} for p in ["count from 4 :", "count from 17 :", *FAR]], root / "p.jsonl")
        ),
    }


@pytest.fixture(scope="module")
def reference(files):
    return load_causal_lm(files["reference"]).eval(), load_tokenizer(files["reference"])


def ids_of(tokenizer, prompts: list[str]) -> list[list[int]]:
    return [tokenizer(p)["input_ids"] for p in prompts]


def naive_embedding(model, ids: list[int]) -> torch.Tensor:
    """One prompt alone, no padding: the mean over its tokens of the last hidden state, normalised."""
    with torch.no_grad():
        hidden = model(torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0]
    mean = hidden.float().mean(0)
    return mean / mean.norm()


# ------------------------------------------------------------------------------------------- embeddings, distances


def test_embeddings_equal_a_naive_per_prompt_computation(reference):
    model, tokenizer = reference
    prompts = ["count from 3 :", "19", "count from 12 : 12 13 14 15", *FAR, "count from 3 :"]
    ids = ids_of(tokenizer, prompts)
    got = prompt_embeddings(model, ids, pad_id=PAD, batch_size=3)  # batches mix lengths: padding is exercised
    expected = torch.stack([naive_embedding(model, i) for i in ids])
    assert got.shape == (len(prompts), model.config.hidden_size) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got.norm(dim=1), torch.ones(len(prompts)))


def test_distances_equal_brute_force_and_a_training_prompt_is_at_zero(reference):
    model, tokenizer = reference
    train = ids_of(tokenizer, [f"count from {n} :" for n in range(12)] + ["1 2 3", ": : :"])
    queries = ids_of(tokenizer, ["count from 5 :", "count from 17 :", *FAR, "count from 5 :", "3 : 2"])
    # chunks of 4 training prompts, batches of 3: the running maximum crosses chunks
    got = nearest_distances(model, queries, train, pad_id=PAD, batch_size=3, chunk_size=4)
    keys = [naive_embedding(model, t) for t in train]
    expected = [1 - max(float(naive_embedding(model, q) @ k) for k in keys) for q in queries]
    assert got == pytest.approx(expected, abs=COS_TOL)
    # "count from 5 :" is a training prompt: 0 exactly (its own cosine is 1), and the naive computation agrees
    # within float rounding (COS_TOL)
    assert got[0] == got[-2] == 0.0 and expected[0] <= COS_TOL
    assert min(got[2:6]) > max(got[:2]) + 0.1  # the far template is far


def test_far_template_lands_in_the_far_bucket(files, reference):
    result = run_eval(
        EvalOptions(model=files["policy"], ref=files["reference"], data=files["held"], train_data=files["train"])
    )
    d = result["by_distance"]
    assert (d["train_data"], d["train_prompts"], d["train_distinct"], d["train_cut"]) == (files["train"], 48, 12, 0)
    buckets = d["pairs"]["buckets"]
    assert sum(b["pairs"] for b in buckets) == 16 and len(d["pairs"]["edges"]) == len(buckets) - 1
    assert buckets[0]["upper_edge"] == buckets[0]["mean_distance"] == 0.0  # the 8 training prompts themselves
    assert buckets[0]["pairs"] == 8 and buckets[0]["distance"] == "≤ 0"
    far = buckets[-1]
    assert far["pairs"] == 4 and far["upper_edge"] is None and far["distance"].startswith("> ")
    # which held-out prompts lie beyond the last edge: the four of the other template (rows 12–15), and only they
    model, tokenizer = reference
    held = [json.loads(line)["prompt"] for line in Path(files["held"]).read_text(encoding="utf-8").splitlines()]
    train = ids_of(tokenizer, [f"count from {n} :" for n in range(12)])
    distances = nearest_distances(model, ids_of(tokenizer, held), train, pad_id=PAD)
    assert [i for i, x in enumerate(distances) if x > far["lower_edge"]] == [12, 13, 14, 15]
    assert held[12:] == FAR and far["mean_distance"] > 0.1


# ------------------------------------------------------------------------------------------- buckets


def test_pair_buckets_by_hand():
    # β = 1, reference log-probs 0: chosen reward = policy chosen, rejected reward = policy rejected.
    # pairs: margins +1 (win), −1 (loss), +2 (win), 0 (tie), +3 (win); distances 0, 0.1, 0.2, 0.2, 0.5; edges 0.15
    logps = {
        "policy_chosen": [-1.0, -3.0, -1.0, -2.0, -1.0],
        "policy_rejected": [-2.0, -2.0, -3.0, -2.0, -4.0],
        "ref_chosen": [0.0] * 5,
        "ref_rejected": [0.0] * 5,
    }
    out = pair_buckets([0.0, 0.1, 0.2, 0.2, 0.5], logps, beta=1.0, edges=[0.15])
    near, far = out["buckets"]
    assert out["edges"] == [0.15] and (near["distance"], far["distance"]) == ("≤ 0.15", "> 0.15")
    assert (near["pairs"], near["wins"], near["losses"], near["rewards/accuracies"]) == (2, 1, 1, 0.5)
    assert (far["pairs"], far["wins"], far["ties"], far["rewards/accuracies"]) == (3, 2, 1, pytest.approx(2 / 3))
    assert near["rewards/margins"] == 0.0 and far["rewards/margins"] == pytest.approx(5 / 3)
    assert (far["accuracy_ci_low"], far["accuracy_ci_high"]) == pytest.approx(wilson_interval(2, 3))
    assert near["mean_distance"] == pytest.approx(0.05) and far["mean_distance"] == pytest.approx(0.3)
    # default edges: quartiles of the distances (nearest rank) → 0.1, 0.2; the largest distance alone beyond
    assert [b["pairs"] for b in pair_buckets([0.0, 0.1, 0.2, 0.2, 0.5], logps, beta=1.0)["buckets"]] == [2, 2, 1]


def test_generation_buckets_by_hand():
    per_prompt = {
        "policy_logps": [-1.0, -2.0, -1.0, -3.0],
        "reference_logps": [-1.5, -2.0, -4.0, -5.0],  # log-ratios 0.5, 0, 3, 2
        "policy_reward": [1.0, 0.0, 2.0, 1.0],
        "reference_reward": [0.0, 0.0, 3.0, 1.0],  # win, tie | loss, tie
    }
    near, far = generation_buckets([0.3, 0.0, 0.9, 0.8], per_prompt, edges=[0.5])["buckets"]
    assert (near["prompts"], near["kl"], near["kl_infinite"]) == (2, 0.25, 0)
    assert near["kl_se"] == pytest.approx(0.25)  # s = √(2 · 0.25² / 1) = 0.3536, SE = s / √2
    assert (far["kl"], far["reward"]["policy"], far["reward"]["reference"]) == (2.5, 1.5, 2.0)
    assert (near["win_rate"]["win_rate"], far["win_rate"]["win_rate"]) == (0.75, 0.25)
    assert distance_label(None, None) == "all" and distance_label(0.01234, 0.5) == "0.0123–0.5"


def test_buckets_equal_a_hand_computation_from_the_per_pair_numbers(files, reference):
    options = EvalOptions(
        model=files["policy"], ref=files["reference"], data=files["held"], train_data=files["train"], beta=0.5
    )
    by_distance = run_eval(options)["by_distance"]["pairs"]
    model, tokenizer = reference
    held = [json.loads(line) for line in Path(files["held"]).read_text(encoding="utf-8").splitlines()]
    rows = Path(files["train"]).read_text(encoding="utf-8").splitlines()
    train = list(dict.fromkeys(json.loads(line)["prompt"] for line in rows))  # distinct, in file order as eval
    distances = nearest_distances(
        model, ids_of(tokenizer, [r["prompt"] for r in held]), ids_of(tokenizer, train), pad_id=PAD
    )
    # quartiles by nearest rank: the ⌈q·16/4⌉-th smallest of the 16 distances, repeats collapsed, none at the top
    ordered = sorted(distances)
    edges = sorted({ordered[math.ceil(q * 16 / 4) - 1] for q in (1, 2, 3)} - {ordered[-1]})
    assert by_distance["edges"] == edges and len(by_distance["buckets"]) == len(edges) + 1
    pairs = tokenize_pairs(load_pairs(files["held"])[0], tokenizer)[0]
    numbers = pair_logps(load_causal_lm(files["policy"]), model, pairs, pad_id=PAD)
    for bucket, low, high in zip(by_distance["buckets"], [None, *edges], [*edges, None]):
        assert (bucket["lower_edge"], bucket["upper_edge"]) == (low, high)
        members = [i for i, d in enumerate(distances) if (low is None or d > low) and (high is None or d <= high)]
        wins = ties = 0
        for i in members:
            pc, pr, rc, rr = (numbers[k][i] for k in ("policy_chosen", "policy_rejected", "ref_chosen", "ref_rejected"))
            margin = 0.5 * (pc - rc) - 0.5 * (pr - rr)
            band = 0.5 * 1e-5 * (abs(pc) + abs(pr) + abs(rc) + abs(rr))  # pairs.py's tie band
            wins, ties = wins + (margin > band), ties + (abs(margin) <= band)
        assert (bucket["pairs"], bucket["wins"], bucket["ties"]) == (len(members), wins, ties)
        assert bucket["rewards/accuracies"] == pytest.approx(wins / len(members))


# ------------------------------------------------------------------------------------------- the command


def header_of(table: str) -> str:
    """The column header line of the by-distance table."""
    return next(
        line for line in table.splitlines() if line.split()[:2] in (["distance", "pairs"], ["distance", "prompts"])
    )


def test_cli_prints_the_by_distance_table(files, capsys):
    args = ["eval", "--model", files["policy"], "--ref", files["reference"], "--data", files["held"]]
    assert main(args + ["--train-data", files["train"]]) == 0
    table = capsys.readouterr().out
    assert f"by distance from the training prompts: {files['train']} (48 prompts, 12 distinct); near → far" in table
    assert "  held-out pairs (edges 0, " in table
    header = header_of(table)
    assert header.split() == ["distance", "pairs", "accuracy", "95%", "CI", "margin", "±", "SE"]
    rows = table.split(header + "\n")[1].splitlines()
    assert rows[0].lstrip().startswith("≤ ") and rows[-1].lstrip().startswith("> ") and "±" in rows[0]


def test_cli_by_distance_of_samples_with_rewards(files, capsys, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(files["root"]))
    out = tmp_path / "eval.json"
    args = ["eval", "--model", files["policy"], "--ref", files["reference"], "--prompts", files["prompts"]]
    args += [
        "--reward",
        "score_words:score",
        "--max-new-tokens",
        "4",
        "--train-data",
        files["train"],
        "--json",
        str(out),
    ]
    assert main(args) == 0
    table = capsys.readouterr().out
    assert "  generation (edges " in table
    header = header_of(table)
    assert header.split() == ["distance", "prompts", "KL", "±", "SE", "reward", "policy", "reference", "win", "rate"]
    gen = json.loads(out.read_text(encoding="utf-8"))["by_distance"]["generation"]
    assert sum(b["prompts"] for b in gen["buckets"]) == 6 and "pairs" not in gen
    # quartile edges of 6 distances (0, ≈0.05 and four far ones): the 2nd, 3rd and 5th smallest
    assert gen["buckets"][0]["prompts"] == 2 and gen["buckets"][0]["upper_edge"] < 0.1
    assert min(b["mean_distance"] for b in gen["buckets"][1:]) > 0.1
    assert all(b["win_rate"]["prompts"] == b["prompts"] and b["kl"] is not None for b in gen["buckets"])


def test_train_data_needs_data_or_prompts(files, capsys):
    args = ["eval", "--model", files["policy"], "--ref", files["reference"], "--refusal-prompts", files["held"]]
    assert main(args + ["--train-data", files["train"]]) == 2
    assert "--train-data buckets the pairs of --data and the prompts of --prompts" in capsys.readouterr().err


def test_train_data_formats_give_the_same_prompts(files, reference, tmp_path):
    _, tokenizer = reference
    expected, info = load_train_prompts(files["train"], tokenizer)
    rows = Path(files["train"]).read_text(encoding="utf-8").splitlines()
    prompts = sorted({json.loads(line)["prompt"] for line in rows})
    only_prompts = write_jsonl([{"prompt": p} for p in prompts], tmp_path / "prompts.jsonl")
    unpaired = write_jsonl(
        [{"prompt": p, "completion": " 1", "label": i % 2 == 0} for i, p in enumerate(prompts)], tmp_path / "kto.jsonl"
    )
    renamed = write_jsonl([{"q": p, "a": " 1", "b": " 2"} for p in prompts], tmp_path / "renamed.jsonl")
    for path, columns in (
        (only_prompts, None),
        (unpaired, None),
        (renamed, {"prompt": "q", "chosen": "a", "rejected": "b"}),
    ):
        ids, _ = load_train_prompts(str(path), tokenizer, columns=columns)
        assert sorted(ids) == sorted(expected)
    assert info["train_prompts"] == 48 and info["train_distinct"] == len(expected) == 12
    with pytest.raises(UserError, match="--train-data: .*no_such.jsonl: no such file"):
        load_train_prompts(str(tmp_path / "no_such.jsonl"), tokenizer)


def test_plot_by_distance_is_a_png_and_needs_no_torch(files, tmp_path):
    out = tmp_path / "eval.json"
    run_eval(
        EvalOptions(
            model=files["policy"],
            ref=files["reference"],
            data=files["held"],
            prompts=files["prompts"],
            max_new_tokens=3,
            train_data=files["train"],
            json=str(out),
        )
    )
    result = json.loads(out.read_text(encoding="utf-8"))
    assert plot_by_distance(result).startswith(b"\x89PNG") and plot_by_distance(result["by_distance"])[:4] == b"\x89PNG"
    # The report (no torch) can draw it from eval.json alone.
    code = (
        "import json, sys; from preftune.evaluation.distance import plot_by_distance; "
        f"png = plot_by_distance(json.load(open({str(out)!r}))); "
        "assert png.startswith(b'\\x89PNG'); assert 'torch' not in sys.modules, 'torch imported'"
    )
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": src}
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=120, env=env)
