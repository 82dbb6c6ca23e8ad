"""The padded layout, with exact expected tensors for the worked example of `preftune.data.batching`."""

import pytest
import torch

from preftune.data.batching import PaddedBatch, collate_padded
from preftune.data.tokenize import TokenizedPair


def example_pairs():
    return [
        TokenizedPair(prompt_ids=[1, 2, 3], chosen_ids=[4, 5], rejected_ids=[6], where="data.jsonl line 6"),
        TokenizedPair(prompt_ids=[7, 8], chosen_ids=[9], rejected_ids=[10, 11], where="data.jsonl line 3"),
    ]


def test_worked_example_exact_tensors():
    batch = collate_padded(example_pairs(), indices=[5, 2], pad_id=0)
    # Rows: chosen of pair 0, chosen of pair 1, rejected of pair 0, rejected of pair 1; T = longest row = 5.
    assert batch.input_ids.tolist() == [[1, 2, 3, 4, 5], [7, 8, 9, 0, 0], [1, 2, 3, 6, 0], [7, 8, 10, 11, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 0]]
    assert batch.response_mask.tolist() == [[0, 0, 0, 1, 1], [0, 0, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 1, 1, 0]]
    assert batch.index.tolist() == [5, 2]
    # real tokens per row [5, 3, 4, 4] → 16; chosen tokens 2 + 1 = 3
    assert (batch.num_pairs, batch.num_tokens, batch.num_chosen_tokens) == (2, 16, 3)
    for tensor in (batch.input_ids, batch.attention_mask, batch.response_mask, batch.index):
        assert tensor.dtype == torch.long


def test_pad_id_and_pad_to_multiple_of():
    # Longest row 5 → rounded up to 8 with pad_to_multiple_of=4; pad_id 99 fills input_ids only.
    batch = collate_padded(example_pairs(), indices=[0, 1], pad_id=99, pad_to_multiple_of=4)
    assert batch.input_ids.tolist() == [
        [1, 2, 3, 4, 5, 99, 99, 99],
        [7, 8, 9, 99, 99, 99, 99, 99],
        [1, 2, 3, 6, 99, 99, 99, 99],
        [7, 8, 10, 11, 99, 99, 99, 99],
    ]
    assert batch.attention_mask.tolist() == [
        [1, 1, 1, 1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0],
    ]
    assert batch.response_mask.tolist() == [
        [0, 0, 0, 1, 1, 0, 0, 0],
        [0, 0, 1, 0, 0, 0, 0, 0],
        [0, 0, 0, 1, 0, 0, 0, 0],
        [0, 0, 1, 1, 0, 0, 0, 0],
    ]
    assert batch.num_tokens == 16  # padding is never counted


def test_pad_to_multiple_already_aligned():
    # Longest row 5 is already a multiple of 5: no extra column.
    assert collate_padded(example_pairs(), [0, 1], pad_id=0, pad_to_multiple_of=5).input_ids.shape == (4, 5)


def test_single_pair():
    batch = collate_padded([TokenizedPair([1], [2, 3, 4], [5], "row 0")], [0], pad_id=0)
    assert batch.input_ids.tolist() == [[1, 2, 3, 4], [1, 5, 0, 0]]
    assert batch.response_mask.tolist() == [[0, 1, 1, 1], [0, 1, 0, 0]]
    assert (batch.num_pairs, batch.num_tokens, batch.num_chosen_tokens) == (1, 6, 3)


def test_to_moves_tensors_and_keeps_counts():
    batch = collate_padded(example_pairs(), [5, 2], pad_id=0)
    moved = batch.to("cpu")
    assert isinstance(moved, PaddedBatch)
    assert torch.equal(moved.input_ids, batch.input_ids) and torch.equal(moved.index, batch.index)
    assert (moved.num_pairs, moved.num_tokens, moved.num_chosen_tokens) == (2, 16, 3)
    assert moved.response_mask.device.type == "cpu"


@pytest.mark.parametrize("field", ["prompt_ids", "chosen_ids", "rejected_ids"])
def test_empty_sequence_is_refused_with_its_location(field):
    ids = {"prompt_ids": [1], "chosen_ids": [2], "rejected_ids": [3], field: []}
    with pytest.raises(ValueError, match=f"data.jsonl line 9: {field} is empty"):
        collate_padded([TokenizedPair(**ids, where="data.jsonl line 9")], [0], pad_id=0)


def test_indices_must_match_pairs():
    with pytest.raises(ValueError, match="2 pairs but 1 indices"):
        collate_padded(example_pairs(), [0], pad_id=0)
