"""Sampling and the KL estimator: a model against itself gives exactly 0, and models whose next-token distribution
is a fixed vector give the closed-form KL(π‖π_ref) = max_new_tokens × KL(p‖q)."""

from __future__ import annotations

import math

import pytest
import torch

from preftune.evaluation.evaluate import generation_eval
from preftune.evaluation.sampling import (
    GenerationSettings,
    Prompt,
    decode_response,
    encode_prompts,
    generate,
    sampled_logps,
)

from conftest import build_tiny_tokenizer

EOS = 2


@pytest.fixture(scope="module")
def tokenizer():
    tok = build_tiny_tokenizer()
    tok.pad_token = tok.eos_token  # as preftune's loader sets it
    return tok


def llama(vocab: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        vocab_size=vocab,
        bos_token_id=1,
        eos_token_id=EOS,
    )
    return LlamaForCausalLM(config).eval()


def constant_logits_llama(logits: torch.Tensor):
    """A real Llama (so `generate` treats it like any other) whose logits are `logits` at every position, whatever
    the context: all tokens embed to one vector e, the attention and MLP outputs are zeroed (o_proj = down_proj = 0)
    so the residual stream stays e, and the head maps the normalised e to `logits`."""
    model = llama(logits.shape[0], seed=0)
    with torch.no_grad():
        e = torch.zeros(32)
        e[0] = 1.0
        model.model.embed_tokens.weight.copy_(e.expand_as(model.model.embed_tokens.weight))
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        normalised = model.model.norm(e)[0]
        model.lm_head.weight.zero_()
        model.lm_head.weight[:, 0] = logits / normalised
    return model


def actual_logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([[1, 20, 21]])).logits[0, -1]


def kl_of(p_logits: torch.Tensor, q_logits: torch.Tensor, temperature: float = 1.0) -> float:
    """KL(softmax(p/T) ‖ softmax(q/T)) in closed form, summed over the tokens p can produce."""
    p = (p_logits / temperature).log_softmax(-1).double()
    q = (q_logits / temperature).log_softmax(-1).double()
    support = p > -math.inf
    return (p[support].exp() * (p[support] - q[support])).sum().item()


def prompt_rows(n: int) -> list[list[int]]:
    """n prompts of lengths 2–5, so batches are left-padded."""
    return [[1] + [20 + (i + k) % 30 for k in range(1 + i % 4)] for i in range(n)]


def fixed_vectors(seed: int, vocab: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(vocab, generator=g)
    logits[EOS] = -1e4  # EOS never sampled: every response has exactly max_new_tokens tokens
    return logits


# ------------------------------------------------------------------------------------------- KL


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 0.9)])
def test_kl_of_a_model_against_itself_is_exactly_zero(tokenizer, temperature, top_p):
    model = llama(len(tokenizer), seed=0)
    prompts = [Prompt("hi there", "p0"), Prompt("what color is the sky ?", "p1"), Prompt("why", "p2")]
    ids, _ = encode_prompts(prompts, tokenizer)
    settings = GenerationSettings(temperature=temperature, top_p=top_p, max_new_tokens=6, seed=3)
    metrics, samples = generation_eval(model, model, tokenizer, prompts, ids, settings, batch_size=2)
    assert metrics["kl"] == 0.0 and metrics["kl_se"] == 0.0 and metrics["kl_infinite"] == 0
    assert metrics["kl_samples"] == 3
    # the same model with the same seed samples the same responses: no length drift
    assert metrics["length"]["ratio"] == 1.0
    assert [s["policy"] for s in samples] == [s["reference"] for s in samples]


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_kl_analytic_for_fixed_next_token_distributions(tokenizer, temperature):
    vocab = len(tokenizer)
    policy = constant_logits_llama(fixed_vectors(1, vocab))
    reference = constant_logits_llama(fixed_vectors(2, vocab))
    p, q = actual_logits(policy), actual_logits(reference)
    assert torch.allclose(p, fixed_vectors(1, vocab), atol=1e-3)  # the construction works
    steps, n = 6, 160
    settings = GenerationSettings(temperature=temperature, max_new_tokens=steps, seed=0)
    samples = generate(policy, tokenizer, prompt_rows(n), settings, batch_size=64)
    assert all(len(r) == steps for r in samples.response_ids) and not any(samples.ended)
    from preftune.evaluation.stats import kl_estimate

    estimate = kl_estimate(
        sampled_logps(policy, samples, settings, EOS, batch_size=64),
        sampled_logps(reference, samples, settings, EOS, batch_size=64),
    )
    # Tokens are independent draws from softmax(p/T), so the sequence KL is `steps` times the per-token KL.
    expected = steps * kl_of(p, q, temperature)
    assert expected > 1.0  # a KL well away from 0, so the check has teeth
    assert abs(estimate["kl"] - expected) < 3 * estimate["kl_se"]
    # The SE matches the closed form: Var(sequence log-ratio) = steps · Var_p(log p/q), SE = √(Var / n).
    lp, lq = (p / temperature).log_softmax(-1).double(), (q / temperature).log_softmax(-1).double()
    ratio, weights = (lp - lq)[lp > -math.inf], lp[lp > -math.inf].exp()
    variance = (weights * ratio**2).sum().item() - ((weights * ratio).sum().item()) ** 2
    assert estimate["kl_se"] == pytest.approx(math.sqrt(steps * variance / n), rel=0.25)


