"""Token ids → batches. The plain padded layout here is the reference that faster layouts are tested against.

Worked example (the one `tests/test_batching.py` asserts, the same as TRL's collator docstring), pad_id = 0:

    pairs   = [TokenizedPair(prompt_ids=[1, 2, 3], chosen_ids=[4, 5], rejected_ids=[6], where=...),
               TokenizedPair(prompt_ids=[7, 8],    chosen_ids=[9],    rejected_ids=[10, 11], where=...)]
    collate_padded(pairs, indices=[5, 2], pad_id=0)

    input_ids        attention_mask   response_mask
    [[1, 2, 3, 4, 5],  [[1, 1, 1, 1, 1],  [[0, 0, 0, 1, 1],    row 0: pair 0, prompt + chosen
     [7, 8, 9, 0, 0],   [1, 1, 1, 0, 0],   [0, 0, 1, 0, 0],    row 1: pair 1, prompt + chosen
     [1, 2, 3, 6, 0],   [1, 1, 1, 1, 0],   [0, 0, 0, 1, 0],    row 2: pair 0, prompt + rejected
     [7, 8, 10, 11, 0]] [1, 1, 1, 1, 0]]   [0, 0, 1, 1, 0]]    row 3: pair 1, prompt + rejected

    index = [5, 2], num_pairs = 2, num_tokens = 5 + 3 + 4 + 4 = 16, num_chosen_tokens = 2 + 1 = 3
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING

import torch
from torch import LongTensor

if TYPE_CHECKING:  # only for annotations: batching needs nothing else from tokenization
    from preftune.data.tokenize import TokenizedPair


@dataclass
class PaddedBatch:
    """B pairs as 2B right-padded rows: rows 0..B−1 are prompt+chosen, rows B..2B−1 prompt+rejected."""

    input_ids: LongTensor  # [2B, T], pad_id after the real tokens
    attention_mask: LongTensor  # [2B, T], 1 on real tokens
    response_mask: LongTensor  # [2B, T], 1 on response tokens: the tokens whose log-prob is summed
    index: LongTensor  # [B], positions of the pairs in the dataset (keys for cached reference log-probs)
    num_pairs: int
    num_tokens: int  # real (non-padding) tokens in all 2B rows
    num_chosen_tokens: int  # response tokens in the chosen rows

    def to(self, device: torch.device | str) -> "PaddedBatch":
        """The same batch with every tensor on `device`."""
        moved = {f.name: getattr(self, f.name).to(device) for f in fields(self)
                 if isinstance(getattr(self, f.name), torch.Tensor)}
        return replace(self, **moved)


def _check_pair(pair: TokenizedPair) -> None:
    # The first token of a row has no logits predicting it, so an empty prompt would silently drop the first
    # response token; an empty response would contribute log-prob 0. Tokenization must rule both out.
    for name in ("prompt_ids", "chosen_ids", "rejected_ids"):
        if not getattr(pair, name):
            raise ValueError(f"{pair.where}: {name} is empty after tokenization; it must hold at least one token")


def _pad_rows(rows: list[list[int]], length: int, value: int) -> LongTensor:
    return torch.tensor([row + [value] * (length - len(row)) for row in rows], dtype=torch.long)


def collate_padded(pairs: list[TokenizedPair], indices: list[int], pad_id: int,
                   pad_to_multiple_of: int | None = None) -> PaddedBatch:
    """Lay out B pairs as a `PaddedBatch` of 2B rows, right-padded to the longest row (rounded up to a multiple
    of `pad_to_multiple_of` when given). `indices[i]` is the dataset position of `pairs[i]`."""
    if len(pairs) != len(indices):
        raise ValueError(f"{len(pairs)} pairs but {len(indices)} indices")
    for pair in pairs:
        _check_pair(pair)
    sequences = [p.prompt_ids + p.chosen_ids for p in pairs] + [p.prompt_ids + p.rejected_ids for p in pairs]
    responses = [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs]
    response_marks = [[0] * (len(seq) - len(resp)) + [1] * len(resp) for seq, resp in zip(sequences, responses)]

    length = max(len(seq) for seq in sequences)
    if pad_to_multiple_of:
        length = -(-length // pad_to_multiple_of) * pad_to_multiple_of  # ceil to a multiple
    return PaddedBatch(
        input_ids=_pad_rows(sequences, length, pad_id),
        attention_mask=_pad_rows([[1] * len(seq) for seq in sequences], length, 0),
        response_mask=_pad_rows(response_marks, length, 0),
        index=torch.tensor(indices, dtype=torch.long),
        num_pairs=len(pairs),
        num_tokens=sum(len(seq) for seq in sequences),
        num_chosen_tokens=sum(len(p.chosen_ids) for p in pairs),
    )
