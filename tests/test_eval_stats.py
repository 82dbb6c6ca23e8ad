"""Estimators of `preftune.evaluation.stats` and the reward loader, against values worked out by hand."""

from __future__ import annotations

import math

import pytest

from preftune.errors import UserError
from preftune.evaluation.rewards import check_scores, load_reward
from preftune.evaluation.stats import (
    distinct_n,
    kl_estimate,
    mean_se,
    wilson_interval,
    win_rate,
)


def test_mean_and_standard_error():
    # [1, 2, 3, 4]: mean 2.5; s² = (1.5² + 0.5² + 0.5² + 1.5²) / 3 = 5/3; SE = √(5/3) / √4 = 0.645497
    mean, se = mean_se([1, 2, 3, 4])
    assert mean == 2.5 and se == pytest.approx(math.sqrt(5 / 3) / 2)
    assert mean_se([7.0]) == (7.0, None)  # one value: no spread to measure
    assert mean_se([]) == (None, None)


def test_kl_estimate_is_the_mean_log_ratio_with_its_standard_error():
    # log-ratios 1 − 0 = 1, −1 − (−4) = 3: KL = 2, s² = ((−1)² + 1²) / 1 = 2, SE = √2 / √2 = 1
    assert kl_estimate([1.0, -1.0], [0.0, -4.0]) == {"kl": 2.0, "kl_se": 1.0, "samples": 2, "infinite": 0}
    # a sample the reference cannot produce (log-prob −inf) makes the KL infinite: reported, not averaged away
    assert kl_estimate([1.0, -1.0, -2.0], [0.0, -math.inf, -4.0]) == {
        "kl": None,
        "kl_se": None,
        "samples": 3,
        "infinite": 1,
    }


def test_distinct_n_by_hand():
    responses = [[5, 6, 5], [5, 7]]
    # unigrams 5 6 5 5 7: 3 distinct of 5; bigrams (5,6) (6,5) (5,7): 3 distinct of 3
    assert distinct_n(responses, 1) == pytest.approx(3 / 5)
    assert distinct_n(responses, 2) == 1.0
    assert distinct_n([[4, 4, 4, 4]], 2) == pytest.approx(1 / 3)  # (4,4) three times
    assert distinct_n([[], [3]], 2) is None  # no response has two tokens


def test_wilson_interval_by_hand():
    # p̂ = 8.5 / 10 = 0.85, z = 1.959964, z²/n = 0.3841459:
    #   centre = (0.85 + 0.1920729) / 1.3841459 = 0.7528635
    #   half   = 1.959964 / 1.3841459 · √(0.85·0.15/10 + 3.841459/400) = 1.4160051 · 0.1495114 = 0.2117096
    low, high = wilson_interval(8.5, 10)
    assert low == pytest.approx(0.7528635 - 0.2117096, abs=1e-6)
    assert high == pytest.approx(0.7528635 + 0.2117096, abs=1e-6)
    # p̂ = 1 still has width (the normal interval would be the single point 1):
    #   centre = (1 + 0.1920729) / 1.3841459 = 0.8612349; half = 1.4160051 · √(3.841459/400) = 0.1387672
    low, high = wilson_interval(10, 10)
    assert low == pytest.approx(0.8612349 - 0.1387672, abs=1e-6)
    assert high == pytest.approx(1.0)


def test_win_rate_ties_count_half():
    result = win_rate([2, 1, 0, 1, 3], [1, 1, 0, 0, 4])  # win, tie, tie, win, loss
    assert (result["wins"], result["ties"], result["losses"], result["prompts"]) == (2, 2, 1, 5)
    assert result["win_rate"] == pytest.approx((2 + 2 / 2) / 5)
    assert (result["ci_low"], result["ci_high"]) == wilson_interval(3, 5)


@pytest.fixture
def reward_module(tmp_path, monkeypatch):
    """An importable module `eval_stats_reward` whose `score` counts the word "good" and records its inputs."""
    (tmp_path / "eval_stats_reward.py").write_text(
        "SEEN = []\n"
        "def score(texts):\n"
        "    SEEN.extend(texts)\n"
        "    return [float(t.split().count('good')) for t in texts]\n"
        "def wrong_length(texts):\n"
        "    return [0.0]\n"
        "def not_numbers(texts):\n"
        "    return ['high' for _ in texts]\n"
        "def nan(texts):\n"
        "    return [float('nan') for _ in texts]\n"
        "NOT_CALLABLE = 3\n",
        encoding="utf-8",
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib
    import sys

    sys.modules.pop("eval_stats_reward", None)
    return importlib.import_module("eval_stats_reward")


def test_win_rate_on_a_callable_reward(reward_module):
    reward = load_reward("eval_stats_reward:score")
    prompts = ["Q: hi A:"] * 4
    policy = [" good good", " good", " bad", " good"]
    reference = [" good", " good", " bad", " bad"]
    policy_scores, ref_scores = reward(prompts, policy), reward(prompts, reference)
    # the function sees prompt + response, and counts "good": policy 2, 1, 0, 1; reference 1, 1, 0, 0
    assert reward_module.SEEN[:4] == ["Q: hi A: good good", "Q: hi A: good", "Q: hi A: bad", "Q: hi A: good"]
    assert policy_scores == [2.0, 1.0, 0.0, 1.0] and ref_scores == [1.0, 1.0, 0.0, 0.0]
    result = win_rate(policy_scores, ref_scores)
    # 2 wins, 2 ties, 0 losses: (2 + 1) / 4 = 0.75. Wilson with p̂ = 0.75, n = 4, z²/n = 0.9603648:
    #   centre = (0.75 + 0.4801824) / 1.9603648 = 0.6275270; half = 0.9997956 · √(0.046875 + 0.0600228) = 0.3268859
    assert result["win_rate"] == 0.75
    assert result["ci_low"] == pytest.approx(0.6275270 - 0.3268859, abs=1e-6)
    assert result["ci_high"] == pytest.approx(0.6275270 + 0.3268859, abs=1e-6)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("eval_stats_reward:wrong_length", "--reward eval_stats_reward:wrong_length: returned 1 scores for 2 texts"),
        ("eval_stats_reward:not_numbers", "--reward eval_stats_reward:not_numbers: score 0 is str, expected a number"),
        ("eval_stats_reward:nan", "--reward eval_stats_reward:nan: score 0 is nan, expected a finite number"),
    ],
)
def test_a_reward_returning_nonsense_is_a_user_error(reward_module, spec, message):
    with pytest.raises(UserError) as e:
        load_reward(spec)(["a", "b"], ["c", "d"])
    assert str(e.value) == message


@pytest.mark.parametrize(
    "spec, message",
    [
        ("no_such_module_xyz:score", "--reward no_such_module_xyz:score: cannot import module 'no_such_module_xyz'"),
        (
            "eval_stats_reward:missing",
            "--reward eval_stats_reward:missing: module 'eval_stats_reward' has no attribute",
        ),
        ("eval_stats_reward:NOT_CALLABLE", "--reward eval_stats_reward:NOT_CALLABLE: 'NOT_CALLABLE' is not callable"),
        ("eval_stats_reward:", "--reward eval_stats_reward:: expected module:function"),
        ("just-a-name", "--reward just-a-name: no such folder; expected a reward model folder or module:function"),
    ],
)
def test_bad_reward_specs(reward_module, spec, message):
    with pytest.raises(UserError) as e:
        load_reward(spec)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_check_scores_accepts_tensors():
    import torch

    assert check_scores(torch.tensor([1.5, -2.0]), 2, "--reward x") == [1.5, -2.0]
