"""CHES, the likelihood-displacement score of Razin et al. 2025 (`preftune.ches`): the formula by hand, both layouts
against a naive per-sequence pass, the reference-cache pass that also writes it, and `preftune audit --displacement`.

Tolerance of the model-level comparisons: both sides run the same float32 model, but the batched layouts compute
attention over other key sets (padding, packed neighbours, masked) and matmuls of other shapes, so a hidden state
differs from the naive one by float32 rounding (~1e-7 relative); summing up to ~10 states and one inner product
over H = 64 add a few ulps more. CHES is a difference of two terms, ⟨a, b⟩ and ‖a‖², so its error scales with
their size, not with its own: we allow RTOL = 1e-5 of |⟨a, b⟩| + ‖a‖² (the worst seen here is 1.3e-7: room for
other CPU kernels), while summing the states one position off (the likeliest mistake) moves CHES by 2e-4 to 1e-1
of that scale on these pairs, which `test_tolerance_catches_a_position_off_by_one` checks.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from preftune.ches import _quantiles, ches, ches_scores, logps_and_ches
from preftune.cli import main
from preftune.data.batching import collate_packed, collate_padded
from preftune.data.tokenize import TokenizedPair
from preftune.logps import compute_logps, packed_hidden
from preftune.refcache import compute

from toy import build_model, build_tokenizer, counting_pairs, save_model_folder, write_jsonl

pytestmark = pytest.mark.exactness  # compares layouts and passes: CI runs it again under other CPU kernels

EOS = 2
RTOL = 1e-5  # of |⟨a, b⟩| + ‖a‖²: see the module docstring


@pytest.fixture(scope="module")
def model():
    return build_model(len(build_tokenizer()), seed=0, hidden=64).eval()


def random_pairs(n: int, vocab: int, seed: int) -> list[TokenizedPair]:
    rng = random.Random(seed)
    ids = lambda lo, hi: [rng.randrange(3, vocab) for _ in range(rng.randrange(lo, hi))]  # noqa: E731
    return [TokenizedPair(ids(1, 10), ids(1, 8) + [EOS], ids(1, 8) + [EOS], f"pair {i}") for i in range(n)]


# ---------------------------------------------------------------------------------------------------- by hand


def naive_sums(model, prompt: list[int], response: list[int], shift: int = 0) -> torch.Tensor:
    """Σ_k h_{x,y,<k} in float64: the full model on prompt + response alone, its last hidden states at the
    positions P − 1 … P + |y| − 2 that predict the response's tokens (`shift` moves them, to model a mistake)."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True, use_cache=False)
    hidden = out.hidden_states[-1][0].double()
    start = len(prompt) - 1 + shift
    return hidden[start : start + len(response)].sum(0)


def naive_ches(model, pair: TokenizedPair, shift: int = 0) -> tuple[float, float, float, float]:
    """(CHES, CHES_norm, and the scale of each: |⟨a, b⟩| + ‖a‖², the same of the means), written out."""
    a = naive_sums(model, pair.prompt_ids, pair.chosen_ids, shift)
    b = naive_sums(model, pair.prompt_ids, pair.rejected_ids, shift)
    n_a, n_b = len(pair.chosen_ids), len(pair.rejected_ids)
    cross, own = float(a @ b), float(a @ a)
    return cross - own, cross / (n_a * n_b) - own / n_a**2, abs(cross) + own, abs(cross) / (n_a * n_b) + own / n_a**2


def test_formula_by_hand():
    # a = [1, 2], b = [3, 0.5], |y+| = 2, |y−| = 4: ⟨a, b⟩ = 3 + 1 = 4, ‖a‖² = 5
    # CHES = 4 − 5 = −1; CHES_norm = 4 / (2 · 4) − 5 / 2² = 0.5 − 1.25 = −0.75
    raw, norm = ches_scores(torch.tensor([[1.0, 2.0], [3.0, 0.5]]), torch.tensor([2, 4]))
    assert raw.tolist() == [-1.0] and norm.tolist() == [-0.75]


def test_identical_responses_score_exactly_zero_by_the_formula():
    # ⟨a, a⟩ − ‖a‖² = 0 and ⟨a, a⟩ / n² − ‖a‖² / n² = 0: the two terms are summed in the same order, so exactly
    a = torch.randn(3, 64) * 7
    raw, norm = ches_scores(torch.cat([a, a]), torch.tensor([5, 1, 9, 5, 1, 9]))
    assert torch.equal(raw, torch.zeros(3)) and torch.equal(norm, torch.zeros(3))