def test_kl_is_infinite_when_the_reference_nucleus_excludes_policy_samples(tokenizer):
    vocab = len(tokenizer)
    policy = constant_logits_llama(fixed_vectors(1, vocab))
    peaked = fixed_vectors(2, vocab)
    peaked[30] = 30.0  # the reference's top-0.9 nucleus is token 30 alone
    reference = constant_logits_llama(peaked)
    settings = GenerationSettings(top_p=0.9, max_new_tokens=4, seed=0)
    prompts = [Prompt("hi", f"p{i}") for i in range(8)]
    ids, _ = encode_prompts(prompts, tokenizer)
    metrics, _ = generation_eval(policy, reference, tokenizer, prompts, ids, settings)
    assert metrics["kl"] is None and metrics["kl_infinite"] == 8  # 4 tokens each, never all token 30
    assert "top-p nucleus" in metrics["kl_of"]


# ------------------------------------------------------------------------------------------- log-probs, sampling


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_sampled_logps_match_an_unpadded_forward(tokenizer, temperature):
    """Left padding, position ids and the response offset are right: each row equals its own plain sequence."""
    model = llama(len(tokenizer), seed=0)
    settings = GenerationSettings(temperature=temperature, max_new_tokens=5, seed=1)
    samples = generate(model, tokenizer, prompt_rows(5), settings, batch_size=5)
    got = sampled_logps(model, samples, settings, EOS, batch_size=5)
    for prompt, response, value in zip(samples.prompt_ids, samples.response_ids, got):
        with torch.no_grad():
            logits = model(torch.tensor([prompt + response])).logits[0] / temperature
        logprobs = logits.log_softmax(-1)
        expected = sum(logprobs[len(prompt) + k - 1, t].item() for k, t in enumerate(response))
        assert value == pytest.approx(expected, abs=1e-4)


def test_sampling_is_seeded_and_leaves_the_callers_random_state_alone(tokenizer):
    model = llama(len(tokenizer), seed=0)
    rows = prompt_rows(6)
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    first = generate(model, tokenizer, rows, GenerationSettings(max_new_tokens=6, seed=7), batch_size=4)
    assert torch.equal(torch.rand(3), expected_next)
    again = generate(model, tokenizer, rows, GenerationSettings(max_new_tokens=6, seed=7), batch_size=4)
    other = generate(model, tokenizer, rows, GenerationSettings(max_new_tokens=6, seed=8), batch_size=4)
    assert first.response_ids == again.response_ids
    assert first.response_ids != other.response_ids


def test_responses_stop_at_eos(tokenizer):
    logits = torch.full((len(tokenizer),), -1e4)
    logits[EOS] = 0.0  # only EOS can be sampled
    samples = generate(constant_logits_llama(logits), tokenizer, prompt_rows(3), GenerationSettings(seed=0))
    assert samples.response_ids == [[EOS]] * 3 and samples.ended == [True] * 3
    assert samples.lengths == [0, 0, 0] and samples.texts == ["", "", ""]


def test_model_folder_generation_defaults_do_not_change_the_distribution(tokenizer):
    """A top_k in generation_config.json would make the samples differ from softmax(logits): it is set aside."""
    model = llama(len(tokenizer), seed=0)
    rows, settings = prompt_rows(4), GenerationSettings(max_new_tokens=8, seed=0)
    plain = generate(model, tokenizer, rows, settings)
    model.generation_config.top_k = 1  # greedy if it were used
    model.generation_config.do_sample = False
    assert generate(model, tokenizer, rows, settings).response_ids == plain.response_ids
    assert model.generation_config.top_k == 1  # and restored


# ------------------------------------------------------------------------------------------- prompts


def test_encode_prompts_text_and_chat(tokenizer):
    prompts = [Prompt("Q: hi there", "row 1"), Prompt([{"role": "user", "content": "hi"}], "row 2")]
    ids, cut = encode_prompts(prompts, tokenizer)
    # text: BOS then the words (Q=12 ":"=7 hi=16 there=17); chat: "<s><|user|> hi</s><|assistant|>"
    assert ids == [[1, 12, 7, 16, 17], [1, 4, 16, 2, 5]] and cut == 0
    ids, cut = encode_prompts(prompts, tokenizer, max_prompt_length=3)
    assert ids == [[7, 16, 17], [16, 2, 5]] and cut == 2  # cut from the left, as training cuts prompts


def test_decode_response_keeps_the_separating_space(tokenizer):
    assert decode_response(tokenizer, [1, 16, 17], [18, 19]) == " good bad"
