"""The demo's grammar, its ground-truth sentiment reward and the Bradley–Terry labels drawn from it."""

from __future__ import annotations

import math
import random
import statistics

import pytest

from preftune.demo import preferences, sentiment

# ---------------------------------------------------------------------------------------------- grammar


def test_grammar_is_a_pure_function_of_the_seed():
    assert sentiment.reviews(50, seed=3) == sentiment.reviews(50, seed=3)
    assert sentiment.reviews(50, seed=3) != sentiment.reviews(50, seed=4)
    assert sentiment.prompts(20, seed=5) == sentiment.prompts(20, seed=5)


def test_corpus_is_varied_mixed_and_of_a_few_hundred_words():
    texts = sentiment.reviews(2000, seed=0)
    assert len(set(texts)) > 1900  # templates × slots: hardly any review repeats
    vocabulary = {w for t in texts for w in sentiment.words(t)}
    assert 200 <= len(vocabulary) <= 400
    rewards = sentiment.score(texts)
    positive = sum(r > 0 for r in rewards) / len(rewards)
    negative = sum(r < 0 for r in rewards) / len(rewards)
    assert abs(statistics.fmean(rewards)) < 0.1 and positive > 0.35 and negative > 0.35
    assert statistics.pstdev(rewards) > 0.3
    lengths = [len(t.split()) for t in texts]
    assert min(lengths) >= 4 and 10 <= statistics.fmean(lengths) <= 20


def test_plot_sentences_are_neutral():
    rng = random.Random(0)
    for _ in range(300):
        clause = sentiment._plot(rng)
        assert sentiment.sentiment_sum(clause) == 0, clause


def test_prompts_are_two_to_four_words_and_leave_two_to_continue():
    rng = random.Random(1)
    for text in sentiment.reviews(300, seed=1):
        prompt = sentiment.prompt_of(text, rng)
        n = len(prompt.split(" "))
        assert text.startswith(prompt + " ")
        assert 2 <= n <= 4 and len(text.split(" ")) - n >= 2


def test_heldout_prompts_never_occur_in_training():
    train = sentiment.prompts(3000, seed=1)
    heldout = sentiment.prompts(300, seed=2, heldout=True)
    assert len(heldout) == 300 and all(map(sentiment.is_heldout, heldout))
    assert not set(train) & set(heldout)
    # A fifth of the distinct prompt texts, by hash: crc32("it is") % 5 == 0, crc32("i did not") % 5 == 1.
    assert sentiment.is_heldout("it is") and not sentiment.is_heldout("i did not")
    rng = random.Random(3)
    distinct = {sentiment.prompt_of(text, rng) for text in sentiment.reviews(3000, seed=3)}
    assert 0.15 < sum(map(sentiment.is_heldout, distinct)) / len(distinct) < 0.25


# ---------------------------------------------------------------------------------------------- reward


@pytest.mark.parametrize(
    "text, total",
    [
        ("the acting was good.", 0.5),
        ("the acting was not good.", -0.5),  # negation flips
        ("the acting was not very good.", -(1.5 * 0.5)),  # ... and the intensifier still scales
        ("really very good", 1.5 * 1.5 * 0.5),  # intensifiers multiply
        ("this is not a great film", -1.0),  # negation reaches past "a" to the next polarity word
        ("not the plot, but the acting was good.", 0.5),  # ... but not past a comma
        ("not never good", 0.5),  # double negation
        ("i really loved it, but the plot was extremely dull.", 1.5 * 1.0 - 2.0 * 0.5),
        ("it is a disaster and a mess", -1.0 - 0.5),
        ("slightly awful, very", 0.5 * -1.0),  # a trailing intensifier scales nothing
        ("GREAT!", 1.0),  # case-insensitive, punctuation split off
        ("the story follows a young farmer who moves to paris.", 0.0),
    ],
)
def test_sentiment_sum_by_hand(text, total):
    assert sentiment.sentiment_sum(text) == pytest.approx(total)


def test_score_is_tanh_of_half_the_sum():
    scores = sentiment.score(["the acting was not very good.", "i loved it, but the plot was dull.", "hello"])
    # tanh(−0.75 / 2) = −0.358357, tanh(0.5 / 2) = 0.244919, tanh(0) = 0
    assert scores == pytest.approx([-0.358357, 0.244919, 0.0], abs=1e-6)
    with pytest.raises(TypeError):
        sentiment.score("a single string")


# ---------------------------------------------------------------------------------------------- Bradley–Terry


