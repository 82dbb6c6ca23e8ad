"""Cached reference log-probs: values and row order, hits that skip the model, what the key depends on,
atomic writes, damaged files, tied weights."""

import copy

import numpy as np
import pytest
import torch

from preftune import refcache
from preftune.data.batching import collate_padded
from preftune.data.formats import PreferencePair
from preftune.data.tokenize import TokenizedPair, tokenize_pairs
from preftune.logps import padded_logps
from preftune.refcache import cache_key, compute, default_cache_dir, load_or_compute, weights_digest

from toy import build_model, build_tokenizer, counting_pairs

pytestmark = pytest.mark.exactness  # compares runs: CI runs it again under other CPU kernels

EOS = 2


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    return build_model(len(tokenizer), seed=0, hidden=32).eval()


@pytest.fixture(scope="module")
def pairs(tokenizer):
    rows = counting_pairs(7, seed=3)
    prefs = [PreferencePair(r["prompt"], r["chosen"], r["rejected"], f"toy row {i}") for i, r in enumerate(rows)]
    tokenized, _ = tokenize_pairs(prefs, tokenizer)
    return tokenized


def collate(batch_pairs, indices):
    return collate_padded(batch_pairs, indices, pad_id=EOS)


class CountingLogps:
    """padded_logps that counts its calls and can raise at call number `fail_at` (a crash mid-way)."""

    def __init__(self, fail_at=None):
        self.calls, self.fail_at = 0, fail_at

    def __call__(self, model, batch):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("killed")
        return padded_logps(model, batch)


def run_compute(model, pairs, out, logps_fn=padded_logps, batch_size=3):
    return compute(
        model,
        pairs,
        batch_size=batch_size,
        logps_fn=logps_fn,
        collate_fn=collate,
        device="cpu",
        dtype="float32",
        out=out,
        progress=False,
    )


def test_pairs_have_different_lengths(pairs):
    # The sort then really reorders pairs: row order in the file is checked by the next test.
    lengths = [len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) for p in pairs]
    assert len(set(lengths)) >= 3 and lengths != sorted(lengths, reverse=True)


def test_cached_values_equal_direct_logps_in_dataset_order(model, pairs, tmp_path):
    ref = run_compute(model, pairs, tmp_path / "ref.npy")
    # Direct: every pair in one unsorted batch, in dataset order.
    with torch.no_grad():
        want_chosen, want_rejected, _, _ = padded_logps(model, collate(pairs, list(range(len(pairs)))))
    assert len(ref) == len(pairs) and ref.array.shape == (7, 2) and ref.array.dtype == np.float32
    got_chosen, got_rejected = ref.lookup(torch.arange(len(pairs)), "cpu")
    torch.testing.assert_close(got_chosen, want_chosen, atol=1e-6, rtol=0)
    torch.testing.assert_close(got_rejected, want_rejected, atol=1e-6, rtol=0)
    # A lookup at scattered positions returns those rows, in the order asked.
    chosen, rejected = ref.lookup(torch.tensor([5, 0, 5]), "cpu")
    assert chosen.dtype == torch.float32 and chosen.shape == (3,)
    torch.testing.assert_close(chosen, want_chosen[[5, 0, 5]], atol=1e-6, rtol=0)
    torch.testing.assert_close(rejected, want_rejected[[5, 0, 5]], atol=1e-6, rtol=0)
    assert not list(tmp_path.glob("*.tmp"))


def test_lookup_rejects_out_of_range_index(model, pairs, tmp_path):
    ref = run_compute(model, pairs, tmp_path / "ref.npy")
    with pytest.raises(IndexError):
        ref.lookup(torch.tensor([-1]), "cpu")  # numpy alone would silently return the last row
    with pytest.raises(IndexError):
        ref.lookup(torch.tensor([7]), "cpu")


def test_compute_restores_training_mode(model, pairs, tmp_path):
    trained = copy.deepcopy(model).train()
    run_compute(trained, pairs, tmp_path / "ref.npy")
    assert trained.training


def test_second_load_is_a_hit_without_the_model(model, pairs, tmp_path):
    key = cache_key(weights=weights_digest(model), pairs=pairs, dtype="float32")
    counter = CountingLogps()
    first, hit = load_or_compute(tmp_path, key, lambda out: run_compute(model, pairs, out, counter))
    assert not hit and first.path == tmp_path / f"{key}.npy"
    assert counter.calls == 3  # 7 pairs in batches of 3
    second, hit = load_or_compute(tmp_path, key, lambda out: run_compute(model, pairs, out, counter))
    assert hit and counter.calls == 3 and second.path == first.path
    np.testing.assert_array_equal(np.asarray(second.array), np.asarray(first.array))


def pair(prompt, chosen, rejected):
    return TokenizedPair(prompt_ids=prompt, chosen_ids=chosen, rejected_ids=rejected, where="t")


