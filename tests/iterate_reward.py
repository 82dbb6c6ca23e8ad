"""A `module:function` reward for the tests of `preftune iterate` (`--reward iterate_reward:total`): pytest puts
tests/ on sys.path, so the spec imports in the test process."""

from __future__ import annotations


def total(texts: list[str]) -> list[float]:
    """The sum of the numbers in each text (prompt + response), e.g. "count from 3 : 4 5" → 12.0: varied enough
    that the k samples of a prompt rarely tie, and a reward a tiny model can learn (say larger numbers)."""
    return [float(sum(int(word) for word in text.split() if word.isdigit())) for text in texts]


def words(texts: list[str]) -> list[float]:
    """The number of words of each text: a second reward, for --eval-reward."""
    return [float(len(text.split())) for text in texts]
