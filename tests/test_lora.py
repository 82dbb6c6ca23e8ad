"""LoRA through peft, end to end through the CLI on the toy Llama: only the adapter trains, the reference is the
base with the adapter disabled (never a copy), a folder holding an adapter trains further, resume is exact."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from preftune import lora, refcache
from preftune import recipe as train_module
from preftune.cli import main
from preftune.config import resolve
from preftune.loading import load_causal_lm
from preftune.logps import compute_logps
from preftune.reference import PolicyReference

from conftest import stopped_after
from helpers import losses
from toy import counting_pairs, save_model_folder, write_jsonl

pytestmark = pytest.mark.exactness  # compares runs: CI runs it again under other CPU kernels


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    return {
        "model": str(save_model_folder(root / "model")),
        "train": str(write_jsonl(counting_pairs(16, seed=1), root / "train.jsonl")),
        "root": root,
    }


def base_args(toy, out: Path, steps: int = 2, model: str | None = None) -> list[str]:
    return [
        "train",
        "--model",
        model or toy["model"],
        "--data",
        toy["train"],
        "--output",
        str(out),
        "--batch-size",
        "8",
        "--max-steps",
        str(steps),
        "--learning-rate",
        "1e-2",
        "--lr-scheduler",
        "constant",
    ]


def run_and_capture(args: list[str]) -> dict[str, torch.Tensor]:
    """Run the CLI; return the policy's full state just before final/ is written (save_final may merge in place)."""
    captured = {}
    save_final = train_module.save_final

    def capture(s):
        captured.update({k: v.detach().clone() for k, v in s.policy.state_dict().items()})
        return save_final(s)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_module, "save_final", capture)
        assert main(args) == 0
    return captured


@pytest.fixture(scope="module")
def fresh(toy):
    """One --lora-r 4 --merge run: its folder and the policy's final state dict."""
    out = toy["root"] / "fresh"
    state = run_and_capture(base_args(toy, out) + ["--lora-r", "4", "--merge"])
    return {"out": out, "state": state}


def test_first_loss_is_ln2_and_only_the_adapter_changes(toy, fresh):
    # B = 0 at the start: π = π_ref, h = 0, loss = −log σ(0) = ln 2.
    assert losses(fresh["out"])[0] == pytest.approx(math.log(2), abs=1e-6)
    base = load_file(Path(toy["model"]) / "model.safetensors")
    state = fresh["state"]
    adapter = {k: v for k, v in state.items() if ".lora_" in k}
    others = {k: v for k, v in state.items() if ".lora_" not in k}
    # 2 layers × 7 linear layers (q, k, v, o, gate, up, down) × (A, B)
    assert len(adapter) == 28 and len(others) == len(base)
    for name, tensor in others.items():  # every base weight bit-identical after training
        original = name.removeprefix("base_model.model.").replace(".base_layer", "")
        assert torch.equal(tensor, base[original]), name
    assert all(v.abs().sum() > 0 for k, v in adapter.items() if ".lora_B." in k)  # B moved away from 0


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")
def test_final_is_an_adapter_and_merged_is_a_plain_model(toy, fresh):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    final, merged_dir = fresh["out"] / "final", fresh["out"] / "final-merged"
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= {p.name for p in final.iterdir()}
    assert not (final / "model.safetensors").exists() and not (final / "reference").exists()
    config = json.loads((final / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["base_model_name_or_path"]) == (
        4,
        8.0,
        str(Path(toy["model"]).resolve()),
    )
    saved = load_file(final / "adapter_model.safetensors")
    assert len(saved) == 28 and all(".lora_" in k for k in saved)

    ids = torch.tensor([[1, 3, 4, 8, 5, 9, 10, 11]])  # <s> count from 5 : 5 6 7
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(toy["model"]), final).eval()
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    plain = AutoModelForCausalLM.from_pretrained(toy["model"]).eval()
    with torch.no_grad():
        a, m, p = adapted(ids).logits, merged(ids).logits, plain(ids).logits
    assert (a - m).abs().max() < 1e-5
    assert (a - p).abs().max() > 1e-3  # the adapter matters, so the comparison above means something


