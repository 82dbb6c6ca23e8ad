"""k-way prefix sharing: the k pairs of a data row (one prompt, one chosen response, k rejected ones) as one packed
segment [prompt | chosen | rejected_1 … rejected_k] give the same per-pair log-probs, losses and parameter
gradients as one segment per pair (today's packing) and as the plain padded layout; runs of `--loss plackett_luce`
on rejected-list data give the same metrics, weights and reference cache files as runs without sharing.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from preftune import recipe, refsetup
from preftune.ches import ches
from preftune.cli import main
from preftune.data.batching import collate, collate_packed, collate_padded
from preftune.data.tokenize import TokenizedPair
from preftune.logps import compute_logps_wpo, packed_logps, padded_logps
from preftune.losses import combined_loss

from helpers import RUN_TOL, WEIGHT_TOL, assert_same_run, assert_same_weights, records
from toy import build_model, counting_rows_with_rejected_lists, save_model_folder, write_jsonl

pytestmark = pytest.mark.exactness  # compares layouts and runs: CI runs it again under other CPU kernels

VOCAB = 40


def rows_of_pairs(rows: int, k: int, seed: int) -> list[TokenizedPair]:
    """`rows` source rows of k pairs each (same prompt and chosen ids, k different rejected ones), lengths varying
    from row to row and response to response."""
    rng = random.Random(seed)
    ids = lambda lo, hi: [rng.randrange(3, VOCAB) for _ in range(rng.randrange(lo, hi))]  # noqa: E731
    pairs = []
    for r in range(rows):
        prompt, chosen = ids(2, 14), ids(1, 8)
        pairs += [TokenizedPair(prompt, chosen, ids(1, 8), f"d.jsonl line {r + 1} rejected[{j}]") for j in range(k)]
    return pairs


def loss_and_grads(model, batch, loss: str, k: int, ld_alpha: float | None = None):
    """Per-pair log-probs, loss and every parameter's gradient of one forward and backward. The reference values
    differ from pair to pair, so each of the k pairs weighs the shared chosen response differently."""
    model.zero_grad()
    logps = (padded_logps if batch.__class__.__name__ == "PaddedBatch" else packed_logps)(
        model, batch, ld_alpha=ld_alpha
    )
    b = logps.chosen.shape[0]
    offsets = torch.linspace(-0.4, 0.3, b)
    names, weights = (["plackett_luce"], [1.0]) if loss == "plackett_luce" else (["sigmoid", "sft"], [1.0, 0.5])
    value = combined_loss(
        names,
        weights,
        policy_chosen_logps=logps.chosen,
        policy_rejected_logps=logps.rejected,
        ref_chosen_logps=logps.chosen.detach() + offsets,
        ref_rejected_logps=logps.rejected.detach() - offsets.flip(0),
        chosen_lengths=logps.chosen_lengths,
        rejected_lengths=logps.rejected_lengths,
        beta=0.1,
        label_smoothing=0.0,
        num_pairs=b,
        num_chosen_tokens=int(logps.chosen_lengths.sum()),
        group_size=k,
    )
    value.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    return torch.stack([t.detach().double() for t in logps]), value.detach(), grads


def assert_close(a, b) -> None:
    torch.testing.assert_close(a, b, rtol=RUN_TOL, atol=RUN_TOL)


def test_two_way_example_from_the_docstring():
    pairs = [TokenizedPair([1, 2], [3], [4, 5], "a"), TokenizedPair([1, 2], [3], [6], "b")]
    batch = collate_packed(pairs, [7, 9], pad_id=0)
    assert batch.input_ids.tolist() == [[1, 2, 3, 4, 5, 6]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 2, 3, 2]]
    assert batch.part.tolist() == [[0, 0, 1, 2, 2, 3]]
    assert batch.target_pos.tolist() == [1, 1, 3, 1, 1]
    assert batch.target_ids.tolist() == [3, 4, 5, 3, 6]
    assert batch.target_seq.tolist() == [0, 2, 2, 1, 3]
    assert batch.head_rows.tolist() == [0, 1, 2, 4] and batch.head_index.tolist() == [0, 1, 2, 0, 3]
    assert batch.lengths.tolist() == [1, 1, 2, 1] and batch.index.tolist() == [7, 9]
    assert (
        batch.num_tokens == (2 + 1) + (2 + 2) + (2 + 1) + (2 + 1) and batch.num_chosen_tokens == 2
    )  # as the plain layout counts
    mask = batch.attention_mask()[0, 0].int().tolist()
    assert mask[2] == [1, 1, 1, 0, 0, 0]  # the chosen token: prompt and itself
    assert mask[4] == [1, 1, 0, 1, 1, 0]  # rejected_1's second token: prompt and rejected_1, never the chosen one
    assert mask[5] == [1, 1, 0, 0, 0, 1]  # rejected_2: prompt and itself, neither the chosen nor rejected_1
    # without sharing: today's two segments, one per pair, and no head rows to share
    plain = collate_packed(pairs, [7, 9], pad_id=0, share=False)
    assert plain.input_ids.tolist() == [[1, 2, 3, 4, 5], [1, 2, 3, 6, 0]] and plain.head_rows is None


@pytest.mark.parametrize("k", [2, 4])
@pytest.mark.parametrize("loss", ["plackett_luce", "sigmoid"])
@pytest.mark.parametrize("pack_tokens", [None, 60])
def test_k_way_rows_give_the_same_logps_and_gradients(k, loss, pack_tokens):
    model = build_model(VOCAB, seed=1).train()
    pairs = rows_of_pairs(3, k, seed=k)
    indices = list(range(len(pairs)))
    kway = collate_packed(pairs, indices, 0, pack_tokens)
    # one segment per source row: row r's prompt and chosen response are encoded once, not k times
    assert (kway.segment.max(1).values + 1).sum() == 3
    assert kway.input_ids.numel() - (kway.segment < 0).sum() == sum(
        len(pairs[r * k].prompt_ids)
        + len(pairs[r * k].chosen_ids)
        + sum(len(p.rejected_ids) for p in pairs[r * k : r * k + k])
        for r in range(3)
    )
    results = {
        "padded": loss_and_grads(model, collate_padded(pairs, indices, 0), loss, k),
        "one segment per pair": loss_and_grads(
            model, collate_packed(pairs, indices, 0, pack_tokens, share=False), loss, k
        ),
        "k-way": loss_and_grads(model, kway, loss, k),
    }
    logps, value, grads = results["k-way"]
    for name in ("padded", "one segment per pair"):
        other_logps, other_value, other_grads = results[name]
        assert_close(logps, other_logps)
        assert_close(value, other_value)
        for param in grads:
            assert_close(grads[param], other_grads[param])
    assert value > 0 and any(g.abs().max() > 1e-3 for g in grads.values())  # a real loss, real gradients


def test_pairs_of_a_row_anywhere_in_the_batch_and_options_per_pair():
    # A pairwise loss trains shuffled pairs: the k pairs of a row are shared wherever they sit in the micro-batch.
    # LD-DPO weighs a shared chosen token by its own pair's min(|yw|, |yl|), WPO and CHES read the pair's own states.
    model = build_model(VOCAB, seed=2).eval()
    pairs = rows_of_pairs(3, 2, seed=5) + rows_of_pairs(1, 1, seed=6)
    order = [4, 0, 6, 2, 1, 5, 3]
    pairs, indices = [pairs[i] for i in order], order
    kway = collate_packed(pairs, indices, 0)
    assert kway.input_ids.shape[0] == 4 and kway.head_rows is not None
    padded = collate_padded(pairs, indices, 0)
    with torch.no_grad():
        for ld_alpha in (None, 0.5):
            got = torch.stack(list(padded_logps(model, padded, ld_alpha)))
            assert_close(torch.stack(list(packed_logps(model, kway, ld_alpha=ld_alpha))).float(), got.float())
        assert_close(
            torch.stack(list(compute_logps_wpo(model, kway))), torch.stack(list(compute_logps_wpo(model, padded)))
        )
        for a, b in zip(ches(model, kway), ches(model, padded)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)  # inner products of summed states: larger values


def test_sharing_is_used_only_where_it_makes_the_batch_no_larger():
    prompt, chosen = [5] * 10, [6] * 4
    pair = lambda rejected, p=prompt: TokenizedPair(p, chosen, rejected, "x")  # noqa: E731
    # 4 pairs of one row: 1 row of 10 + 4 + 4·4 = 30 tokens instead of 4 rows of 18 (72 cells)
    whole = collate_packed([pair([7] * 4) for _ in range(4)], [0, 1, 2, 3], 0)
    assert whole.input_ids.shape == (1, 30)
    # 2 pairs of one row among 6 others of the same size, a row per segment: 7 rows of 22 = 154 cells would pad
    # more than the 8 rows of 18 = 144 save, so each pair keeps its own segment (the numbers are the same anyway)
    mixed = [pair([7] * 4), pair([8] * 4)] + [pair([7] * 4, [9 + i] * 10) for i in range(6)]
    assert collate_packed(mixed, list(range(8)), 0).input_ids.shape == (8, 18)
    # --pack-tokens 60 with 3 pairs of one row: shared, 26 + 18 | 18 + 18 + 18 | 18 = 3 rows of 54, as many cells
    # as unshared 18 · 3 | 18 · 3 | 18 · 2, so shared (a tie shares: fewer tokens to encode)
    mixed = [pair([7] * 4), pair([8] * 4), pair([9] * 4)] + [pair([7] * 4, [9 + i] * 10) for i in range(5)]
    packed = collate_packed(mixed, list(range(8)), 0, max_row_tokens=60)
    assert packed.input_ids.shape == (3, 54) and packed.segment.max(1).values.tolist() == [1, 2, 0]


# ---------------------------------------------------------------------------------------------------- runs


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("kway")
    return {
        "model": str(save_model_folder(root / "model")),
        "root": root,
        "train": str(write_jsonl(counting_rows_with_rejected_lists(8, 4, seed=1), root / "train.jsonl")),
        "eval": str(write_jsonl(counting_rows_with_rejected_lists(4, 4, seed=2), root / "eval.jsonl")),
    }


def run(toy, out: Path, *extra: str) -> Path:
    """8 rows × 4 rejected = 32 pairs; 8 pairs (2 rows) per step: 4 steps."""
    argv = ["train", "--model", toy["model"], "--data", toy["train"], "--eval-data", toy["eval"], "--output", str(out)]
    argv += ["--loss", "plackett_luce", "--batch-size", "8", "--epochs", "1", "--learning-rate", "1e-3"]
    assert main([*argv, "--lr-scheduler", "constant", "--eval-every", "2", "--no-report", *extra]) == 0
    return out


def spy(monkeypatch, share: bool) -> dict[str, list[tuple[int, int]]]:
    """(rows, pairs) of every packed batch of the run's steps and of its reference pass, with or without sharing."""
    seen = {"steps": [], "reference": []}

    def collating(what: str):
        def collate_and_record(*args, **kwargs):
            batch = collate(*args, **kwargs, share=share)
            seen[what].append((batch.input_ids.shape[0], batch.num_pairs))
            return batch

        return collate_and_record

    monkeypatch.setattr(recipe, "collate", collating("steps"))
    monkeypatch.setattr(refsetup, "collate", collating("reference"))
    return seen