def test_quantiles_are_nearest_rank():
    q = _quantiles(np.array([4.0, 1.0, 3.0, 2.0], dtype=np.float32))
    # ranks ceil(q · 4): p10 → 1st, p25 → 1st, median → 2nd, p75 → 3rd, p90 → 4th
    assert q == {"min": 1.0, "p10": 1.0, "p25": 1.0, "median": 2.0, "p75": 3.0, "p90": 4.0, "max": 4.0, "mean": 2.5}


# ---------------------------------------------------------------------------------------------------- layouts


def test_hidden_states_are_what_the_lm_head_multiplies(model):
    # hidden_states[-1] (what naive_sums reads) is after the final norm: the head applied to it gives the logits
    ids = torch.tensor([[1, 5, 9, 12, 7, 2]])
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True, use_cache=False)
        assert torch.equal(model.get_output_embeddings()(out.hidden_states[-1]), out.logits)
        # and the packed pass reads the same states at the positions predicting the responses' tokens
        pair = TokenizedPair([1, 5, 9], [12, 7, 2], [8, 2], "p")
        picked = packed_hidden(model, collate_packed([pair], [0], EOS))
    want = out.hidden_states[-1][0, 2:5]  # chosen 12, 7, 2 ← positions 2, 3, 4
    torch.testing.assert_close(picked[:3], want, rtol=1e-5, atol=1e-5)