def test_reference_is_the_base_with_the_adapter_disabled_and_no_copy(toy, tmp_path):
    args = {
        "model": toy["model"],
        "data": toy["train"],
        "output": str(tmp_path / "run"),
        "batch_size": 8,
        "lora_r": 4,
        "no_ref_cache": True,
    }
    s = train_module.setup(resolve(args)[0])
    assert isinstance(s.reference, PolicyReference) and s.reference.model is s.policy
    # No second copy of the base: the reference's tensors are the policy's own.
    policy_storage = {p.data_ptr() for p in s.policy.parameters()}
    assert {p.data_ptr() for p in s.reference.model.parameters()} == policy_storage
    plain = train_module.setup(resolve({**args, "lora_r": 0, "output": str(tmp_path / "plain")})[0])
    assert not {p.data_ptr() for p in plain.reference.model.parameters()} & {
        p.data_ptr() for p in plain.policy.parameters()
    }

    with torch.no_grad():  # an adapter that has trained: B ≠ 0
        for name, p in s.policy.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn_like(p) * 0.1)
    batch = train_module.micro_batches(s, s.train_pairs, list(range(8)))[0]
    s.policy.train()
    ref_chosen, ref_rejected = s.reference.logps(batch)
    assert s.policy.training  # train mode is restored after the eval-mode reference pass
    assert all(p.requires_grad for n, p in s.policy.named_parameters() if ".lora_" in n)
    base = load_causal_lm(toy["model"])
    with torch.no_grad():
        base_chosen, base_rejected, _, _ = compute_logps(base, batch)
        s.policy.eval()
        policy_chosen, _, _, _ = compute_logps(s.policy, batch)
    assert torch.allclose(ref_chosen, base_chosen, atol=1e-6) and torch.allclose(ref_rejected, base_rejected, atol=1e-6)
    assert (policy_chosen - base_chosen).abs().max() > 1e-3


def test_live_reference_equals_the_cache_which_a_plain_run_shares(toy, tmp_path, capsys):
    cache = ["--ref-cache", str(tmp_path / "cache")]
    # A plain precompute fills the cache; a LoRA run finds it: the key is the base weights alone.
    assert main(["precompute", "--model", toy["model"], "--data", toy["train"], "--batch-size", "8"] + cache) == 0
    capsys.readouterr()
    cached, live = tmp_path / "cached", tmp_path / "live"
    assert main(base_args(toy, cached) + cache + ["--lora-r", "4", "--lora-dropout", "0.1"]) == 0
    assert "reference log-probs: reused" in capsys.readouterr().err
    assert main(base_args(toy, live) + ["--no-ref-cache", "--lora-r", "4", "--lora-dropout", "0.1"]) == 0
    assert losses(cached)[0] == pytest.approx(math.log(2), abs=1e-6)
    assert losses(cached) == pytest.approx(losses(live), abs=1e-6)
    assert losses(cached)[1] < losses(cached)[0]