def test_plackett_luce_runs_the_same_with_k_way_rows(toy, tmp_path, monkeypatch):
    with monkeypatch.context() as patch:
        before = spy(patch, share=False)
        old = run(toy, tmp_path / "one segment per pair", "--ref-cache", str(tmp_path / "cache-old"))
    with monkeypatch.context() as patch:
        now = spy(patch, share=True)
        new = run(toy, tmp_path / "k-way", "--ref-cache", str(tmp_path / "cache-new"))
    assert all(rows == pairs for rows, pairs in before["steps"] + before["reference"])
    # every micro-batch of a step holds 2 whole data rows of 4 pairs: one packed row each (4 for the 4 eval rows)
    assert sorted(set(now["steps"])) == [(2, 8)] and len(now["steps"]) == 4 + 2 * 2, now["steps"]
    assert now["reference"] and any(rows < pairs for rows, pairs in now["reference"])
    assert records(new)[0]["loss"] == pytest.approx(math.log(5), abs=1e-5)
    assert_same_run(records(new), records(old), pairs_per_step=8)
    assert_same_weights(new, old)
    # the reference cache: the same files (keys) holding the same per-pair values
    old_files = sorted(p.name for p in (tmp_path / "cache-old").rglob("*.npy"))
    assert old_files and old_files == sorted(p.name for p in (tmp_path / "cache-new").rglob("*.npy"))
    for name in old_files:
        [a], [b] = (list((tmp_path / c).rglob(name)) for c in ("cache-old", "cache-new"))
        np.testing.assert_allclose(np.load(b), np.load(a), rtol=RUN_TOL, atol=RUN_TOL)
    padded = run(toy, tmp_path / "padded", "--layout", "padded")
    assert_same_run(records(new), records(padded), pairs_per_step=8)
    # Measured: today's packing is 6e-6 off the padded run's weights, k-way rows 7e-6 off today's packing and 1.4e-5
    # off the padded run, at a weight whose gradient is near AdamW's eps (it moved 4e-4 in 4 steps, the median
    # weight 2e-3), where an update is not proportional to the gradient and rounding grows: the two gaps add up.
    assert_same_weights(new, padded, 2 * WEIGHT_TOL)


def test_a_live_reference_runs_the_same(toy, tmp_path, monkeypatch):
    with monkeypatch.context() as patch:
        spy(patch, share=False)
        old = run(toy, tmp_path / "old", "--no-ref-cache")
    new = run(toy, tmp_path / "new", "--no-ref-cache")
    assert_same_run(records(new), records(old), pairs_per_step=8)