LAYOUTS = {
    "padded": lambda pairs: collate_padded(pairs, list(range(len(pairs))), EOS),
    "packed": lambda pairs: collate_packed(pairs, list(range(len(pairs))), EOS),
    "packed, several pairs a row": lambda pairs: collate_packed(pairs, list(range(len(pairs))), EOS, 40),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_matches_naive_per_sequence_pass(model, layout):
    pairs = random_pairs(6, vocab=model.config.vocab_size, seed=1)
    raw, norm = ches(model, LAYOUTS[layout](pairs))
    assert raw.dtype == norm.dtype == torch.float32 and raw.shape == norm.shape == (6,)
    for i, pair in enumerate(pairs):
        want_raw, want_norm, scale, scale_norm = naive_ches(model, pair)
        assert abs(raw[i].item() - want_raw) <= RTOL * scale, (pair.where, raw[i].item(), want_raw)
        assert abs(norm[i].item() - want_norm) <= RTOL * scale_norm, (pair.where, norm[i].item(), want_norm)


def test_tolerance_catches_a_position_off_by_one(model):
    # The check above has power: states one position early differ from the right ones by far more than it allows.
    pairs = [p for p in random_pairs(6, vocab=model.config.vocab_size, seed=1) if len(p.prompt_ids) > 1]
    assert len(pairs) == 5  # a shift needs a state before the first predicting one: a prompt of 2 tokens or more
    raw, norm = ches(model, LAYOUTS["packed"](pairs))
    for i, pair in enumerate(pairs):
        want_raw, want_norm, scale, scale_norm = naive_ches(model, pair, shift=-1)
        assert abs(raw[i].item() - want_raw) > 10 * RTOL * scale
        assert abs(norm[i].item() - want_norm) > 10 * RTOL * scale_norm


@pytest.mark.parametrize("layout", LAYOUTS)
def test_identical_responses_score_zero(model, layout):
    # CHES(x, y, y) = 0 by the formula; here only up to rounding: the two copies' states come from other places
    # of the batch (a packed rejected copy attends past the masked chosen one), so they may differ in the last bits.
    pairs = [
        TokenizedPair(p.prompt_ids, p.chosen_ids, p.chosen_ids, p.where)
        for p in random_pairs(4, model.config.vocab_size, seed=2)
    ]
    raw, norm = ches(model, LAYOUTS[layout](pairs))
    for i, pair in enumerate(pairs):
        _, _, scale, scale_norm = naive_ches(model, pair)
        assert abs(raw[i].item()) <= RTOL * scale and abs(norm[i].item()) <= RTOL * scale_norm


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("ld_alpha", [None, 0.5])
def test_one_forward_gives_compute_logps_bit_for_bit(model, layout, ld_alpha):
    batch = LAYOUTS[layout](random_pairs(5, vocab=model.config.vocab_size, seed=3))
    both = logps_and_ches(model, batch, ld_alpha=ld_alpha)
    with torch.no_grad():
        plain = compute_logps(model, batch, ld_alpha=ld_alpha)
    for got, want in zip(both[:4], plain):
        assert torch.equal(got, want)
    assert torch.equal(both.ches, ches(model, batch)[0]) and torch.equal(both.ches_norm, ches(model, batch)[1])


# ---------------------------------------------------------------------------------------------------- cache pass


def run_compute(model, pairs, out, collate_fn, **options):
    return compute(
        model,
        pairs,
        batch_size=3,
        collate_fn=collate_fn,
        device="cpu",
        dtype="float32",
        out=out,
        progress=False,
        **options,
    )


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_cache_pass_writes_ches_beside_the_same_logps(model, tmp_path, layout):
    pairs = random_pairs(8, vocab=model.config.vocab_size, seed=4)
    collate = {"padded": collate_padded, "packed": collate_packed}[layout]
    collate_fn = lambda ps, idx: collate(ps, idx, EOS)  # noqa: E731
    run_compute(model, pairs, tmp_path / "plain.npy", collate_fn, logps_fn=compute_logps)
    run_compute(
        model, pairs, tmp_path / "with.npy", collate_fn, logps_fn=logps_and_ches, ches_out=tmp_path / "ches.npy"
    )
    assert (tmp_path / "with.npy").read_bytes() == (tmp_path / "plain.npy").read_bytes()
    rows = np.load(tmp_path / "ches.npy")
    assert rows.dtype == np.float32 and rows.shape == (8, 2)
    for i, pair in enumerate(pairs):  # each pair alone: other padding and neighbours, so rounding apart
        raw, norm = ches(model, collate_fn([pair], [i]))
        _, _, scale, scale_norm = naive_ches(model, pair)
        assert abs(rows[i, 0] - raw.item()) <= RTOL * scale and abs(rows[i, 1] - norm.item()) <= RTOL * scale_norm
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ches.npy", "plain.npy", "with.npy"]  # no .tmp left


def test_interrupted_cache_pass_leaves_neither_file(model, tmp_path):
    def killed(m, batch):
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        run_compute(
            model,
            random_pairs(4, model.config.vocab_size, seed=5),
            tmp_path / "ref.npy",
            lambda ps, idx: collate_padded(ps, idx, EOS),
            logps_fn=killed,
            ches_out=tmp_path / "ches.npy",
        )
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------------- audit


@pytest.fixture(scope="module")
def audit_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("displacement")
    return str(save_model_folder(folder / "model")), str(write_jsonl(counting_pairs(9, seed=6), folder / "d.jsonl"))


def test_audit_ranks_the_riskiest_pairs(audit_files, capsys):
    from preftune.data.formats import iter_pairs, parse_columns
    from preftune.data.tokenize import tokenize_pairs
    from preftune.loading import load_causal_lm, load_tokenizer

    model_dir, data = audit_files
    assert main(["audit", data, "--model", model_dir, "--displacement", "--top", "3"]) == 0
    out = capsys.readouterr().out.splitlines()
    head = next(i for i, line in enumerate(out) if line.startswith("riskiest 3 pairs by ches_norm"))
    ranked = out[head + 1 :]
    assert [line.split(".")[0].strip() for line in ranked] == ["1", "2", "3"]
    assert any(line.startswith("likelihood displacement (CHES") and "9 pairs scored" in line for line in out)

    # The three printed are the naive pass's three highest CHES_norm, in order, with their values.
    prefs = [pair for pair, _ in iter_pairs(data, parse_columns(None))]  # as `preftune audit` reads them
    tokenized, _ = tokenize_pairs(prefs, load_tokenizer(model_dir))
    reference = load_causal_lm(model_dir)
    naive = sorted((naive_ches(reference, p) + (p.where,) for p in tokenized), key=lambda s: -s[1])
    assert all(naive[k][1] - naive[k + 1][1] > 2 * RTOL * naive[k][3] for k in range(3))  # a clear order
    for line, (raw, norm, scale, scale_norm, where) in zip(ranked, naive):
        assert f"{where}  ches_norm " in line
        printed_norm = float(line.split("ches_norm ")[1].split()[0])
        printed_raw = float(line.split(" ches ")[1].split()[0])
        assert printed_norm == pytest.approx(norm, rel=1e-3, abs=RTOL * scale_norm)  # printed to 4 digits
        assert printed_raw == pytest.approx(raw, rel=1e-3, abs=RTOL * scale)
    assert "chosen '" in ranked[0] and "rejected '" in ranked[0]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--displacement"], "--displacement scores pairs with a model: give --model (a --tokenizer is not enough)"),
        (["--top", "3"], "--top ranks the pairs of --displacement: give --displacement too"),
        (["--displacement", "--top", "0", "--model", "m"], "--top must be at least 1, got 0"),
    ],
)
def test_audit_displacement_errors(audit_files, capsys, extra, message):
    assert main(["audit", audit_files[1], *extra]) == 2
    assert capsys.readouterr().err == f"preftune: error: {message}\n"