BASE = [pair([1, 3, 4, 8], [8, 9, 10, 2], [9, 8, 10, 2]), pair([1, 3, 4, 5], [5, 6, 2], [6, 5, 2])]


def test_key_changes_with_each_input(model):
    weights = weights_digest(model)
    base = cache_key(weights=weights, pairs=BASE, dtype="float32", extra={"ld_alpha": None})

    nudged = copy.deepcopy(model)
    with torch.no_grad():
        nudged.model.layers[1].mlp.up_proj.weight[3, 5] += 1e-3
    one_token = [BASE[0], pair([1, 3, 4, 5], [5, 7, 2], [6, 5, 2])]
    truncated = [BASE[0], pair([1, 3, 4, 5], [5, 6], [6, 5])]  # responses cut one token shorter (EOS lost)
    prompt_cut = [BASE[0], pair([3, 4, 5], [5, 6, 2], [6, 5, 2])]  # prompt cut from the left
    # The same ids split differently between prompt and response: different log-probs, different key.
    boundary = [BASE[0], pair([1, 3, 4], [5, 5, 6, 2], [5, 6, 5, 2])]
    variants = {
        "weight": cache_key(weights=weights_digest(nudged), pairs=BASE, dtype="float32", extra={"ld_alpha": None}),
        "token": cache_key(weights=weights, pairs=one_token, dtype="float32", extra={"ld_alpha": None}),
        "truncation": cache_key(weights=weights, pairs=truncated, dtype="float32", extra={"ld_alpha": None}),
        "prompt_cut": cache_key(weights=weights, pairs=prompt_cut, dtype="float32", extra={"ld_alpha": None}),
        "boundary": cache_key(weights=weights, pairs=boundary, dtype="float32", extra={"ld_alpha": None}),
        "dtype": cache_key(weights=weights, pairs=BASE, dtype="bfloat16", extra={"ld_alpha": None}),
        "extra": cache_key(weights=weights, pairs=BASE, dtype="float32", extra={"ld_alpha": 0.5}),
        "no_extra": cache_key(weights=weights, pairs=BASE, dtype="float32"),
        "order": cache_key(weights=weights, pairs=BASE[::-1], dtype="float32", extra={"ld_alpha": None}),
        "subset": cache_key(weights=weights, pairs=BASE[:1], dtype="float32", extra={"ld_alpha": None}),
    }
    assert weights_digest(nudged) != weights
    assert len(set(variants.values()) | {base}) == len(variants) + 1, variants
    # Not part of the key: where a pair came from, and the order of keys in `extra`.
    relocated = [pair(p.prompt_ids, p.chosen_ids, p.rejected_ids) for p in BASE]
    relocated[0].where = "other.jsonl line 9"
    assert cache_key(weights=weights, pairs=relocated, dtype="float32", extra={"ld_alpha": None}) == base
    assert cache_key(weights=weights, pairs=BASE, dtype="float32", extra={"a": 1, "b": 2}) == cache_key(
        weights=weights, pairs=BASE, dtype="float32", extra={"b": 2, "a": 1}
    )
    assert len(base) == 64 and int(base, 16) >= 0  # 32-byte blake2b, hex


def test_key_is_stable_across_rebuilds(tokenizer, pairs):
    # Two "processes": the model rebuilt from the same seed, the pairs re-tokenized from the same rows.
    first = build_model(len(tokenizer), seed=0, hidden=32)
    second = build_model(len(tokenizer), seed=0, hidden=32)
    other_seed = build_model(len(tokenizer), seed=1, hidden=32)
    assert weights_digest(first) == weights_digest(second) != weights_digest(other_seed)
    copies = [TokenizedPair(list(p.prompt_ids), list(p.chosen_ids), list(p.rejected_ids), p.where) for p in pairs]
    assert cache_key(weights=weights_digest(first), pairs=pairs, dtype="float32") == cache_key(
        weights=weights_digest(second), pairs=copies, dtype="float32"
    )


def test_digest_sees_dtype_and_bf16_bytes(model):
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    assert weights_digest(bf16) != weights_digest(model)
    bumped = copy.deepcopy(bf16)
    with torch.no_grad():
        bumped.lm_head.weight.view(torch.int16)[0, 0] += 1  # one bf16 value moves by one ulp
    assert weights_digest(bumped) != weights_digest(bf16)
    assert weights_digest(copy.deepcopy(bf16)) == weights_digest(bf16)


def test_crash_midway_leaves_no_file(model, pairs, tmp_path):
    key = cache_key(weights=weights_digest(model), pairs=pairs, dtype="float32")
    crashing = CountingLogps(fail_at=2)
    with pytest.raises(RuntimeError, match="killed"):
        load_or_compute(tmp_path, key, lambda out: run_compute(model, pairs, out, crashing))
    assert list(tmp_path.iterdir()) == []  # neither the final file nor the temporary one
    # The next run computes from scratch (a miss), all 3 batches.
    counter = CountingLogps()
    _, hit = load_or_compute(tmp_path, key, lambda out: run_compute(model, pairs, out, counter))
    assert not hit and counter.calls == 3


