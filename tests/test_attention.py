"""FlexAttention for the packed layout (preftune.attention) gives the dense mask's numbers.

On a CPU torch has no FlexAttention backward, so these tests check what a CPU can: the mask_mod against the dense
mask on every (query, key) pair, the block mask's sparsity, and forward passes through the whole model (Flex
uncompiled here; compiled in the slow test) against the SDPA path. Forward and backward on CUDA are checked by
`benchmarks/gpu_check.py`, whose CPU smoke mode and arithmetic are tested at the end.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from preftune import attention
from preftune.attention import bucket_length, flex_and_sdpa, flex_problem, mask_mod, packed_attention
from preftune.data.batching import collate_packed, collate_padded
from preftune.data.tokenize import TokenizedPair
from preftune.logps import packed_logps, padded_logps

from helpers import RUN_TOL
from toy import build_model

_spec = importlib.util.spec_from_file_location("gpu_check", Path(__file__).parents[1] / "benchmarks" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_check)

# Uncompiled Flex (exact, unfused) warns that it is slow: these tests use it on purpose.
pytestmark = [pytest.mark.exactness, pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")]
VOCAB = 40


def random_pairs(n: int, seed: int, shared: int = 0) -> list[TokenizedPair]:
    """n random pairs; the last `shared` of them share the prompt and chosen response of the one before them
    (a k-way segment, `collate_packed`'s `share`)."""
    rng = random.Random(seed)
    ids = lambda lo, hi: [rng.randrange(3, VOCAB) for _ in range(rng.randrange(lo, hi))]  # noqa: E731
    pairs = [TokenizedPair(ids(1, 12), ids(1, 7), ids(1, 7), f"pair {i}") for i in range(n - shared)]
    last = pairs[-1]
    pairs += [TokenizedPair(last.prompt_ids, last.chosen_ids, ids(1, 7), f"shared {i}") for i in range(shared)]
    return pairs


# Rows of one pair each (padded to the longest), --pack-tokens rows of several pairs with padding, and k-way
# segments (three pairs with one prompt and chosen response) among others.
LAYOUTS = {
    "one pair per row": dict(pairs=random_pairs(5, seed=1), row_tokens=None),
    "pack tokens": dict(pairs=random_pairs(7, seed=2), row_tokens=40),
    "k-way shared": dict(pairs=random_pairs(6, seed=3, shared=2), row_tokens=60),
}


def packed(name: str):
    spec = LAYOUTS[name]
    return collate_packed(spec["pairs"], list(range(len(spec["pairs"]))), 0, spec["row_tokens"])


def dense_from_mask_mod(batch, length: int) -> torch.Tensor:
    """[R, 1, length, length] mask_mod evaluated on every (query, key) pair of rows padded to `length`."""
    rows, width = batch.segment.shape
    segment, part = (F.pad(x, (0, length - width), value=-1) for x in (batch.segment, batch.part))
    b, q, kv = torch.arange(rows)[:, None, None], torch.arange(length)[None, :, None], torch.arange(length)
    return mask_mod(segment, part)(b, 0, q, kv).unsqueeze(1)


def test_mask_mod_by_hand():
    """The docstring pairs of `PackedBatch` in one row: a response sees its prompt and itself, never the other."""
    pairs = [TokenizedPair([1, 2, 3], [4, 5], [6], "a"), TokenizedPair([7, 8], [9], [10, 11], "b")]
    batch = collate_packed(pairs, [0, 1], 0, max_row_tokens=20)
    assert batch.part.tolist() == [[0, 0, 0, 1, 1, 2, 0, 0, 1, 2, 2]]
    got = dense_from_mask_mod(batch, 11)[0, 0].int().tolist()
    # columns: segment 0 = prompt 1 2 3, chosen 4 5, rejected 6; segment 1 = prompt 7 8, chosen 9, rejected 10 11
    assert got == [
        [1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 1, 0, 0, 0, 0, 0],  # rejected 6: the prompt and itself, not 4 5
        [0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 1, 1, 1, 0, 0],
        [0, 0, 0, 0, 0, 0, 1, 1, 0, 1, 0],  # rejected 10: not the chosen 9
        [0, 0, 0, 0, 0, 0, 1, 1, 0, 1, 1],
    ]


@pytest.mark.parametrize("name", LAYOUTS)
def test_mask_mod_is_the_dense_mask_on_every_pair(name):
    batch = packed(name)
    rows, width = batch.segment.shape
    assert (batch.segment < 0).any(), "each layout has padding"
    length = bucket_length(width)
    got = dense_from_mask_mod(batch, length)[:, 0]
    assert torch.equal(got[:, :width, :width], batch.attention_mask()[:, 0])
    # The bucket's extra positions are padding: no token of the row sees them, and they see no real token.
    real = F.pad(batch.segment >= 0, (0, length - width), value=False)
    assert not got[:, :width, width:].any() and not (got[:, width:, :] & real[:, None, :]).any()
    if name == "k-way shared":
        assert batch.head_rows is not None and (batch.part > 2).any(), "one segment holds 3 responses"


@pytest.mark.parametrize("name", LAYOUTS)
def test_block_mask_keeps_every_allowed_block(name):
    """The BlockMask skips only blocks with nothing allowed, and applies mask_mod inside the others."""
    batch = packed(name)
    length = bucket_length(batch.segment.shape[1])
    blocks = attention.block_mask(batch, length)
    assert blocks.shape == (batch.segment.shape[0], 1, length, length)
    dense = dense_from_mask_mod(batch, length)
    n = length // attention.BLOCK
    any_allowed = dense.view(dense.shape[0], 1, n, attention.BLOCK, n, attention.BLOCK).any(-1).any(-2)
    assert torch.equal(blocks.to_dense().bool(), any_allowed)


def test_bucket_lengths():
    assert [bucket_length(n) for n in (1, 128, 129, 300, 1000, 2048, 2049, 3000, 5000)] == [
        128, 128, 256, 384, 1024, 2048, 2304, 3072, 5120
    ]  # fmt: skip
    # At most 8 lengths per doubling, each under 1/8 longer than the row, all multiples of the block.
    buckets = {bucket_length(n) for n in range(2049, 4097)}  # (2048, 4096]
    assert len(buckets) == 8 and all(b % attention.BLOCK == 0 for b in buckets)
    assert all(bucket_length(n) < n * 9 / 8 for n in range(1024, 9000))


def logps_both_ways(model, name: str, dtype: torch.dtype | None = None):
    """(SDPA, Flex) per-sequence log-probs of the packed batch `name` under no_grad (and autocast to `dtype`)."""
    batch = packed(name)
    ctx = torch.autocast("cpu", dtype=dtype) if dtype else torch.autocast("cpu", enabled=False)
    with torch.no_grad(), ctx:
        attention.set_packed_attention(model, "sdpa")
        want = packed_logps(model, batch)
        attention.set_packed_attention(model, "flex")
        got = packed_logps(model, batch)
    return want, got


@pytest.fixture
def model():
    return build_model(VOCAB, seed=0).eval()


def qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256,
    )  # fmt: skip
    return Qwen2ForCausalLM(config).eval()


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("name", LAYOUTS)
def test_flex_forward_gives_the_sdpa_log_probs(family, name):
    """Through the whole model (uncompiled Flex, exact and fast to start): the same per-sequence log-probs as the
    dense mask, and so as the plain padded layout, for Llama and Qwen2 (transformers passes a 4-D mask, which a
    BlockMask is, to the attention function untouched)."""
    model = build_model(VOCAB, seed=0).eval() if family == "llama" else qwen2()
    with torch.compiler.set_stance("force_eager"):
        want, got = logps_both_ways(model, name)
    pairs = LAYOUTS[name]["pairs"]
    with torch.no_grad():
        plain = padded_logps(model, collate_padded(pairs, list(range(len(pairs))), 0))
    for a, b, c in zip(want, got, plain):
        assert torch.allclose(a, b, rtol=RUN_TOL, atol=RUN_TOL)
        assert torch.allclose(c, b, rtol=RUN_TOL, atol=RUN_TOL)
    assert attention.packed_attention(model) == "flex"


