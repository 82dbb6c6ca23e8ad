"""`--weights-dtype bfloat16`: the policy's weights, gradients and AdamW state in bfloat16 (half the memory of
float32), the LM head's log-sum-exp and the loss still in float32; float32 runs unchanged."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from preftune import recipe, refcache
from preftune.cli import main
from preftune.loading import load_causal_lm
from preftune.logps import token_logps

from helpers import records
from helpers import records as read_metrics
from toy import counting_pairs, save_model_folder, write_jsonl

BF16 = ["--weights-dtype", "bfloat16"]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    model = save_model_folder(root / "model")
    train = write_jsonl(counting_pairs(32, seed=1), root / "train.jsonl")
    return {"model": str(model), "train": str(train)}


def args(toy, out: Path, *extra: str, steps: int = 2) -> list[str]:
    return ["train", "--model", toy["model"], "--data", toy["train"], "--output", str(out), "--batch-size", "8"] + [
        "--max-steps",
        str(steps),
        "--learning-rate",
        "1e-3",
        *extra,
    ]


@pytest.fixture
def captured(monkeypatch):
    """The optimizer each run makes, to read its parameters and state after the run."""
    made = []
    make = recipe.make_optimizer

    def capture(s):
        optimizer, scheduler = make(s)
        made.append(optimizer)
        return optimizer, scheduler

    monkeypatch.setattr(recipe, "make_optimizer", capture)
    return made


def test_weights_grads_and_adamw_state_are_bfloat16(toy, tmp_path, captured):
    assert main(args(toy, tmp_path / "run", *BF16)) == 0
    (optimizer,) = captured
    params = [p for group in optimizer.param_groups for p in group["params"]]
    assert params and {p.dtype for p in params} == {torch.bfloat16}
    states = [optimizer.state[p] for p in params]
    assert {s[k].dtype for s in states for k in ("exp_avg", "exp_avg_sq")} == {torch.bfloat16}
    assert all(p.grad is None or p.grad.dtype == torch.bfloat16 for p in params)


def test_first_loss_is_ln2_within_bfloat16_rounding(toy, tmp_path):
    # Live reference (a bf16 copy of the policy on the same batch): the two passes are the same computation, so
    # h = 0 exactly and the loss is ln 2 as in float32.
    assert main(args(toy, tmp_path / "live", *BF16, "--no-ref-cache", steps=1)) == 0
    assert read_metrics(tmp_path / "live")[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    # Cached reference: its log-probs come from other batches (other padding), so each sequence's log-prob differs
    # by bf16 rounding of the hidden states (relative 2^-8 per value, ~1e-2 on a sum of a few tokens' log-probs).
    # h = β(Δπ − Δref) then is within ~0.1 × 4 × 1e-2, and the loss −log σ(h) ≈ ln 2 − h/2 within 2e-3.
    assert main(args(toy, tmp_path / "cached", *BF16, steps=1)) == 0
    assert read_metrics(tmp_path / "cached")[0]["loss"] == pytest.approx(math.log(2), abs=2e-3)


def test_log_sum_exp_is_float32_on_bfloat16_weights():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 5000, bias=False).to(torch.bfloat16)
    hidden = torch.randn(6, 16, dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, 5000, (6,))
    got = token_logps(hidden, head, targets, chunk=4)
    assert got.dtype == torch.float32
    logits = (hidden.detach() @ head.weight.detach().t()).float()  # the bf16 logits, reduced in float32
    want = logits.log_softmax(-1).gather(1, targets[:, None])[:, 0]
    torch.testing.assert_close(got.detach(), want, rtol=0, atol=1e-5)
    bf16_sum = logits.bfloat16().logsumexp(-1).float()  # the same reduction in bf16 would be off by far more
    assert (bf16_sum - logits.logsumexp(-1)).abs().max() > 1e-3
    got.sum().backward()
    assert hidden.grad.dtype == torch.bfloat16 and head.weight.grad.dtype == torch.bfloat16


def test_final_is_saved_in_bfloat16_and_loads(toy, tmp_path):
    out = tmp_path / "run"
    assert main(args(toy, out, *BF16)) == 0
    config = json.loads((out / "final" / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
    with safe_open(out / "final" / "model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    model = load_causal_lm(str(out / "final"), dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert main(args(toy, tmp_path / "again", *BF16, "--model", str(out / "final"), steps=1)) == 0


def test_cache_key_names_bfloat16_and_float32_keys_are_unchanged(toy, tmp_path, monkeypatch):
    seen = []
    key = refcache.cache_key
    monkeypatch.setattr(refcache, "cache_key", lambda **kw: seen.append(kw) or key(**kw))
    cache = ["--ref-cache", str(tmp_path / "cache")]
    assert main(args(toy, tmp_path / "f32", *cache, steps=1)) == 0
    assert main(args(toy, tmp_path / "bf16", *cache, *BF16, steps=1)) == 0
    f32, bf16 = seen
    assert "weights_dtype" not in f32["extra"] and f32["dtype"] == "float32"  # the key float32 runs always had
    assert bf16["extra"]["weights_dtype"] == "bfloat16" and bf16["dtype"] == "bfloat16"
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 2


def test_float32_weights_stay_float32(toy, tmp_path, captured):
    assert main(args(toy, tmp_path / "run", steps=1)) == 0
    (optimizer,) = captured
    assert {p.dtype for group in optimizer.param_groups for p in group["params"]} == {torch.float32}


def test_lora_on_bfloat16_base_trains(toy, tmp_path, captured):
    assert main(args(toy, tmp_path / "run", *BF16, "--lora-r", "4")) == 0
    (optimizer,) = captured
    assert all(math.isfinite(r["loss"]) for r in read_metrics(tmp_path / "run"))
    # peft keeps the adapter in float32 on a bf16 base (its autocast_adapter_dtype): only the frozen base halves.
    assert {p.dtype for group in optimizer.param_groups for p in group["params"]} == {torch.float32}


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--dtype", "float32"], "--dtype float32 contradicts it"),
        (["--lora-r", "4", "--load-in-4bit"], "not supported with --load-in-4bit"),
        (["--fsdp"], "not supported with --fsdp"),
    ],
)
def test_unsupported_combinations_give_one_line(toy, tmp_path, capsys, extra, message):
    out = tmp_path / "run"
    assert main(args(toy, out, *BF16, *extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("preftune: error:") and message in err[0]
    assert not out.exists()


def test_packed_layout_gives_the_padded_run_within_bfloat16_rounding(toy, tmp_path, capsys):
    """bfloat16 weights keep the packed layout (the start-up check allows bfloat16's rounding) and it trains as the
    plain padded layout does: the two sum the same terms in another order, so they differ by bfloat16 rounding
    (eps 7.8e-3 relative on activations, ~1e-3 of a summed log-prob), not by whole nats."""
    assert main(args(toy, tmp_path / "packed", *BF16, "--no-report", steps=3)) == 0
    assert "packed layout does not fit" not in capsys.readouterr().err
    assert main(args(toy, tmp_path / "padded", *BF16, "--no-report", "--layout", "padded", steps=3)) == 0
    packed, padded = records(tmp_path / "packed"), records(tmp_path / "padded")
    for key in ("loss", "logps/chosen", "logps/rejected"):
        for a, b in zip(packed, padded):
            assert a[key] == pytest.approx(b[key], rel=1e-2, abs=2e-2), key