def test_resume_with_lora_reproduces_the_adapter(toy, tmp_path):
    def args(out):
        return base_args(toy, out, steps=3) + [
            "--lora-r",
            "4",
            "--lora-dropout",
            "0.1",
            "--save-every",
            "1",
            "--lora-targets",
            "q_proj,self_attn.v_proj,embed_tokens",
        ]

    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert main(args(whole)) == 0

    with stopped_after(2):
        assert main(args(cut)) == 130
    assert main(args(cut) + ["--resume"]) == 0
    assert losses(cut) == losses(whole)
    a, b = (
        load_file(whole / "final" / "adapter_model.safetensors"),
        load_file(cut / "final" / "adapter_model.safetensors"),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # 2 layers × (q_proj, v_proj) × (A, B) + the embedding's A and B; never the frozen embedding matrix itself
    assert len(a) == 10 and all(".lora_" in k for k in a)


def test_a_folder_with_an_adapter_trains_that_adapter_further(toy, fresh, tmp_path):
    start = fresh["out"] / "final"
    cached, live = tmp_path / "cached", tmp_path / "live"
    state = run_and_capture(base_args(toy, cached, model=str(start)) + ["--merge"])
    assert main(base_args(toy, live, model=str(start)) + ["--no-ref-cache"]) == 0
    # The reference is the model as loaded (base + the adapter's initial state): ln 2 again at the first step.
    assert losses(cached)[0] == pytest.approx(math.log(2), abs=1e-6)
    assert losses(cached) == pytest.approx(losses(live), abs=1e-6)
    initial = load_file(start / "adapter_model.safetensors")
    trained = load_file(cached / "final" / "adapter_model.safetensors")
    assert trained.keys() == initial.keys() and any(not torch.equal(trained[k], initial[k]) for k in initial)
    base = load_file(Path(toy["model"]) / "model.safetensors")
    for name, tensor in state.items():
        if ".lora_" not in name:
            assert torch.equal(tensor, base[name.removeprefix("base_model.model.").replace(".base_layer", "")]), name
    config = json.loads((cached / "final" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["base_model_name_or_path"] == str(Path(toy["model"]).resolve())
    assert (cached / "final-merged" / "model.safetensors").exists()


def test_reference_digest_covers_base_adapter_and_its_settings(toy, fresh, tmp_path):
    def model():
        return load_causal_lm(toy["model"])

    plain_digest = refcache.weights_digest(model())
    cfg = resolve({"model": toy["model"], "data": "d", "output": "o", "lora_r": 4})[0]
    assert lora.reference_digest(lora.wrap(model(), cfg), cfg) == plain_digest  # a fresh adapter: the base alone

    folder = tmp_path / "adapter"
    shutil.copytree(fresh["out"] / "final", folder)
    cfg = resolve({"model": str(folder), "data": "d", "output": "o"})[0]
    first = lora.reference_digest(lora.wrap(model(), cfg), cfg)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": 16}))
    second = lora.reference_digest(lora.wrap(model(), cfg), cfg)
    assert len({plain_digest, first, second}) == 3  # α is no tensor, yet it changes the reference


def adapter_folder(fresh, tmp_path: Path, **changes) -> str:
    folder = tmp_path / "adapter"
    shutil.copytree(fresh["out"] / "final", folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, **changes}))
    return str(folder)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--merge"], "--merge has no effect without --lora-r"),
        (["--lora-alpha", "8"], "--lora-alpha has no effect without --lora-r"),
        (["--lora-r", "-1"], "--lora-r must be zero or positive, got -1"),
        (["--lora-r", "4", "--lora-dropout", "1"], "--lora-dropout must be in [0, 1), got 1.0"),
        (["--lora-r", "4", "--lora-alpha", "0"], "--lora-alpha must be positive, got 0.0"),
        (
            ["--lora-r", "4", "--lora-targets", "q_proj,qproj"],
            "--lora-targets: no linear or embedding module named 'qproj' in the model (its modules: down_proj, embed_tokens",
        ),
        (["--lora-r", "4", "--lora-targets", "lm_head"], "--lora-targets: lm_head is the output layer"),
    ],
)
def test_lora_flag_mistakes(toy, tmp_path, capsys, extra, message):
    out = tmp_path / "run"
    assert main(base_args(toy, out) + extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("preftune: error: ") and message in err[-1], err[-1]
    assert "Traceback" not in "\n".join(err) and not out.exists()


def test_adapter_folder_mistakes(toy, fresh, tmp_path, capsys):
    out = tmp_path / "run"
    cases = [
        (adapter_folder(fresh, tmp_path / "a"), ["--lora-r", "8"], "--lora-r: --model "),
        (
            adapter_folder(fresh, tmp_path / "b", base_model_name_or_path=str(tmp_path / "gone")),
            [],
            "field 'base_model_name_or_path' names",
        ),
        (
            adapter_folder(fresh, tmp_path / "c", peft_type="PREFIX_TUNING"),
            [],
            "field 'peft_type' must be LORA, got 'PREFIX_TUNING'",
        ),
    ]
    pickled = adapter_folder(fresh, tmp_path / "d")
    Path(pickled, "adapter_model.safetensors").rename(Path(pickled, "adapter_model.bin"))
    cases.append((pickled, [], "holds only pickle adapter weights"))
    for folder, extra, message in cases:
        assert main(base_args(toy, out, model=folder) + extra) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert message in err[-1] and "Traceback" not in "\n".join(err), err[-1]
        assert not out.exists()