def test_preference_probability_by_hand():
    tau = 0.25
    assert preferences.preference_probability(tau * math.log(3), 0.0, tau) == pytest.approx(0.75)
    assert preferences.preference_probability(0.0, tau * math.log(3), tau) == pytest.approx(0.25)
    assert preferences.preference_probability(0.3, 0.3, tau) == 0.5


def test_bradley_terry_labels_follow_the_planted_probabilities():
    n, tau = 8000, 0.25
    rng = random.Random(0)
    # r1 − r2 = τ·ln 3 → P(first) = 0.75; equal rewards → 0.5. Standard errors √(p(1−p)/n) ≈ 0.0048 and 0.0056.
    wins = preferences.first_preferred([0.2 + tau * math.log(3)] * n, [0.2] * n, tau, rng)
    assert abs(sum(wins) / n - 0.75) < 4 * math.sqrt(0.75 * 0.25 / n)
    ties = preferences.first_preferred([0.1] * n, [0.1] * n, tau, rng)
    assert abs(sum(ties) / n - 0.5) < 4 * math.sqrt(0.25 / n)
    again = preferences.first_preferred([0.5, -0.5, 0.0], [0.0, 0.0, 0.0], tau, random.Random(7))
    assert again == preferences.first_preferred([0.5, -0.5, 0.0], [0.0, 0.0, 0.0], tau, random.Random(7))
    with pytest.raises(ValueError):
        preferences.first_preferred([0.0], [0.0], 0.0, rng)


def test_the_judge_labels_pairs_as_bradley_terry_does():
    """judge = r + τ·G(text): the difference of two Gumbel draws is logistic, so the judge prefers the text whose
    reward is τ·ln 3 higher with probability 0.75, as `first_preferred` does; the noise is fixed by the text."""
    n, tau = 8000, preferences.TAU
    noise = [preferences.gumbel(f"review {i}") for i in range(n)]
    assert abs(statistics.fmean(noise) - 0.5772157) < 4 * 1.2825 / math.sqrt(n)  # Euler's γ; sd π/√6
    assert abs(sum(g <= 0 for g in noise) / n - math.exp(-1)) < 4 * math.sqrt(0.37 * 0.63 / n)  # P(G ≤ 0) = 1/e
    gap = tau * math.log(3)
    wins = [gap + tau * a > tau * b for a, b in zip(noise[: n // 2], noise[n // 2 :])]
    assert abs(sum(wins) / len(wins) - 0.75) < 4 * math.sqrt(0.75 * 0.25 / len(wins))
    texts = ["the acting is great.", "the acting is awful.", "the acting is great."]
    judged = preferences.judge(texts)
    assert judged[0] == judged[2]  # the same text, the same noise
    for text, value, truth in zip(texts, judged, sentiment.score(texts)):
        assert value == pytest.approx(truth + tau * preferences.gumbel(text))


def test_preference_rows_count_disagreements_ties_and_skips():
    n, tau = 4000, 0.25
    prompts = ["the plot"] * n
    first, second = [f" was good {i}." for i in range(n)], [f" was dull {i}." for i in range(n)]
    # The first response is better by τ·ln 3: a quarter of the labels should prefer the second (disagree).
    rows, report = preferences.preference_rows(
        prompts, first, second, [tau * math.log(3)] * n, [0.0] * n, tau=tau, seed=0
    )
    assert report.pairs == len(rows) == n and report.ties == 0
    assert abs(report.disagreement_share - 0.25) < 4 * math.sqrt(0.25 * 0.75 / n)
    assert sum(r["chosen"].startswith(" was dull") for r in rows) == report.disagreements

    rows, report = preferences.preference_rows(
        ["a", "b", "c", "d"],
        [" good.", " same.", "", " fine."],
        [" bad.", " same.", " x.", " fine!"],
        [0.9, 0.0, 0.0, 0.2],
        [-0.9, 0.0, 0.0, 0.2],
        tau=1e-3,
        seed=0,
    )
    # τ → 0: the higher reward always wins; "same" is identical, "" is empty, the last pair is a tie.
    assert rows[0] == {"prompt": "a", "chosen": " good.", "rejected": " bad."}
    assert [r["prompt"] for r in rows] == ["a", "d"]
    assert (report.pairs, report.identical_skipped, report.empty_skipped, report.ties, report.disagreements) == (
        2,
        1,
        1,
        1,
        0,
    )
    assert report.summary() == (
        "2 pairs, labels disagree with the reward on 0% (τ = 0.001), 1 ties; skipped 1 identical, 1 empty"
    )