def test_a_leftover_temporary_file_is_not_picked_up(model, pairs, tmp_path):
    # A process killed with SIGKILL cannot clean up: its complete-looking temporary file must still be ignored.
    key = "k"
    run_compute(model, pairs, tmp_path / f"{key}.npy.12345.tmp")
    counter = CountingLogps()
    _, hit = load_or_compute(tmp_path, key, lambda out: run_compute(model, pairs, out, counter))
    assert not hit and counter.calls == 3


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "wrong_shape", "wrong_dtype", "nan"])
def test_damaged_file_is_recomputed(model, pairs, tmp_path, damage, caplog):
    path = tmp_path / "k.npy"
    run_compute(model, pairs, path)
    good = np.load(path).copy()
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[:-12])
    elif damage == "garbage":
        path.write_bytes(b"\x00garbage" * 20)
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "wrong_shape":
        np.save(path, np.zeros((7, 3), dtype=np.float32))
    elif damage == "wrong_dtype":
        np.save(path, good.astype(np.float64))
    else:
        bad = good.copy()
        bad[4, 1] = np.nan
        np.save(path, bad)
    counter = CountingLogps()
    with caplog.at_level("WARNING", logger="preftune"):
        ref, hit = load_or_compute(tmp_path, "k", lambda out: run_compute(model, pairs, out, counter))
    assert not hit and counter.calls == 3
    np.testing.assert_array_equal(np.asarray(ref.array), good)
    assert len(caplog.records) == 1 and "damaged" in caplog.records[0].getMessage()


def test_row_count_mismatch_is_recomputed(model, pairs, tmp_path):
    run_compute(model, pairs[:5], tmp_path / "k.npy")
    counter = CountingLogps()
    ref, hit = load_or_compute(tmp_path, "k", lambda out: run_compute(model, pairs, out, counter), num_pairs=len(pairs))
    assert not hit and len(ref) == 7


def test_non_finite_reference_is_refused(model, pairs, tmp_path):
    def nan_logps(model, batch):
        chosen, rejected, c_len, r_len = padded_logps(model, batch)
        return chosen, torch.full_like(rejected, float("nan")), c_len, r_len

    with pytest.raises(ValueError, match="toy row .*non-finite"):
        run_compute(model, pairs, tmp_path / "k.npy", nan_logps)
    assert list(tmp_path.iterdir()) == []


def test_tied_embeddings_hashed_once(tokenizer, monkeypatch):
    tied = build_model(len(tokenizer), seed=0, hidden=32, tie=True)
    state = tied.state_dict()
    assert state["lm_head.weight"].data_ptr() == state["model.embed_tokens.weight"].data_ptr()

    hashed = []
    real = refcache._tensor_bytes
    monkeypatch.setattr(refcache, "_tensor_bytes", lambda t: hashed.append(t.shape) or real(t))
    digest = weights_digest(tied)
    # Every state-dict tensor once, except the tied lm_head.weight: one tensor fewer, not two embeddings.
    assert len(hashed) == len(state) - 1
    assert hashed.count(torch.Size([len(tokenizer), 32])) == 1
    # A deep copy keeps the tie and gives the same digest; untying (same values, two tensors) changes it.
    twin = copy.deepcopy(tied)
    assert twin.lm_head.weight is twin.model.embed_tokens.weight
    assert weights_digest(twin) == digest
    untied = copy.deepcopy(tied)
    untied.lm_head.weight = torch.nn.Parameter(untied.lm_head.weight.detach().clone())
    assert weights_digest(untied) != digest


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path / "mine"))
    assert default_cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("PREFTUNE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "preftune" / "reference"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "preftune" / "reference"


def test_bfloat16_runs_under_autocast(model, pairs, tmp_path):
    ref32 = run_compute(model, pairs, tmp_path / "f32.npy")
    ref16 = compute(
        model,
        pairs,
        batch_size=3,
        logps_fn=padded_logps,
        collate_fn=collate,
        device="cpu",
        dtype="bfloat16",
        out=tmp_path / "bf16.npy",
        progress=False,
    )
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want_chosen, _, _, _ = padded_logps(model, collate(pairs, list(range(len(pairs)))))
    got_chosen, _ = ref16.lookup(torch.arange(len(pairs)), "cpu")
    f32_chosen, _ = ref32.lookup(torch.arange(len(pairs)), "cpu")
    # bf16 matmuls round differently from float32 (here by ~1e-3 nats, hence the dtype in the key); the cached
    # values match direct autocast to well below that gap.
    assert (f32_chosen - want_chosen).abs().max() > 2e-4
    torch.testing.assert_close(got_chosen, want_chosen, atol=1e-4, rtol=0)
