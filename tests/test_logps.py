"""Per-sequence log-probs: a hand-computed case, a naive loop, padding invariance, dtype, and a tiny Llama."""

import math

import pytest
import torch

from preftune.data.batching import collate_padded
from preftune.data.tokenize import TokenizedPair
from preftune.logps import padded_logps, sequence_logps

pytestmark = pytest.mark.exactness  # compares runs: CI runs it again under other CPU kernels


def naive_logps(logits, input_ids, response_mask):
    """Token by token: log softmax(logits[n, t−1])[input_ids[n, t]] for every response token t ≥ 1."""
    logps, lengths = [], []
    for n in range(input_ids.shape[0]):
        total, count = 0.0, 0
        for t in range(1, input_ids.shape[1]):
            if response_mask[n, t]:
                row = logits[n, t - 1].double()
                total += (row[input_ids[n, t]] - torch.logsumexp(row, 0)).item()
                count += 1
        logps.append(total)
        lengths.append(count)
    return torch.tensor(logps), torch.tensor(lengths)


def test_uniform_logits_hand_value():
    # Equal logits over V = 4 → every token has log-prob ln(1/4). Row 0 scores 3 response tokens: 3·ln(1/4)
    # = −4.158883; row 1 scores 1. Padding positions carry −inf logits: they must neither count nor make nan.
    logits = torch.zeros(2, 5, 4)
    logits[1, 2:] = -math.inf
    input_ids = torch.tensor([[0, 1, 2, 3, 1], [3, 2, 0, 0, 0]])
    response_mask = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 0, 0, 0]])
    logps, lengths = sequence_logps(logits, input_ids, response_mask)
    torch.testing.assert_close(logps, torch.tensor([3 * math.log(0.25), math.log(0.25)]))
    assert lengths.tolist() == [3, 1]


def test_peaked_logits_hand_value():
    # Logits [ln 3, 0] over V = 2 → p(0) = 3/4, p(1) = 1/4. Response tokens [0, 1, 0] → ln(3/4)·2 + ln(1/4).
    logits = torch.tensor([math.log(3.0), 0.0]).expand(1, 4, 2)
    logps, _ = sequence_logps(logits, torch.tensor([[1, 0, 1, 0]]), torch.tensor([[0, 1, 1, 1]]))
    assert logps.item() == pytest.approx(2 * math.log(0.75) + math.log(0.25), abs=1e-6)


def random_case(seed, n=4, t=9, v=11):
    gen = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(n, t, v, generator=gen)
    input_ids = torch.randint(0, v, (n, t), generator=gen)
    response_mask = torch.zeros(n, t, dtype=torch.long)
    for row, (start, end) in enumerate([(2, 9), (1, 4), (5, 6), (3, 8)]):  # response spans, some before padding
        response_mask[row, start:end] = 1
    return logits, input_ids, response_mask


def test_matches_naive_loop():
    logits, input_ids, response_mask = random_case(0)
    logps, lengths = sequence_logps(logits, input_ids, response_mask)
    want_logps, want_lengths = naive_logps(logits, input_ids, response_mask)
    assert logps.dtype == torch.float32
    torch.testing.assert_close(logps, want_logps.float(), atol=1e-5, rtol=1e-6)
    assert lengths.tolist() == want_lengths.tolist() == [7, 3, 1, 5]


def test_invariant_to_extra_right_padding():
    # The same rows with 6 more columns of pad ids and arbitrary logits: identical log-probs.
    logits, input_ids, response_mask = random_case(1)
    extra = 6
    padded_logits = torch.cat([logits, 100 * torch.randn(4, extra, logits.shape[-1])], dim=1)
    padded_ids = torch.cat([input_ids, torch.zeros(4, extra, dtype=torch.long)], dim=1)
    padded_mask = torch.cat([response_mask, torch.zeros(4, extra, dtype=torch.long)], dim=1)
    logps, lengths = sequence_logps(logits, input_ids, response_mask)
    padded, padded_lengths = sequence_logps(padded_logits, padded_ids, padded_mask)
    torch.testing.assert_close(padded, logps, atol=1e-6, rtol=0)
    assert torch.equal(padded_lengths, lengths)


def test_padding_gets_no_gradient():
    logits, input_ids, response_mask = random_case(2)
    logits.requires_grad_()
    sequence_logps(logits, input_ids, response_mask)[0].sum().backward()
    # Logits at t−1 predict token t: only positions one left of a response token may get gradient.
    scored_positions = torch.zeros_like(response_mask, dtype=torch.bool)
    scored_positions[:, :-1] = response_mask[:, 1:].bool()
    assert (logits.grad[~scored_positions] == 0).all()
    assert (logits.grad[scored_positions].abs().sum(-1) > 0).all()


def test_bf16_logits_give_float32_output():
    # log_softmax runs in float32 on the bf16 values, so the result equals float32 on the rounded logits.
    logits, input_ids, response_mask = random_case(3)
    bf16 = logits.bfloat16()
    logps, _ = sequence_logps(bf16, input_ids, response_mask)
    assert logps.dtype == torch.float32
    torch.testing.assert_close(logps, sequence_logps(bf16.float(), input_ids, response_mask)[0], atol=0, rtol=0)


@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    return LlamaForCausalLM(config).float().eval()


SHORT = TokenizedPair(prompt_ids=[1, 5, 9], chosen_ids=[12, 7], rejected_ids=[30, 31, 2], where="row 0")
LONG = TokenizedPair(prompt_ids=list(range(3, 40)), chosen_ids=list(range(40, 60)), rejected_ids=[8] * 5, where="row 1")


@torch.no_grad()
def test_padded_logps_invariant_to_batch_neighbours(tiny_llama):
    # SHORT alone (rows of 5 and 6 tokens) vs SHORT next to LONG (rows padded to 57): same log-probs.
    alone = padded_logps(tiny_llama, collate_padded([SHORT], [0], pad_id=0))
    together = padded_logps(tiny_llama, collate_padded([SHORT, LONG], [0, 1], pad_id=0, pad_to_multiple_of=64))
    for got, want in zip(together, alone):
        torch.testing.assert_close(got[:1], want, atol=1e-6, rtol=1e-6)
    assert [x.tolist() for x in alone[2:]] == [[2], [3]]
    assert [x.tolist() for x in together[2:]] == [[2, 20], [3, 5]]


@torch.no_grad()
def test_padded_logps_matches_unpadded_model_call(tiny_llama):
    # Chosen log-prob of SHORT straight from the model on the bare 5-token sequence, summed by the naive loop.
    ids = torch.tensor([SHORT.prompt_ids + SHORT.chosen_ids])
    logits = tiny_llama(input_ids=ids).logits
    want, _ = naive_logps(logits, ids, torch.tensor([[0, 0, 0, 1, 1]]))
    chosen_logps, _, _, _ = padded_logps(tiny_llama, collate_padded([SHORT, LONG], [0, 1], pad_id=0))
    assert chosen_logps[0].item() == pytest.approx(want.item(), abs=1e-5)
