"""Groups of pairs that a grouped loss (`plackett_luce`) trains as one: the k pairs (chosen, rejected_j) of a data
row whose `rejected` lists k responses, e.g. {"prompt": "2+2=", "chosen": " 4", "rejected": [" 5", " 22", " 3"]}
→ one group of k = 3 pairs, "d.jsonl line 1 rejected[0]" ... "rejected[2]".

Its loss needs each group whole, in one micro-batch of one process, so with a grouped loss:
- every row gives the same number of pairs k (`group_size`), none of them skipped (chosen == rejected) or
  dropped (--on-overlength drop): a row that lost some is an error, never a smaller group;
- an epoch shuffles the groups, not the pairs, and keeps the k pairs of a group next to each other
  (`grouped_order`); --batch-size is a multiple of k, and processes share a step in whole groups.

The packed layout then encodes each group's prompt and chosen response once: its k pairs share their prompt and
chosen ids, so `batching.collate_packed` lays them out as one k-way segment [prompt | chosen | rejected_1 …
rejected_k] (any pairwise loss gets the same whenever the k pairs of a row land in one micro-batch).
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import groupby

import numpy as np

from preftune.data.formats import rejected_item
from preftune.data.tokenize import TokenizedPair
from preftune.errors import UserError


def group_size(pairs: Iterable[TokenizedPair], flag: str, loss: str) -> int:
    """k, the number of pairs each source row of `pairs` (in file order) gives; a UserError naming two rows that
    give different numbers."""
    k = first = None
    for row, members in groupby(pairs, key=lambda pair: rejected_item(pair.where)[0]):
        n = sum(1 for _ in members)
        if k is None:
            k, first = n, row
        elif n != k:
            raise UserError(
                f"--loss {loss}: {flag}: {row} gives {n} pair{'s' * (n != 1)} but {first} gives {k}; "
                "every row must keep the same number of rejected responses (each row trains as one "
                "group; a pair skipped as identical or dropped as over length leaves its row short)"
            )
    if k is None:
        raise ValueError("no pairs")
    return k


def grouped_order(groups: np.ndarray, k: int) -> np.ndarray:
    """Pair indices of the groups in the order `groups` (group g holds pairs g·k ... g·k + k − 1), [len(groups)·k];
    with k = 1, `groups` itself."""
    return (groups[:, None] * k + np.arange(k)).ravel()