def test_flex_under_bfloat16_autocast_casts_as_sdpa_does(model):
    """Under autocast the query, key and value reach Flex in bfloat16, as they reach SDPA: log-probs within
    bfloat16 rounding of the SDPA path's (two kernels, two summation orders)."""
    with torch.compiler.set_stance("force_eager"):
        want, got = logps_both_ways(model, "pack tokens", torch.bfloat16)
    assert torch.allclose(want[0], got[0], rtol=2e-2, atol=5e-2) and torch.allclose(
        want[1], got[1], rtol=2e-2, atol=5e-2
    )


@pytest.mark.slow
def test_compiled_flex_forward_gives_the_sdpa_log_probs(model):
    """The compiled kernel CUDA runs, here on a CPU (forward only; ~25 s to compile on 1 thread)."""
    want, got = logps_both_ways(model, "pack tokens")
    for a, b in zip(want, got):
        assert torch.allclose(a, b, rtol=RUN_TOL, atol=RUN_TOL)


def test_the_probe_compares_flex_with_sdpa():
    """The start-up probe's comparison on a CPU (forward; uncompiled): equal outputs at every real position (two
    rows of 127), for a grouped-query shape and for a head count that is no power of two."""
    with torch.compiler.set_stance("force_eager"):
        for heads, kv_heads in ((4, 2), (6, 2)):
            (got,), (want,) = flex_and_sdpa(torch.device("cpu"), heads, kv_heads, 16, torch.float32, grad=False)
            assert got.shape == want.shape == (2, 127, heads, 16)
            assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)
        assert flex_problem.__wrapped__(torch.device("cpu"), 4, 2, 16, torch.float32) is None


