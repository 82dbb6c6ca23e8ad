"""The packed, prefix-shared layout with the chunked LM head gives the plain layout's numbers exactly.

The plain layout (`collate_padded` + `padded_logps`, full logits) is the reference: same per-sequence log-probs,
same loss and the same gradient for every parameter, within float32 tolerance.
"""

from __future__ import annotations

import random

import pytest
import torch

from preftune.data.batching import collate_packed, collate_padded
from preftune.data.tokenize import TokenizedPair
from preftune.logps import packed_layout_works, packed_logps, padded_logps, token_logps
from preftune.losses import combined_loss

from toy import build_model

pytestmark = pytest.mark.exactness  # compares runs: CI runs it again under other CPU kernels


def random_pairs(n: int, vocab: int, seed: int) -> list[TokenizedPair]:
    rng = random.Random(seed)
    ids = lambda lo, hi: [rng.randrange(3, vocab) for _ in range(rng.randrange(lo, hi))]  # noqa: E731
    return [TokenizedPair(ids(1, 12), ids(1, 7), ids(1, 7), f"pair {i}") for i in range(n)]


def loss_and_grads(model, batch, logps_fn):
    model.zero_grad()
    chosen, rejected, chosen_len, rejected_len = logps_fn(model, batch)
    loss = combined_loss(
        ["sigmoid", "sft"],
        [1.0, 0.5],
        policy_chosen_logps=chosen,
        policy_rejected_logps=rejected,
        ref_chosen_logps=chosen.detach() - 0.3,
        ref_rejected_logps=rejected.detach() + 0.2,
        chosen_lengths=chosen_len,
        rejected_lengths=rejected_len,
        beta=0.1,
        label_smoothing=0.0,
        num_pairs=len(chosen),
        num_chosen_tokens=int(chosen_len.sum()),
    )
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    return (chosen.detach(), rejected.detach(), chosen_len, rejected_len), loss.detach(), grads


def test_packed_example_from_docstring():
    pairs = [TokenizedPair([1, 2, 3], [4, 5], [6], "a"), TokenizedPair([7, 8], [9], [10, 11], "b")]
    batch = collate_packed(pairs, [5, 2], pad_id=0)
    assert batch.input_ids.tolist() == [[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 0]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4, 3], [0, 1, 2, 2, 3, 0]]
    assert batch.part.tolist() == [[0, 0, 0, 1, 1, 2], [0, 0, 1, 2, 2, -1]]
    # flat positions: row · 6 + column; chosen 4 ← 2, 5 ← 3, 9 ← 6+1; rejected 6 ← 2, 10 ← 7, 11 ← 6+3
    assert batch.target_pos.tolist() == [2, 3, 2, 7, 7, 9]
    assert batch.target_ids.tolist() == [4, 5, 6, 9, 10, 11]
    assert batch.target_seq.tolist() == [0, 0, 2, 1, 3, 3]
    assert batch.num_tokens == 16 and batch.num_chosen_tokens == 3 and batch.index.tolist() == [5, 2]
    mask = batch.attention_mask()[0, 0]
    # the rejected token (column 5) sees the prompt and itself, never the chosen tokens (columns 3, 4)
    assert mask[5].tolist() == [True, True, True, False, False, True]
    assert mask[4].tolist() == [True, True, True, True, True, False]


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("pack_tokens, chunk", [(None, 1024), (None, 3), (40, 5)])
def test_packed_matches_padded_values_and_gradients(tie, pack_tokens, chunk):
    model = build_model(40, seed=1, tie=tie).train()
    pairs = random_pairs(6, 40, seed=2)
    indices = list(range(len(pairs)))
    plain_logps, plain_loss, plain_grads = loss_and_grads(model, collate_padded(pairs, indices, 0), padded_logps)
    batch = collate_packed(pairs, indices, 0, max_row_tokens=pack_tokens)
    if pack_tokens:
        assert batch.input_ids.shape[0] < len(pairs)  # several pairs really share rows
    packed_logps_, packed_loss, packed_grads = loss_and_grads(model, batch, lambda m, b: packed_logps(m, b, chunk))
    for a, b in zip(plain_logps, packed_logps_):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(plain_loss, packed_loss, rtol=1e-6, atol=1e-6)
    for name in plain_grads:
        torch.testing.assert_close(plain_grads[name], packed_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_chunked_head_gradients_match_full_log_softmax():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=True)
    hidden = torch.randn(13, 16, requires_grad=True)
    targets = torch.randint(0, 50, (13,))
    weights = torch.randn(13)
    full = torch.log_softmax(head(hidden), -1).gather(-1, targets[:, None]).squeeze(-1)
    grads_full = torch.autograd.grad((full * weights).sum(), [hidden, head.weight, head.bias])
    chunked = token_logps(hidden, head, targets, chunk=4)
    grads_chunked = torch.autograd.grad((chunked * weights).sum(), [hidden, head.weight, head.bias])
    torch.testing.assert_close(chunked, full)
    for a, b in zip(grads_full, grads_chunked):
        torch.testing.assert_close(a, b)


def test_bf16_chunked_head_accumulates_in_float32():
    torch.manual_seed(0)
    head = torch.nn.Linear(32, 1000, bias=False)
    hidden = torch.randn(8, 32)
    targets = torch.randint(0, 1000, (8,))
    exact = torch.log_softmax(hidden.double() @ head.weight.double().t(), -1).gather(-1, targets[:, None]).squeeze(-1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = token_logps(hidden, head, targets, chunk=3)
    assert got.dtype == torch.float32
    # only the bf16 rounding of the logits remains: ~3 significant digits, no error from the reduction
    torch.testing.assert_close(got.double(), exact, rtol=2e-2, atol=5e-2)


def test_models_that_do_not_fit_fall_back():
    model = build_model(40, seed=1)
    pairs = random_pairs(2, 40, seed=3)
    assert packed_layout_works(model, pairs, 0) is None
    model.config.final_logit_softcapping = None
    original = model.forward

    def scaled_forward(*args, **kwargs):  # a model whose logits are more than lm_head(decoder(x))
        out = original(*args, **kwargs)
        out.logits = out.logits * 0.5
        return out

    model.forward = scaled_forward
    problem = packed_layout_works(model, pairs, 0)
    assert problem is not None and "differ" in problem