def test_the_probe_reports_what_fails_instead_of_raising():
    with torch.compiler.set_stance("force_eager"):
        problem = flex_problem.__wrapped__(torch.device("cpu"), 4, 3, 16, torch.float32)  # 4 heads on 3 KV heads
    assert problem and problem.split(":")[0] in ("RuntimeError", "ValueError")


def test_auto_keeps_sdpa_on_a_cpu_and_says_why(model, caplog):
    with caplog.at_level(logging.DEBUG, logger="preftune"):
        assert packed_attention(model) == "sdpa"
    assert "not on CUDA (cpu)" in caplog.text
    with pytest.raises(ValueError, match="expected one of auto, sdpa, flex"):
        attention.set_packed_attention(model, "flash")


def test_what_keeps_a_model_on_the_dense_path(model):
    decoder = model.get_decoder()
    assert attention.flex_unsuitable(decoder) == "not on CUDA (cpu)"
    model.config.attention_dropout = 0.1
    assert attention.flex_unsuitable(decoder) == "attention dropout"
    model.config._attn_implementation = "eager"
    assert attention.flex_unsuitable(decoder) == "the model runs eager attention"


def test_installing_flex_leaves_sdpa_untouched(model):
    """After the "sdpa" entry is wrapped, anything but a BlockMask still runs transformers' own SDPA: bit-identical
    padded log-probs."""
    pairs = LAYOUTS["pack tokens"]["pairs"]
    batch = collate_padded(pairs, list(range(len(pairs))), 0)
    with torch.no_grad():
        before = padded_logps(model, batch)
        attention._install()
        attention._install()  # idempotent: it wraps the original once
        after = padded_logps(model, batch)
    assert attention._sdpa is not attention._dispatch
    for a, b in zip(before, after):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------ benchmarks/gpu_check.py
def test_gpu_check_flops_by_hand():
    """One pair (prompt 3, chosen 2, rejected 1) on a 1-layer model: hidden 4, 2 heads of 2 (1 KV head),
    intermediate 8, vocabulary 10."""
    config = gpu_check.LlamaConfig(
        vocab_size=10, hidden_size=4, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=8,
    )  # fmt: skip
    pair = [TokenizedPair([1, 2, 3], [4, 5], [6], "x")]
    linear = 2 * 4 * 4 + 2 * 4 * 2 + 3 * 4 * 8  # q, o; k, v (2 wide); the MLP's 3 matrices: 144 weights
    # padded: sequences of 5 and 4 tokens, all scored; causal pairs 15 + 10
    padded = 2 * linear * 9 + 2 * 4 * 10 * 9 + 4 * 4 * 1 * 25
    # packed: 6 tokens, 3 scored; pairs: prompt 6, chosen 2·3 + 3, rejected 1·3 + 1
    packed = 2 * linear * 6 + 2 * 4 * 10 * 3 + 4 * 4 * 1 * 19
    assert gpu_check.forward_flops(config, pair, "padded") == padded == 3712
    assert gpu_check.forward_flops(config, pair, "packed") == packed == 2272
    assert gpu_check.train_flops(config, pair, "packed") == 3 * packed
    assert gpu_check.mfu(2e12, 0.5, 8e12) == 0.5


def test_gpu_check_arguments_and_pairs():
    args = gpu_check.parse_args(["--device", "cpu", "--tiny"])
    assert (args.pairs, args.prompt, args.response, args.steps, args.pack_tokens) == (4, 24, 8, 2, 160)
    assert gpu_check.parse_args(["--quick"]).pairs == 4 and gpu_check.parse_args([]).pairs == 8
    pairs = gpu_check.make_pairs(50, 100, 10, VOCAB)
    assert all(80 <= len(p.prompt_ids) <= 120 and 8 <= len(p.chosen_ids) <= 12 for p in pairs)
    assert all(3 <= t < VOCAB for p in pairs for t in p.prompt_ids + p.chosen_ids + p.rejected_ids)
    assert gpu_check.make_pairs(3, 10, 4, VOCAB) == gpu_check.make_pairs(3, 10, 4, VOCAB)


def test_gpu_check_smoke_mode_runs_on_a_cpu(capsys):
    """`--device cpu --tiny --no-train`: every check of the GPU script runs, and passes, on a CPU."""
    assert gpu_check.main(["--device", "cpu", "--tiny", "--no-train"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines[-1]["summary"] == "ok" and lines[-1]["checks"] == 4 + 5 + 1
    exact = {r["exact"]: r for r in lines if "exact" in r}
    assert exact["packed_sdpa"]["grad_rel_diff"] < 1e-5 and exact["packed_flex"]["grad_rel_diff"] is None
    assert {r["speed"] for r in lines if "speed" in r} == {v[0] for v in gpu_check.VARIANTS}
